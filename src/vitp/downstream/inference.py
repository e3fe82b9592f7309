"""Evaluation-time inference: the whole image at once, or mmseg's sliding window (``test_cfg.mode='slide'``).

``model`` is any callable mapping pixels ``[N, C_in, h, w]`` to logits ``[N, num_classes, h, w]`` at the
same size: a ``Segmentor``, a ``ChangeSegmentor`` (its 6-channel pairs are cropped like any image), or a
wrapper around either. Both functions run under ``torch.no_grad()``; put the model in eval mode first.

The sliding-window rule (mmseg ``EncoderDecoder.slide_inference``, open-cd's is the same): windows start
every ``stride`` pixels; a window that would cross the bottom or right edge is moved back inside so that it
ends at the edge (windows are never padded); an image smaller than the crop is one window, the image
itself. Every window's logits are summed into their place and each pixel is divided by how many windows
covered it. ViTP's settings (crop, stride): iSAID (896, 896) / (448, 448), LoveDA (512, 512) /
(384, 384), UAVid (768, 768) / (512, 512), LEVIR-CD (256, 256) / (128, 128), S2Looking (512, 512) /
(256, 256); WHU-CD and SVCD use the whole image.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitp.downstream.heads import resize

Model = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def whole_inference(
    model: Model,
    pixels: torch.Tensor,
    size_divisor: int | None = None,
    pad_value: float = 0.0,
    output_size: Sequence[int] | None = None,
    align_corners: bool = False,
) -> torch.Tensor:
    """Logits ``[B, num_classes, H, W]`` for ``pixels`` ``[B, C_in, H, W]``, from one forward pass.

    ``size_divisor``: pad the bottom and right edges with ``pad_value`` up to a multiple of it first, and
    cut the padding off the logits afterwards (open-cd's ``test_cfg=dict(size_divisor=32)``).
    ``output_size``: resize the logits (bilinear) to this (H, W) at the end, mmseg's ``rescale`` back to
    the original image size when the image was resized for testing."""
    _check_pixels(pixels)
    padded = _pad_to_multiple(pixels, size_divisor, pad_value)
    logits = _run(model, padded, expected_batch=pixels.shape[0])
    return _finish(logits[:, :, : pixels.shape[2], : pixels.shape[3]], output_size, align_corners)


@torch.no_grad()
def slide_inference(
    model: Model,
    pixels: torch.Tensor,
    crop: int | Sequence[int],
    stride: int | Sequence[int],
    num_classes: int | None = None,
    windows_per_forward: int = 4,
    size_divisor: int | None = None,
    pad_value: float = 0.0,
    output_size: Sequence[int] | None = None,
    align_corners: bool = False,
) -> torch.Tensor:
    """Logits ``[B, num_classes, H, W]`` for ``pixels`` ``[B, C_in, H, W]``, averaged over overlapping
    windows of size ``crop`` (h, w) placed every ``stride`` (h, w) pixels, as mmseg's slide inference.

    ``windows_per_forward`` window positions go through the model together (each with the whole batch),
    so memory is bounded by that many windows however large the image; only the summed logits and the
    coverage count are image-sized. Batching windows does not change the result of a model in eval mode;
    an ``nn.Module`` in training mode (whose BatchNorm would see the other windows) gets one window
    position per forward, as mmseg. ``num_classes``, when given, is checked against the model's output.
    ``size_divisor``, ``pad_value``, ``output_size``, ``align_corners``: as in ``whole_inference``."""
    _check_pixels(pixels)
    crop = _pair(crop, "crop")
    stride = _pair(stride, "stride")
    if stride[0] > crop[0] or stride[1] > crop[1]:
        # A stride longer than the crop leaves rows or columns that no window covers.
        raise ValueError(f"stride {stride} must not exceed crop {crop} in either dimension")
    if windows_per_forward < 1:
        raise ValueError(f"windows_per_forward must be at least 1, got {windows_per_forward}")
    if isinstance(model, nn.Module) and model.training:
        windows_per_forward = 1

    padded = _pad_to_multiple(pixels, size_divisor, pad_value)
    batch, _, height, width = padded.shape
    boxes = sliding_windows(height, width, crop, stride)
    summed = None
    count = torch.zeros(1, 1, height, width, dtype=torch.float32, device=pixels.device)
    for start in range(0, len(boxes), windows_per_forward):
        group = boxes[start : start + windows_per_forward]
        windows = torch.cat([padded[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in group], dim=0)
        logits = _run(model, windows, expected_batch=windows.shape[0])
        if summed is None:
            if num_classes is not None and logits.shape[1] != num_classes:
                raise ValueError(f"num_classes={num_classes} but the model returned {logits.shape[1]} channels")
            dtype = torch.promote_types(logits.dtype, torch.float32)
            summed = torch.zeros(batch, logits.shape[1], height, width, dtype=dtype, device=pixels.device)
        for index, (y1, y2, x1, x2) in enumerate(group):
            summed[:, :, y1:y2, x1:x2] += logits[index * batch : (index + 1) * batch]
            count[:, :, y1:y2, x1:x2] += 1
    logits = summed / count.to(summed.dtype)
    return _finish(logits[:, :, : pixels.shape[2], : pixels.shape[3]], output_size, align_corners)


def sliding_windows(
    height: int, width: int, crop: Sequence[int], stride: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """The windows ``(y1, y2, x1, x2)`` mmseg's slide inference visits over an image of ``height`` x
    ``width``, row by row: every ``stride`` pixels, the last one of a row or column shifted back to end at
    the edge, clipped to the image when it is smaller than ``crop``. All have the same size."""
    (crop_h, crop_w), (stride_h, stride_w) = crop, stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    columns = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    boxes = []
    for row in range(rows):
        for column in range(columns):
            y2 = min(row * stride_h + crop_h, height)
            x2 = min(column * stride_w + crop_w, width)
            boxes.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return boxes


def _check_pixels(pixels: torch.Tensor) -> None:
    if pixels.ndim != 4 or pixels.shape[0] < 1 or pixels.shape[2] < 1 or pixels.shape[3] < 1:
        raise ValueError(f"pixels: expected a non-empty [B, C, H, W] tensor, got {list(pixels.shape)}")


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """An (h, w) pair of positive ints from an int or a pair (numpy and torch integers accepted)."""
    try:
        pair = (operator.index(value),) * 2 if not isinstance(value, Sequence) else tuple(map(operator.index, value))
    except TypeError:
        pair = ()
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or an (h, w) pair of them, got {value!r}")
    return pair


def _pad_to_multiple(pixels: torch.Tensor, size_divisor: int | None, pad_value: float) -> torch.Tensor:
    if size_divisor is None:
        return pixels
    if not isinstance(size_divisor, int) or size_divisor < 1:
        raise ValueError(f"size_divisor must be a positive int, got {size_divisor!r}")
    height, width = pixels.shape[2:]
    pad_h, pad_w = -height % size_divisor, -width % size_divisor
    return F.pad(pixels, (0, pad_w, 0, pad_h), value=pad_value) if pad_h or pad_w else pixels


def _run(model: Model, pixels: torch.Tensor, expected_batch: int) -> torch.Tensor:
    logits = model(pixels)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 4:
        raise ValueError(f"model must return logits [N, num_classes, H, W], got {type(logits).__name__}"
                         f"{list(logits.shape) if isinstance(logits, torch.Tensor) else ''}")
    if logits.shape[0] != expected_batch or logits.shape[2:] != pixels.shape[2:]:
        raise ValueError(
            f"model returned logits of shape {list(logits.shape)} for input {list(pixels.shape)}: expected "
            f"[{expected_batch}, num_classes, {pixels.shape[2]}, {pixels.shape[3]}] (logits at the input's size)"
        )
    return logits


def _finish(logits: torch.Tensor, output_size: Sequence[int] | None, align_corners: bool) -> torch.Tensor:
    if output_size is None:
        return logits
    return resize(logits, _pair(output_size, "output_size"), align_corners)
