"""Task models: an encoder, a decode head (and optionally an auxiliary head), and the training loss.

``Segmentor`` is mmseg's ``EncoderDecoder``; ``ChangeSegmentor`` is open-cd's ``SiamEncoderDecoder``: one
encoder (shared weights) on both dates of a pair, their features joined by a ``FeatureFusion``, then the
same decode head. Both map pixels to logits at the pixels' size (``model(pixels)``), which is what
``inference.whole_inference`` and ``inference.slide_inference`` call, and compute mmseg's losses
(``model.loss(pixels, labels)``).

Change detection takes one tensor ``[B, 2 * image_channels, H, W]``: date A's channels, then date B's, as
open-cd's ``DualInputSegDataPreProcessor`` stacks them. One tensor keeps the two dates aligned through
every spatial transform, batching and sliding windows without a second code path.

The encoder is any module whose ``forward(pixels)`` returns the list of feature maps the head expects
(finest first) and, for the ``build_*`` functions, has ``out_channels`` (a list of ints).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitp.downstream.heads import FeatureFusion, UPerHead, resize


def segmentation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    average_non_ignored: bool = False,
    align_corners: bool = False,
) -> torch.Tensor:
    """mmseg's ``CrossEntropyLoss`` as a decode head applies it: the head's logits are resized (bilinear)
    to the labels' size, cross-entropy per pixel in float32, ``ignore_index`` pixels contribute nothing.

    mmseg's default (``avg_non_ignore=False``, which ViTP's configs keep) divides the sum by *every*
    pixel, ignored ones included, so padded crops weigh less; ``average_non_ignored=True`` divides by the
    labelled pixels only (PyTorch's own mean)."""
    labels = _as_label_map(labels, logits)
    logits = resize(logits.float(), labels.shape[-2:], align_corners)
    _check_label_values(labels, logits.shape[1], ignore_index)
    per_pixel = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    if not average_non_ignored:
        return per_pixel.mean()
    labelled = (labels != ignore_index).sum().clamp(min=1)
    return per_pixel.sum() / labelled


def _as_label_map(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """[B, H, W] integer class indices (a [B, 1, H, W] map is accepted, as mmseg stores them)."""
    if labels.ndim == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels: expected a [B, H, W] map of class indices with B = {logits.shape[0]}, got {list(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected an integer tensor of class indices, got {labels.dtype}")
    return labels.long()


def _check_label_values(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """A class index outside [0, num_classes) makes cross-entropy fail deep inside CUDA ("device-side assert");
    say which values are wrong instead (a usual cause: a 0 = "no data" class not mapped to the ignore index,
    mmseg's ``reduce_zero_label``, or 0/255 change masks not mapped to 0/1)."""
    invalid = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(invalid.any()):
        values = torch.unique(labels[invalid]).tolist()
        raise ValueError(
            f"labels: class indices must be in [0, {num_classes}) or the ignore index {ignore_index}; "
            f"found {values[:10]}"
        )


class _EncoderDecoder(nn.Module):
    """What segmentation and change detection share: decode, resize to the input, and the losses."""

    def __init__(
        self,
        decode_head: nn.Module,
        auxiliary_head: nn.Module | None,
        ignore_index: int,
        align_corners: bool,
        decode_weight: float,
        auxiliary_weight: float,
        average_non_ignored: bool,
    ):
        super().__init__()
        head_align_corners = getattr(decode_head, "align_corners", align_corners)
        if head_align_corners != align_corners:
            raise ValueError(
                f"align_corners={align_corners} but the decode head resizes with align_corners={head_align_corners}"
            )
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.ignore_index = ignore_index
        self.align_corners = align_corners
        self.decode_weight = decode_weight
        self.auxiliary_weight = auxiliary_weight
        self.average_non_ignored = average_non_ignored

    @property
    def num_classes(self) -> int:
        return self.decode_head.num_classes

    def extract_features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor | None = None):
        """Logits ``[B, num_classes, H, W]`` at the size of ``pixels``; with ``labels``, the losses of
        :meth:`loss` instead and ``"loss"`` their total (the transformers convention, so that a training
        step goes through ``forward``, as DistributedDataParallel needs)."""
        if labels is not None:
            losses = self.loss(pixels, labels)
            return {**losses, "loss": losses["total"]}
        logits = self.decode_head(self.extract_features(pixels))
        return resize(logits, pixels.shape[-2:], self.align_corners)

    def loss(self, pixels: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted losses by name: ``decode``, ``aux`` (with an auxiliary head) and their sum ``total``.
        Each head's logits are resized straight to the labels' size, as mmseg does."""
        features = self.extract_features(pixels)
        losses = {"decode": self.decode_weight * self._head_loss(self.decode_head(features), labels)}
        if self.auxiliary_head is not None:
            losses["aux"] = self.auxiliary_weight * self._head_loss(self.auxiliary_head(features), labels)
        losses["total"] = sum(losses.values())
        return losses

    def _head_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return segmentation_loss(logits, labels, self.ignore_index, self.average_non_ignored, self.align_corners)

    @staticmethod
    def _check_pixels(pixels: torch.Tensor, channels: int | None = None) -> None:
        if pixels.ndim != 4 or (channels is not None and pixels.shape[1] != channels):
            expected = f"[B, {channels}, H, W]" if channels is not None else "[B, C, H, W]"
            raise ValueError(f"pixels: expected {expected}, got {list(pixels.shape)}")


class Segmentor(_EncoderDecoder):
    """mmseg's ``EncoderDecoder``: ``encoder(pixels)`` -> feature maps -> ``decode_head`` -> logits.

    ``auxiliary_head`` (any module mapping the same feature list to logits) only adds a training loss,
    weighted by ``auxiliary_weight``; inference uses the decode head alone. ViTP's configs have none."""

    def __init__(
        self,
        encoder: nn.Module,
        decode_head: nn.Module,
        auxiliary_head: nn.Module | None = None,
        ignore_index: int = 255,
        align_corners: bool = False,
        decode_weight: float = 1.0,
        auxiliary_weight: float = 0.4,
        average_non_ignored: bool = False,
    ):
        super().__init__(
            decode_head, auxiliary_head, ignore_index, align_corners, decode_weight, auxiliary_weight,
            average_non_ignored,
        )
        self.encoder = encoder

    def extract_features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        self._check_pixels(pixels)
        return list(self.encoder(pixels))


class ChangeSegmentor(_EncoderDecoder):
    """open-cd's ``SiamEncoderDecoder``: the shared encoder runs on date A and date B, ``fusion`` joins the
    two feature lists level by level, the decode head classifies each pixel (2 classes: unchanged, changed).

    ``pixels`` is ``[B, 2 * image_channels, H, W]`` (date A's channels first). By default the encoder runs
    twice, once per date, as open-cd does; ``encode_dates_together=True`` runs it once on the two dates
    stacked along the batch, which is faster and gives the same result unless the encoder normalises with
    batch statistics in training (BatchNorm in train mode would then see both dates; a ViT has none)."""

    def __init__(
        self,
        encoder: nn.Module,
        fusion: FeatureFusion,
        decode_head: nn.Module,
        auxiliary_head: nn.Module | None = None,
        image_channels: int = 3,
        encode_dates_together: bool = False,
        ignore_index: int = 255,
        align_corners: bool = False,
        decode_weight: float = 1.0,
        auxiliary_weight: float = 0.4,
        average_non_ignored: bool = False,
    ):
        super().__init__(
            decode_head, auxiliary_head, ignore_index, align_corners, decode_weight, auxiliary_weight,
            average_non_ignored,
        )
        self.encoder = encoder
        self.fusion = fusion
        self.image_channels = image_channels
        self.encode_dates_together = encode_dates_together

    def extract_features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        self._check_pixels(pixels, 2 * self.image_channels)
        date_a, date_b = pixels.split(self.image_channels, dim=1)
        if self.encode_dates_together:
            both = self.encoder(torch.cat([date_a, date_b], dim=0))
            features_a, features_b = zip(*(level.chunk(2, dim=0) for level in both))
        else:
            features_a, features_b = self.encoder(date_a), self.encoder(date_b)
        return self.fusion(list(features_a), list(features_b))


def build_upernet_segmentor(
    encoder: nn.Module,
    num_classes: int,
    channels: int = 512,
    pool_scales: Sequence[int] = (1, 2, 3, 6),
    dropout: float = 0.1,
    norm: str = "batch",
    ignore_index: int = 255,
    align_corners: bool = False,
) -> Segmentor:
    """ViTP's segmentation model: ``encoder`` + UPerHead (defaults as its iSAID/LoveDA/UAVid configs, which
    differ only in ``num_classes``: 16, 7, 8)."""
    head = UPerHead(
        encoder.out_channels, num_classes, channels=channels, pool_scales=pool_scales, dropout=dropout,
        align_corners=align_corners, norm=norm,
    )
    return Segmentor(encoder, head, ignore_index=ignore_index, align_corners=align_corners)


def build_upernet_change_detector(
    encoder: nn.Module,
    num_classes: int = 2,
    policy: str = "concat",
    channels: int = 512,
    pool_scales: Sequence[int] = (1, 2, 3, 6),
    dropout: float = 0.1,
    norm: str = "batch",
    image_channels: int = 3,
    encode_dates_together: bool = False,
    ignore_index: int = 255,
    align_corners: bool = False,
) -> ChangeSegmentor:
    """ViTP's change-detection model: shared ``encoder``, ``FeatureFusion(policy)``, UPerHead over the fused
    channels (ViTP: ``concat``, 2 classes; head channels 512, 1024 in its LEVIR-CD config)."""
    fusion = FeatureFusion(policy)
    head = UPerHead(
        fusion.out_channels(encoder.out_channels), num_classes, channels=channels, pool_scales=pool_scales,
        dropout=dropout, align_corners=align_corners, norm=norm,
    )
    return ChangeSegmentor(
        encoder, fusion, head, image_channels=image_channels, encode_dates_together=encode_dates_together,
        ignore_index=ignore_index, align_corners=align_corners,
    )
