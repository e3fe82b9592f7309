"""`vitp serve` over a Milvus Lite collection: the same answers as over the FAISS index of the same features."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from vitp import build_vit, save_vit
from vitp.errors import RetrievalError
from vitp.retrieval.feature_file import load_features
from vitp.retrieval.index import RetrievalIndex
from vitp.serve.app import create_app
from vitp.serve.server import load_engine
from vitp_testing import randomize_


@pytest.fixture(scope="module")
def milvus_index(served_gallery, tmp_path_factory):
    directory = tmp_path_factory.mktemp("milvus") / "gallery.index"
    gallery = load_features(served_gallery.features)
    RetrievalIndex.build(gallery, backend="milvus", uri=str(directory / "milvus.db"), collection="gallery",
                         progress_bar=False).save(directory)
    return directory


@pytest.fixture(scope="module")
def milvus_client(milvus_index):
    with TestClient(create_app(load_engine(milvus_index, device="cpu"), max_k=50)) as test_client:
        yield test_client


def test_uploads_and_gallery_queries_get_the_faiss_answers(milvus_client, client, served_gallery):
    health = milvus_client.get("/api/health").json()
    assert health["images"] == 25 and health["index_type"].startswith("Milvus Lite FLAT collection gallery")
    for query in served_gallery.queries:
        files = {"image": (query.name, query.read_bytes(), "image/png")}
        from_milvus = milvus_client.post("/api/search", params={"k": 8}, files=files).json()["results"]
        from_faiss = client.post("/api/search", params={"k": 8}, files=files).json()["results"]
        assert [r["path"] for r in from_milvus] == [r["path"] for r in from_faiss]
        assert [r["score"] for r in from_milvus] == pytest.approx([r["score"] for r in from_faiss], abs=1e-5)
    path = served_gallery.gallery_images()[3]
    params = {"path": path, "k": 5, "label": "square"}
    from_milvus = milvus_client.get("/api/search/gallery", params=params).json()["results"]
    assert [r["path"] for r in from_milvus] == [r["path"] for r in client.get("/api/search/gallery", params=params).json()["results"]]
    assert path not in [r["path"] for r in milvus_client.get("/api/search/gallery", params={"path": path}).json()["results"]]


def test_serving_a_collection_with_another_model_is_refused(milvus_index, tmp_path):
    other = tmp_path / "other.safetensors"
    save_vit(randomize_(build_vit("internvit-tiny"), std=0.05, seed=7).eval(), other, to="vitp")
    with pytest.raises(RetrievalError, match="model_fingerprint"):
        load_engine(milvus_index, vit_checkpoint=other, device="cpu")
