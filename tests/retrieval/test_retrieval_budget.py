"""An index under a memory budget: autofaiss's choice, training on a sample, tuning, and the recall report."""

import json

import faiss
import numpy as np
import pytest

from vitp.cli import main
from vitp.errors import RetrievalError
from vitp.retrieval.backends import autoindex
from vitp.retrieval.feature_file import FeatureSet, save_features
from vitp.retrieval.index import RetrievalIndex
from vitp.retrieval.rerank import l2_normalise

MiB = 2**20


@pytest.mark.parametrize(
    "count, dimension, budget, factory",
    [
        (999, 512, 1, "Flat"),  # below 1000 vectors an exact index is as fast, whatever the budget
        # HNSW while its graph fits: links = (budget / 4N - d) / 2, at most 32 (here (64 - 32) / 2 = 16).
        (100_000, 32, 100_000 * 4 * 64, "HNSW16"),
        (100_000, 32, 10 * 2**30, "HNSW32"),
        # Below a million vectors, unquantized IVF lists if they fit (4 sqrt(N) = 1024 lists, a power of two,
        # halved until 39 training vectors per list, with a copy, fit in half the budget: 512).
        (100_000, 128, 53 * MiB, "IVF512,Flat"),
        # Otherwise OPQ + IVF + PQ with the largest code that fits (m < d; OPQ output: d rounded up to a multiple
        # of m); IVF over HNSW from 1000 lists on.
        (100_000, 128, 10 * MiB, "OPQ64_128,IVF128,PQ64x8"),
        (1_000_000, 256, 256 * MiB, "OPQ128_256,IVF1024_HNSW32,PQ128x8"),
        (1_000_000, 256, 64 * MiB, "OPQ48_288,IVF256,PQ48x8"),
        (1_000_000, 100, 64 * MiB, "OPQ48_144,IVF1024_HNSW32,PQ48x8"),
    ],
)
def test_the_index_follows_autofaiss_rule(count, dimension, budget, factory):
    choice = autoindex.choose_index(count, dimension, budget)
    assert choice.factory == factory
    assert choice.estimated_bytes <= budget or factory == "Flat"


def test_ivf_lists_shrink_until_their_training_sample_fits_the_budget():
    # autofaiss gives a million vectors 16384 lists; 39 training vectors per list (and a copy) must fit in half
    # of the budget.
    assert autoindex.ivf_list_choices(1_000_000)[0] == 16_384
    lists = autoindex.lists_within(1_000_000, 256, 256 * MiB)
    assert lists == 1024 and 39 * lists * 256 * 4 * 2 <= 256 * MiB // 2 < 39 * 2 * lists * 256 * 4 * 2


def test_budgets_nothing_fits_in_are_refused_with_the_smallest_size():
    with pytest.raises(ValueError, match="too few to train a product quantizer; allow more memory"):
        autoindex.choose_index(5000, 64, 100_000)
    with pytest.raises(ValueError, match="even at 4 bytes per vector"):
        autoindex.choose_index(10_000_000, 64, 10 * MiB)


@pytest.mark.parametrize("text, size", [("4GB", 4 * 2**30), ("512M", 512 * MiB), ("1.5GiB", 3 * 2**29),
                                        ("300000", 300000), ("64 kb", 65536)])
def test_memory_sizes_are_read_in_powers_of_1024(text, size):
    assert autoindex.parse_memory(text) == size


def test_a_memory_size_that_is_not_one_is_refused():
    with pytest.raises(ValueError, match="as an amount of memory"):
        autoindex.parse_memory("four gigs")


def test_tuning_takes_the_largest_value_under_the_time_target():
    tunable = autoindex.Tunable("nprobe", list(range(1, 101)), lambda n: {"nprobe": n})
    asked = []

    def milliseconds(parameters):  # time grows with nprobe: 0.1 ms per list
        asked.append(parameters["nprobe"])
        return 0.1 * parameters["nprobe"]

    parameters, ms = autoindex.tune_search(milliseconds, tunable, max_query_ms=4.25)
    assert parameters == {"nprobe": 42} and ms == pytest.approx(4.2)
    assert len(asked) <= 8  # bisection, not a scan
    slow, _ = autoindex.tune_search(lambda p: 100.0, tunable, max_query_ms=1.0)
    assert slow == {"nprobe": 1}  # nothing is fast enough: the cheapest setting


def test_recall_counts_the_exact_neighbours_found():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert autoindex.recall_at_k(np.array([[4, 3, 9, 1], [8, -1, -1, -1]]), exact) == pytest.approx((3 / 4 + 1 / 4) / 2)


def clustered(count, dimension, seed=0):
    """Clustered unit vectors with a low intrinsic dimension, as image features have."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dimension, 8)))[0]
    labels = rng.integers(0, 20, count)
    latent = rng.normal(size=(20, 8))[labels] + 0.5 * rng.normal(size=(count, 8))
    vectors = l2_normalise((latent @ basis.T + 0.02 * rng.normal(size=(count, dimension))).astype(np.float32))
    paths = np.array([f"/g/c{label}/{i}.png" for i, label in enumerate(labels)])
    settings = {"model_fingerprint": "sha256:x", "layer": 1, "pool": "mean", "image_size": 112}
    return FeatureSet(vectors, paths, np.array([f"c{label}" for label in labels]), settings, "clustered")


@pytest.mark.slow
def test_a_budgeted_index_fits_its_budget_and_reports_its_recall(tmp_path):
    gallery = clustered(12_000, 32)
    budget = 12_000 * 32 * 4 // 4  # a quarter of the exact index
    index = RetrievalIndex.build(gallery, max_index_memory=budget, progress_bar=False, faiss_device="cpu")
    assert index.meta["factory"].startswith("OPQ") and index.meta["memory_budget"] == budget
    assert faiss.serialize_index(index.full_index).nbytes <= budget  # the index itself, as saved
    tuning = index.meta["tuning"]
    assert tuning["tuned"] == "nprobe" and tuning["held_out_queries"] == 1000
    assert tuning["ms_per_query"] <= tuning["max_query_ms"] and tuning["recall_at_10"] > 0.5
    assert "nprobe" in index.meta["search_parameters"]
    loaded = RetrievalIndex.load(index.save(tmp_path / "budget.index"), faiss_device="cpu")
    assert loaded.meta["tuning"] == tuning and loaded.describe() == index.describe()
    _, ids, _ = loaded.search(loaded.prepare_queries(gallery.features[:20]), 5)
    assert (ids[:, 0] == np.arange(20)).mean() >= 0.9  # a gallery vector finds itself first


def test_the_cli_builds_under_a_budget_and_prints_the_recall(tmp_path, capsys):
    features = save_features(clustered(3000, 16), tmp_path / "g.npz")
    build = ["index", "build", "--features", str(features), "--no_progress", "--faiss_device", "cpu"]
    assert main([*build, "--output", str(tmp_path / "i"), "--max_index_memory", "250KB", "--max_query_ms", "5"]) == 0
    out = capsys.readouterr().out
    assert "built IVF16,Flat index of 3000 x 16, nprobe=" in out and "recall@10 against exact search: " in out
    meta = json.loads((tmp_path / "i" / "meta.json").read_text())
    assert meta["tuning"]["max_query_ms"] == 5 and meta["memory_budget"] == 250 * 1024
    assert main([*build, "--output", str(tmp_path / "j"), "--max_index_memory", "1MB", "--factory", "HNSW32"]) == 2
    assert "leave out --factory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*build, "--output", str(tmp_path / "k"), "--max_index_memory", "lots"])
    assert "as an amount of memory" in capsys.readouterr().err
    assert main([*build, "--output", str(tmp_path / "l"), "--max_index_memory", "1KB"]) == 2
    assert "memory budget 1.0 KiB" in capsys.readouterr().err


def test_an_old_index_with_a_separate_pca_file_is_refused_and_one_without_is_read(tmp_path):
    gallery = clustered(200, 16)
    path = RetrievalIndex.build(gallery, progress_bar=False).save(tmp_path / "old")
    meta = json.loads((path / "meta.json").read_text())
    for key in ("backend", "vectors_store", "memory_budget", "build_seconds"):
        meta.pop(key, None)
    (path / "meta.json").write_text(json.dumps({**meta, "version": 1}))
    assert len(RetrievalIndex.load(path, faiss_device="cpu")) == 200
    (path / "meta.json").write_text(json.dumps({**meta, "version": 1, "pca": {"dimensions": 8, "whiten": True}}))
    with pytest.raises(RetrievalError, match="separate pca.npz; PCA is now part of the FAISS index: build it again"):
        RetrievalIndex.load(path, faiss_device="cpu")
