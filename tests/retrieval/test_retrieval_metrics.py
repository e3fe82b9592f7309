"""Retrieval metrics against values computed by hand on small fixed cases."""

import numpy as np
import pytest

from vitp.retrieval import metrics

# Gallery classes: ids 0,1 -> A; 2,3,4 -> B; 5 -> C (encoded as 0, 1, 2).
GALLERY_CLASSES = np.array([0, 0, 1, 1, 1, 2])
QUERY_CLASSES = np.array([0, 1])  # query 0 is an A, query 1 a B
# Rankings: query 0 gets [2, 0, 3, 1, 4, 5] -> relevant at ranks 2 and 4 (R = 2);
#           query 1 gets [3, 4, 0, 2, 1, 5] -> relevant at ranks 1, 2 and 4 (R = 3).
RANKED = np.array([[2, 0, 3, 1, 4, 5], [3, 4, 0, 2, 1, 5]])


def vectors_for_rankings():
    """Query i = unit vector e_i; gallery column i holds scores that produce RANKED[i]."""
    gallery = np.zeros((6, 2), dtype=np.float32)
    for query, ranking in enumerate(RANKED):
        gallery[ranking, query] = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    return np.eye(2, dtype=np.float32), gallery


def test_relevant_counts_and_hits():
    relevant = metrics.relevant_counts(QUERY_CLASSES, GALLERY_CLASSES, 3)
    assert relevant.tolist() == [2, 3]
    hits = metrics.hit_matrix(RANKED, QUERY_CLASSES, GALLERY_CLASSES)
    assert hits.astype(int).tolist() == [[0, 1, 0, 1, 0, 0], [1, 1, 0, 1, 0, 0]]


def test_top_k_precision_and_ap_at_k_by_hand():
    hits = metrics.hit_matrix(RANKED, QUERY_CLASSES, GALLERY_CLASSES)
    relevant = np.array([2, 3])
    assert metrics.top_k_hits(hits, 1).tolist() == [False, True]
    assert metrics.top_k_hits(hits, 3).tolist() == [True, True]
    np.testing.assert_allclose(metrics.precision_at_k(hits, 1), [0, 1])
    np.testing.assert_allclose(metrics.precision_at_k(hits, 3), [1 / 3, 2 / 3])
    np.testing.assert_allclose(metrics.precision_at_k(hits, 5), [2 / 5, 3 / 5])
    # AP@3: query 0 has one hit (rank 2, precision 1/2) over min(R=2, 3) = 2 -> 0.25;
    #       query 1 hits at ranks 1, 2 (precision 1, 1) over min(3, 3) = 3 -> 2/3.
    np.testing.assert_allclose(metrics.average_precision_at_k(hits, relevant, 3), [0.25, 2 / 3])
    # AP@5: query 0: (1/2 + 2/4) / 2 = 0.5; query 1: (1 + 1 + 3/4) / 3.
    np.testing.assert_allclose(metrics.average_precision_at_k(hits, relevant, 5), [0.5, 2.75 / 3])


def test_full_ranking_ap_by_hand():
    queries, gallery = vectors_for_rankings()
    relevant = metrics.relevant_counts(QUERY_CLASSES, GALLERY_CLASSES, 3)
    ap = metrics.average_precision(queries, gallery, QUERY_CLASSES, GALLERY_CLASSES, relevant)
    np.testing.assert_allclose(ap, [0.5, 2.75 / 3])


def test_full_ranking_ap_leave_one_out_by_hand():
    # Query 0 is gallery item 0 itself: without it the ranking is [2, 3, 1, 4, 5], the one other A at rank 3.
    queries, gallery = vectors_for_rankings()
    exclude = np.array([0, -1])
    relevant = metrics.relevant_counts(QUERY_CLASSES, GALLERY_CLASSES, 3, exclude)
    assert relevant.tolist() == [1, 3]
    ap = metrics.average_precision(queries, gallery, QUERY_CLASSES, GALLERY_CLASSES, relevant, exclude)
    np.testing.assert_allclose(ap, [1 / 3, 2.75 / 3])


def reference_ap(queries, gallery, query_classes, gallery_classes, exclude):
    """Straight from the definition, one query at a time."""
    out = []
    for i, query in enumerate(queries):
        scores = gallery @ query
        order = [j for j in sorted(range(len(gallery)), key=lambda j: (-scores[j], j)) if j != exclude[i]]
        found, total = 0, 0.0
        for rank, j in enumerate(order, start=1):
            if gallery_classes[j] == query_classes[i]:
                found += 1
                total += found / rank
        out.append(total / found if found else 0.0)
    return np.array(out)


@pytest.mark.parametrize("chunk_bytes", [1, 10_000, metrics.DEFAULT_CHUNK_BYTES])
def test_full_ranking_ap_matches_definition_in_any_chunking(chunk_bytes):
    rng = np.random.default_rng(3)
    gallery = rng.normal(size=(40, 8)).astype(np.float32)
    gallery_classes = rng.integers(0, 4, 40)
    queries = gallery[:15] + 0.1 * rng.normal(size=(15, 8)).astype(np.float32)
    query_classes = gallery_classes[:15]
    exclude = np.arange(15)
    relevant = metrics.relevant_counts(query_classes, gallery_classes, 4, exclude)
    ap = metrics.average_precision(queries, gallery, query_classes, gallery_classes, relevant, exclude, chunk_bytes)
    np.testing.assert_allclose(ap, reference_ap(queries, gallery, query_classes, gallery_classes, exclude), rtol=1e-6)


def test_encode_labels_shares_one_vocabulary():
    classes, queries, gallery = metrics.encode_labels(np.array(["b", "z"]), np.array(["a", "b", "b"]))
    assert classes.tolist() == ["a", "b", "z"]
    assert queries.tolist() == [1, 2] and gallery.tolist() == [0, 1, 1]


def test_full_ranking_ap_ties_rank_relevant_items_first():
    # Scores 0.9 (class 1), 0.9 (class 0), 0.5 (class 0): the tied relevant item counts as rank 1.
    gallery = np.array([[0.9], [0.9], [0.5]], np.float32)
    classes = np.array([1, 0, 0])
    ap = metrics.average_precision(np.ones((1, 1), np.float32), gallery, np.array([0]), classes, np.array([2]))
    np.testing.assert_allclose(ap, [(1 / 1 + 2 / 3) / 2])
