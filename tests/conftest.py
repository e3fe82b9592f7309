"""Shared fixtures: tiny random InternViTs and transformers models built from scratch (no downloads)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from vitp import build_vit

torch.set_num_threads(2)


def randomize_(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (init leaves LayerScale, biases and norms constant,
    which would let a wrongly mapped tensor go unnoticed)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


@pytest.fixture
def tiny_vit():
    return randomize_(build_vit("internvit-tiny")).eval()


@pytest.fixture
def pixels():
    return torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
