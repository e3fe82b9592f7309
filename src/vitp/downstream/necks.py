"""Necks: what turns a plain ViT (one map at stride 16) into maps at strides 4, 8, 16, 32 (and more).

* ``SimpleFPN`` — ViTDet's simple feature pyramid (Li et al. 2022, detectron2's ``SimpleFeaturePyramid``):
  the last layer's map, deconvolved to strides 8 and 4 and max-pooled to stride 32, then a 1x1 and a 3x3
  convolution (each with LayerNorm) per level; extra levels by stride-2 subsampling of the coarsest.
* ``ViTAdapter`` — ViT-Adapter (Chen et al. 2023) as ViTP configures it (upstream ``InternViTAdapter``):
  a convolutional spatial prior module (SPM) gives maps at strides 4-32; four interaction blocks, each
  around a range of ViT blocks, inject the SPM's features into the ViT tokens (deformable attention,
  scaled by a learned gamma) and extract the ViT's back into them (deformable attention + a ConvFFN);
  the ViT's final map is added to every level.

Both take the padded image and the ViT's patch tokens from ``vitp.downstream.backbone.DenseEncoder``
and run the ViT's blocks themselves (the adapter between its interactions). Parameter names follow
upstream's where the structure is the same (``level_embed``, ``spm.*``, ``interactions.N.injector.*``,
``interactions.N.extractor.*``, ``up``).

A ViT whose patch is not 16 (InternViT's 14, kept) has its map resampled to the stride-16 grid before
anything else uses it: bilinear, with the pixel geometry kept (a patch-p token covers pixels
[p*i, p*(i+1))), as upstream resamples the ViT's map onto the other levels.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, LayerNorm2d, trunc_normal_

from vitp.downstream.deformable_attention import MSDeformAttn
from vitp.model.vision import InternViT

# ViTP's interaction blocks for a 24-layer ViT (InternViT-300M): block ranges, both ends included.
VITP_INTERACTION_INDEXES = ((0, 7), (8, 11), (12, 15), (16, 23))
VITP_DEPTH = 24

ViTStem = tuple[torch.Tensor, tuple[int, int]]  # patch tokens (B, Hv*Wv, C) and their grid (Hv, Wv)


# --------------------------------------------------------------------------------------------------
# Shared pieces


def scale_interaction_indexes(depth: int, reference: Sequence[Sequence[int]] = VITP_INTERACTION_INDEXES,
                              reference_depth: int = VITP_DEPTH) -> list[list[int]]:
    """ViTP's interaction ranges for a ViT of another depth.

    Each range ends at the same fraction of the depth as in ViTP's 24-layer ViT (after blocks 8, 12, 16
    and 24: 1/3, 1/2, 2/3, 1), rounded half up, and every range keeps at least one block: 12 layers ->
    [[0,3],[4,5],[6,7],[8,11]]; 4 -> one block each; 45 (InternViT-6B-448) -> [[0,14],[15,22],[23,29],
    [30,44]]. A ViT with fewer blocks than ranges gets one interaction per block (2 -> [[0,0],[1,1]]).
    """
    if depth < len(reference):
        return [[index, index] for index in range(depth)]
    count = len(reference)
    ends: list[int] = []  # exclusive ends
    for position, (_, last) in enumerate(reference):
        end = math.floor((last + 1) * depth / reference_depth + 0.5)
        lowest = (ends[-1] if ends else 0) + 1  # at least one block in this range
        highest = depth - (count - 1 - position)  # and one left for each range after it
        ends.append(min(max(end, lowest), highest))
    starts = [0] + ends[:-1]
    return [[start, end - 1] for start, end in zip(starts, ends)]


def check_interaction_indexes(indexes: Sequence[Sequence[int]], depth: int) -> list[list[int]]:
    """Ranges must cover blocks 0..depth-1 once each, in order: a block outside every range would never run."""
    ranges = [list(pair) for pair in indexes]
    expected_start = 0
    for pair in ranges:
        if len(pair) != 2 or pair[0] != expected_start or pair[1] < pair[0]:
            raise ValueError(
                f"interaction_indexes {ranges} must be consecutive [first, last] block ranges covering blocks "
                f"0..{depth - 1} of the ViT, e.g. {scale_interaction_indexes(depth)}"
            )
        expected_start = pair[1] + 1
    if expected_start != depth or not ranges:
        raise ValueError(
            f"interaction_indexes {ranges} must end at the ViT's last block {depth - 1}, "
            f"e.g. {scale_interaction_indexes(depth)}"
        )
    return ranges


def to_stride16(vit_map: torch.Tensor, patch_size: int, size: tuple[int, int]) -> torch.Tensor:
    """The ViT's map (B, C, Hv, Wv) at stride ``patch_size`` resampled to the stride-16 grid of ``size``.

    Bilinear at the true scale (patch/16) rather than "to this size", so that token centres stay on
    their pixels; the ViT's grid covers the (padded) image, so the result is at least ``size`` and is
    cut to it. A patch of 16 needs nothing."""
    if patch_size == 16 and tuple(vit_map.shape[-2:]) == tuple(size):
        return vit_map
    resampled = F.interpolate(
        vit_map, scale_factor=patch_size / 16, mode="bilinear", align_corners=False, recompute_scale_factor=False
    )
    return resampled[..., : size[0], : size[1]]


def run_blocks(vit: InternViT, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """ViT blocks ``first``..``last`` (both included), recomputed in the backward pass when the ViT has
    gradient checkpointing on and a gradient will flow through them. Unlike ``InternViT._run_block`` this
    does not ask for training mode: a frozen ViT runs in eval mode, yet under the adapter the gradients of
    the injectors pass through its blocks and their activations are worth recomputing (upstream's
    ``with_cp`` checkpoints in any mode too)."""
    recompute = vit.grad_checkpointing and torch.is_grad_enabled() and x.requires_grad
    for index in range(first, last + 1):
        block = vit.blocks[index]
        x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if recompute else block(x)
    return x


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


class OutputConvs(nn.Module):
    """Per level a 1x1 convolution to ``out_channels`` and a 3x3 one, each followed by a LayerNorm
    (ViTDet's output layers; also upstream's detection neck, its ``SimpleFPN`` with ``use_residual=False``).
    Convolutions have no bias (a norm follows) and are Xavier-initialised, as upstream's neck."""

    def __init__(self, in_channels: Sequence[int], out_channels: int):
        super().__init__()
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, out_channels, 1, bias=False), LayerNorm2d(out_channels)) for c in in_channels
        )
        self.output = nn.ModuleList(
            nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels))
            for _ in in_channels
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [out(lateral(x)) for x, lateral, out in zip(features, self.lateral, self.output)]


def add_pooled_levels(features: list[torch.Tensor], num_levels: int) -> list[torch.Tensor]:
    """Levels past the last by taking every other pixel of it (``max_pool2d(kernel 1, stride 2)``:
    detectron2's ``LastLevelMaxPool`` and upstream's neck with ``num_outs=5``)."""
    while len(features) < num_levels:
        features.append(F.max_pool2d(features[-1], kernel_size=1, stride=2))
    return features


def _check_levels(num_levels: int) -> int:
    if not isinstance(num_levels, int) or num_levels < 4:
        raise ValueError(f"num_levels must be an integer >= 4 (strides 4, 8, 16, 32, then 64, ...), got {num_levels!r}")
    return num_levels


def _maybe_checkpoint(enabled: bool, function: Callable, *args):
    """Recompute ``function`` in the backward pass instead of storing its activations (training only)."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
    return function(*args)


# --------------------------------------------------------------------------------------------------
# SimpleFPN (ViTDet)


class SimpleFPN(nn.Module):
    """ViTDet's simple feature pyramid on the ViT's last layer.

    Stride 4: deconv (dim -> dim/2), LayerNorm, GELU, deconv (-> dim/4); stride 8: deconv (-> dim/2);
    stride 16: the map itself; stride 32: 2x2 max-pool. Then ``OutputConvs`` to ``out_channels`` (ViTDet:
    256) and pooled levels up to ``num_levels`` (ViTP's detectors: 5)."""

    def __init__(self, embed_dim: int, *, depth: int, out_channels: int = 256, num_levels: int = 4):
        super().__init__()
        if not isinstance(out_channels, int) or out_channels <= 0:
            raise ValueError(f"out_channels must be a positive integer, got {out_channels!r}")
        self.depth = depth
        self.num_levels = _check_levels(num_levels)
        half, quarter = embed_dim // 2, embed_dim // 4
        self.scale4 = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, half, kernel_size=2, stride=2),
            LayerNorm2d(half),
            nn.GELU(),
            nn.ConvTranspose2d(half, quarter, kernel_size=2, stride=2),
        )
        self.scale8 = nn.ConvTranspose2d(embed_dim, half, kernel_size=2, stride=2)
        self.scale32 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.output_convs = OutputConvs([quarter, half, embed_dim, embed_dim], out_channels)
        self.out_channels = [out_channels] * num_levels
        self.grad_checkpointing = False

    def forward(self, pixels: torch.Tensor, stem: ViTStem, vit: InternViT) -> list[torch.Tensor]:
        tokens, grid = stem
        x = run_blocks(vit, tokens, 0, self.depth - 1)
        size = (pixels.shape[-2] // 16, pixels.shape[-1] // 16)
        x16 = to_stride16(tokens_to_map(x, grid), vit.config.patch_size, size)
        features = [self.scale4(x16), self.scale8(x16), x16, self.scale32(x16)]
        return add_pooled_levels(self.output_convs(features), self.num_levels)


# --------------------------------------------------------------------------------------------------
# ViT-Adapter


class SpatialPriorModule(nn.Module):
    """A small ResNet-like stem: maps at strides 4, 8, 16, 32, each projected to the ViT's width.
    ViTP's (upstream's) version normalises with channels-first LayerNorms, not BatchNorm."""

    def __init__(self, inplanes: int, embed_dim: int):
        super().__init__()

        def conv_norm_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), LayerNorm2d(cout), nn.ReLU(inplace=True)]

        self.stem = nn.Sequential(
            *conv_norm_relu(3, inplanes, 2),
            *conv_norm_relu(inplanes, inplanes, 1),
            *conv_norm_relu(inplanes, inplanes, 1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(*conv_norm_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*conv_norm_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*conv_norm_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c1 = self.stem(pixels)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)


class ConvFFN(nn.Module):
    """fc1 -> 3x3 depth-wise convolution on each level's map -> GELU -> fc2, over the concatenated tokens
    of several levels (their (H, W) given, rather than inferred from a 16:4:1 token ratio as upstream does,
    which only holds for sizes that are multiples of 32)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, level_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        x = self.fc1(x)
        levels = x.split([h * w for h, w in level_shapes], dim=1)
        x = torch.cat(
            [self.dwconv(tokens_to_map(level, shape)).flatten(2).transpose(1, 2) for level, shape in zip(levels, level_shapes)],
            dim=1,
        )
        return self.drop(self.fc2(self.drop(self.act(x))))


class Injector(nn.Module):
    """ViT tokens (queries) attend to the SPM's three levels; the result is added scaled by ``gamma``
    (initialised to ``init_values``: 0.1 in ViTP), so that at first the ViT sees almost its own tokens."""

    def __init__(self, dim: int, num_heads: int, num_points: int, deform_ratio: float, init_values: float):
        super().__init__()
        # upstream builds these with nn.LayerNorm's default epsilon (1e-5)
        self.query_norm = nn.LayerNorm(dim)
        self.feat_norm = nn.LayerNorm(dim)
        self.attn = MSDeformAttn(dim, num_levels=3, num_heads=num_heads, num_points=num_points, value_ratio=deform_ratio)
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, query, reference_points, feat, spatial_shapes):
        attended = self.attn(self.query_norm(query), reference_points, self.feat_norm(feat), spatial_shapes)
        return query + self.gamma * attended


class Extractor(nn.Module):
    """SPM tokens (queries, three levels) attend to the ViT's map; then a ConvFFN, with DropPath."""

    def __init__(self, dim: int, num_heads: int, num_points: int, deform_ratio: float, with_cffn: bool,
                 cffn_ratio: float, drop_path: float):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.feat_norm = nn.LayerNorm(dim)
        self.attn = MSDeformAttn(dim, num_levels=1, num_heads=num_heads, num_points=num_points, value_ratio=deform_ratio)
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
            self.ffn_norm = nn.LayerNorm(dim)
            self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, query, reference_points, feat, spatial_shapes, level_shapes):
        query = query + self.attn(self.query_norm(query), reference_points, self.feat_norm(feat), spatial_shapes)
        if self.with_cffn:
            query = query + self.drop_path(self.ffn(self.ffn_norm(query), level_shapes))
        return query


class InteractionBlock(nn.Module):
    """Injector -> the ViT blocks of this range -> extractor (-> two more extractors in the last block)."""

    def __init__(self, dim: int, *, num_heads: int, num_points: int, deform_ratio: float, init_values: float,
                 with_cffn: bool, cffn_ratio: float, drop_path: float, extra_extractor: bool):
        super().__init__()
        extractor = dict(num_heads=num_heads, num_points=num_points, deform_ratio=deform_ratio, with_cffn=with_cffn,
                         cffn_ratio=cffn_ratio, drop_path=drop_path)
        self.injector = Injector(dim, num_heads, num_points, deform_ratio, init_values)
        self.extractor = Extractor(dim, **extractor)
        self.extra_extractors = nn.ModuleList(Extractor(dim, **extractor) for _ in range(2)) if extra_extractor else None


class ViTAdapter(nn.Module):
    """ViT-Adapter as ViTP uses it (upstream ``InternViTAdapter``): SPM + interaction blocks around the ViT.

    Defaults are ViTP's configs: 64 SPM channels, 16 deformable heads of 4 points, ``deform_ratio`` and
    ``cffn_ratio`` 0.25, ``init_values`` 0.1, extra extractors in the last interaction, the ViT's map added
    to every level, a LayerNorm on each output. ``interaction_indexes`` default to ViTP's
    [[0,7],[8,11],[12,15],[16,23]] scaled to the ViT's depth (:func:`scale_interaction_indexes`).
    ``out_channels`` adds ``OutputConvs`` (upstream's detection neck: 256); ``num_levels`` > 4 adds pooled levels.
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        depth: int,
        drop_path_rate: float = 0.1,
        interaction_indexes: Sequence[Sequence[int]] | None = None,
        conv_inplane: int = 64,
        n_points: int = 4,
        deform_num_heads: int = 16,
        init_values: float = 0.1,
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        deform_ratio: float = 0.25,
        add_vit_feature: bool = True,
        use_extra_extractor: bool = True,
        use_final_norm: bool = True,
        out_channels: int | None = None,
        num_levels: int = 4,
    ):
        super().__init__()
        if interaction_indexes is None:
            interaction_indexes = scale_interaction_indexes(depth)
        self.interaction_indexes = check_interaction_indexes(interaction_indexes, depth)
        self.num_levels = _check_levels(num_levels)
        self.add_vit_feature = add_vit_feature
        self.grad_checkpointing = False

        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        self.spm = SpatialPriorModule(conv_inplane, embed_dim)
        count = len(self.interaction_indexes)
        self.interactions = nn.ModuleList(
            InteractionBlock(
                embed_dim, num_heads=deform_num_heads, num_points=n_points, deform_ratio=deform_ratio,
                init_values=init_values, with_cffn=with_cffn, cffn_ratio=cffn_ratio, drop_path=drop_path_rate,
                extra_extractor=use_extra_extractor and i == count - 1,
            )
            for i in range(count)
        )
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
        self.norms = nn.ModuleList(LayerNorm2d(embed_dim) for _ in range(4)) if use_final_norm else None
        if out_channels is None:
            self.output_convs = None
            self.out_channels = [embed_dim] * num_levels
        else:
            if not isinstance(out_channels, int) or out_channels <= 0:
                raise ValueError(f"out_channels must be a positive integer or None, got {out_channels!r}")
            self.output_convs = OutputConvs([embed_dim] * 4, out_channels)
            self.out_channels = [out_channels] * num_levels
        self._init_weights()

    def _init_weights(self) -> None:
        """Upstream's: truncated normal (std 0.02) linears, He-normal (fan-out) convolutions, zero biases,
        unit norms; then each deformable attention's own init; a standard-normal level embedding."""
        for module in [*self.spm.modules(), *self.interactions.modules(), self.up]:
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, pixels: torch.Tensor, stem: ViTStem, vit: InternViT) -> list[torch.Tensor]:
        x, grid = stem
        batch, _, height, width = pixels.shape
        checkpointing = self.grad_checkpointing and self.training
        c1, c2, c3, c4 = _maybe_checkpoint(checkpointing, self.spm, pixels.to(self.level_embed.dtype))
        level_shapes = [tuple(c.shape[-2:]) for c in (c2, c3, c4)]
        c = torch.cat(
            [level.flatten(2).transpose(1, 2) + self.level_embed[i] for i, level in enumerate((c2, c3, c4))], dim=1
        )

        # Reference points from pixel geometry: a query at pixel (y, x), as a fraction of the attended
        # map's extent (the padded image for the SPM's levels, the ViT's grid times its patch for the ViT).
        patch = vit.config.patch_size
        vit_extent = (grid[0] * patch, grid[1] * patch)
        injector_points = reference_points([grid], [patch], (height, width), pixels.device)
        extractor_points = reference_points(level_shapes, [8, 16, 32], vit_extent, pixels.device)

        for (first, last), interaction in zip(self.interaction_indexes, self.interactions):
            x = _maybe_checkpoint(checkpointing, interaction.injector, x, injector_points, c, level_shapes)
            x = run_blocks(vit, x, first, last)
            extractors = [interaction.extractor, *(interaction.extra_extractors or [])]
            for extractor in extractors:
                c = _maybe_checkpoint(checkpointing, extractor, c, extractor_points, x, [grid], level_shapes)

        sizes = [h * w for h, w in level_shapes]
        c2, c3, c4 = (tokens_to_map(level, shape) for level, shape in zip(c.split(sizes, dim=1), level_shapes))
        c1 = self.up(c2) + c1
        features = [c1, c2, c3, c4]
        if self.add_vit_feature:
            x16 = to_stride16(tokens_to_map(x, grid), patch, level_shapes[1])
            features = [
                c1 + F.interpolate(x16, scale_factor=4, mode="bilinear", align_corners=False),
                c2 + F.interpolate(x16, scale_factor=2, mode="bilinear", align_corners=False),
                c3 + x16,
                c4 + F.interpolate(x16, scale_factor=0.5, mode="bilinear", align_corners=False),
            ]
        if self.norms is not None:
            features = [norm(f) for norm, f in zip(self.norms, features)]
        if self.output_convs is not None:
            features = self.output_convs(features)
        return add_pooled_levels(features, self.num_levels)


def reference_points(
    grids: Sequence[tuple[int, int]], strides: Sequence[int], extent: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """(1, sum of H*W, 1, 2): the (x, y) of each query's pixel centre as a fraction of ``extent`` pixels,
    for queries on ``grids`` of the given ``strides``. With every grid an exact division of ``extent``
    this is upstream's ``get_reference_points``: ((j + 0.5) / W, (i + 0.5) / H) on each grid."""
    points = []
    for (rows, cols), stride in zip(grids, strides):
        y = (torch.arange(rows, dtype=torch.float32, device=device) + 0.5) * stride / extent[0]
        x = (torch.arange(cols, dtype=torch.float32, device=device) + 0.5) * stride / extent[1]
        yy, xx = torch.meshgrid(y, x, indexing="ij")
        points.append(torch.stack([xx.flatten(), yy.flatten()], -1))
    return torch.cat(points)[None, :, None, :]
