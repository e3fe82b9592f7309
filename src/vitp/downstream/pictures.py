"""Pictures of dense predictions: label maps as palette PNGs, and an overlay contact sheet.

* :func:`write_palette_png` saves a class-index map as a mode "P" PNG whose palette is the class
  colours: image viewers show the colours, and reading the file back (Pillow's ``np.asarray``, mmseg's
  loader) gives the indices. 255 (ignore) gets its own colour.
* :func:`write_overlay_sheet` draws one row per image: the image(s) (before and after for change
  detection), the label and the prediction blended over the (last) image, and the errors (pixels
  whose prediction differs from a non-ignored label, in red); a legend of the class colours below.

Drawing, fonts and saving are :mod:`vitp.retrieval.pictures`'s (one way of writing pictures).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

from vitp.data.images import ImageError, load_image
from vitp.downstream.data import ClassTable
from vitp.files import atomic_path
from vitp.retrieval.pictures import (
    _THUMBNAIL_MAX_PIXELS,
    BACKGROUND,
    MISMATCH,
    TEXT,
    _font,
    _save_picture,
    _shorten,
)

IGNORE_INDEX = 255
IGNORE_COLOUR = (0, 0, 0)
ImageLike = Union[str, Path, Image.Image, np.ndarray]


def _palette_array(classes: ClassTable | Sequence[Sequence[int]]) -> np.ndarray:
    colours = classes.palette if isinstance(classes, ClassTable) else classes
    palette = np.asarray(colours, dtype=np.int64)
    if palette.ndim != 2 or palette.shape[1] != 3 or len(palette) > 256 or palette.min() < 0 or palette.max() > 255:
        raise ValueError(f"classes must give up to 256 RGB colours in 0-255, got shape {palette.shape}")
    return palette.astype(np.uint8)


def _index_map(mask, name: str) -> np.ndarray:
    mask = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D map of class indices, got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"{name} holds values outside 0-255 ({int(mask.min())}..{int(mask.max())})")
    return mask.astype(np.uint8)


def colour_mask(mask, classes: ClassTable | Sequence[Sequence[int]], ignore_index: int = IGNORE_INDEX,
                ignore_colour: tuple[int, int, int] = IGNORE_COLOUR) -> np.ndarray:
    """H x W x 3 uint8: each pixel the colour of its class; ``ignore_index`` and any index beyond the
    palette in ``ignore_colour``."""
    lookup = np.tile(np.asarray(ignore_colour, dtype=np.uint8), (256, 1))
    palette = _palette_array(classes)
    lookup[: len(palette)] = palette
    lookup[ignore_index] = ignore_colour
    return lookup[_index_map(mask, "mask")]


def write_palette_png(mask, path: Path | str, classes: ClassTable | Sequence[Sequence[int]],
                      ignore_index: int = IGNORE_INDEX, ignore_colour: tuple[int, int, int] = IGNORE_COLOUR) -> Path:
    """Save a class-index map as a palette PNG (see the module docstring); written atomically."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png (a palette image keeps its indices only as PNG), got {path}")
    indices = _index_map(mask, "mask")
    palette = np.zeros((256, 3), dtype=np.uint8)
    colours = _palette_array(classes)
    palette[: len(colours)] = colours
    palette[ignore_index] = ignore_colour
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.ravel().tolist())
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def blend(image: np.ndarray, mask, classes: ClassTable | Sequence[Sequence[int]], alpha: float = 0.5,
          ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """The class colours laid over ``image`` (H x W x 3 uint8) with opacity ``alpha``; ignored pixels
    show the image alone."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    indices = _index_map(mask, "mask")
    if indices.shape != image.shape[:2]:
        raise ValueError(f"mask {indices.shape} and image {image.shape[:2]} must have one size")
    colours = colour_mask(indices, classes, ignore_index).astype(np.float32)
    mixed = image.astype(np.float32) * (1 - alpha) + colours * alpha
    mixed = np.where((indices == ignore_index)[..., None], image, mixed)
    return np.round(mixed).astype(np.uint8)


@dataclass
class OverlayRow:
    """One row of the sheet: the image(s) — paths, Pillow images or arrays —, the label (None at
    test time) and the prediction, as class-index maps of the image's size."""

    name: str
    images: list[ImageLike]
    prediction: np.ndarray
    label: np.ndarray | None = None
    caption: str = ""  # e.g. the image's IoU
    notes: list[str] = field(default_factory=list)


def _read_rgb(image: ImageLike, shape: tuple[int, int]) -> tuple[np.ndarray, str | None]:
    """RGB array of ``image``; an unreadable file becomes a grey canvas of ``shape`` and the reason."""
    if isinstance(image, (str, Path)):
        try:
            image = load_image(image, _THUMBNAIL_MAX_PIXELS)
        except ImageError as err:
            return np.full((*shape, 3), 200, dtype=np.uint8), f"unreadable: {err.reason}"
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"images must be RGB (H x W x 3), got shape {image.shape}")
    return image.astype(np.uint8), None


def _panel_size(height: int, width: int, tile: int) -> tuple[int, int]:
    factor = tile / max(height, width)
    return max(1, round(height * factor)), max(1, round(width * factor))


def _shrink(array: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), resample))


def _row_panels(row: OverlayRow, classes: ClassTable, tile: int, alpha: float, ignore_index: int):
    """(title, panel array) of each column, and notes on what could not be drawn."""
    prediction = _index_map(row.prediction, f"{row.name}: prediction")
    label = None if row.label is None else _index_map(row.label, f"{row.name}: label")
    if label is not None and label.shape != prediction.shape:
        raise ValueError(f"{row.name}: label {label.shape} and prediction {prediction.shape} must have one size")
    size = _panel_size(*prediction.shape, tile)
    panels, notes = [], list(row.notes)
    images = []
    for number, source in enumerate(row.images):
        rgb, problem = _read_rgb(source, prediction.shape)
        if rgb.shape[:2] != prediction.shape:
            raise ValueError(f"{row.name}: image {number + 1} is {rgb.shape[1]}x{rgb.shape[0]} but the prediction "
                             f"is {prediction.shape[1]}x{prediction.shape[0]}")
        if problem:
            notes.append(problem)
        images.append(_shrink(rgb, size, nearest=False))
    titles = ["before", "after"] if len(images) == 2 else ["image"] * len(images)
    panels += list(zip(titles, images))
    base = images[-1] if images else np.full((*size, 3), 128, dtype=np.uint8)
    small_prediction = _shrink(prediction, size, nearest=True)
    if label is not None:
        small_label = _shrink(label, size, nearest=True)
        panels.append(("label", blend(base, small_label, classes, alpha, ignore_index)))
    panels.append(("prediction", blend(base, small_prediction, classes, alpha, ignore_index)))
    if label is not None:
        wrong = (small_prediction != small_label) & (small_label != ignore_index)
        errors = np.round(base.astype(np.float32) * 0.4 + 255 * 0.6 * 0.5).astype(np.uint8)  # faded image
        errors[wrong] = MISMATCH
        panels.append(("errors", errors))
    return panels, notes


def write_overlay_sheet(
    rows: list[OverlayRow], classes: ClassTable, path: Path | str, tile: int = 256, alpha: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
) -> Path:
    """The contact sheet of the module docstring, in the format the file name says (.png, .jpg, ...)."""
    if not rows:
        raise ValueError("rows must hold at least one image")
    if tile < 16:
        raise ValueError(f"tile must be at least 16 pixels, got {tile}")
    path = Path(path)
    font = _font()
    margin, title_height, caption_height = 8, 14, 28
    drawn = [_row_panels(row, classes, tile, alpha, ignore_index) for row in rows]
    columns = max(len(panels) for panels, _ in drawn)
    cell = tile + margin
    legend = _legend_lines(classes, margin + columns * cell, font)
    row_heights = [title_height + max(p.shape[0] for _, p in panels) + caption_height for panels, _ in drawn]
    height = margin + sum(row_heights) + 16 * len(legend) + margin
    sheet = Image.new("RGB", (margin + columns * cell, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    characters = max(8, tile // 6)
    y = margin
    for row, (panels, notes), row_height in zip(rows, drawn, row_heights):
        for c, (title, panel) in enumerate(panels):
            x = margin + c * cell
            draw.text((x, y), title, fill=TEXT, font=font)
            sheet.paste(Image.fromarray(panel), (x, y + title_height))
        below = y + row_height - caption_height + 1
        caption = f"{row.name}  {row.caption}".strip()
        draw.text((margin, below), _shorten(caption, characters * columns), fill=TEXT, font=font)
        if notes:
            draw.text((margin, below + 13), _shorten("; ".join(notes), characters * columns), fill=MISMATCH, font=font)
        y += row_height
    for line in legend:
        x = margin
        for name, colour in line:
            draw.rectangle([x, y, x + 11, y + 11], fill=tuple(colour), outline=TEXT)
            draw.text((x + 15, y), name, fill=TEXT, font=font)
            x += 15 + _text_width(draw, name, font) + 14
        y += 16
    _save_picture(sheet, path, "overlay sheet")
    return path


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def _legend_lines(classes: ClassTable, width: int, font) -> list[list[tuple[str, tuple[int, int, int]]]]:
    """The classes as (name, colour) swatches, wrapped to the sheet's width."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, line, used = [], [], 8
    for index, (name, colour) in enumerate(zip(classes.names, classes.palette)):
        label = f"{index} {name}"
        needed = 15 + _text_width(measure, label, font) + 14
        if line and used + needed > width:
            lines.append(line)
            line, used = [], 8
        line.append((label, colour))
        used += needed
    return lines + ([line] if line else [])
