"""The embedding store: extraction writes it shard by shard, every command reads it, nothing loads it whole."""

import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest

from vitp.cli import main
from vitp.errors import RetrievalError
from vitp.retrieval.embedding_store import EmbeddingStore, load_feature_set, open_gallery
from vitp.retrieval.evaluate import evaluate_retrieval
from vitp.retrieval.extract import extract_features
from vitp.retrieval.feature_file import FeatureSet, load_features
from vitp.retrieval.index import RetrievalIndex
from vitp.retrieval.rerank import l2_normalise

FAST = dict(num_workers=0, progress_bar=False, device="cpu", dtype="fp32")


def test_a_store_holds_the_npz_rows_in_the_layout_embedding_reader_reads(image_tree, vit_file, tmp_path):
    (image_tree / "square" / "broken.png").write_bytes(b"\x89PNG\r\n")
    npz = extract_features(image_tree, tmp_path / "ref.npz", vit_file, batch_size=5, **FAST)
    store = extract_features(image_tree, tmp_path / "g", vit_file, batch_size=5, store_shard_size=5, **FAST)
    assert store.feature_set is None and store.shape == (12, 64) and store.skipped == npz.skipped
    assert (tmp_path / "g.skipped.txt").read_text() == (tmp_path / "ref.skipped.txt").read_text()

    # embedding-reader's parquet_npy layout: .npy and .parquet files pair up by sorted name, row for row.
    vectors = sorted((tmp_path / "g" / "embeddings").glob("*.npy"))
    tables = sorted((tmp_path / "g" / "metadata").glob("*.parquet"))
    assert [p.stem for p in vectors] == [p.stem for p in tables] and len(vectors) == 3  # 13 files, 5 per shard
    rows = np.concatenate([np.load(p) for p in vectors])
    metadata = [pq.read_table(p).to_pydict() for p in tables]
    assert all(m["row"] == list(range(len(m["row"]))) for m in metadata)
    assert set(metadata[0]) == {"image_path", "label", "size", "mtime_ns", "row"}
    paths = [path for m in metadata for path in m["image_path"]]
    reference = load_features(tmp_path / "ref.npz")
    assert paths == list(reference.image_paths)
    np.testing.assert_array_equal(rows, reference.features)

    opened = EmbeddingStore.open(tmp_path / "g")
    assert opened.settings["model_fingerprint"] == reference.settings["model_fingerprint"]
    np.testing.assert_array_equal(opened.take(np.array([7, 2, 11])), reference.features[[7, 2, 11]])
    np.testing.assert_array_equal(load_feature_set(tmp_path / "g").features, reference.features)


def test_a_float16_store_reads_back_as_normalised_float32(image_tree, vit_file, tmp_path):
    reference = extract_features(image_tree, tmp_path / "g.npz", vit_file, **FAST).feature_set
    extract_features(image_tree, tmp_path / "half", vit_file, store_dtype="float16", **FAST)
    assert np.load(next((tmp_path / "half" / "embeddings").glob("*.npy"))).dtype == np.float16
    half = load_feature_set(tmp_path / "half")
    assert half.features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(half.features, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(half.features, reference.features, atol=2e-3)


KILLED_STORE_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from vitp.retrieval.extract import embedder, extract_features

    real_embed, calls = embedder.embed_batch, [0]

    def embed_then_die(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_embed(*args, **kwargs)

    embedder.embed_batch = embed_then_die
    extract_features(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=2, shard_size=2, store_shard_size=5,
                     num_workers=0, progress_bar=False, device="cpu", dtype="fp32")
    """
)


def test_a_killed_store_run_resumes_to_identical_files(image_tree, vit_file, tmp_path):
    killed = subprocess.run([sys.executable, "-c", KILLED_STORE_RUN, str(image_tree), str(tmp_path / "resumed"),
                             str(vit_file)], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "resumed").exists()
    with pytest.raises(RetrievalError, match="not a finished embedding store"):
        EmbeddingStore.open(tmp_path / "resumed.partial")
    options = dict(batch_size=2, shard_size=2, store_shard_size=5, **FAST)
    assert extract_features(image_tree, tmp_path / "resumed", vit_file, **options).num_reused == 6
    extract_features(image_tree, tmp_path / "straight", vit_file, **options)
    files = sorted(p.relative_to(tmp_path / "straight") for p in (tmp_path / "straight").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "resumed") for p in (tmp_path / "resumed").rglob("*") if p.is_file())
    for name in files:
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_a_damaged_store_is_a_clear_error(image_tree, vit_file, tmp_path):
    extract_features(image_tree, tmp_path / "g", vit_file, store_shard_size=5, **FAST)
    with pytest.raises(RetrievalError, match="not a finished embedding store"):
        EmbeddingStore.open(tmp_path / "nothing_here")
    first = sorted((tmp_path / "g" / "embeddings").glob("*.npy"))[0]
    np.save(first, np.load(first)[:2])
    with pytest.raises(RetrievalError, match="damaged store: shard part-000000 holds \\(2, 64\\)"):
        EmbeddingStore.open(tmp_path / "g")


def synthetic_store(tmp_path, count, dimension, classes=8, seed=0, shard_rows=997):
    """A store of clustered unit vectors written with the store's own writer, and the same as a FeatureSet."""
    from vitp.retrieval.embedding_store import shard_name, write_manifest, write_shard

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, count)
    centres = rng.normal(size=(classes, dimension))
    vectors = l2_normalise((centres[labels] + 0.7 * rng.normal(size=(count, dimension))).astype(np.float32))
    paths = [f"/data/c{label}/{i:06d}.png" for i, label in enumerate(labels)]
    names = [f"c{label}" for label in labels]
    settings = {"model_fingerprint": "sha256:synthetic", "layer": 1, "pool": "mean", "image_size": 112}
    shards = []
    for number, start in enumerate(range(0, count, shard_rows)):
        stop = min(start + shard_rows, count)
        write_shard(tmp_path / "store", shard_name(number), vectors[start:stop], paths[start:stop], names[start:stop],
                    [1] * (stop - start), [0] * (stop - start), "float32")
        shards.append((shard_name(number), stop - start))
    write_manifest(tmp_path / "store", settings, "float32", dimension, shards)
    return tmp_path / "store", FeatureSet(vectors, np.array(paths), np.array(names), settings, "memory")


def test_index_search_and_evaluate_read_a_store_in_chunks_never_whole(tmp_path, monkeypatch):
    path, in_memory = synthetic_store(tmp_path, count=4000, dimension=16)
    reads = []
    real_take = EmbeddingStore.take

    def recorded_take(self, ids):
        reads.append(len(ids))
        return real_take(self, ids)

    def refuse_load(self):
        raise AssertionError("the gallery store was loaded whole")

    monkeypatch.setattr(EmbeddingStore, "take", recorded_take)
    monkeypatch.setattr(EmbeddingStore, "load", refuse_load)
    monkeypatch.setattr("vitp.retrieval.backends.faiss._CHUNK_ROWS", 1000)
    store = open_gallery(path)
    queries = FeatureSet(in_memory.features[:50] + 0.01, in_memory.image_paths[:50], in_memory.labels[:50],
                         in_memory.settings, "queries")
    queries.features[:] = l2_normalise(queries.features)

    from_store = RetrievalIndex.build(store, progress_bar=False)
    from_memory = RetrievalIndex.build(in_memory, progress_bar=False)
    assert max(reads) <= 1000 and sum(reads) >= 4000  # streamed in chunks
    scores, ids, _ = from_store.search(queries.features, 10)
    expected_scores, expected_ids, _ = from_memory.search(queries.features, 10)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(scores, expected_scores)

    report = evaluate_retrieval(queries, store, top_k=[1, 5], progress_bar=False)
    expected = evaluate_retrieval(queries, in_memory, top_k=[1, 5], progress_bar=False)
    assert report.accuracy == expected.accuracy and report.mean_average_precision == expected.mean_average_precision

    # A lossy index built from a store reads its exact vectors (query expansion) from the store, by id.
    pq_index = RetrievalIndex.build(store, "IVF16,PQ4x4", progress_bar=False)
    assert not pq_index.meta["stores_vectors"] and pq_index.meta["vectors_store"] == str(path)
    reads.clear()
    loaded = RetrievalIndex.load(pq_index.save(tmp_path / "pq.index"))
    _, expanded, _ = loaded.search(loaded.prepare_queries(queries.features), 5, qe_k=3)
    assert expanded.shape == (50, 5) and max(reads) <= 1000


def test_the_commands_take_a_store_wherever_they_take_an_npz(tmp_path, capsys):
    path, in_memory = synthetic_store(tmp_path, count=300, dimension=8, shard_rows=64)
    assert main(["index", "build", "--features", str(path), "--output", str(tmp_path / "i"), "--no_progress"]) == 0
    assert main(["search", "--index", str(tmp_path / "i"), "--query_features", str(path), "-k", "3",
                 "--output", str(tmp_path / "r.json")]) == 0
    assert main(["evaluate", "--gallery_features", str(path), "--leave_one_out", "--top_k", "1", "--no_progress",
                 "--no_per_class"]) == 0
    assert main(["evaluate", "--index", str(tmp_path / "i"), "--query_features", str(path), "--top_k", "1",
                 "--no_progress", "--no_per_class"]) == 0
    out = capsys.readouterr().out
    assert out.count("Top-1 accuracy: ") == 2 and "queries: 300 x 8, gallery: 300 x 8" in out
