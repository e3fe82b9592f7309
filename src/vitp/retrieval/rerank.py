"""Post-processing of retrieval vectors, as batched matrix operations.

* :class:`PCAWhitening` — PCA to ``d`` dimensions, optionally whitened (each component divided by
  its standard deviation), then L2-normalised. Learned on the gallery or on a separate set.
* :func:`weighted_expansion` — the formula shared by query expansion and database-side augmentation
  (Radenović et al., "Fine-tuning CNN image retrieval with no human annotation", 2018):
  ``x' = normalise(x + sum_i w_i * n_i)`` over the top-k neighbours ``n_i`` of ``x``, with
  ``w_i = max(score_i, 0) ** alpha``. ``alpha = 0`` gives every neighbour weight 1: average query
  expansion (the seed's re-ranking, which averages the query with its top-k). ``alpha > 0`` is α-QE.
* Query expansion (QE) applies it to the queries and searches again; database-side augmentation
  (DBA) applies it to every gallery vector, with its neighbours in the gallery, before indexing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitp.errors import VitpError

# Rows processed at a time when fitting PCA: bounds the float64 copy to chunk x D.
_FIT_CHUNK_ROWS = 65536


class PostProcessingError(VitpError):
    """Post-processing settings that cannot work on the data given."""


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32, copy=False)


@dataclass
class PCAWhitening:
    """``y = normalise(((x - mean) @ components) / sqrt(eigenvalues) if whiten)``."""

    mean: np.ndarray  # float32 [D]
    components: np.ndarray  # float32 [D, d], columns by decreasing variance
    eigenvalues: np.ndarray  # float32 [d], variance along each component
    whiten: bool

    @property
    def input_dimension(self) -> int:
        return int(self.components.shape[0])

    @property
    def output_dimension(self) -> int:
        return int(self.components.shape[1])

    @classmethod
    def fit(cls, vectors: np.ndarray, dimensions: int, whiten: bool, source: str = "the fit set") -> "PCAWhitening":
        count, input_dimension = vectors.shape
        if not 1 <= dimensions <= input_dimension:
            raise PostProcessingError(f"--pca {dimensions}: must be between 1 and the feature dimension {input_dimension}")
        if dimensions > count - 1:
            raise PostProcessingError(
                f"--pca {dimensions}: {source} has {count} vectors, which span at most {count - 1} dimensions "
                f"around their mean; fit PCA on more vectors (--pca_fit) or use fewer dimensions"
            )
        mean = np.zeros(input_dimension, dtype=np.float64)
        for start in range(0, count, _FIT_CHUNK_ROWS):
            mean += vectors[start : start + _FIT_CHUNK_ROWS].sum(axis=0, dtype=np.float64)
        mean /= count
        covariance = np.zeros((input_dimension, input_dimension), dtype=np.float64)
        for start in range(0, count, _FIT_CHUNK_ROWS):
            centred = vectors[start : start + _FIT_CHUNK_ROWS].astype(np.float64) - mean
            covariance += centred.T @ centred
        covariance /= count
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
        order = np.argsort(eigenvalues)[::-1][:dimensions]
        eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
        # The features are float32: variances below this are rounding noise, and whitening would blow them up.
        noise_floor = eigenvalues[0] * input_dimension * np.finfo(np.float32).eps
        usable = int((eigenvalues > noise_floor).sum())
        if whiten and usable < dimensions:
            raise PostProcessingError(
                f"--pca {dimensions} --whiten: only {usable} directions of {source} have non-negligible variance; "
                f"whitening the others would amplify noise. Use --pca {usable} or less"
            )
        return cls(mean.astype(np.float32), eigenvectors.astype(np.float32), eigenvalues.astype(np.float32), whiten)

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        if vectors.shape[-1] != self.input_dimension:
            raise PostProcessingError(
                f"PCA expects {self.input_dimension}-dimensional features, got {vectors.shape[-1]}"
            )
        projected = (vectors - self.mean) @ self.components
        if self.whiten:
            projected /= np.sqrt(self.eigenvalues)
        return l2_normalise(projected)

    def save(self, path: Path) -> None:
        from vitp.retrieval.feature_file import write_npz

        write_npz(
            {
                "mean": self.mean,
                "components": self.components,
                "eigenvalues": self.eigenvalues,
                "whiten": np.array(self.whiten),
            },
            path,
        )

    @classmethod
    def load(cls, path: Path) -> "PCAWhitening":
        with np.load(path, allow_pickle=False) as data:
            return cls(data["mean"], data["components"], data["eigenvalues"], bool(data["whiten"]))

    def describe(self) -> str:
        return f"PCA {self.input_dimension}->{self.output_dimension}" + (" + whitening" if self.whiten else "")


def weighted_expansion(
    vectors: np.ndarray, neighbour_vectors: np.ndarray, neighbour_scores: np.ndarray, alpha: float
) -> np.ndarray:
    """``normalise(x + sum_i max(s_i, 0)**alpha * n_i)`` for a batch: x [n, d], n_i [n, k, d], s [n, k].

    Missing neighbours (FAISS returns id -1 when it finds fewer than k) must come with score ``-inf``
    or NaN; they get weight 0.
    """
    if alpha < 0:
        raise PostProcessingError(f"alpha must be >= 0 (0 = average expansion), got {alpha}")
    present = np.isfinite(neighbour_scores)
    weights = np.where(present, np.power(np.clip(np.nan_to_num(neighbour_scores, nan=0.0, neginf=0.0), 0, None), alpha), 0.0)
    # (n, 1, k) @ (n, k, d) -> (n, 1, d): one small matrix product per row, batched.
    expanded = vectors + np.matmul(weights.astype(np.float32)[:, None, :], neighbour_vectors)[:, 0]
    return l2_normalise(expanded)
