"""The order samples are trained in: upstream's data resampling and length grouping.

* ``--use_data_resampling``: each dataset is drawn with probability proportional to the square root of
  its size instead of its size, so small datasets are seen more often (upstream's weights).
* ``--group_by_length``: upstream's (LLaVA's) length-grouped order: random megabatches of
  ``world_size x gradient_accumulation_steps x batch_size`` samples, each sorted by length (longest
  first) and dealt to the ranks in chunks of equal total length, so that the micro-batches of one
  optimizer step pad little and take about as long on every rank.
"""

from __future__ import annotations

import json
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from vitp.data.meta import SampleError


def dataset_weights(sizes: Sequence[int], resampling: bool) -> list[float]:
    """Probability of drawing from each dataset: proportional to its size, or its square root."""
    raw = [float(np.sqrt(n)) if resampling else float(n) for n in sizes]
    total = sum(raw)
    return [w / total for w in raw] if total else raw


def resampled_indices(sizes: Sequence[int], weights: Sequence[float], count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` entries drawn with replacement: a dataset by ``weights``, then an entry of it uniformly.
    Entries are numbered dataset after dataset (the dataset's own order)."""
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    chosen = rng.choice(len(sizes), size=count, p=weights)
    within = (rng.random(count) * np.asarray(sizes)[chosen]).astype(np.int64)
    return offsets[chosen] + within


class ResamplingSampler(Sampler[int]):
    """An epoch of ``len(dataset)`` entries drawn by sqrt-of-size dataset weights, seeded per epoch."""

    def __init__(self, sizes: Sequence[int], seed: int):
        self.sizes = list(sizes)
        self.weights = dataset_weights(self.sizes, resampling=True)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(self.sizes)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng((self.seed, self.epoch))
        self.epoch += 1  # the next epoch's order, should no one call set_epoch
        return iter(resampled_indices(self.sizes, self.weights, len(self), rng).tolist())


def estimated_lengths(dataset, length_key: str) -> list[int]:
    """Upstream's length estimate of every entry: the line's precomputed ``length_key`` if it has one,
    else the tokens of its conversation text plus the image tokens of the most tiles it can have.
    Only the JSONL line is read (no image is opened)."""
    settings = dataset.settings
    lengths, cache = [], {}
    for dataset_index, line in dataset.entries:
        key = (int(dataset_index), int(line))
        if key not in cache:
            cache[key] = _estimate(dataset, *key, settings, length_key)
        lengths.append(cache[key])
    return lengths


def _estimate(dataset, dataset_index: int, line: int, settings, length_key: str) -> int:
    index, spec = dataset.indexes[dataset_index], dataset.specs[dataset_index]
    raw = index.raw(line)
    try:
        item = json.loads(raw)
        if isinstance(item.get(length_key), int):
            return int(item[length_key])
        sample = index.sample(line)
    except (ValueError, AttributeError, SampleError):
        return 0  # a bad line is replaced by another one when it is built; any length will do
    text = "\n".join(turn.text for turn in sample.turns)
    tokens = len(dataset.tokenizer(text, add_special_tokens=False)["input_ids"])
    most_tiles = (spec.max_dynamic_patch or settings.max_dynamic_patch) + int(settings.use_thumbnail)
    return tokens + (settings.num_image_token * most_tiles if sample.images else 0)


def length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                           generator: torch.Generator) -> list[int]:
    """A random permutation cut into megabatches of ``world_size x batch_size``; each megabatch sorted by
    length, longest first, and split into ``world_size`` chunks of about equal total length."""
    indices = torch.randperm(len(lengths), generator=generator).tolist()
    megabatch = world_size * batch_size
    order = []
    for start in range(0, len(indices), megabatch):
        group = sorted(indices[start : start + megabatch], key=lambda i: lengths[i], reverse=True)
        for chunk in even_chunks(group, lengths, world_size):
            order += chunk
    return order


def even_chunks(indices: list[int], lengths: Sequence[int], chunks: int) -> list[list[int]]:
    """Deal indices (longest first) to the chunk with the least total length so far, each chunk
    taking an equal count; round-robin when the count does not divide evenly."""
    if len(indices) % chunks:
        return [indices[i::chunks] for i in range(chunks)]
    per_chunk = len(indices) // chunks
    result: list[list[int]] = [[] for _ in range(chunks)]
    totals = [0.0] * chunks
    for index in indices:
        shortest = totals.index(min(totals))
        result[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(result[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return result


class LengthGroupedSampler(Sampler[int]):
    """Upstream's length-grouped order (see the module docstring), seeded per epoch."""

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int, seed: int):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1  # the next epoch's order, should no one call set_epoch
        return iter(length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator))
