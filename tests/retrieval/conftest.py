"""Fixtures of the retrieval tests: small class folders of coloured shapes and textures, a tiny ViT file."""

from pathlib import Path

import pytest

from retrieval_testing import make_image_tree
from vitp import build_vit, save_vit
from vitp_testing import randomize_


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """3 classes x 4 PNGs under tmp_path/images/<class>/."""
    root = tmp_path / "images"
    make_image_tree(root, per_class=4)
    return root


@pytest.fixture
def vit_file(tmp_path) -> Path:
    """A random internvit-tiny saved as a ViTP-release safetensors (+ JSON config)."""
    path = tmp_path / "vit.safetensors"
    save_vit(randomize_(build_vit("internvit-tiny"), std=0.05).eval(), path)
    return path
