"""The FAISS index: exact results, factory strings, save/load, and refusing incompatible queries."""

import json
import logging

import numpy as np
import pytest

from vitp.errors import RetrievalError
from vitp.retrieval.feature_file import FeatureSet, load_features, save_features
from vitp.retrieval.index import RetrievalIndex
from vitp.retrieval.rerank import l2_normalise

SETTINGS = {"model_fingerprint": "sha256:aaaa", "layer": 24, "pool": "mean", "image_size": 448, "vit_checkpoint": "/m/vit.safetensors"}


def random_features(count=300, dimension=16, seed=0, settings=SETTINGS, prefix="g"):
    rng = np.random.default_rng(seed)
    vectors = l2_normalise(rng.normal(size=(count, dimension)).astype(np.float32))
    paths = np.array([f"/data/{prefix}/c{i % 4}/{i:04d}.png" for i in range(count)])
    labels = np.array([f"c{i % 4}" for i in range(count)])
    return FeatureSet(vectors, paths, labels, dict(settings) if settings else None, f"{prefix}.npz")


def test_flat_index_is_exact_and_survives_save_and_load(tmp_path):
    gallery, queries = random_features(), random_features(20, seed=1, prefix="q")
    index = RetrievalIndex.build(gallery, progress_bar=False)
    scores, ids, _ = index.search(index.prepare_queries(queries.features), 5)
    brute = queries.features @ gallery.features.T
    np.testing.assert_array_equal(ids, np.argsort(-brute, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(scores, np.sort(brute, axis=1)[:, ::-1][:, :5], rtol=1e-5)
    assert not index.meta["stores_vectors"]  # a flat index gives its vectors back exactly

    path = index.save(tmp_path / "gallery.index")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["feature_settings"]["model_fingerprint"] == "sha256:aaaa"
    assert meta["count"] == 300 and meta["dimension"] == 16 and meta["factory"] == "Flat"
    loaded = RetrievalIndex.load(path, faiss_device="cpu")
    loaded_scores, loaded_ids, _ = loaded.search(loaded.prepare_queries(queries.features), 5)
    np.testing.assert_array_equal(loaded_ids, ids)
    np.testing.assert_array_equal(loaded.image_paths, gallery.image_paths)
    np.testing.assert_array_equal(loaded.labels, gallery.labels)


def test_factories_that_train_and_lossy_ones_keep_exact_vectors(tmp_path):
    gallery = random_features(600)
    ivf = RetrievalIndex.build(gallery, "IVF8,Flat", search_parameters={"nprobe": 8}, progress_bar=False)
    # nprobe = all lists: IVF is exhaustive, so it finds the exact top-5.
    _, ids, _ = ivf.search(gallery.features[:10], 5)
    np.testing.assert_array_equal(ids[:, 0], np.arange(10))
    assert not ivf.meta["stores_vectors"]

    pq = RetrievalIndex.build(gallery, "PQ4x4", progress_bar=False)
    assert pq.meta["stores_vectors"]
    np.testing.assert_array_equal(pq.all_gallery_vectors(), gallery.features)
    loaded = RetrievalIndex.load(pq.save(tmp_path / "pq.index"))
    np.testing.assert_array_equal(loaded.gallery_vectors(np.array([[3, 7]])), gallery.features[[3, 7]][None])


def test_pca_is_saved_with_the_index_and_applied_to_queries(tmp_path):
    gallery, queries = random_features(), random_features(5, seed=2, prefix="q")
    index = RetrievalIndex.build(gallery, pca_dimensions=8, whiten=True, progress_bar=False)
    assert index.dimension == 8 and index.meta["pca"]["whiten"]
    _, ids, _ = index.search(index.prepare_queries(queries.features), 3)
    loaded = RetrievalIndex.load(index.save(tmp_path / "pca.index"))
    _, loaded_ids, _ = loaded.search(loaded.prepare_queries(queries.features), 3)
    np.testing.assert_array_equal(loaded_ids, ids)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layer": 12}, "layer: 12"),
        ({"pool": "cls"}, "pool: 'cls'"),
        ({"model_fingerprint": "sha256:bbbb"}, "model_fingerprint"),
        ({"image_size": 224}, "image_size: 224"),
    ],
)
def test_queries_with_other_feature_settings_are_refused(change, message):
    index = RetrievalIndex.build(random_features(), progress_bar=False)
    queries = random_features(5, seed=1, settings={**SETTINGS, **change}, prefix="q")
    with pytest.raises(RetrievalError, match=message):
        index.check_queries(queries.settings, queries.dimension, "query features q.npz")


def test_queries_of_another_dimension_are_refused():
    index = RetrievalIndex.build(random_features(), progress_bar=False)
    with pytest.raises(RetrievalError, match="8-dimensional features; .* 16-dimensional"):
        index.check_queries(SETTINGS, 8, "query features q.npz")


def test_bad_factories_are_clear_errors():
    gallery = random_features(50)
    with pytest.raises(RetrievalError, match="cannot build it"):
        RetrievalIndex.build(gallery, "NotAnIndex", progress_bar=False)
    with pytest.raises(RetrievalError, match="training failed on 50 gallery vectors"):
        RetrievalIndex.build(gallery, "IVF100,Flat", progress_bar=False)
    with pytest.raises(RetrievalError, match="whiten needs pca"):
        RetrievalIndex.build(gallery, whiten=True, progress_bar=False)


def test_not_an_index_directory(tmp_path):
    with pytest.raises(RetrievalError, match="not a vitp index"):
        RetrievalIndex.load(tmp_path)


def test_seed_written_features_load_with_folder_labels(tmp_path, caplog):
    # What the seed's extract_features.py writes: np.savez(features=..., image_paths=[...]).
    path = tmp_path / "seed.npz"
    np.savez(path, features=np.eye(3, dtype=np.float32), image_paths=["/d/cat/1.jpg", "/d/dog/2.jpg", "/d/cat/3.jpg"])
    with caplog.at_level(logging.WARNING, logger="vitp"):
        loaded = load_features(path)
    assert loaded.labels.tolist() == ["cat", "dog", "cat"] and loaded.settings is None
    assert "no vitp settings" in caplog.text


def test_features_file_round_trip_and_damage(tmp_path):
    features = random_features(10)
    save_features(features, tmp_path / "f.npz")
    loaded = load_features(tmp_path / "f.npz")
    np.testing.assert_array_equal(loaded.features, features.features)
    assert loaded.settings == features.settings
    # Unnormalised vectors are normalised (cosine similarity needs unit vectors).
    np.savez(tmp_path / "raw.npz", features=np.array([[3.0, 4.0]], np.float32), image_paths=["/a/b.png"])
    np.testing.assert_allclose(load_features(tmp_path / "raw.npz").features, [[0.6, 0.8]])
    np.savez(tmp_path / "nan.npz", features=np.array([[np.nan, 1.0]], np.float32), image_paths=["/a/b.png"])
    with pytest.raises(RetrievalError, match="NaN or inf .* /a/b.png"):
        load_features(tmp_path / "nan.npz")
    np.savez(tmp_path / "short.npz", features=np.ones((2, 2), np.float32), image_paths=["/a/b.png"])
    with pytest.raises(RetrievalError, match="'image_paths' has 1 entries but 'features' has 2 rows"):
        load_features(tmp_path / "short.npz")
    np.savez(tmp_path / "other.npz", embeddings=np.ones((2, 2)))
    with pytest.raises(RetrievalError, match="no 'features' array \\(found: embeddings\\)"):
        load_features(tmp_path / "other.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(RetrievalError, match="not a readable .npz"):
        load_features(tmp_path / "text.npz")


@pytest.mark.parametrize("parameters, name", [({"nprobe": 0}, "nprobe 0"), ({"efSearch": -3}, "efSearch -3")])
def test_search_parameters_below_one_are_refused(parameters, name):
    gallery = random_features(600)
    with pytest.raises(ValueError, match=f"{name}: must be a whole number >= 1"):
        RetrievalIndex.build(gallery, "IVF8,Flat", search_parameters=parameters, progress_bar=False)
    index = RetrievalIndex.build(gallery, "IVF8,Flat", progress_bar=False)
    with pytest.raises(ValueError, match=f"{name}: must be"):
        index.set_search_parameters(parameters)


def test_fewer_results_than_k_are_reported(caplog):
    from vitp.retrieval.evaluate import evaluate_retrieval
    from vitp.retrieval.search import search_index

    # 600 vectors in 8 IVF lists, one list visited: about 75 candidates, fewer than the 100 asked for.
    gallery, queries = random_features(600), random_features(4, seed=1, prefix="q")
    index = RetrievalIndex.build(gallery, "IVF8,Flat", search_parameters={"nprobe": 1}, progress_bar=False)
    with caplog.at_level(logging.WARNING, logger="vitp"):
        results = search_index(index, queries, 100)
    assert (results.ids < 0).any()
    assert "4 of the 4 queries got fewer than 100 results" in caplog.text and "raise nprobe" in caplog.text

    report = evaluate_retrieval(queries, index=index, top_k=[100], full_map=False, progress_bar=False)
    assert any("4 of 4 queries got fewer than 100 results" in line for line in report.summary_lines())
    assert report.to_dict()["warnings"]
    exhaustive = RetrievalIndex.build(gallery, "IVF8,Flat", search_parameters={"nprobe": 8}, progress_bar=False)
    assert not evaluate_retrieval(queries, index=exhaustive, top_k=[100], full_map=False, progress_bar=False).notes


def test_features_listing_an_image_twice_are_refused(tmp_path):
    # A duplicate would find its own copy, which leave-one-out (by path) cannot remove.
    paths = ["/d/a/1.png", "/d/a/2.png", "/d/b/3.png", "/d/a/1.png", "/d/b/3.png", "/d/b/3.png"]
    np.savez(tmp_path / "dup.npz", features=np.eye(6, dtype=np.float32), image_paths=paths)
    with pytest.raises(RetrievalError, match=r"2 image paths appear more than once: /d/a/1.png \(2x\), /d/b/3.png \(3x\)"):
        load_features(tmp_path / "dup.npz")


def test_a_factory_whose_index_refuses_plain_add_is_a_clear_error():
    with pytest.raises(RetrievalError, match="'IDMap,Flat': FAISS cannot add the gallery vectors .*add_with_ids"):
        RetrievalIndex.build(random_features(50), "IDMap,Flat", progress_bar=False)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda meta: [1], "holds a JSON list, not an object"),
        (lambda meta: {k: v for k, v in meta.items() if k not in ("factory", "stores_vectors")},
         "missing factory, stores_vectors"),
        (lambda meta: {**meta, "feature_dimension": "16"}, "feature_dimension is str"),
        (lambda meta: {**meta, "dba": {"k": 2}}, "dba lacks"),
        (lambda meta: {**meta, "feature_dimension": 8}, "says 8-dimensional features, but the index .* take 16"),
    ],
)
def test_a_damaged_meta_json_is_a_clear_error(tmp_path, damage, message):
    path = RetrievalIndex.build(random_features(20), progress_bar=False).save(tmp_path / "i")
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps(damage(meta)))
    with pytest.raises(RetrievalError, match=f"damaged index.*{message}"):
        RetrievalIndex.load(path, faiss_device="cpu")


def test_huge_feature_values_are_normalised_not_zeroed_and_2d_labels_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(6, 4)).astype(np.float32)
    paths = [f"/d/c{i % 2}/{i}.png" for i in range(6)]
    np.savez(tmp_path / "huge.npz", features=vectors * np.float32(1e30), image_paths=paths)
    np.testing.assert_allclose(load_features(tmp_path / "huge.npz").features, l2_normalise(vectors), rtol=1e-5)
    np.savez(tmp_path / "labels2d.npz", features=vectors, image_paths=paths, labels=np.array([["a", "b"]] * 6))
    with pytest.raises(RetrievalError, match="'labels' must be a 1-D list of strings, got shape \\(6, 2\\)"):
        load_features(tmp_path / "labels2d.npz")
