"""Shared fixtures: tiny random InternViTs and transformers models built from scratch (no downloads)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from vitp import build_vit
from vitp_testing import randomize_

torch.set_num_threads(2)


@pytest.fixture
def tiny_vit():
    return randomize_(build_vit("internvit-tiny")).eval()


@pytest.fixture
def pixels():
    return torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
