"""Helpers of the downstream tests (a module with a unique name, importable from tests/downstream):
tiny synthetic data sets in mmseg's layout (``img_dir/<split>``, ``ann_dir/<split>``) and LEVIR-CD's
(``<split>/A``, ``B``, ``label``), class files, and names that stress sorting and unicode.

The pictures are learnable: every segmentation pixel has its class's palette colour plus noise, and
every change is a bright rectangle painted into the after image, so a trainer test can check that a
model learns something."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

# 16 classes as iSAID, with names that sort differently as text and as numbers ("class 10" before
# "class 9" as text) and non-ASCII names.
SIXTEEN_CLASSES = (
    "background", "ship", "class 10", "class 9", "class 2", "bâtiment", "建筑物", "дорога",
    "Large_Vehicle", "small vehicle", "helicopter", "swimming pool", "roundabout", "soccer field", "plane", "harbour",
)


def palette(count: int) -> list[tuple[int, int, int]]:
    """``count`` colours far enough apart that a pixel's class can be read from its colour."""
    rng = np.random.default_rng(1234)
    colours: list[tuple[int, int, int]] = []
    while len(colours) < count:
        candidate = tuple(int(v) for v in rng.integers(0, 256, 3))
        if all(sum(abs(a - b) for a, b in zip(candidate, c)) > 90 for c in colours):
            colours.append(candidate)
    return colours


def unicode_names(count: int, prefix: str = "图像") -> list[str]:
    """File names (no extension) with non-ASCII letters, a space and numbers that sort differently as
    text and as numbers (… 10, 2, …)."""
    return [f"{prefix} é{i}" for i in range(count)]


def write_class_file(path: Path, names: Sequence[str], colours: Sequence[Sequence[int]] | None = None,
                     form: str = "text") -> Path:
    """A class file in the text form (``name r g b`` lines) or as mmseg-style JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if form == "json":
        data = {"classes": list(names)}
        if colours is not None:
            data["palette"] = [list(c) for c in colours]
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    elif colours is None:
        path.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    else:
        path.write_text("".join(f"{n} {r} {g} {b}\n" for n, (r, g, b) in zip(names, colours)), encoding="utf-8")
    return path


def _sizes(num_images: int, size, sizes) -> list[tuple[int, int]]:
    """(width, height) of each image."""
    return list(sizes) if sizes is not None else [tuple(size)] * num_images


def draw_label_map(rng: np.random.Generator, width: int, height: int, num_classes: int,
                   ignore_fraction: float = 0.05) -> np.ndarray:
    """Class indices 0..C-1 in random rectangles over a random background class, and a few 255s."""
    label = np.full((height, width), rng.integers(num_classes), dtype=np.uint8)
    for _ in range(max(3, num_classes)):
        w, h = int(rng.integers(4, max(5, width // 2))), int(rng.integers(4, max(5, height // 2)))
        x, y = int(rng.integers(0, max(1, width - w))), int(rng.integers(0, max(1, height - h)))
        label[y : y + h, x : x + w] = rng.integers(num_classes)
    label[rng.random((height, width)) < ignore_fraction] = 255
    return label


def paint(label: np.ndarray, colours: Sequence[Sequence[int]], rng: np.random.Generator, noise: int = 20) -> np.ndarray:
    """An RGB image whose pixels have their class's colour plus uniform noise (ignored pixels grey)."""
    lookup = np.full((256, 3), 128, dtype=np.int64)
    lookup[: len(colours)] = colours
    image = lookup[label] + rng.integers(-noise, noise + 1, (*label.shape, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_segmentation_dataset(
    root: Path, split: str = "train", num_images: int = 4, size: tuple[int, int] = (333, 250),
    sizes: Sequence[tuple[int, int]] | None = None, num_classes: int = 16, names: Sequence[str] | None = None,
    reduce_zero_label: bool = False, image_suffix: str = ".png", label_mode: str = "L", seed: int = 0,
) -> list[str]:
    """Images and label maps under ``root/img_dir/<split>`` and ``root/ann_dir/<split>``; returns the
    image names (paths inside img_dir/<split>). ``size``/``sizes`` are (width, height); with
    ``reduce_zero_label`` the files hold 0 (no data) and 1..C as LoveDA's do; ``label_mode`` "L" (grey)
    or "P" (palette PNG)."""
    rng = np.random.default_rng(seed)
    names = list(names) if names is not None else [f"tile_{i:03d}" for i in range(num_images)]
    colours = palette(num_classes)
    image_dir, label_dir = root / "img_dir" / split, root / "ann_dir" / split
    written = []
    for name, (width, height) in zip(names, _sizes(len(names), size, sizes)):
        label = draw_label_map(rng, width, height, num_classes)
        image = paint(label, colours, rng)
        stored = label.copy()
        if reduce_zero_label:
            stored = np.where(label == 255, 0, label.astype(np.int64) + 1).astype(np.uint8)
        image_path = image_dir / f"{name}{image_suffix}"
        label_path = label_dir / f"{name}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(image_path)
        mask = Image.fromarray(stored, mode=label_mode)
        if label_mode == "P":  # the file's colours are the classes'; its values stay the indices
            mask.putpalette([v for c in colours for v in c] + [0] * (768 - 3 * len(colours)))
        mask.save(label_path)
        written.append(f"{name}{image_suffix}")
    return written


def write_change_dataset(
    root: Path, split: str | None = "train", num_images: int = 4, size: tuple[int, int] = (96, 80),
    sizes: Sequence[tuple[int, int]] | None = None, names: Sequence[str] | None = None,
    label_values: tuple[int, int] = (0, 255), folders: tuple[str, str, str] = ("A", "B", "label"), seed: int = 0,
) -> list[str]:
    """Before/after images and change labels under ``root/<split>/{A,B,label}`` (``split`` None:
    ``root/A`` ...); the after image is the before image with bright rectangles where the label says
    "changed". Returns the image names."""
    rng = np.random.default_rng(seed)
    names = list(names) if names is not None else [f"pair_{i:03d}" for i in range(num_images)]
    base = root if split is None else root / split
    for folder in folders:
        (base / folder).mkdir(parents=True, exist_ok=True)
    for name, (width, height) in zip(names, _sizes(len(names), size, sizes)):
        before = rng.integers(20, 120, (height, width, 3)).astype(np.uint8)
        changed = np.zeros((height, width), dtype=bool)
        for _ in range(2):
            w, h = int(rng.integers(4, max(5, width // 3))), int(rng.integers(4, max(5, height // 3)))
            x, y = int(rng.integers(0, max(1, width - w))), int(rng.integers(0, max(1, height - h)))
            changed[y : y + h, x : x + w] = True
        after = before.copy()
        after[changed] = np.clip(rng.integers(200, 256, 3), 0, 255).astype(np.uint8)
        label = np.where(changed, label_values[1], label_values[0]).astype(np.uint8)
        Image.fromarray(before).save(base / folders[0] / f"{name}.png")
        Image.fromarray(after).save(base / folders[1] / f"{name}.png")
        Image.fromarray(label, mode="L").save(base / folders[2] / f"{name}.png")
    return [f"{name}.png" for name in names]


def corrupt(path: Path, keep_bytes: int = 60) -> Path:
    """Cut a file short: a PNG whose header still reads but whose pixels do not decode."""
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])
    return path
