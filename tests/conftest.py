"""Shared fixtures: tiny random InternViTs and transformers models built from scratch (no downloads)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from vitp import build_vit
from vitp.data.templates import prepare_tokenizer
from vitp.data.tokenizer import train_tokenizer
from vitp_testing import randomize_

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skipped, with the reason, on machines without it. Those in tests/gpu take
    their device from a fixture: VITP_GPU_TESTS_ON_CPU=1 (benchmarks/gpu_check.sh --dry-run) runs them
    on the CPU with tiny models."""
    if torch.cuda.is_available():
        return
    on_cpu = os.environ.get("VITP_GPU_TESTS_ON_CPU") == "1"
    skip = pytest.mark.skip(reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs these)")
    for item in items:
        if "gpu" in item.keywords and not (on_cpu and item.path.parent.name == "gpu"):
            item.add_marker(skip)


@pytest.fixture
def tiny_vit():
    return randomize_(build_vit("internvit-tiny")).eval()


@pytest.fixture
def pixels():
    return torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))


CORPUS = [
    "What is in this image? A harbour with many boats.",
    "Is there water in the image? Yes, most of it is water.",
    "Describe the scene. Farmland, forest, marsh, beach and open sea.",
    "Which option matches the image? A. forest B. farmland C. sea",
] * 10


@pytest.fixture(scope="session")
def bpe_tokenizer():
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    prepare_tokenizer(tokenizer)
    return tokenizer


@pytest.fixture(autouse=True)
def _progress_enabled():
    """`--no_progress` turns progress off for the rest of a process; tests run `main()` in one process."""
    import vitp.progress

    vitp.progress._enabled = True
    yield
    vitp.progress._enabled = True
