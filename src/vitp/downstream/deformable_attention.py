"""Multi-scale deformable attention (Deformable DETR), in plain PyTorch: nothing to compile.

Each query looks at a few points of every feature level: points are a learned offset away from the
query's reference point, their values are read by bilinear interpolation, and a softmax over all of a
head's points (every level together) weighs them. ViT-Adapter uses it between the ViT's tokens and the
spatial-prior feature maps.

Upstream builds the sampling as a CUDA extension (``ops/make.sh``) and keeps
``ms_deform_attn_core_pytorch`` (one ``grid_sample`` per level) "for debug and test only". The sampling
here is that same formulation (each level's weighted sum accumulated instead of all levels stacked:
within +-20 % of upstream's on 2 CPU cores, neither ahead at every batch size). One gather over the
flattened value with explicit bilinear weights, the other candidate, is 2.3-6.6x slower on 2 CPU cores,
forward and backward, at ViT-Adapter's shapes for 512 px (``benchmarks/downstream.py --deform``).

Semantics are the CUDA kernel's: a location in [0, 1] spans the whole map (pixel centres at
(i + 0.5) / size, i.e. ``align_corners=False``) and points outside it read zeros. The sampling runs in
float32 whatever the autocast dtype, as upstream's kernel does (``custom_fwd(cast_inputs=torch.float32)``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

SpatialShapes = Sequence[tuple[int, int]]


def deformable_sampling(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The sampling core of multi-scale deformable attention.

    ``value`` (batch, sum of H*W over levels, heads, head_dim): the levels' maps flattened row-major and
    concatenated; ``spatial_shapes`` the (H, W) of each level; ``sampling_locations`` (batch, queries,
    heads, levels, points, 2) as (x, y) in [0, 1]; ``attention_weights`` (batch, queries, heads, levels,
    points). Returns (batch, queries, heads * head_dim): per head, the weighted sum of the sampled values.
    """
    batch, length, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    if len(spatial_shapes) != levels:
        raise ValueError(f"spatial_shapes has {len(spatial_shapes)} levels, sampling_locations {levels}")
    if sum(h * w for h, w in spatial_shapes) != length:
        raise ValueError(f"spatial_shapes {list(spatial_shapes)} do not add up to the value's {length} positions")
    # grid_sample wants coordinates in [-1, 1]; heads go into the batch dimension.
    grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1)  # (B*heads, Lq, levels, points, 2)
    weights = attention_weights.transpose(1, 2).flatten(0, 1)  # (B*heads, Lq, levels, points)
    output = value.new_zeros(batch * heads, queries, head_dim)
    for level, level_value in enumerate(value.split([h * w for h, w in spatial_shapes], dim=1)):
        height, width = spatial_shapes[level]
        level_value = level_value.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height, width)
        sampled = F.grid_sample(  # (B*heads, head_dim, Lq, points)
            level_value, grids[:, :, level], mode="bilinear", padding_mode="zeros", align_corners=False
        )
        output = output + (sampled.transpose(1, 2) @ weights[:, :, level, :, None]).squeeze(-1)
    return output.view(batch, heads, queries, head_dim).transpose(1, 2).reshape(batch, queries, heads * head_dim)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention as ViT-Adapter uses it (upstream's ``ops.modules.MSDeformAttn``).

    ``value_ratio`` (upstream's ``ratio``, ViT-Adapter's ``deform_ratio``) narrows the value projection to
    ``int(dim * value_ratio)`` channels, which the output projection widens back to ``dim``.
    """

    def __init__(self, dim: int, num_levels: int, num_heads: int, num_points: int, value_ratio: float = 1.0):
        super().__init__()
        value_dim = int(dim * value_ratio)
        if value_dim <= 0 or value_dim % num_heads:
            raise ValueError(
                f"value_ratio {value_ratio} gives {value_dim} value channels for dim {dim}, which {num_heads} "
                f"heads do not divide: choose num_heads (deform_num_heads) dividing {value_dim}"
            )
        self.dim = dim
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.value_dim = value_dim
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, value_dim)
        self.output_proj = nn.Linear(value_dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: the points of head h start on a ray at angle 2*pi*h/heads,
        point k at k+1 pixels (on the ray's square of radius k+1), with equal attention to all of them."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        grid = directions.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: SpatialShapes,
    ) -> torch.Tensor:
        """``query`` (B, Lq, dim); ``reference_points`` (B or 1, Lq, levels or 1, 2), (x, y) in [0, 1] of the
        value maps' extent; ``value`` (B, sum of H*W, dim) with the levels' (H, W) in ``spatial_shapes``.
        Offsets are in pixels of each level (divided by its width and height). Returns (B, Lq, dim)."""
        batch, queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        if len(spatial_shapes) != levels:
            raise ValueError(f"this attention has {levels} levels; spatial_shapes gives {len(spatial_shapes)}")
        value = self.value_proj(value).view(batch, value.shape[1], heads, self.value_dim // heads)
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, queries, heads, levels, points)
        # Sample in float32 at least (float64 stays float64, for gradcheck).
        dtype = torch.promote_types(value.dtype, torch.float32)
        # (width, height) of each level: offsets are (x, y) in that level's pixels
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=dtype, device=query.device)
        locations = reference_points[:, :, None, :, None, :].to(dtype) + offsets.to(dtype) / normalizer[:, None, :]
        with torch.autocast(device_type=query.device.type, enabled=False):
            sampled = deformable_sampling(value.to(dtype), spatial_shapes, locations, weights.to(dtype))
        return self.output_proj(sampled.to(value.dtype))
