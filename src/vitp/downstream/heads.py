"""Decode heads for dense prediction: UPerNet (pyramid pooling + FPN) and change detection's feature fusion.

``UPerHead`` is mmseg's UPerHead as ViTP's configs use it (channels 512, pool scales 1/2/3/6, dropout 0.1,
bilinear resizing with ``align_corners=False``). Its parameter names are mmseg's (``psp_modules.0.1.conv``,
``lateral_convs.0.bn``, ``fpn_bottleneck``, ``conv_seg``, ...), so the ``decode_head.*`` tensors of an mmseg
or open-cd checkpoint fit it as they are.

BatchNorm layers are plain ``nn.BatchNorm2d`` (``norm="batch"``). ViTP trains with SyncBN; under DDP call
``torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)`` before wrapping the model, or build the heads with
``norm="sync_batch"``. ``FeatureFusion`` is open-cd's ``FeatureFusionNeck``: it joins the features of the
two dates of a change-detection pair level by level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

NORMS = {"batch": nn.BatchNorm2d, "sync_batch": nn.SyncBatchNorm}
FUSION_POLICIES = ("concat", "sum", "diff", "abs_diff")


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
    return NORMS[norm](channels)


def _synchronised_across_processes(norm: nn.Module) -> bool:
    """Whether a SyncBatchNorm will gather its statistics from more than one process in this forward."""
    if not isinstance(norm, nn.SyncBatchNorm) or not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(norm.process_group or dist.group.WORLD) > 1


class ConvBNReLU(nn.Module):
    """Conv (no bias: the norm has one) -> BatchNorm -> ReLU: mmcv's ``ConvModule`` with a BN norm, with its
    submodule names (``conv``, ``bn``) and initialisation (Kaiming normal, fan-out; BN weight 1, bias 0).

    One case differs from mmcv, where mmcv crashes: in training, a map with a single value per channel
    (a batch of 1 through the pyramid pooling's 1x1 branch, unless SyncBN gathers more values from other
    processes) has no batch statistics (PyTorch raises "Expected more than 1 value per channel"). That
    input is normalised with the running statistics, as in eval mode, and they are left unchanged."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: str = "batch"):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = _norm_layer(norm, out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self._normalise(self.conv(x)))

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        single_value = x.shape[0] * x.shape[2] * x.shape[3] == 1
        if not (self.training and single_value) or _synchronised_across_processes(self.bn):
            return self.bn(x)
        bn = self.bn
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)


def resize(x: torch.Tensor, size: Sequence[int], align_corners: bool) -> torch.Tensor:
    """Bilinear resize to ``size`` (H, W), the one resampling every step of the heads and segmentors uses."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class PyramidPooling(nn.ModuleList):
    """PSPNet's pyramid pooling module (mmseg ``PPM``): for each scale s, average-pool to s x s, a 1x1
    ConvBNReLU, and resize back to the input's size. Returns one map per scale."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int, align_corners: bool, norm: str):
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvBNReLU(in_channels, channels, 1, norm=norm))
            for scale in pool_scales
        )
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [resize(branch(x), x.shape[2:], self.align_corners) for branch in self]


class UPerHead(nn.Module):
    """UPerNet's decode head: pyramid pooling on the coarsest level, an FPN top-down path over all levels,
    every level resized to the finest one, fused, and classified per pixel.

    Takes a list of feature maps, finest first (``in_channels`` gives each one's channels); returns
    logits ``[B, num_classes, H0, W0]`` at the first (finest) map's resolution."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        align_corners: bool = False,
        norm: str = "batch",
    ):
        super().__init__()
        in_channels = list(in_channels)
        if len(in_channels) < 1 or any(int(c) < 1 for c in in_channels):
            raise ValueError(f"in_channels must list one positive channel count per level, got {in_channels}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.channels = channels
        self.align_corners = align_corners

        self.psp_modules = PyramidPooling(pool_scales, in_channels[-1], channels, align_corners, norm)
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3, norm=norm)
        # The coarsest level enters the FPN through the pyramid pooling, the others through a 1x1 lateral conv.
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1, norm=norm) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3, norm=norm) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3, norm=norm)
        # mmseg drops whole channels (Dropout2d) before the classifier, which starts near zero (std 0.01).
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.in_channels):
            raise ValueError(f"features: expected {len(self.in_channels)} maps, got {len(features)}")
        for level, (feature, expected) in enumerate(zip(features, self.in_channels)):
            if feature.ndim != 4 or feature.shape[1] != expected:
                raise ValueError(
                    f"features[{level}]: expected [B, {expected}, H, W], got {list(feature.shape)}"
                )

        laterals = [conv(features[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self._pyramid_pooling(features[-1]))
        # Top-down: each level adds the (upsampled) level above it, coarsest first.
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:], self.align_corners)

        outputs = [self.fpn_convs[i](laterals[i]) for i in range(len(laterals) - 1)]
        outputs.append(laterals[-1])
        finest = outputs[0].shape[2:]
        outputs = [outputs[0]] + [resize(x, finest, self.align_corners) for x in outputs[1:]]
        fused = self.fpn_bottleneck(torch.cat(outputs, dim=1))
        return self.conv_seg(self.dropout(fused))

    def _pyramid_pooling(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))


class FeatureFusion(nn.Module):
    """open-cd's ``FeatureFusionNeck``: joins the two dates' feature lists level by level.

    ``concat`` stacks channels (date A first, so channels double), ``sum`` adds, ``diff`` is B - A,
    ``abs_diff`` is |A - B|. ViTP's change-detection configs use ``concat``. No parameters."""

    def __init__(self, policy: str = "concat"):
        super().__init__()
        if policy not in FUSION_POLICIES:
            raise ValueError(f"policy must be one of {FUSION_POLICIES}, got {policy!r}")
        self.policy = policy

    def out_channels(self, in_channels: Sequence[int]) -> list[int]:
        """Channels of each fused level, given the encoder's: what the decode head's ``in_channels`` is."""
        return [2 * c if self.policy == "concat" else c for c in in_channels]

    def forward(self, features_a: Sequence[torch.Tensor], features_b: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features_a) != len(features_b):
            raise ValueError(f"features_a and features_b: {len(features_a)} levels against {len(features_b)}")
        return [self._fuse(a, b) for a, b in zip(features_a, features_b)]

    def _fuse(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.policy == "concat":
            return torch.cat([a, b], dim=1)
        if self.policy == "sum":
            return a + b
        if self.policy == "diff":
            return b - a
        return (a - b).abs()

    def extra_repr(self) -> str:
        return f"policy={self.policy!r}"
