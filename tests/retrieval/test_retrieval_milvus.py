"""The Milvus backend on Milvus Lite: the same results and refusals as FAISS, resumable and retried builds."""

import logging

import numpy as np
import pytest
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from vitp.cli import main
from vitp.errors import RetrievalError
from vitp.retrieval.backends import milvus as milvus_backend
from vitp.retrieval.evaluate import evaluate_retrieval
from vitp.retrieval.feature_file import FeatureSet, save_features
from vitp.retrieval.index import RetrievalIndex, write_meta
from vitp.retrieval.rerank import l2_normalise

SETTINGS = {"model_fingerprint": "sha256:aaaa", "layer": 2, "pool": "mean", "image_size": 112}


def random_features(count=200, dimension=16, seed=0, prefix="g", settings=SETTINGS):
    rng = np.random.default_rng(seed)
    vectors = l2_normalise(rng.normal(size=(count, dimension)).astype(np.float32))
    paths = np.array([f"/data/{prefix}/c{i % 4}/{i:04d}.png" for i in range(count)])
    return FeatureSet(vectors, paths, np.array([f"c{i % 4}" for i in range(count)]), dict(settings), f"{prefix}.npz")


@pytest.fixture(autouse=True)
def no_retry_delay(monkeypatch):
    monkeypatch.setattr(milvus_backend, "RETRY_FIRST_DELAY_S", 0.0)


def build_milvus(gallery, directory, **options):
    index = RetrievalIndex.build(gallery, backend="milvus", uri=str(directory / "milvus.db"),
                                 collection="gallery", progress_bar=False, **options)
    return index.save(directory)


def test_a_lite_collection_gives_the_exact_faiss_results_and_metrics(tmp_path):
    gallery, queries = random_features(), random_features(30, seed=1, prefix="q")
    faiss_dir = RetrievalIndex.build(gallery, progress_bar=False).save(tmp_path / "faiss.index")
    milvus_dir = build_milvus(gallery, tmp_path / "milvus.index")
    faiss_index = RetrievalIndex.load(faiss_dir, faiss_device="cpu")
    milvus_index = RetrievalIndex.load(milvus_dir)
    assert milvus_index.backend == "milvus" and "Milvus Lite FLAT collection gallery of 200 x 16" in milvus_index.describe()
    np.testing.assert_array_equal(milvus_index.image_paths, gallery.image_paths)
    np.testing.assert_array_equal(milvus_index.labels, gallery.labels)

    prepared = milvus_index.prepare_queries(queries.features)
    for qe_k in (0, 3):
        exclude = np.arange(30)  # as leave-one-out would: gallery ids 0..29 left out of rows 0..29
        scores, ids, _ = milvus_index.search(prepared, 7, exclude=exclude, qe_k=qe_k)
        expected_scores, expected_ids, _ = faiss_index.search(prepared, 7, exclude=exclude, qe_k=qe_k)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-5)
    np.testing.assert_allclose(milvus_index.all_gallery_vectors(), gallery.features, rtol=1e-6)

    expected = evaluate_retrieval(queries, index=faiss_index, top_k=[1, 3, 5], progress_bar=False)
    report = evaluate_retrieval(queries, index=milvus_index, top_k=[1, 3, 5], progress_bar=False)
    assert report.accuracy == expected.accuracy and report.map_at_k == expected.map_at_k
    assert report.mean_average_precision == pytest.approx(expected.mean_average_precision, rel=1e-6)
    leave_one_out = evaluate_retrieval(gallery, index=milvus_index, top_k=[1], leave_one_out=True, progress_bar=False)
    assert leave_one_out.accuracy == evaluate_retrieval(gallery, index=faiss_index, top_k=[1], leave_one_out=True,
                                                        progress_bar=False).accuracy


def test_a_collection_refuses_features_of_another_model_as_faiss_does(tmp_path):
    index = RetrievalIndex.load(build_milvus(random_features(), tmp_path / "m.index"))
    other = random_features(5, seed=2, settings={**SETTINGS, "model_fingerprint": "sha256:bbbb"})
    with pytest.raises(RetrievalError, match="model_fingerprint"):
        index.check_queries(other.settings, other.dimension, "query features q.npz")
    with pytest.raises(RetrievalError, match="8-dimensional features"):
        index.check_queries(SETTINGS, 8, "query features q.npz")


def test_a_dropped_connection_is_retried_and_reported(tmp_path, monkeypatch, caplog):
    real_insert, calls = MilvusClient.insert, [0]

    def drops_once(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            real_insert(self, *args, **kwargs)  # the rows arrive, then the connection drops before the reply
            raise MilvusException(message="connection reset by peer")
        return real_insert(self, *args, **kwargs)

    monkeypatch.setattr(milvus_backend, "_batch_rows", lambda dimension: 64)
    monkeypatch.setattr(MilvusClient, "insert", drops_once)
    with caplog.at_level(logging.WARNING, logger="vitp"):
        index = RetrievalIndex.load(build_milvus(random_features(), tmp_path / "m.index"))
    assert "could not insert rows 64..127 (connection reset by peer); retrying (1 of 4)" in caplog.text
    assert len(index) == 200
    client = index.connection.client
    assert client.query("gallery", filter="", output_fields=["count(*)"])[0]["count(*)"] == 200  # upserted, not doubled


def test_a_failed_build_is_refused_until_the_same_build_finishes_it(tmp_path, monkeypatch):
    gallery = random_features()
    real_insert, calls = MilvusClient.insert, [0]

    def fails_from_the_third_batch(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] >= 3:
            raise MilvusException(message="server unavailable")
        return real_insert(self, *args, **kwargs)

    monkeypatch.setattr(milvus_backend, "_batch_rows", lambda dimension: 64)
    monkeypatch.setattr(MilvusClient, "insert", fails_from_the_third_batch)
    monkeypatch.setattr(MilvusClient, "upsert", fails_from_the_third_batch)
    with pytest.raises(milvus_backend.RetrievalError, match="could not insert rows 128..191 after 5 attempts"):
        build_milvus(gallery, tmp_path / "m.index")
    # An index directory pointing at the collection (as another machine's finished build would) refuses it.
    build = {"index_type": "FLAT", "index_params": {}, "count": 200, "dimension": 16, "features_file": "g.npz"}
    write_meta(tmp_path / "m.index", milvus_backend._meta("milvus.db", "gallery", build, SETTINGS, {}))
    with pytest.raises(RetrievalError, match="unfinished .* run the same `vitp index build` again"):
        RetrievalIndex.load(tmp_path / "m.index")

    monkeypatch.setattr(MilvusClient, "insert", real_insert)
    inserted = []
    monkeypatch.setattr(MilvusClient, "insert", lambda self, name, rows, **kw: inserted.append(rows[0]["id"]) or real_insert(self, name, rows, **kw))
    index = RetrievalIndex.load(build_milvus(gallery, tmp_path / "m.index"))
    assert inserted == [128, 192]  # continued where the failed build stopped
    faiss_index = RetrievalIndex.build(gallery, progress_bar=False)
    _, ids, _ = index.search(gallery.features[:10], 5)
    np.testing.assert_array_equal(ids, faiss_index.search(gallery.features[:10], 5)[1])


def test_the_commands_work_against_a_milvus_index(tmp_path, capsys):
    gallery = save_features(random_features(), tmp_path / "g.npz")
    queries = save_features(random_features(12, seed=1, prefix="q"), tmp_path / "q.npz")
    build = ["index", "build", "--features", str(gallery), "--no_progress"]
    assert main([*build, "--output", str(tmp_path / "f.index")]) == 0
    assert main([*build, "--output", str(tmp_path / "m.index"), "--backend", "milvus"]) == 0
    assert (tmp_path / "m.index" / "milvus.db").exists()
    assert main([*build, "--output", str(tmp_path / "x.index"), "--backend", "milvus", "--pca", "8"]) == 2
    assert "pca: FAISS only" in capsys.readouterr().err
    assert main([*build, "--output", str(tmp_path / "y.index"), "--milvus_uri", str(tmp_path / "y.db")]) == 2
    assert "need --backend milvus" in capsys.readouterr().err

    for name in ("f", "m"):
        assert main(["search", "--index", str(tmp_path / f"{name}.index"), "--query_features", str(queries), "-k", "4",
                     "--qe", "2", "--output", str(tmp_path / f"{name}.json")]) == 0
        assert main(["evaluate", "--index", str(tmp_path / f"{name}.index"), "--query_features", str(queries),
                     "--no_progress", "--no_per_class", "--output", str(tmp_path / f"{name}_eval.json")]) == 0
    import json

    results = {name: json.loads((tmp_path / f"{name}.json").read_text())["queries"] for name in "fm"}
    assert [[r["path"] for r in q["results"]] for q in results["f"]] == [[r["path"] for r in q["results"]] for q in results["m"]]
    reports = {name: json.loads((tmp_path / f"{name}_eval.json").read_text()) for name in "fm"}
    assert reports["f"]["top_k_accuracy"] == reports["m"]["top_k_accuracy"]
    capsys.readouterr()
    assert main(["index", "info", str(tmp_path / "m.index")]) == 0
    assert "Milvus Lite FLAT collection vitp_m of 200 x 16" in capsys.readouterr().out


LOAD_IN_ANOTHER_PROCESS = """
import sys
from vitp.errors import RetrievalError
from vitp.retrieval.index import RetrievalIndex
try:
    RetrievalIndex.load(sys.argv[1])
except RetrievalError as err:
    print(err)
"""


def test_a_lite_file_open_in_another_process_is_a_clear_error(tmp_path):
    import subprocess
    import sys

    index = RetrievalIndex.load(build_milvus(random_features(20), tmp_path / "m.index"))  # holds the file open
    done = subprocess.run([sys.executable, "-c", LOAD_IN_ANOTHER_PROCESS, str(tmp_path / "m.index")],
                          capture_output=True, text=True, timeout=120)
    assert "is in use by another process, and a Milvus Lite file serves one process at a time" in done.stdout
    assert len(index) == 20
