"""The dense backbone: a vitp ViT (any InternViT vitp loads) turned into multi-scale feature maps.

``build_encoder`` makes the ViT's adaptations ViTP's downstream configs make (upstream
``InternViT.init_weights`` and ``InternViTAdapter``), then puts a neck (``vitp.downstream.necks``) on it:

* the position embedding is resized bicubically from the pretraining grid (32x32 for 448 px / patch 14)
  to ``image_size // patch_size`` (the crop size the model is trained at); inputs of another size get it
  resampled again on the fly (bicubic, no antialias, as InternVL) instead of failing as upstream would;
* the patch-embedding kernel is optionally resized bicubically (14 -> 16 in every ViTP config);
* DropPath rising linearly over the blocks to ``drop_path_rate`` (0.1 in ViTP);
* gradient checkpointing (upstream's ``with_cp``) of the ViT blocks and of the neck's parts;
* ``freeze_vit``: no gradients to the ViT's parameters and the ViT kept in eval mode (upstream's
  ``_freeze_params``); the neck trains.

Loading is strict (``vitp.load_vit``): a missing, unexpected or mis-shaped ViT tensor is an error.

Input sizes: the image is padded at the bottom and right with zeros to a multiple of 32 (and, for the
ViT, of its patch), as mmseg/mmdet's ``size_divisor=32`` does, and each map is cut back to
``ceil(H / stride) x ceil(W / stride)``. Padding rather than resizing keeps every pixel where it was, so
a map's cell i covers input pixels [stride*i, stride*(i+1)) at every level and the logits a head
upsamples land on the pixels they describe; resizing would change the aspect ratio and the scale.

Like upstream's adapter, dense prediction uses the patch tokens only: the class token takes no part
(it stays in the ViT, so the ViT can still be saved in every format, but it is frozen so that no
optimizer or DDP sees a trainable parameter without a gradient).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from vitp.downstream.necks import SimpleFPN, ViTAdapter
from vitp.model.vision import PRESETS, InternViT, VisionConfig, build_vit
from vitp.model.vit_checkpoint import load_vit

NECKS = ("adapter", "simple_fpn")
SIZE_DIVISOR = 32  # the coarsest of the four strides


# --------------------------------------------------------------------------------------------------
# The ViT's adaptations


def resize_position_embedding(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + h*w, C) -> (1, 1 + grid[0]*grid[1], C): the patch positions resized bicubically
    (``align_corners=False``, no antialias, in float32), the class position kept, as upstream's
    ``resize_pos_embed``. The stored grid must be square (it is, for every InternViT)."""
    side = math.isqrt(pos_embed.shape[1] - 1)
    if side * side != pos_embed.shape[1] - 1:
        raise ValueError(f"pos_embed has {pos_embed.shape[1] - 1} patch positions, not a square grid")
    return resample_abs_pos_embed(
        pos_embed, new_size=list(grid), old_size=[side, side], num_prefix_tokens=1,
        interpolation="bicubic", antialias=False,
    )


def resize_patch_embedding(weight: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The patch-embedding kernel (C, 3, p, p) resized bicubically to ``patch_size`` (upstream's 14 -> 16).

    A plain interpolation, as upstream: the kernel covers (16/14)^2 more pixels with the same values,
    so the embedding of a flat patch grows by about that factor; fine-tuning absorbs it (FlexiViT's
    norm-preserving resize would be another network than ViTP's)."""
    resized = F.interpolate(weight.float(), size=(patch_size, patch_size), mode="bicubic", align_corners=False)
    return resized.to(weight.dtype)


def adapt_vit(vit: InternViT, *, image_size: int, patch_size: int | None = None,
              drop_path_rate: float | None = None) -> InternViT:
    """``vit`` for dense training at ``image_size`` px: patch kernel resized to ``patch_size`` (None keeps
    it), position embedding resized to the ``image_size // patch_size`` grid, DropPath set.

    Returns ``vit`` itself when nothing changes, else a new InternViT that reuses ``vit``'s other tensors
    (no copy: the given ViT is taken over, not cloned)."""
    patch = vit.config.patch_size if patch_size is None else patch_size
    grid = image_size // patch
    if grid < 1:
        raise ValueError(f"image_size {image_size} is smaller than one patch of {patch} pixels")
    config = vit.config.replace(
        image_size=grid * patch,
        patch_size=patch,
        drop_path_rate=vit.config.drop_path_rate if drop_path_rate is None else drop_path_rate,
    )
    if config == vit.config:
        return vit
    state = vit.state_dict()
    if grid != vit.config.grid_size:
        state["pos_embed"] = resize_position_embedding(state["pos_embed"], (grid, grid))
    if patch != vit.config.patch_size:
        state["patch_embed.proj.weight"] = resize_patch_embedding(state["patch_embed.proj.weight"], patch)
    with torch.device("meta"):  # the tensors come from `state`
        adapted = InternViT(config)
    adapted.load_state_dict(state, strict=True, assign=True)
    adapted.set_grad_checkpointing(vit.grad_checkpointing)
    return adapted.train(vit.training)


def patch_tokens(vit: InternViT, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The ViT's patch tokens with position embeddings (no class token), and their grid.

    The image is padded (bottom, right, zeros) to a multiple of the patch; the position embedding is
    resampled to the grid when it is not the one the ViT was built for."""
    patch = vit.config.patch_size
    height, width = pixels.shape[-2:]
    pixels = F.pad(pixels, (0, (-width) % patch, 0, (-height) % patch))
    x = vit.patch_embed(pixels.to(vit.patch_embed.proj.weight.dtype))  # (B, Hv, Wv, C)
    batch, rows, cols, channels = x.shape
    pos_embed = resample_abs_pos_embed(
        vit.pos_embed[:, 1:], new_size=[rows, cols], old_size=list(vit.patch_embed.grid_size),
        num_prefix_tokens=0, interpolation="bicubic", antialias=False,
    )
    x = vit.pos_drop(x.reshape(batch, rows * cols, channels) + pos_embed)
    return vit.norm_pre(x), (rows, cols)


# --------------------------------------------------------------------------------------------------
# The encoder


class DenseEncoder(nn.Module):
    """A ViT and a neck: ``forward(pixels (B, 3, H, W))`` -> maps at ``strides`` (4, 8, 16, 32[, 64...])
    of the input, of ``out_channels`` channels, each ``ceil(H / stride) x ceil(W / stride)``.

    ``num_layers`` (ViT depth + 2) and ``layer_id(name)`` give layer-wise learning-rate decay its layers
    (BEiT's rule, upstream's ``InternViTAdapterLayerDecayOptimizerConstructor``)."""

    def __init__(self, vit: InternViT, neck: SimpleFPN | ViTAdapter, *, freeze_vit: bool = False):
        super().__init__()
        self.vit = vit
        self.neck = neck
        self.freeze_vit = freeze_vit
        self.out_channels: list[int] = list(neck.out_channels)
        self.strides: list[int] = [4 * 2**level for level in range(neck.num_levels)]
        self.num_layers = vit.config.num_layers + 2
        vit.cls_token.requires_grad_(False)  # unused by dense prediction (see the module's docstring)
        if freeze_vit:
            vit.requires_grad_(False)
            vit.eval()

    def train(self, mode: bool = True) -> "DenseEncoder":
        super().train(mode)
        if self.freeze_vit:
            self.vit.eval()  # a frozen ViT runs as at inference: no DropPath
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute ViT blocks and the neck's parts in the backward pass (training only)."""
        self.vit.set_grad_checkpointing(enable)
        self.neck.grad_checkpointing = enable

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (batch, 3, height, width), got {tuple(pixels.shape)}")
        height, width = pixels.shape[-2:]
        padded = F.pad(pixels, (0, (-width) % SIZE_DIVISOR, 0, (-height) % SIZE_DIVISOR))
        # A frozen ViT under a SimpleFPN records no graph (no input of its ops needs a gradient), so it
        # keeps no activations; under the adapter, gradients pass through its blocks to the injectors.
        features = self.neck(padded, patch_tokens(self.vit, padded), self.vit)
        return [f[..., : -(-height // s), : -(-width // s)] for f, s in zip(features, self.strides)]

    # ----------------------------------------------------------------------------------------------
    # Layer-wise learning-rate decay

    def layer_id(self, name: str) -> int:
        """The layer of one of this module's parameters (``named_parameters`` names), BEiT's rule as ViTP
        applies it: the position and patch embeddings and the adapter's level embedding are layer 0,
        ViT block i is layer i + 1, everything else (neck, class token) the top, ``num_layers - 1``.
        Parameters of other modules (heads) belong at the top too; this refuses names it does not own."""
        if name not in self._parameter_names():
            raise ValueError(f"{name!r} is not a parameter of this DenseEncoder (names as named_parameters() gives them)")
        if name in ("vit.pos_embed", "neck.level_embed") or name.startswith("vit.patch_embed."):
            return 0
        block = re.match(r"vit\.blocks\.(\d+)\.", name)
        if block:
            return int(block.group(1)) + 1
        return self.num_layers - 1

    def _parameter_names(self) -> set[str]:
        return {name for name, _ in self.named_parameters()}


# --------------------------------------------------------------------------------------------------
# Building


def build_encoder(
    vit_or_checkpoint: InternViT | VisionConfig | str | Path,
    *,
    neck: str = "adapter",
    image_size: int | None = None,
    patch_size: int | None = None,
    drop_path_rate: float = 0.1,
    grad_checkpoint: bool = False,
    freeze_vit: bool = False,
    out_channels: int | None = None,
    **neck_options: Any,
) -> DenseEncoder:
    """A DenseEncoder on a ViT given as an InternViT (taken over, see :func:`adapt_vit`), a VisionConfig
    or preset name (random weights) or a checkpoint path (any format ``vitp.load_vit`` reads; strict).

    ``neck``: ``"adapter"`` (ViT-Adapter, ViTP's backbone for all its tasks) or ``"simple_fpn"`` (ViTDet).
    ``image_size``: the training crop (upstream's ``img_size``; None: the ViT's pretraining size), which
    sizes the position embedding; ``patch_size``: 16 as ViTP's configs, None keeps the ViT's.
    ``out_channels``: SimpleFPN's width (None: ViTDet's 256); for the adapter None keeps the ViT's width
    (ViTP's segmentation) and a number adds upstream's detection output convolutions.
    ``neck_options``: ``num_levels`` (4; 5 for ViTP's detectors) and the adapter's (see ``ViTAdapter``)."""
    if neck not in NECKS:
        raise ValueError(f"neck must be one of {', '.join(NECKS)}, got {neck!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size <= 0):
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}")
    if patch_size is not None and (not isinstance(patch_size, int) or patch_size <= 0):
        raise ValueError(f"patch_size must be a positive integer or None, got {patch_size!r}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")

    vit = vit_from_source(vit_or_checkpoint)
    vit = adapt_vit(vit, image_size=image_size or vit.config.image_size, patch_size=patch_size,
                    drop_path_rate=drop_path_rate)
    config = vit.config
    if neck == "adapter":
        head = ViTAdapter(config.hidden_size, depth=config.num_layers, drop_path_rate=drop_path_rate,
                          out_channels=out_channels, **neck_options)
    else:
        head = SimpleFPN(config.hidden_size, depth=config.num_layers,
                         out_channels=256 if out_channels is None else out_channels, **neck_options)
    head = head.to(device=vit.pos_embed.device, dtype=vit.pos_embed.dtype)
    encoder = DenseEncoder(vit, head, freeze_vit=freeze_vit)
    encoder.set_grad_checkpointing(grad_checkpoint)
    return encoder.train()  # as a freshly built module is (a loaded ViT comes in eval mode)


def vit_from_source(source: InternViT | VisionConfig | str | Path) -> InternViT:
    """The ViT ``source`` names: itself, a random one of a config or preset name, or a checkpoint's (strict)."""
    if isinstance(source, InternViT):
        return source
    if isinstance(source, VisionConfig):
        return build_vit(source)
    if isinstance(source, str) and source in PRESETS and not Path(source).exists():
        return build_vit(source)
    if isinstance(source, (str, Path)):
        return load_vit(source)
    raise TypeError(
        f"expected an InternViT, a VisionConfig, a preset name or a checkpoint path, got {type(source).__name__}"
    )
