"""Post-processing of retrieval vectors, as batched matrix operations.

(PCA / whitening is part of the FAISS index: see :func:`vitp.retrieval.backends.faiss.fit_pca`.)

* :func:`weighted_expansion` — the formula shared by query expansion and database-side augmentation
  (Radenović et al., "Fine-tuning CNN image retrieval with no human annotation", 2018):
  ``x' = normalise(x + sum_i w_i * n_i)`` over the top-k neighbours ``n_i`` of ``x``, with
  ``w_i = max(score_i, 0) ** alpha``. ``alpha = 0`` gives every neighbour weight 1: average query
  expansion (the seed's re-ranking, which averages the query with its top-k). ``alpha > 0`` is α-QE.
* Query expansion (QE) applies it to the queries and searches again; database-side augmentation
  (DBA) applies it to every gallery vector, with its neighbours in the gallery, before indexing.
"""

from __future__ import annotations

import numpy as np


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32, copy=False)


def weighted_expansion(
    vectors: np.ndarray, neighbour_vectors: np.ndarray, neighbour_scores: np.ndarray, alpha: float
) -> np.ndarray:
    """``normalise(x + sum_i max(s_i, 0)**alpha * n_i)`` for a batch: x [n, d], n_i [n, k, d], s [n, k].

    Missing neighbours (FAISS returns id -1 when it finds fewer than k) must come with score ``-inf``
    or NaN; they get weight 0.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (0 = average expansion), got {alpha}")
    present = np.isfinite(neighbour_scores)
    weights = np.where(present, np.power(np.clip(np.nan_to_num(neighbour_scores, nan=0.0, neginf=0.0), 0, None), alpha), 0.0)
    # (n, 1, k) @ (n, k, d) -> (n, 1, d): one small matrix product per row, batched.
    expanded = vectors + np.matmul(weights.astype(np.float32)[:, None, :], neighbour_vectors)[:, 0]
    return l2_normalise(expanded)
