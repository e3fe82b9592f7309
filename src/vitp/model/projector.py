"""Between the ViT and the LLM: pixel shuffle (InternVL's "v2") and the MLP projector ``mlp1``."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


def pixel_shuffle(features: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """(N, W, H, C) -> (N, W*scale, H*scale, C/scale²): merge each 2x2 block of patch tokens into one.

    InternVL's "v2" order: fold H into channels, transpose, fold W, transpose back, so that the token
    grid keeps its orientation."""
    n, w, h, c = features.shape
    if (h * scale) % 1 or (w * scale) % 1:
        raise ValueError(f"a {w}x{h} token grid cannot be pixel-shuffled by {scale}")
    x = features.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


def tokens_per_tile(image_size: int, patch_size: int, downsample_ratio: float) -> int:
    """LLM tokens one tile becomes: (448 / 14)² patches, pixel-shuffled by 0.5 -> 256."""
    return int((image_size // patch_size) ** 2 * downsample_ratio**2)


def build_projector(vision_hidden: int, llm_hidden: int, downsample_ratio: float) -> nn.Sequential:
    """``mlp1``: LayerNorm -> Linear -> GELU -> Linear, from shuffled ViT tokens to LLM embeddings.
    Indices 0, 1, 3 are the parameter names InternVL checkpoints use (mlp1.0, mlp1.1, mlp1.3)."""
    width = vision_hidden * int(round(1 / downsample_ratio)) ** 2
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))


def load_projector_weights(mlp1: nn.Sequential, path: str | Path) -> None:
    """Fill ``mlp1`` from upstream's --mlp_path file: the projector's state dict as InternVL's
    ``tools/extract_mlp.py`` saves it (``0.weight`` ... ``3.bias``; an ``mlp1.`` prefix is accepted),
    .pth/.bin (read with weights_only) or .safetensors. Every tensor must be there with its shape."""
    from vitp.errors import WeightFormatError
    from vitp.tensor_io import open_tensor_source

    source = open_tensor_source(Path(path))
    state = {key.removeprefix("mlp1."): tensor for key, tensor in source.load(source.keys()).items()}
    expected = {key: tuple(tensor.shape) for key, tensor in mlp1.state_dict().items()}
    found = {key: tuple(tensor.shape) for key, tensor in state.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        unknown = sorted(set(found) - set(expected))
        wrong = sorted(key for key in set(found) & set(expected) if found[key] != expected[key])
        raise WeightFormatError(
            f"{path}: not this model's projector (mlp1): missing {missing}, unexpected {unknown[:4]}, "
            f"shapes differ for {[(k, found[k], expected[k]) for k in wrong]}"
        )
    with torch.no_grad():
        for key, parameter in mlp1.state_dict().items():
            parameter.copy_(state[key])
