"""Retrieval metrics over ranked gallery ids, vectorised over queries.

Definitions (``rel_i`` = 1 when the gallery image at rank ``i`` has the query's class; ``R`` = number
of gallery images of the query's class, not counting the query itself in leave-one-out):

* Top-K accuracy (the seed's): a query counts as a hit if any of its top K shares its class.
* Precision@K: ``sum(rel_1..K) / K``.
* AP@K: ``sum_i P@i * rel_i / min(R, K)`` over i <= K; mAP@K its mean.
* AP (full ranking): ``sum_i P@i * rel_i / R`` over the whole gallery ranked by exact score (on a
  tie, relevant items first); mAP its mean. Computed in chunks of queries
  (:func:`average_precision`), so the query x gallery score matrix is never held whole.

Queries with ``R = 0`` (their class is absent from the gallery) cannot be answered; the caller
excludes them and reports them instead of counting them as misses.
"""

from __future__ import annotations

import numpy as np
import torch

# Memory for one chunk of full-ranking AP: the scores and their sorted copy, 4 bytes each per
# (query, gallery) pair.
_BYTES_PER_PAIR = 8
DEFAULT_CHUNK_BYTES = 256 * 2**20


def class_ids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The class names, sorted as text, and each label's id: its position among them.

    The one place where class names become integer ids. A table indexed by these ids takes its names
    from ``names[id]``; the ids themselves are never turned back into text and sorted again, because
    text sorts differently from numbers ("10" before "2") and ids would land on other classes' names.
    """
    names, ids = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    return names, ids.reshape(-1)


def encode_labels(query_labels: np.ndarray, gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class names and integer class ids of queries and gallery (one shared vocabulary, :func:`class_ids`)."""
    names, ids = class_ids(np.concatenate([np.asarray(query_labels).astype(str), np.asarray(gallery_labels).astype(str)]))
    return names, ids[: len(query_labels)], ids[len(query_labels) :]


def relevant_counts(
    query_classes: np.ndarray, gallery_classes: np.ndarray, num_classes: int, exclude: np.ndarray | None = None
) -> np.ndarray:
    """R per query: gallery images of its class, minus the query itself when it is excluded."""
    per_class = np.bincount(gallery_classes, minlength=num_classes)
    counts = per_class[query_classes].astype(np.int64)
    if exclude is not None:
        excluded = exclude >= 0
        same = np.zeros(len(query_classes), dtype=bool)
        same[excluded] = gallery_classes[exclude[excluded]] == query_classes[excluded]
        counts -= same
    return counts


def hit_matrix(ids: np.ndarray, query_classes: np.ndarray, gallery_classes: np.ndarray) -> np.ndarray:
    """Boolean [n, k]: whether the result at each rank has the query's class (id -1: no result)."""
    found = ids >= 0
    return found & (gallery_classes[np.where(found, ids, 0)] == query_classes[:, None])


def top_k_hits(hits: np.ndarray, k: int) -> np.ndarray:
    return hits[:, :k].any(axis=1)


def precision_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    return hits[:, :k].sum(axis=1) / k


def average_precision_at_k(hits: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    top = hits[:, :k]
    precision_at_rank = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
    return (precision_at_rank * top).sum(axis=1) / np.maximum(np.minimum(relevant, k), 1)


def average_precision(
    queries: np.ndarray,
    gallery: np.ndarray,
    query_classes: np.ndarray,
    gallery_classes: np.ndarray,
    relevant: np.ndarray,
    exclude: np.ndarray | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> np.ndarray:
    """AP of each query over the full ranking of the gallery by inner product.

    Only the ranks of the relevant items matter: the m-th best relevant item (1-based) sits at rank
    ``m + (irrelevant items scoring above it)``. So each query's row of scores is sorted once (numpy's
    SIMD sort, values only) and the relevant scores are located in it by binary search; no argsort
    of the gallery is needed. Tied scores rank relevant items first. Queries go in chunks whose scores
    fit in ``chunk_bytes``; an excluded id (leave-one-out) is neither ranked nor relevant.
    """
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    if not gallery.flags.writeable:  # a read-only memory map (vectors.npy): torch wants its own copy
        gallery = gallery.copy()
    gallery_t = torch.from_numpy(gallery)
    size = len(gallery)
    by_class = np.argsort(gallery_classes, kind="stable")
    class_starts = np.searchsorted(gallery_classes[by_class], np.arange(gallery_classes.max() + 2))
    rows = max(1, chunk_bytes // (_BYTES_PER_PAIR * size))
    result = np.zeros(len(queries), dtype=np.float64)
    for start in range(0, len(queries), rows):
        stop = min(start + rows, len(queries))
        scores = (torch.from_numpy(np.ascontiguousarray(queries[start:stop], dtype=np.float32)) @ gallery_t.T).numpy()
        if exclude is not None:
            own = exclude[start:stop]
            scores[np.flatnonzero(own >= 0), own[own >= 0]] = -np.inf
        ascending = np.sort(scores, axis=1)
        for row, query in enumerate(range(start, stop)):
            cls = query_classes[query]
            members = by_class[class_starts[cls] : class_starts[cls + 1]] if cls < len(class_starts) - 1 else by_class[:0]
            if exclude is not None:
                members = members[members != exclude[query]]
            if not len(members):
                continue
            relevant_scores = np.sort(scores[row, members])  # ascending
            # Items scoring strictly above each relevant score: all of them, and the relevant ones among them.
            above_all = size - np.searchsorted(ascending[row], relevant_scores, side="right")
            above_relevant = len(members) - np.searchsorted(relevant_scores, relevant_scores, side="right")
            best_first = np.arange(len(members), 0, -1)  # the ascending order's m (1 = best)
            ranks = best_first + (above_all - above_relevant)
            result[query] = (best_first / ranks).sum() / max(relevant[query], 1)
    return result
