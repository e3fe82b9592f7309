"""Fixtures of the `vitp serve` tests: a small gallery in class folders, a tiny ViT, its features and a
saved index, built once per session exactly as a user would (`vitp features`, `vitp index build`)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from vitp import build_vit, save_vit
from vitp.retrieval.extract import extract_features
from vitp.retrieval.feature_file import load_features
from vitp.retrieval.index import RetrievalIndex
from vitp.serve.app import create_app
from vitp.serve.server import load_engine
from vitp_testing import draw_shape, randomize_

SHAPES = {
    # class: (colour, how it is drawn)
    "disk": ((220, 40, 40), "ellipse"),
    "square": ((40, 180, 60), "rectangle"),
    "stripes": ((50, 70, 220), "stripes"),
    "cross": ((230, 200, 40), "cross"),
}
PER_CLASS = 6


def make_gallery(root: Path, per_class: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for name, (colour, kind) in SHAPES.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = root / name / f"{name}_{i:02d}.png"
            draw_shape(kind, colour, rng, size=(64, 56), extent=30).save(path)
            paths.append(path)
    return paths


@dataclass
class ServedGallery:
    root: Path  # everything of the fixture; the gallery is root/gallery
    gallery: Path
    vit: Path
    features: Path
    index: Path
    linked: Path  # a gallery entry that is a symlink to a file outside the gallery (indexed: served)
    secret: Path  # a file outside the gallery (never served)
    queries: list[Path]  # images not in the gallery, one per class

    def gallery_images(self) -> list[str]:
        return [str(path) for path in load_features(self.features).image_paths]


@pytest.fixture(scope="session")
def served_gallery(tmp_path_factory) -> ServedGallery:
    root = tmp_path_factory.mktemp("serve")
    gallery = root / "gallery"
    make_gallery(gallery, PER_CLASS, seed=3)
    # Galleries are often symlink farms: an indexed symlink to a file elsewhere is part of the gallery.
    store = root / "store"
    store.mkdir()
    draw_shape("ellipse", SHAPES["disk"][0], np.random.default_rng(9), size=(64, 56), extent=30).save(store / "disk_elsewhere.png")
    linked = gallery / "disk" / "disk_linked.png"
    linked.symlink_to(store / "disk_elsewhere.png")

    vit = root / "vit.safetensors"
    save_vit(randomize_(build_vit("internvit-tiny"), std=0.05).eval(), vit, to="vitp")
    features = root / "gallery.npz"
    extract_features(gallery, features, vit, device="cpu", num_workers=0, progress_bar=False)
    index = root / "gallery.index"
    RetrievalIndex.build(load_features(features), progress_bar=False).save(index)

    # Made after indexing, so none of these is in the index: every one must stay unreachable.
    outside = root / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    draw_shape("rectangle", (255, 255, 255), np.random.default_rng(1), size=(64, 56), extent=30).save(secret)
    draw_shape("rectangle", (255, 255, 255), np.random.default_rng(2), size=(64, 56), extent=30).save(gallery / "square" / "not_indexed.png")
    (gallery / "escape.png").symlink_to(secret)
    (gallery / "up").symlink_to(root, target_is_directory=True)

    queries = make_gallery(root / "queries", per_class=1, seed=11)
    return ServedGallery(root, gallery, vit, features, index, linked, secret, queries)


@pytest.fixture(scope="session")
def engine(served_gallery):
    return load_engine(served_gallery.index, device="cpu", faiss_device="cpu")


@pytest.fixture(scope="session")
def client(engine) -> TestClient:
    with TestClient(create_app(engine, max_k=50)) as test_client:
        yield test_client


@pytest.fixture
def encode_image():
    """image, format -> the encoded bytes."""

    def encode(image: Image.Image, format: str = "PNG") -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=format)
        return buffer.getvalue()

    return encode


@pytest.fixture(scope="session")
def loopback_environment() -> dict[str, str]:
    """The environment without proxy settings, so that test traffic goes straight to the loopback server."""
    return {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
