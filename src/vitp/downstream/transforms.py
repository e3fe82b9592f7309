"""Augmentations of dense prediction, as ViTP's mmseg / opencd configs use them, on numpy arrays.

A :class:`Sample` holds one image (segmentation) or two (change detection: before, after) as
H x W x 3 uint8 RGB arrays, and a label map (H x W, 255 = ignore). Every transform is called as
``transform(sample, rng)`` with a ``numpy.random.Generator``: geometric transforms draw once and
apply that draw to every image and the label (so the two dates of a change pair stay aligned);
:class:`PhotoMetricDistortion` draws for each image on its own, as opencd's
``MultiImgPhotoMetricDistortion`` does (two dates are lit differently, which is the point).

What each transform re-states (mmseg 0.x ``datasets/pipelines/transforms.py``, opencd
``datasets/transforms/transforms.py``):

* :class:`RandomResize` — ``Resize(img_scale, ratio_range, keep_ratio=True)``: a ratio drawn uniformly
  from ``ratio_range`` scales ``scale``; the image is then rescaled, aspect kept, to the largest size
  whose long edge fits the long bound and short edge the short bound (mmcv's ``rescale_size``,
  rounding half up). Images bilinear, labels nearest (OpenCV's nearest: ``floor(x * in / out)``).
* :class:`RandomCrop` — a uniform crop of ``crop_size``; with ``cat_max_ratio`` < 1 the crop is drawn
  again, up to 10 times, while one class covers ``cat_max_ratio`` or more of its labelled pixels (or it
  holds only one class); after 10 failures the 11th draw is kept unchecked, as upstream.
* :class:`RandomFlip`, :class:`RandomRotate` (bilinear images, nearest labels, border 0 / 255),
  :class:`ExchangeTime` (swap the two dates).
* :class:`PhotoMetricDistortion` — brightness (p 0.5, +U(-delta, delta)), then contrast either second
  or last (a coin), saturation and hue in OpenCV's 8-bit HSV (hue 0-179), each with p 0.5; every step
  clips to 0-255 and truncates to uint8 as upstream's ``convert``.
* :class:`Normalize` (ImageNet mean/std, float32), then :class:`Pad` (bottom/right, image 0 — that
  is, after normalisation, as upstream — label 255).

:func:`train_pipeline` / :func:`eval_pipeline` (segmentation; LoveDA's values by default) and
:func:`change_train_pipeline` / :func:`change_eval_pipeline` (LEVIR-CD-256's) build the lists.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from vitp.data.images import IMAGENET_MEAN, IMAGENET_STD

IGNORE_INDEX = 255
# mmseg's RandomCrop: how many times a crop is drawn again while one class dominates it.
CROP_RETRIES = 10


@dataclass
class Sample:
    """Images (uint8 H x W x 3 RGB, float32 after :class:`Normalize`) and their label map."""

    images: list[np.ndarray]
    label: np.ndarray | None  # H x W uint8, IGNORE_INDEX where unlabelled; None at test time

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the images."""
        return self.images[0].shape[:2]


class Compose:
    """Transforms applied in order, all drawing from one generator."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for transform in self.transforms:
            sample = transform(sample, rng)
        return sample

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``array``'s memory when it can (decoded images are read-only: copied then)."""
    return torch.from_numpy(np.require(array, requirements=["C", "W"]))


def _resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear without antialiasing (what OpenCV's INTER_LINEAR does), rounded back to uint8."""
    tensor = _as_tensor(image).permute(2, 0, 1)[None].float()
    resized = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)
    return resized[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _resize_label(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest as OpenCV's INTER_NEAREST: output pixel i takes input pixel floor(i * in / out)."""
    rows = np.minimum((np.arange(height) * (label.shape[0] / height)).astype(np.int64), label.shape[0] - 1)
    columns = np.minimum((np.arange(width) * (label.shape[1] / width)).astype(np.int64), label.shape[1] - 1)
    return label[rows[:, None], columns[None, :]]


def rescaled_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's ``rescale_size``: the largest aspect-keeping size whose long edge fits max(scale) and
    short edge min(scale); each side rounded half up."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_sample(sample: Sample, height: int, width: int, resize_label: bool = True) -> Sample:
    images = [_resize_image(image, height, width) for image in sample.images]
    label = sample.label
    if resize_label and label is not None:
        label = _resize_label(label, height, width)
    return replace(sample, images=images, label=label)


@dataclass
class Resize:
    """Rescale, aspect kept, to fit ``scale`` (mmseg's ``Resize(img_scale, keep_ratio=True)``).
    ``resize_label=False`` leaves the label at the file's size: evaluation compares predictions,
    resized back, with the original label, as mmseg does."""

    scale: tuple[int, int]
    resize_label: bool = True

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        return resize_sample(sample, *rescaled_size(*sample.size, self.scale), resize_label=self.resize_label)


@dataclass
class RandomResize:
    """``Resize(img_scale=scale, ratio_range=ratio_range, keep_ratio=True)``: scale times a ratio
    drawn uniformly from ratio_range, then as :class:`Resize`."""

    scale: tuple[int, int]
    ratio_range: tuple[float, float] = (0.5, 2.0)

    def __post_init__(self):
        low, high = self.ratio_range
        if not 0 < low <= high:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {self.ratio_range}")

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        low, high = self.ratio_range
        ratio = rng.random() * (high - low) + low
        scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        return resize_sample(sample, *rescaled_size(*sample.size, scale))


@dataclass
class RandomCrop:
    """A random ``crop_size`` (height, width) window, redrawn while one class dominates it (see the
    module docstring). An image smaller than the crop is kept whole (:class:`Pad` fills it up)."""

    crop_size: tuple[int, int]
    cat_max_ratio: float = 1.0
    ignore_index: int = IGNORE_INDEX

    def _draw(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int]:
        top = int(rng.integers(0, max(height - self.crop_size[0], 0) + 1))
        left = int(rng.integers(0, max(width - self.crop_size[1], 0) + 1))
        return top, left

    def _balanced(self, label: np.ndarray) -> bool:
        values, counts = np.unique(label, return_counts=True)
        counts = counts[values != self.ignore_index]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        height, width = sample.size
        crop_h, crop_w = self.crop_size
        top, left = self._draw(height, width, rng)
        if self.cat_max_ratio < 1.0 and sample.label is not None:
            for _ in range(CROP_RETRIES):
                if self._balanced(sample.label[top : top + crop_h, left : left + crop_w]):
                    break
                top, left = self._draw(height, width, rng)
        window = (slice(top, top + crop_h), slice(left, left + crop_w))
        label = None if sample.label is None else sample.label[window]
        return replace(sample, images=[image[window] for image in sample.images], label=label)


@dataclass
class RandomFlip:
    """Flip everything with probability ``prob``, ``horizontal`` or ``vertical``."""

    prob: float = 0.5
    direction: str = "horizontal"

    def __post_init__(self):
        if self.direction not in ("horizontal", "vertical"):
            raise ValueError(f"direction must be 'horizontal' or 'vertical', got {self.direction!r}")

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if not rng.random() < self.prob:
            return sample
        axis = 1 if self.direction == "horizontal" else 0
        label = None if sample.label is None else np.flip(sample.label, axis)
        return replace(sample, images=[np.flip(image, axis) for image in sample.images], label=label)


@dataclass
class RandomRotate:
    """With probability ``prob``, rotate by an angle drawn uniformly from (-degree, degree) about the
    image centre, keeping the size; corners are filled with 0 (images) and 255 (labels)."""

    prob: float = 0.5
    degree: float = 180.0
    pad_value: int = 0
    label_pad_value: int = IGNORE_INDEX

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        rotate = rng.random() < self.prob
        angle = float(rng.uniform(-self.degree, self.degree))  # drawn either way, as upstream
        if not rotate:
            return sample

        def turn(array: np.ndarray, interpolation: InterpolationMode, fill: int) -> np.ndarray:
            tensor = _as_tensor(array)
            tensor = tensor.permute(2, 0, 1) if array.ndim == 3 else tensor[None]
            turned = TF.rotate(tensor, angle, interpolation=interpolation, fill=[float(fill)] * tensor.shape[0])
            return (turned.permute(1, 2, 0) if array.ndim == 3 else turned[0]).numpy()

        images = [turn(image, InterpolationMode.BILINEAR, self.pad_value) for image in sample.images]
        label = None if sample.label is None else turn(sample.label, InterpolationMode.NEAREST, self.label_pad_value)
        return replace(sample, images=images, label=label)


@dataclass
class ExchangeTime:
    """Swap the before and after images with probability ``prob`` (a change is a change both ways)."""

    prob: float = 0.5

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() < self.prob:
            return replace(sample, images=list(reversed(sample.images)))
        return sample


def _convert(array: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """Upstream's ``convert``: scale and shift, clip to 0-255, truncate to uint8."""
    return np.clip(array.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit RGB -> HSV: H in 0-179 (degrees / 2), S and V in 0-255, rounded."""
    rgb = image.astype(np.float32)
    value = rgb.max(axis=2)
    spread = value - rgb.min(axis=2)
    saturation = np.where(value > 0, spread * 255.0 / np.maximum(value, 1e-6), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(spread, 1e-6)
    hue = np.where(value == r, 60.0 * (g - b) / safe,
                   np.where(value == g, 120.0 + 60.0 * (b - r) / safe, 240.0 + 60.0 * (r - g) / safe))
    hue = np.where(spread > 0, hue % 360.0, 0.0)
    hsv = np.stack([np.round(hue / 2.0) % 180, np.round(saturation), value], axis=2)
    return hsv.astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hsv` (OpenCV's 8-bit HSV -> RGB), rounded to uint8."""
    hue = hsv[..., 0].astype(np.float32) * 2.0 / 60.0
    saturation = hsv[..., 1].astype(np.float32) / 255.0
    value = hsv[..., 2].astype(np.float32)
    sector = np.floor(hue).astype(np.int64) % 6
    fraction = hue - np.floor(hue)
    p = value * (1 - saturation)
    q = value * (1 - saturation * fraction)
    t = value * (1 - saturation * (1 - fraction))
    choices = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    rgb = np.zeros(hsv.shape, dtype=np.float32)
    for index, channels in enumerate(choices):
        where = sector == index
        for c in range(3):
            rgb[..., c][where] = channels[c][where]
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


@dataclass
class PhotoMetricDistortion:
    """mmseg's ``PhotoMetricDistortion`` (defaults: segmentation's; LEVIR-CD uses 10, (0.8, 1.2),
    (0.8, 1.2), 10). Draws in upstream's order, for each image on its own."""

    brightness_delta: int = 32
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = 18

    def _contrast(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            return _convert(image, alpha=rng.uniform(*self.contrast_range))
        return image

    def distort(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            image = _convert(image, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = rng.integers(2) == 1
        if contrast_first:
            image = self._contrast(image, rng)
        if rng.integers(2):
            hsv = rgb_to_hsv(image)
            hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
            image = hsv_to_rgb(hsv)
        if rng.integers(2):
            hsv = rgb_to_hsv(image)
            shift = int(rng.integers(-self.hue_delta, self.hue_delta))  # high excluded, as numpy's randint
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 180
            image = hsv_to_rgb(hsv)
        if not contrast_first:
            image = self._contrast(image, rng)
        return image

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        return replace(sample, images=[self.distort(image, rng) for image in sample.images])


@dataclass
class Normalize:
    """uint8 RGB -> float32 (x - 255 mean) / (255 std): mmseg's ``img_norm_cfg`` for ImageNet."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        mean = np.asarray(self.mean, dtype=np.float32) * 255.0
        std = np.asarray(self.std, dtype=np.float32) * 255.0
        return replace(sample, images=[(image.astype(np.float32) - mean) / std for image in sample.images])


@dataclass
class Pad:
    """Pad at the bottom and right to at least ``size`` (height, width): images with ``pad_value``,
    the label with ``label_pad_value`` (ignored by the loss and the metrics)."""

    size: tuple[int, int]
    pad_value: float = 0.0
    label_pad_value: int = IGNORE_INDEX

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        height, width = sample.size
        extra_h, extra_w = max(self.size[0] - height, 0), max(self.size[1] - width, 0)
        if not (extra_h or extra_w):
            return sample
        images = [np.pad(image, ((0, extra_h), (0, extra_w), (0, 0)), constant_values=self.pad_value)
                  for image in sample.images]
        label = sample.label
        if label is not None:
            label = np.pad(label, ((0, extra_h), (0, extra_w)), constant_values=self.label_pad_value)
        return replace(sample, images=images, label=label)


def train_pipeline(
    crop_size: int | Sequence[int] = (512, 512),
    scale: int | Sequence[int] | None = None,
    ratio_range: tuple[float, float] | None = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    photometric: PhotoMetricDistortion | None = PhotoMetricDistortion(),
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    ignore_index: int = IGNORE_INDEX,
) -> Compose:
    """ViTP's segmentation training pipeline; defaults are LoveDA's (``scale`` defaults to the crop
    size, LoveDA's img_scale): random resize, crop, horizontal flip, photometric distortion,
    normalisation, padding to the crop size. ``ratio_range=None`` resizes to ``scale`` (iSAID)."""
    crop = _pair(crop_size, "crop_size")
    bounds = crop if scale is None else _pair(scale, "scale")
    if not 0 < cat_max_ratio <= 1:
        raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
    transforms = [RandomResize(bounds, tuple(ratio_range)) if ratio_range is not None else Resize(bounds)]
    transforms += [RandomCrop(crop, cat_max_ratio, ignore_index), RandomFlip(flip_prob, "horizontal")]
    if photometric is not None:
        transforms.append(photometric)
    transforms += [Normalize(mean, std), Pad(crop, 0.0, ignore_index)]
    return Compose(transforms)


def eval_pipeline(
    scale: int | Sequence[int] | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Compose:
    """Evaluation: resize the image (aspect kept) to fit ``scale`` if given — LoveDA tests at 512 — and
    normalise. The label stays at the file's size: predictions are compared at that size."""
    transforms = [] if scale is None else [Resize(_pair(scale, "scale"), resize_label=False)]
    return Compose(transforms + [Normalize(mean, std)])


def change_train_pipeline(
    crop_size: int | Sequence[int] = (256, 256),
    cat_max_ratio: float = 0.75,
    rotate_prob: float = 0.5,
    rotate_degree: float = 180.0,
    flip_prob: float = 0.5,
    exchange_prob: float = 0.5,
    photometric: PhotoMetricDistortion | None = PhotoMetricDistortion(10, (0.8, 1.2), (0.8, 1.2), 10),
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    ignore_index: int = IGNORE_INDEX,
) -> Compose:
    """ViTP's LEVIR-CD-256 training pipeline: rotate, crop, horizontal and vertical flips, exchange of
    the dates, photometric distortion of each date, normalisation (and padding to the crop size)."""
    crop = _pair(crop_size, "crop_size")
    if not 0 < cat_max_ratio <= 1:
        raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
    transforms = [
        RandomRotate(rotate_prob, rotate_degree, 0, ignore_index),
        RandomCrop(crop, cat_max_ratio, ignore_index),
        RandomFlip(flip_prob, "horizontal"),
        RandomFlip(flip_prob, "vertical"),
        ExchangeTime(exchange_prob),
    ]
    if photometric is not None:
        transforms.append(photometric)
    return Compose(transforms + [Normalize(mean, std), Pad(crop, 0.0, ignore_index)])


def change_eval_pipeline(
    mean: tuple[float, float, float] = IMAGENET_MEAN, std: tuple[float, float, float] = IMAGENET_STD
) -> Compose:
    """LEVIR-CD's test pipeline: the images as they are, normalised."""
    return Compose([Normalize(mean, std)])
