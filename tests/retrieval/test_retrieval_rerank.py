"""PCA / whitening (FAISS's, inside the index), query expansion (average and alpha) and DBA, against hand-computed values."""

import faiss
import numpy as np
import pytest

from vitp.errors import RetrievalError
from vitp.retrieval.feature_file import FeatureSet
from vitp.retrieval.index import RetrievalIndex
from vitp.retrieval.rerank import l2_normalise, weighted_expansion


def test_average_expansion_is_the_normalised_mean():
    query = np.array([[1.0, 0.0, 0.0]], np.float32)
    neighbours = np.array([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], np.float32)
    scores = np.array([[0.2, 0.1]], np.float32)
    expanded = weighted_expansion(query, neighbours, scores, alpha=0.0)
    np.testing.assert_allclose(expanded, [[1 / np.sqrt(3)] * 3], rtol=1e-6)


def test_alpha_expansion_weights_by_score_power_and_ignores_missing():
    query = np.array([[1.0, 0.0, 0.0]], np.float32)
    neighbours = np.array([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]], np.float32)
    scores = np.array([[0.5, -0.3, -np.inf]], np.float32)  # a negative score weighs 0; -inf = no result
    expanded = weighted_expansion(query, neighbours, scores, alpha=2.0)
    expected = l2_normalise(np.array([[1.0, 0.25, 0.0]], np.float32))
    np.testing.assert_allclose(expanded, expected, rtol=1e-6)


def seed_query_expansion(query_features, gallery_features, initial_indices, k1):
    """The seed guide's rerank_with_query_expansion, verbatim in behaviour (one query at a time)."""
    out = []
    for i in range(len(query_features)):
        top = gallery_features[initial_indices[i, :k1]]
        expanded = np.mean(np.vstack([query_features[i : i + 1], top]), axis=0)
        out.append(np.argsort(np.linalg.norm(gallery_features - expanded, axis=1)))
    return np.array(out)


def test_average_query_expansion_ranks_like_the_seed():
    rng = np.random.default_rng(1)
    gallery = l2_normalise(rng.normal(size=(50, 8)).astype(np.float32))
    queries = l2_normalise(rng.normal(size=(6, 8)).astype(np.float32))
    paths = np.array([f"/g/c{i % 5}/{i}.png" for i in range(50)])
    index = RetrievalIndex.build(FeatureSet(gallery, paths, np.array([p.split("/")[2] for p in paths]), None), progress_bar=False)
    scores, ids = index.index.search(queries, 3)
    _, expanded_ids, _ = index.search(queries, 10, qe_k=3)
    np.testing.assert_array_equal(expanded_ids, seed_query_expansion(queries, gallery, ids, 3)[:, :10])


def test_dba_by_hand():
    # Three gallery vectors; with k=1 each is averaged with its nearest other vector.
    gallery = l2_normalise(np.array([[1, 0], [0.8, 0.6], [0, 1]], np.float32))
    paths = np.array(["/g/a/0.png", "/g/a/1.png", "/g/b/2.png"])
    index = RetrievalIndex.build(FeatureSet(gallery, paths, np.array(["a", "a", "b"]), None), dba_k=1, progress_bar=False)
    # Nearest others: 0 -> 1 (0.8), 1 -> 0 (0.8) and 2 (0.6) -> 0, 2 -> 1 (0.6).
    expected = l2_normalise(np.stack([gallery[0] + gallery[1], gallery[1] + gallery[0], gallery[2] + gallery[1]]))
    np.testing.assert_allclose(index.all_gallery_vectors(), expected, rtol=1e-6)
    assert index.meta["dba"] == {"k": 1, "alpha": 0.0}


def pca_features(data: np.ndarray) -> FeatureSet:
    paths = np.array([f"/g/c{i % 2}/{i}.png" for i in range(len(data))])
    return FeatureSet(data.astype(np.float32), paths, np.array([f"c{i % 2}" for i in range(len(data))]), None)


def test_pca_inside_the_index_matches_the_covariance_and_whitening_gives_unit_variance():
    rng = np.random.default_rng(2)
    data = (rng.normal(size=(500, 4)) * [5.0, 2.0, 1.0, 0.1] + [3, 0, 0, 1]).astype(np.float32)
    index = RetrievalIndex.build(pca_features(data), pca_dimensions=2, whiten=True, progress_bar=False)
    pca = index.transforms[0]  # FAISS's PCAMatrix, the first step of the index's own chain
    # Oracle: numpy's eigendecomposition of the covariance.
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(data.T, bias=True))
    order = np.argsort(eigenvalues)[::-1][:2]
    # FAISS keeps the scatter's eigenvalues (n x the covariance's), so its whitened output has variance 1/n:
    # the same directions up to one common scale, which the L2 normalisation that follows removes.
    n = len(data)
    np.testing.assert_allclose(faiss.vector_to_array(pca.eigenvalues)[:2] / n, eigenvalues[order], rtol=1e-3)
    whitened = ((data - data.mean(0)) @ eigenvectors[:, order]) / np.sqrt(eigenvalues[order])
    projected = pca.apply(data) * np.sqrt(n)
    np.testing.assert_allclose(np.abs(projected), np.abs(whitened), atol=2e-3)  # components' signs are arbitrary
    np.testing.assert_allclose(np.cov(projected.T, bias=True), np.eye(2), atol=1e-3)
    # Queries and gallery go through the same chain, ending L2-normalised.
    out = index.prepare_queries(data)
    assert out.shape == (500, 2)
    np.testing.assert_allclose(out, l2_normalise(whitened * np.sign(whitened[0] * projected[0])), atol=1e-3)
    np.testing.assert_allclose(index.all_gallery_vectors(), out, rtol=1e-5, atol=1e-6)


def test_pca_refuses_what_cannot_work():
    rng = np.random.default_rng(3)
    data = rng.normal(size=(10, 12)).astype(np.float32)
    with pytest.raises(RetrievalError, match="feature dimension 12"):
        RetrievalIndex.build(pca_features(data), pca_dimensions=13, progress_bar=False)
    with pytest.raises(RetrievalError, match="span at most 9 dimensions"):
        RetrievalIndex.build(pca_features(data), pca_dimensions=10, progress_bar=False)
    flat = np.concatenate([data[:, :3], np.zeros((10, 3), np.float32)], axis=1)  # 3 directions carry no variance
    with pytest.raises(RetrievalError, match="only 3 directions"):
        RetrievalIndex.build(pca_features(flat), pca_dimensions=5, whiten=True, progress_bar=False)
    with pytest.raises(ValueError, match="alpha"):
        weighted_expansion(data[:1], data[None, :2], np.ones((1, 2)), alpha=-1)
