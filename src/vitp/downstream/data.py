"""Data of dense prediction: class tables, mmseg's and LEVIR-CD's folder layouts, checks, samples.

Layouts (file names pair the files; a sub-folder tree is walked recursively, in sorted order):

* segmentation, mmseg's ``CustomDataset``: ``<root>/img_dir/<split>/x.jpg`` with its label map
  ``<root>/ann_dir/<split>/x.png`` (:meth:`SegmentationDataset.from_root`; any two folders with
  :class:`SegmentationDataset`). A label map holds one class index per pixel (an 8-bit grey or palette
  PNG; 255 = ignore). ``reduce_zero_label`` (LoveDA): raw 0 is "no data" and becomes 255, 1..C
  become 0..C-1.
* change detection, LEVIR-CD's: ``<root>/<split>/A/x.png`` (before), ``B/x.png`` (after),
  ``label/x.png`` (0 = unchanged, 255 = changed; 0/1 files are read as they are) — folder names can
  be changed for WHU-CD (``OUT``) or S2Looking (``Image1``, ``Image2``).

Checks: when a data set is opened, every pair is scanned (``scan="full"`` decodes every file;
``"headers"`` reads sizes only and leaves the rest to loading). A missing partner, an unreadable or
corrupt file, a label map whose size differs from its image, or label values outside the classes is
reported as ``file: what was expected`` and the pair is skipped; the rest loads. A file that fails
later (changed on disk during training) is skipped too: the sample comes back as ``skipped`` with the
reason, and :func:`collate` lists it in the batch instead of raising.

Randomness: a sample's augmentation draws come from ``numpy.random.default_rng([seed, epoch, index])``
— a function of the data set's seed, the epoch set with :meth:`set_epoch` and the index only, so a
run resumed after a kill, on any number of DataLoader workers, augments every sample as before. (A
DataLoader copies the data set into its workers when an iterator starts: call ``set_epoch`` before each
epoch's iterator, and don't use ``persistent_workers``.)

Samples: ``image`` float32 (3, H, W) — (6, H, W) for change detection, before then after, as opencd's
``DualInputSegDataPreProcessor`` stacks them — normalised as the pipeline says; ``label`` int64 (H, W)
with 255 = ignore; ``name`` (the image's path inside its folder, the key of per-image metrics);
``original_size`` (height, width of the file).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vitp.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageError, iter_image_files, load_image
from vitp.downstream.transforms import (
    IGNORE_INDEX,
    Compose,
    Sample,
    change_eval_pipeline,
    change_train_pipeline,
    eval_pipeline,
    train_pipeline,
)
from vitp.errors import DataError

logger = logging.getLogger("vitp")

# A P-mode PNG has 256 indices and 255 means "ignore": at most 255 classes.
MAX_CLASSES = 255
SCANS = ("full", "headers")


# ------------------------------------------------------------------------------------------------
# Class tables


@dataclass(frozen=True)
class ClassTable:
    """Class names (index order) and an RGB colour for each."""

    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]

    def __post_init__(self):
        if not self.names:
            raise ValueError("names must hold at least one class")
        if len(self.names) > MAX_CLASSES:
            raise ValueError(f"at most {MAX_CLASSES} classes (255 is the ignore index), got {len(self.names)}")
        if len(set(self.names)) != len(self.names) or not all(isinstance(n, str) and n.strip() for n in self.names):
            raise ValueError(f"class names must be unique, non-empty strings, got {list(self.names)}")
        if len(self.palette) != len(self.names):
            raise ValueError(f"palette has {len(self.palette)} colours for {len(self.names)} classes")
        for colour in self.palette:
            if len(colour) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in colour):
                raise ValueError(f"palette colours must be three ints in 0-255, got {colour!r}")

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def from_names(cls, names: Sequence[str], palette: Sequence[Sequence[int]] | None = None) -> "ClassTable":
        """Names with a palette, or distinct colours made up when there is none."""
        colours = default_palette(len(names)) if palette is None else palette
        return cls(tuple(str(n) for n in names), tuple(tuple(int(v) for v in c) for c in colours))

    @classmethod
    def read(cls, path: Path | str) -> "ClassTable":
        """A class file: JSON ``{"classes": [...], "palette": [[r, g, b], ...]}`` (mmseg's
        ``CLASSES``/``PALETTE`` spelling too; the palette is optional), or text with one class per
        line, ``name`` or ``name r g b`` (blank lines and lines starting with ``#`` skipped)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise DataError(f"{path}: no such class file") from None
        except OSError as err:
            raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
        if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
            names, palette = _parse_class_json(text, path)
        else:
            names, palette = _parse_class_text(text, path)
        try:
            return cls.from_names(names, palette)
        except ValueError as err:
            raise DataError(f"{path}: {err}") from None

    def write(self, path: Path | str) -> None:
        """The text form (``name r g b`` lines), readable by :meth:`read`."""
        from vitp.files import write_text

        write_text("".join(f"{name} {r} {g} {b}\n" for name, (r, g, b) in zip(self.names, self.palette)), Path(path))


def default_palette(count: int) -> list[tuple[int, int, int]]:
    """``count`` distinct, deterministic colours (hues a golden angle apart, two brightness levels)."""
    colours = []
    for i in range(count):
        hue = (i * 0.618033988749895) % 1.0
        value = 0.95 if i % 2 == 0 else 0.7
        rgb = Image.new("HSV", (1, 1), (int(hue * 255), 200, int(value * 255))).convert("RGB").getpixel((0, 0))
        colours.append(tuple(int(v) for v in rgb))
    return colours


def _parse_class_json(text: str, path: Path) -> tuple[list[str], list | None]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if isinstance(data, list):
        data = {"classes": data}
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'classes' (and 'palette'), found {type(data).__name__}")
    names = data.get("classes", data.get("CLASSES"))
    palette = data.get("palette", data.get("PALETTE"))
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: 'classes' must be a list of class names")
    if palette is not None and not (isinstance(palette, list) and all(isinstance(c, list) for c in palette)):
        raise DataError(f"{path}: 'palette' must be a list of [r, g, b] colours")
    return names, palette


def _parse_class_text(text: str, path: Path) -> tuple[list[str], list | None]:
    names, colours = [], []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=3)
        if len(parts) == 4 and all(p.lstrip("-").isdigit() for p in parts[1:]):
            names.append(parts[0])
            colours.append([int(p) for p in parts[1:]])
        else:
            names.append(line)
            colours.append(None)
    given = [c is not None for c in colours]
    if any(given) and not all(given):
        line = next(i for i, g in enumerate(given) if not g)
        raise DataError(f"{path}: class {names[line]!r} has no colour while others do: give 'name r g b' on every "
                        "line, or names only")
    return names, (colours if all(given) and colours else None)


# Upstream's tables (mmseg's LoveDADataset, iSAIDDataset, UAVidDataset; opencd's LEVIR_CD_Dataset).
LOVEDA_CLASSES = ClassTable.from_names(
    ("background", "building", "road", "water", "barren", "forest", "agricultural"),
    [[255, 255, 255], [255, 0, 0], [255, 255, 0], [0, 0, 255], [159, 129, 183], [0, 255, 0], [255, 195, 128]],
)
ISAID_CLASSES = ClassTable.from_names(
    ("background", "ship", "store_tank", "baseball_diamond", "tennis_court", "basketball_court",
     "Ground_Track_Field", "Bridge", "Large_Vehicle", "Small_Vehicle", "Helicopter", "Swimming_pool",
     "Roundabout", "Soccer_ball_field", "plane", "Harbor"),
    [[0, 0, 0], [0, 0, 63], [0, 63, 63], [0, 63, 0], [0, 63, 127], [0, 63, 191], [0, 63, 255], [0, 127, 63],
     [0, 127, 127], [0, 0, 127], [0, 0, 191], [0, 0, 255], [0, 191, 127], [0, 127, 191], [0, 127, 255],
     [0, 100, 155]],
)
UAVID_CLASSES = ClassTable.from_names(
    ("Building", "Road", "Tree", "Low vegetation", "Moving car", "Static car", "Human", "Background clutter"),
    [[128, 0, 0], [128, 64, 128], [0, 128, 0], [128, 128, 0], [64, 0, 128], [192, 0, 192], [64, 64, 0], [0, 0, 0]],
)
CHANGE_CLASSES = ClassTable.from_names(("unchanged", "changed"), [[0, 0, 0], [255, 255, 255]])


@dataclass(frozen=True)
class DatasetPreset:
    """What one of ViTP's configs says about its data: classes, label encoding, augmentation values."""

    task: str  # "segmentation" | "change_detection"
    classes: ClassTable
    reduce_zero_label: bool
    crop_size: tuple[int, int]
    scale: tuple[int, int] | None  # training resize bounds (segmentation)
    ratio_range: tuple[float, float] | None
    cat_max_ratio: float
    test_scale: tuple[int, int] | None  # evaluation resize bounds; None: as the file is

    def train_pipeline(self) -> Compose:
        if self.task == "change_detection":
            return change_train_pipeline(self.crop_size, self.cat_max_ratio)
        return train_pipeline(self.crop_size, self.scale, self.ratio_range, self.cat_max_ratio)

    def eval_pipeline(self) -> Compose:
        return change_eval_pipeline() if self.task == "change_detection" else eval_pipeline(self.test_scale)


PRESETS = {
    # mmseg/ViTP_configs/vitp_loveda_upernet.py
    "loveda": DatasetPreset("segmentation", LOVEDA_CLASSES, reduce_zero_label=True, crop_size=(512, 512),
                            scale=(512, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75, test_scale=(512, 512)),
    # vitp_isaid_upernet.py: a fixed scale, no class-ratio check
    "isaid": DatasetPreset("segmentation", ISAID_CLASSES, reduce_zero_label=False, crop_size=(896, 896),
                           scale=(896, 896), ratio_range=None, cat_max_ratio=1.0, test_scale=(896, 896)),
    # vitp_uavid_upernet.py
    "uavid": DatasetPreset("segmentation", UAVID_CLASSES, reduce_zero_label=False, crop_size=(768, 768),
                           scale=(1024, 1024), ratio_range=(0.5, 2.0), cat_max_ratio=0.75, test_scale=(1024, 1024)),
    # opencd/ViTP_configs/vitp_levir_upernet.py (LEVIR-CD-256)
    "levir-cd": DatasetPreset("change_detection", CHANGE_CLASSES, reduce_zero_label=False, crop_size=(256, 256),
                              scale=None, ratio_range=None, cat_max_ratio=0.75, test_scale=None),
}


# ------------------------------------------------------------------------------------------------
# Reading label maps


def load_label_map(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A label file's values, one per pixel (H x W): the indices of a palette PNG (not its colours),
    the grey level of an 8-bit or 16-bit grey file, or one channel of an RGB file whose channels are
    equal. Raises :class:`ImageError` for a file that cannot be used, as ``load_image`` does."""
    path = Path(path)
    try:
        empty = path.stat().st_size == 0
    except OSError as err:
        raise ImageError(path, f"cannot read ({err.strerror or err})", "unreadable") from None
    if empty:
        raise ImageError(path, "empty file", "empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            image = Image.open(path)
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(path, f"too large: {width}x{height} = {width * height} pixels > limit {max_pixels}",
                                 "too large")
            image.load()
            return _label_values(image, path)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(path, "not an image in a supported format", "unsupported") from None
    except Exception as err:  # noqa: BLE001 - any decoder failure on a bad file is the file's fault
        raise ImageError(path, f"corrupt or truncated image ({type(err).__name__}: {err})", "corrupt") from None


def _label_values(image: Image.Image, path: Path) -> np.ndarray:
    if image.mode in ("P", "L"):
        return np.asarray(image)
    if image.mode == "1":
        return np.asarray(image.convert("L"))  # 1-bit: white (change, foreground) is 255
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        return np.asarray(image).astype(np.int64)
    if image.mode in ("LA", "PA"):
        return np.asarray(image)[..., 0]
    if image.mode in ("RGB", "RGBA"):
        rgb = np.asarray(image)[..., :3]
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
            return np.ascontiguousarray(rgb[..., 0])
        raise ImageError(path, "a colour (RGB) label map; expected one class index per pixel (an 8-bit grey or "
                         "palette PNG): convert colour masks to indices first", "unsupported")
    raise ImageError(path, f"label map of mode {image.mode}; expected an 8-bit grey or palette PNG", "unsupported")


def _describe_values(values: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (f", ... ({len(values)} values)" if len(values) > limit else "")


def segmentation_labels(raw: np.ndarray, num_classes: int, reduce_zero_label: bool) -> tuple[np.ndarray, str | None]:
    """Class indices 0..C-1 and 255 (uint8) from a label file's values, or a reason they are not valid.

    ``reduce_zero_label`` as mmseg: 0 -> 255 (ignored), v -> v - 1, and 255 stays 255."""
    values = np.unique(raw)
    if reduce_zero_label:
        allowed = ((values >= 0) & (values <= num_classes)) | (values == IGNORE_INDEX)
        expected = f"0 (no data), 1-{num_classes} (the {num_classes} classes) or 255 (ignore)"
    else:
        allowed = ((values >= 0) & (values < num_classes)) | (values == IGNORE_INDEX)
        expected = f"0-{num_classes - 1} (the {num_classes} classes) or 255 (ignore)"
    if not allowed.all():
        return raw, f"label values {_describe_values(values[~allowed])} found; expected {expected}"
    if not reduce_zero_label:
        return raw.astype(np.uint8), None
    ignored = (raw == 0) | (raw == IGNORE_INDEX)
    return np.where(ignored, IGNORE_INDEX, raw.astype(np.int64) - 1).astype(np.uint8), None


def change_labels(raw: np.ndarray) -> tuple[np.ndarray, str | None]:
    """0/1 (uint8) from a change label file of 0/255 (LEVIR-CD) or 0/1, or a reason it is not one."""
    values = np.unique(raw)
    if set(values.tolist()) <= {0, 255}:
        return (raw == 255).astype(np.uint8), None
    if set(values.tolist()) <= {0, 1}:
        return raw.astype(np.uint8), None
    return raw, (f"label values {_describe_values(values)} found; expected 0 (unchanged) and 255 (changed), "
                 "or 0 and 1")


# ------------------------------------------------------------------------------------------------
# Pairing files


@dataclass(frozen=True)
class Pair:
    """One sample's files: its image(s) and label map."""

    name: str  # the (first) image's path inside its folder: the key of per-image results
    images: tuple[Path, ...]
    label: Path


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _index_images(folder: Path, suffix: str | None) -> tuple[dict[str, Path], list[SkippedFile]]:
    """Images under ``folder`` keyed by their path inside it without the extension (or ``suffix``);
    two images with the same key are both reported: which one is meant cannot be told."""
    found: dict[str, list[Path]] = {}
    if suffix is None:
        paths = iter_image_files(folder)
    else:
        paths = (p for p in sorted(folder.rglob(f"*{suffix}")) if not any(
            part.startswith(".") for part in p.relative_to(folder).parts))
    for path in paths:
        relative = path.relative_to(folder).as_posix()
        key = relative[: -len(suffix)] if suffix is not None else relative[: -len(path.suffix)]
        found.setdefault(key, []).append(path)
    index, skipped = {}, []
    for key, paths in found.items():
        if len(paths) == 1:
            index[key] = paths[0]
        else:
            names = ", ".join(p.name for p in paths)
            skipped += [SkippedFile(str(p), f"several images named {key} ({names}); expected one") for p in paths]
    return index, skipped


def _require_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (the {what})" if not folder.exists()
                        else f"{folder}: not a folder (the {what})")


def _read_names_file(path: Path) -> list[str]:
    """mmseg's / opencd's split file: one name (no extension) per line."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as err:
        raise DataError(f"{path}: cannot read the list of names ({err.strerror or err})") from None
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise DataError(f"{path}: the list of names is empty")
    return names


def pair_files(
    image_dirs: Sequence[Path], label_dir: Path, image_suffix: str | None = None, label_suffix: str = ".png",
    names: Sequence[str] | None = None, folder_names: Sequence[str] = ("image",),
) -> tuple[list[Pair], list[SkippedFile]]:
    """Pairs whose every file exists, and a report line for each file without its partners."""
    indexes, skipped = [], []
    for folder in image_dirs:
        index, ambiguous = _index_images(folder, image_suffix)
        indexes.append(index)
        skipped += ambiguous
    labels = _index_images(label_dir, label_suffix)[0]  # a fixed suffix: one file per key
    keys = sorted(set().union(*indexes)) if names is None else list(dict.fromkeys(names))
    pairs = []
    for key in keys:
        present = [index.get(key) for index in indexes]
        label = labels.get(key)
        if all(p is not None for p in present) and label is not None:
            name = present[0].relative_to(image_dirs[0]).as_posix()
            pairs.append(Pair(name, tuple(present), label))
            continue
        where = next((p for p in present if p is not None), label)
        missing = [f"{folder_names[i]} in {image_dirs[i]}" for i, p in enumerate(present) if p is None]
        if label is None:
            missing.append(f"label map {key}{label_suffix} in {label_dir}")
        if where is None:  # named in the list of names, and no file at all
            skipped.append(SkippedFile(key, "listed, but no file of this name exists (expected its "
                                       + "; ".join(missing) + ")"))
        else:
            skipped.append(SkippedFile(str(where), "expected its " + "; ".join(missing) + " (missing)"))
    if names is None:  # label maps without any image are reported too: a renamed image shows up here
        for key in sorted(set(labels) - set().union(*indexes)):
            skipped.append(SkippedFile(str(labels[key]), f"label map without an image (expected {key}.* in "
                                       f"{image_dirs[0]})"))
    return pairs, skipped


# ------------------------------------------------------------------------------------------------
# Data sets


class _PairedDataset(Dataset):
    """Pairs checked at opening, loaded with augmentations drawn from (seed, epoch, index)."""

    task = ""

    def __init__(
        self, pairs: list[Pair], skipped: list[SkippedFile], classes: ClassTable, transform: Callable | None,
        source: str, scan: str, seed: int, max_pixels: int, scan_workers: int | None,
    ):
        if scan not in SCANS:
            raise ValueError(f"scan must be one of {SCANS}, got {scan!r}")
        self.classes = classes
        self.transform = transform if transform is not None else self._default_transform()
        self.source = source
        self.seed = int(seed)
        self.epoch = 0
        self.max_pixels = max_pixels
        problems = self._scan(pairs, scan, scan_workers)
        self.pairs = [pair for pair, problem in zip(pairs, problems) if problem is None]
        self.skipped = skipped + [problem for problem in problems if problem is not None]
        if self.skipped:
            shown = "\n  ".join(str(s) for s in self.skipped[:10])
            more = f"\n  ... and {len(self.skipped) - 10} more" if len(self.skipped) > 10 else ""
            logger.warning("%s: skipped %d file(s), %d pairs kept:\n  %s%s", source, len(self.skipped),
                           len(self.pairs), shown, more)
        if not self.pairs:
            first = f"; first: {self.skipped[0]}" if self.skipped else ""
            raise DataError(f"{source}: no usable {self._what()} ({len(self.skipped)} skipped{first})")

    # -- what subclasses define --------------------------------------------------------------
    def _default_transform(self) -> Callable:
        raise NotImplementedError

    def _what(self) -> str:
        raise NotImplementedError

    def _labels(self, raw: np.ndarray) -> tuple[np.ndarray, str | None]:
        raise NotImplementedError

    def _to_tensor(self, images: list[np.ndarray]) -> torch.Tensor:
        return torch.cat([torch.from_numpy(np.require(i.transpose(2, 0, 1), requirements=["C", "W"])).float()
                          for i in images])

    # -- checks ------------------------------------------------------------------------------
    def _scan(self, pairs: list[Pair], scan: str, workers: int | None) -> list[SkippedFile | None]:
        check = self._check_full if scan == "full" else self._check_headers
        workers = min(8, os.cpu_count() or 1) if workers is None else max(1, workers)
        if workers == 1 or len(pairs) < 2:
            return [check(pair) for pair in pairs]
        with ThreadPoolExecutor(workers) as pool:  # decoders release the GIL
            return list(pool.map(check, pairs))

    def _check_headers(self, pair: Pair) -> SkippedFile | None:
        sizes = []
        for path in (*pair.images, pair.label):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
                    image = Image.open(path)
                with image:
                    sizes.append(image.size)
            except Exception:  # noqa: BLE001 - the loader says what is wrong (it fails the same way)
                return SkippedFile(str(path), self._load_failure(path, is_label=path == pair.label))
            width, height = sizes[-1]
            if width * height > self.max_pixels:
                return SkippedFile(str(path), f"too large: {width}x{height} = {width * height} pixels > limit "
                                   f"{self.max_pixels}")
        return self._size_problem(pair, sizes)

    def _load_failure(self, path: Path, is_label: bool) -> str:
        try:
            (load_label_map if is_label else load_image)(path, self.max_pixels)
        except ImageError as err:
            return err.reason
        return "cannot read its header"

    def _check_full(self, pair: Pair) -> SkippedFile | None:
        try:
            self._read(pair)
        except _PairProblem as problem:
            return problem.skipped
        return None

    @staticmethod
    def _size_problem(pair: Pair, sizes: list[tuple[int, int]]) -> SkippedFile | None:
        (width, height), paths = sizes[0], (*pair.images, pair.label)
        for path, (w, h) in zip(paths[1:], sizes[1:]):
            if (w, h) != (width, height):
                return SkippedFile(str(path), f"{w}x{h} pixels; expected {width}x{height}, the size of {paths[0].name}")
        return None

    def _read(self, pair: Pair) -> tuple[list[np.ndarray], np.ndarray]:
        """Decoded images (RGB uint8) and labels, or :class:`_PairProblem` naming the file."""
        images = []
        for path in pair.images:
            try:
                images.append(np.asarray(load_image(path, self.max_pixels)))
            except ImageError as err:
                raise _PairProblem(SkippedFile(str(path), err.reason)) from None
        try:
            raw = load_label_map(pair.label, self.max_pixels)
        except ImageError as err:
            raise _PairProblem(SkippedFile(str(pair.label), err.reason)) from None
        sizes = [(i.shape[1], i.shape[0]) for i in images] + [(raw.shape[1], raw.shape[0])]
        problem = self._size_problem(pair, sizes)
        if problem is not None:
            raise _PairProblem(problem)
        labels, reason = self._labels(raw)
        if reason is not None:
            raise _PairProblem(SkippedFile(str(pair.label), reason))
        return images, labels

    # -- samples -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def names(self) -> list[str]:
        return [pair.name for pair in self.pairs]

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentations ``__getitem__`` draws (see the module docstring)."""
        self.epoch = int(epoch)

    def generator(self, index: int) -> np.random.Generator:
        """The generator of sample ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load(index, self.generator(index))

    def load(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        """Sample ``index`` transformed with draws from ``rng``; ``{"name", "skipped"}`` (the reason,
        ``file: what``) if its files cannot be used any more."""
        pair = self.pairs[index]
        try:
            images, labels = self._read(pair)
        except _PairProblem as problem:
            return {"name": pair.name, "skipped": str(problem.skipped)}
        sample = self.transform(Sample(images, labels), rng)
        return {
            "name": pair.name,
            "image": self._to_tensor(sample.images),
            "label": torch.from_numpy(np.require(sample.label, requirements=["C", "W"])).long(),
            "original_size": tuple(images[0].shape[:2]),
        }

    def report_lines(self) -> list[str]:
        """A summary and one ``file: reason`` line per skipped file."""
        head = f"{self.source}: {len(self.pairs)} {self._what()} kept, {len(self.skipped)} file(s) skipped"
        return [head] + [str(s) for s in self.skipped]


class _PairProblem(Exception):
    def __init__(self, skipped: SkippedFile):
        super().__init__(str(skipped))
        self.skipped = skipped


class SegmentationDataset(_PairedDataset):
    """Images and their label maps (mmseg's layout; see the module docstring)."""

    task = "segmentation"

    def __init__(
        self,
        image_dir: Path | str,
        label_dir: Path | str,
        classes: ClassTable,
        transform: Callable | None = None,
        *,
        reduce_zero_label: bool = False,
        image_suffix: str | None = None,
        label_suffix: str = ".png",
        names_file: Path | str | None = None,
        scan: str = "full",
        seed: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        scan_workers: int | None = None,
    ):
        image_dir, label_dir = Path(image_dir), Path(label_dir)
        _require_folder(image_dir, "images")
        _require_folder(label_dir, "label maps")
        self.reduce_zero_label = reduce_zero_label
        names = _read_names_file(Path(names_file)) if names_file is not None else None
        pairs, skipped = pair_files([image_dir], label_dir, image_suffix, label_suffix, names)
        if not pairs and not skipped:
            raise DataError(f"{image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        super().__init__(pairs, skipped, classes, transform, str(image_dir), scan, seed, max_pixels, scan_workers)

    @classmethod
    def from_root(cls, root: Path | str, split: str, classes: ClassTable, transform: Callable | None = None,
                  **options) -> "SegmentationDataset":
        """``<root>/img_dir/<split>`` and ``<root>/ann_dir/<split>``."""
        root = Path(root)
        return cls(root / "img_dir" / split, root / "ann_dir" / split, classes, transform, **options)

    def _default_transform(self) -> Callable:
        return eval_pipeline()

    def _what(self) -> str:
        return "image/label pairs"

    def _labels(self, raw: np.ndarray) -> tuple[np.ndarray, str | None]:
        return segmentation_labels(raw, len(self.classes), self.reduce_zero_label)

    def _to_tensor(self, images: list[np.ndarray]) -> torch.Tensor:
        return super()._to_tensor(images[:1])


class ChangeDataset(_PairedDataset):
    """Before and after images with a change label map (LEVIR-CD's layout; see the module docstring)."""

    task = "change_detection"

    def __init__(
        self,
        before_dir: Path | str,
        after_dir: Path | str,
        label_dir: Path | str,
        transform: Callable | None = None,
        *,
        classes: ClassTable = CHANGE_CLASSES,
        image_suffix: str | None = None,
        label_suffix: str = ".png",
        names_file: Path | str | None = None,
        scan: str = "full",
        seed: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        scan_workers: int | None = None,
    ):
        folders = [Path(before_dir), Path(after_dir)]
        label_dir = Path(label_dir)
        for folder, what in zip((*folders, label_dir), ("before images", "after images", "change labels")):
            _require_folder(folder, what)
        if len(classes) != 2:
            raise ValueError(f"classes must be two (unchanged, changed), got {len(classes)}")
        names = _read_names_file(Path(names_file)) if names_file is not None else None
        pairs, skipped = pair_files(folders, label_dir, image_suffix, label_suffix, names,
                                    folder_names=("before image", "after image"))
        if not pairs and not skipped:
            raise DataError(f"{folders[0]}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        super().__init__(pairs, skipped, classes, transform, str(folders[0].parent), scan, seed, max_pixels,
                         scan_workers)

    @classmethod
    def from_root(cls, root: Path | str, split: str | None = None, transform: Callable | None = None,
                  folders: tuple[str, str, str] = ("A", "B", "label"), **options) -> "ChangeDataset":
        """``<root>/<split>/A``, ``B`` and ``label`` (without ``split``: ``<root>/A`` ..., as LEVIR-CD-256
        with its ``list/<split>.txt``, given as ``names_file``)."""
        base = Path(root) if split is None else Path(root) / split
        return cls(*(base / f for f in folders), transform, **options)

    def _default_transform(self) -> Callable:
        return change_eval_pipeline()

    def _what(self) -> str:
        return "before/after/label triples"

    def _labels(self, raw: np.ndarray) -> tuple[np.ndarray, str | None]:
        return change_labels(raw)


# ------------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """Samples padded to the largest in the batch (images with 0, labels with 255), and the names
    and reasons of those that could not be loaded."""

    image: torch.Tensor | None  # (B, C, H, W); None when every sample was skipped
    label: torch.Tensor | None  # (B, H', W') int64
    names: list[str]
    original_sizes: list[tuple[int, int]]
    image_sizes: list[tuple[int, int]]  # before padding
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, "file: reason")

    def __len__(self) -> int:
        return len(self.names)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.image), move(self.label), self.names, self.original_sizes, self.image_sizes,
                     self.skipped)

    def pin_memory(self) -> "Batch":
        if self.image is not None:
            self.image, self.label = self.image.pin_memory(), self.label.pin_memory()
        return self


def _pad_stack(tensors: list[torch.Tensor], value: float) -> torch.Tensor:
    height = max(t.shape[-2] for t in tensors)
    width = max(t.shape[-1] for t in tensors)
    out = tensors[0].new_full((len(tensors), *tensors[0].shape[:-2], height, width), value)
    for row, tensor in enumerate(tensors):
        out[row, ..., : tensor.shape[-2], : tensor.shape[-1]] = tensor
    return out


def collate(items: list[dict[str, Any]], pad_value: float = 0.0, ignore_index: int = IGNORE_INDEX) -> Batch:
    """A :class:`Batch` of data set items (skipped items are listed, not stacked)."""
    good = [item for item in items if "skipped" not in item]
    skipped = [(item["name"], item["skipped"]) for item in items if "skipped" in item]
    if not good:
        return Batch(None, None, [], [], [], skipped)
    return Batch(
        image=_pad_stack([item["image"] for item in good], pad_value),
        label=_pad_stack([item["label"] for item in good], ignore_index),
        names=[item["name"] for item in good],
        original_sizes=[item["original_size"] for item in good],
        image_sizes=[tuple(item["image"].shape[-2:]) for item in good],
        skipped=skipped,
    )
