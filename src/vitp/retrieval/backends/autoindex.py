"""Choosing and tuning a FAISS index under a memory budget, by autofaiss's documented rule.

(autofaiss itself pins numpy < 2, so its rule is implemented here: Flat below 1000 vectors; else HNSW
with as many links as fit (8 to 32); else, below a million vectors, IVF,Flat if it fits; else
``OPQ<m>_<y>,IVF<n>[_HNSW32],PQ<m>x8`` with the largest code size ``m`` that fits.)

Three changes, each measured or needed on a small machine:

* the IVF list count is also capped so that a k-means training sample of 39 vectors per list
  (FAISS's own minimum), with a working copy, fits in half the budget: the whole build, training
  included, stays near the budget;
* the OPQ output ``y`` is the smallest multiple of ``m`` not below ``d`` (autofaiss adds one more
  ``m``): on 10^5 clustered 256-d vectors, PQ128 after OPQ128_384 found 0.845 of the exact top-10,
  after OPQ128_256 0.898 (benchmarks/scale.py's data, nprobe 16);
* OPQ trains for :data:`OPQ_ITERATIONS` rounds instead of FAISS's 50, on one codebook's worth of
  vectors (39 per centroid), and no polysemous codes are trained (vitp never searches with Hamming
  thresholds).

Search-time tuning (:func:`tune_search`) is autofaiss's too: the largest nprobe (IVF) or efSearch
(HNSW) whose measured time per query stays under ``max_query_ms``, found by bisection.
:func:`recall_at_k` compares the index with exact search on held-out gallery vectors.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

# autofaiss's thresholds.
FLAT_BELOW = 1_000  # vectors: an exact index is as fast
QUANTIZE_FROM = 10_000  # vectors: fewer cannot train a PQ codebook (256 centroids per sub-quantizer)
IVF_FLAT_BELOW = 1_000_000  # vectors: beyond, unquantized IVF lists cost too much memory
PQ_CODE_SIZES = (256, 128, 64, 48, 32, 24, 16, 8, 4)  # bytes per vector, largest (most accurate) first
ID_BYTES = 8  # an int64 id per vector in the inverted lists
MIN_TRAIN_PER_LIST = 39  # FAISS warns below this many training vectors per k-means centroid
TRAIN_PER_LIST = 100  # what autofaiss gives k-means when memory allows
PQ_TRAIN_ROWS = 256 * MIN_TRAIN_PER_LIST  # a PQ codebook has 256 centroids
DEFAULT_MAX_QUERY_MS = 10.0  # autofaiss's default query-time target
OPQ_ITERATIONS = 10

_MEMORY = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """``"4GB"``, ``"512M"``, ``"1.5GiB"``, ``"300000000"`` -> bytes (K, M, G, T are powers of 1024)."""
    match = _MEMORY.fullmatch(text)
    if not match:
        raise ValueError(f"cannot read {text!r} as an amount of memory; write it as 4GB, 512MB, 1.5GiB or bytes")
    value = float(match[1]) * 1024 ** " kmgt".index(match[2].lower() or " ")
    return int(value)


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


@dataclass(frozen=True)
class IndexChoice:
    factory: str
    estimated_bytes: int
    lists: int  # IVF lists (0 for Flat and HNSW)
    train_rows: int  # vectors k-means and PQ train on (0: no training)
    reason: str


def ivf_list_choices(count: int) -> list[int]:
    """autofaiss's list counts for ``count`` vectors, best first (FAISS's guideline: 4..16 sqrt(N) below
    a million, then 2^14 to 2^20 as the gallery grows)."""
    if count < 1_000_000:
        power = 2 ** round(math.log2(4 * math.sqrt(count)))
        return [power, 2 * power, round(4 * math.sqrt(count))]
    if count < 10_000_000:
        return [16_384, 65_536]
    if count < 300_000_000:
        return [65_536, 2**17, 2**18]
    return [2**17, 2**18, 65_536, 2**20]


def lists_within(count: int, dimension: int, budget: int) -> int:
    """The first of :func:`ivf_list_choices`, halved until a training sample of 39 vectors per list fits
    in half the budget (float32, with room for one working copy: IVF-PQ trains on residuals)."""
    lists = ivf_list_choices(count)[0]
    while lists > 1 and MIN_TRAIN_PER_LIST * lists * dimension * 4 * 2 > budget // 2:
        lists //= 2
    return max(1, min(lists, count // MIN_TRAIN_PER_LIST or 1))


def training_rows(count: int, dimension: int, lists: int, quantized: bool, budget: int | None) -> int:
    """Vectors to train on: ~100 per IVF list as autofaiss gives, within a quarter of the budget (FAISS
    makes a few working copies: rotated, residuals), but at least 39 per list and enough for the PQ
    codebooks; never more than the gallery."""
    wanted = max(TRAIN_PER_LIST * lists, PQ_TRAIN_ROWS if quantized else 0)
    if budget is not None:
        affordable = budget // 4 // (dimension * 4 * 2)
        wanted = min(wanted, max(affordable, MIN_TRAIN_PER_LIST * lists, PQ_TRAIN_ROWS if quantized else 0))
    return min(count, wanted)


def estimate_bytes(factory: str, count: int, dimension: int) -> int:
    """Memory of a filled index of the kinds :func:`choose_index` makes (autofaiss's estimates)."""
    if factory == "Flat":
        return count * dimension * 4
    if match := re.fullmatch(r"HNSW(\d+)", factory):
        return count * (dimension * 4 + int(match[1]) * 2 * 4)
    if match := re.fullmatch(r"IVF(\d+),Flat", factory):
        return count * (dimension * 4 + ID_BYTES) + int(match[1]) * dimension * 4
    if match := re.fullmatch(r"OPQ(\d+)_(\d+),IVF(\d+)(_HNSW32)?,PQ\d+x8", factory):
        m, y, lists = int(match[1]), int(match[2]), int(match[3])
        size = count * (m + ID_BYTES) + lists * y * 4 + dimension * y * 4 + 256 * y * 4
        return size + (lists * 32 * 2 * 4 if match[4] else 0)
    raise ValueError(f"no memory estimate for index type {factory!r}")


def choose_index(count: int, dimension: int, budget: int) -> IndexChoice:
    """The most accurate index of ``count`` x ``dimension`` vectors that fits in ``budget`` bytes."""
    if count < FLAT_BELOW:
        return IndexChoice("Flat", estimate_bytes("Flat", count, dimension), 0, 0, f"fewer than {FLAT_BELOW} vectors")
    links = (budget // (4 * count) - dimension) // 2
    if links >= 8:
        factory = f"HNSW{min(links, 32)}"
        return IndexChoice(factory, estimate_bytes(factory, count, dimension), 0, 0,
                           "a graph over the exact vectors fits in the budget")
    lists = lists_within(count, dimension, budget)
    if count < IVF_FLAT_BELOW:
        factory = f"IVF{lists},Flat"
        size = estimate_bytes(factory, count, dimension)
        if size <= budget:
            return IndexChoice(factory, size, lists, training_rows(count, dimension, lists, False, budget),
                               "the exact vectors fit in the budget, in inverted lists")
    if count < QUANTIZE_FROM:
        raise ValueError(
            f"{count} vectors of {dimension} dimensions need at least {human_bytes(estimate_bytes(f'IVF{lists},Flat', count, dimension))} "
            f"unquantized, and fewer than {QUANTIZE_FROM} vectors are too few to train a product quantizer; "
            f"allow more memory"
        )
    coarse = f"IVF{lists}_HNSW32" if lists >= 1000 else f"IVF{lists}"
    for m in PQ_CODE_SIZES:
        if m >= dimension:
            continue
        rotated = -(-dimension // m) * m  # OPQ output: the smallest multiple of m that loses no dimension
        factory = f"OPQ{m}_{rotated},{coarse},PQ{m}x8"
        size = estimate_bytes(factory, count, dimension)
        if size <= budget:
            return IndexChoice(factory, size, lists, training_rows(count, dimension, lists, True, budget),
                               f"quantized to {m} bytes per vector to fit the budget")
    smallest = f"OPQ4_{-(-dimension // 4) * 4},{coarse},PQ4x8"
    raise ValueError(
        f"{count} vectors need at least {human_bytes(estimate_bytes(smallest, count, dimension))} even at 4 bytes "
        f"per vector ({smallest}); allow more memory"
    )


# --------------------------------------------------------------------------------------------------
# Search-time tuning


@dataclass(frozen=True)
class Tunable:
    name: str  # what the report calls it
    values: list[int]
    parameters: Callable[[int], dict[str, int]]  # value -> FAISS search parameters


def tunable_parameter(factory: str, lists: int) -> Tunable | None:
    """What trades speed for recall in this kind of index (None: nothing, e.g. Flat)."""
    if re.search(r"IVF\d+_HNSW", factory):
        return Tunable("nprobe", list(range(16, min(6144, lists) + 1)) or [lists],
                       lambda n: {"nprobe": n, "quantizer_efSearch": 2 * n})
    if "IVF" in factory:
        return Tunable("nprobe", list(range(1, min(6144, lists) + 1)), lambda n: {"nprobe": n})
    if factory.startswith("HNSW"):
        return Tunable("efSearch", list(range(16, 2**14)), lambda ef: {"efSearch": ef})
    return None


def tune_search(
    measure_ms: Callable[[dict[str, int]], float], tunable: Tunable, max_query_ms: float
) -> tuple[dict[str, int], float]:
    """The largest value whose time per query (``measure_ms(parameters)``) is under ``max_query_ms``
    (the smallest value if none is): bisection, as time grows with the value."""
    low, high = 0, len(tunable.values) - 1
    best = 0
    timings: dict[int, float] = {}

    def time_of(position: int) -> float:
        if position not in timings:
            timings[position] = measure_ms(tunable.parameters(tunable.values[position]))
        return timings[position]

    while low <= high:
        middle = (low + high) // 2
        if time_of(middle) < max_query_ms:
            best, low = middle, middle + 1
        else:
            high = middle - 1
    return tunable.parameters(tunable.values[best]), time_of(best)


def time_per_query_ms(search: Callable[[np.ndarray], object], queries: np.ndarray, min_seconds: float = 0.2) -> float:
    """Milliseconds per query of batched searches, repeated for at least ``min_seconds`` (after one
    warm-up batch), as a served index would run them."""
    search(queries[: max(1, len(queries) // 10)])
    searched, started = 0, time.perf_counter()
    while True:
        search(queries)
        searched += len(queries)
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return 1000 * elapsed / searched


def recall_at_k(approximate_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approximate top-k  ∩  exact top-k| / k."""
    k = exact_ids.shape[1]
    found = [len(np.intersect1d(a[a >= 0], e[e >= 0])) for a, e in zip(approximate_ids, exact_ids)]
    return float(np.mean(found) / k)
