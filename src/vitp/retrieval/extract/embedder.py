"""The embedder of feature extraction: the ViT on its device and dtype, and what a feature is.

The model is loaded once in fp32 and fingerprinted (SHA-256 of its weights, whatever file format or
precision they were stored in), then cast to the compute dtype. :func:`extraction_settings` is the
record of what produced a set of features; it travels with every features file, embedding store and
index, and is what queries are checked against. :func:`embed_batch` is the forward: a chosen layer,
mean over patch tokens (or CLS), L2-normalised.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import vitp
from vitp.errors import ConfigError
from vitp.options import POOLS, PRECISIONS, torch_dtype
from vitp.retrieval.feature_file import FEATURES_FORMAT



def resolve_device(device: str, local_rank: int | None = None) -> torch.device:
    """``auto``: a GPU if there is one. Under torchrun (``local_rank`` given) ``auto`` and ``cuda``
    mean this process's own GPU, ``cuda:<local rank>``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device}: CUDA is not available on this machine (torch {torch.__version__})")
    if device == "cuda" and local_rank is not None:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} has no GPU of its own: this node has {torch.cuda.device_count()}; "
                f"start at most that many processes per node (torchrun --nproc_per_node)"
            )
        device = f"cuda:{local_rank}"
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r}: expected auto, cpu, cuda or cuda:N") from None


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto``: bf16 on a GPU that has it (fp16 otherwise), fp32 on CPU (the seed's precision; pass
    ``bf16`` explicitly on CPUs with AMX or AVX512-BF16, where it is several times faster)."""
    if dtype == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if dtype not in PRECISIONS:
        raise ValueError(f"dtype {dtype!r}: expected auto, {', '.join(PRECISIONS)}")
    return dtype


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the weights as fp32 (names, shapes, values): the same weights give the same
    fingerprint whatever file format or precision they were stored in."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        values = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
        digest.update(f"{name}:{tuple(values.shape)};".encode())
        digest.update(memoryview(values).cast("B"))
    return "sha256:" + digest.hexdigest()[:32]


@dataclass
class FeatureModel:
    """A ViT ready to embed images, with what identifies its features."""

    model: vitp.InternViT
    checkpoint: str
    fingerprint: str
    device: torch.device
    dtype: str

    @property
    def image_size(self) -> int:
        return self.model.config.image_size


def load_feature_model(
    vit_checkpoint: str | Path,
    *,
    vit_config: vitp.VisionConfig | None = None,
    image_size: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    local_rank: int | None = None,
) -> FeatureModel:
    """Load the ViT in fp32 (for the fingerprint), then move it to the compute device and dtype."""
    torch_device = resolve_device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)  # NCCL, pinned memory and caches follow the current device
    dtype_name = resolve_dtype(dtype, torch_device)
    model = vitp.load_vit(vit_checkpoint, config=vit_config, image_size=image_size, dtype=torch.float32)
    fingerprint = model_fingerprint(model)
    model = model.to(torch_device, torch_dtype(dtype_name)).eval()
    return FeatureModel(model, str(Path(vit_checkpoint).resolve()), fingerprint, torch_device, dtype_name)


def extraction_settings(feature_model: FeatureModel, select_layer: int, pool: str, max_pixels: int) -> dict[str, Any]:
    """What produced a set of features; stored in the features file and in every index built from it."""
    model = feature_model.model
    if pool not in POOLS:
        raise ValueError(f"pool {pool!r}: expected one of {', '.join(POOLS)}")
    try:
        layer = model.resolve_layer(select_layer)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return {
        "format": FEATURES_FORMAT,
        "vitp_version": vitp.__version__,
        "vit_checkpoint": feature_model.checkpoint,
        "model_fingerprint": feature_model.fingerprint,
        "model_config": model.config.to_dict(),
        "select_layer": select_layer,
        "layer": layer,  # select_layer resolved to 0..num_layers, so that -1 and 24 compare equal
        "pool": pool,
        "image_size": model.config.image_size,
        "normalization": "l2",
        "dtype": feature_model.dtype,
        "max_pixels": max_pixels,
    }


@torch.inference_mode()
def embed_batch(model: vitp.InternViT, pixel_values: torch.Tensor, layer: int, pool: str) -> torch.Tensor:
    """Pooled, L2-normalised float32 features of one batch: (B, 3, H, W) -> (B, D)."""
    tokens = model(pixel_values, select_layer=layer)  # (B, 1 + patches, D), CLS first
    if pool == "cls":
        pooled = tokens[:, 0].float()
    else:
        pooled = tokens[:, 1:].mean(dim=1, dtype=torch.float32)
    return F.normalize(pooled, dim=-1)
