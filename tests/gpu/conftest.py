"""Fixtures of the GPU checks (``@pytest.mark.gpu``; run by benchmarks/gpu_check.sh).

On a CUDA machine they run on the GPU with the real model sizes (InternViT-300M at 448 px). Without one
they are skipped, except under ``VITP_GPU_TESTS_ON_CPU=1`` (the script's ``--dry-run``), where the same
checks run on the CPU with tiny models so that they cannot rot unnoticed between GPU runs."""

import pytest
import torch

from vitp import build_vit

from gpu_testing import lively_


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def vit_preset(device) -> str:
    """InternViT-300M (448 px, 1025 tokens: the size whose SDPA takes the flash kernel) on a GPU."""
    return "internvit-300m" if device == "cuda" else "internvit-tiny"


@pytest.fixture(scope="session")
def vlm_preset(device) -> str:
    return "internvl-small" if device == "cuda" else "internvl-tiny"


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """fp32 comparisons must be fp32: TF32 (on by default for cuDNN convolutions) would loosen them."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="session")
def lively_vit(vit_preset):
    """The ViT of the checks, fp32 on the CPU (each test moves a copy where it needs it). Attention
    is peaked 2x, not 4x: through InternViT-300M's 24 layers 4x makes it chaotic, and bf16 rounding
    alone then moves the output by 40 % (measured), which no tolerance could tell from a bug."""
    torch.manual_seed(0)
    return lively_(build_vit(vit_preset), attention_scale=2.0).eval()
