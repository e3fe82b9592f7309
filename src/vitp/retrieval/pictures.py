"""Pictures of retrieval results, drawn with Pillow: a contact sheet of queries and their top-K
(``vitp search --contact_sheet``) and a per-class bar chart (``vitp evaluate --plot``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vitp.data.images import ImageError, load_image
from vitp.errors import RetrievalError
from vitp.files import atomic_path

MATCH = (46, 160, 67)
MISMATCH = (200, 50, 50)
NEUTRAL = (150, 150, 150)
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
# Thumbnails are read with a far lower pixel limit than extraction: a sheet never needs a huge image.
_THUMBNAIL_MAX_PIXELS = 64_000_000


def picture_format(path: Path | str, name: str) -> str:
    """The Pillow format that the file name's extension asks for (``sheet.jpg`` -> JPEG), so that
    the bytes written are what the name says."""
    extension = Path(path).suffix.lower()
    image_format = Image.registered_extensions().get(extension)
    if image_format is None or image_format not in Image.SAVE:
        raise RetrievalError(
            f"{name} {path}: cannot write a picture named {extension or 'without an extension'}; "
            f"use a name ending in .png, .jpg or .webp"
        )
    return image_format


def _save_picture(image: Image.Image, path: Path, name: str) -> None:
    image_format = picture_format(path, name)
    with atomic_path(path) as tmp:
        image.save(tmp, format=image_format, **({"quality": 92} if image_format in ("JPEG", "WEBP") else {}))


@dataclass
class SheetRow:
    query_path: str
    query_label: str | None  # None: do not colour results by class
    results: list[tuple[str, str, float]]  # (path, label, score), best first


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _thumbnail(path: str, size: int) -> Image.Image:
    tile = Image.new("RGB", (size, size), (235, 235, 235))
    try:
        image = load_image(path, _THUMBNAIL_MAX_PIXELS)
    except ImageError as err:
        ImageDraw.Draw(tile).text((4, size // 2 - 6), f"unreadable: {err.reason[:20]}", fill=MISMATCH, font=_font())
        return tile
    if max(image.size) < size:  # small tiles (e.g. 32 px remote-sensing chips) are enlarged, pixels kept sharp
        factor = size // max(image.size)
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    image.thumbnail((size, size))
    tile.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return tile


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def write_contact_sheet(rows: list[SheetRow], path: Path, thumbnail: int = 128) -> Path:
    """One row per query: the query, then its results, each captioned with rank, label and score;
    in the format that the file name's extension says (.png, .jpg, ...).

    A result's frame is green when its label is the query's, red when not, grey when the query has
    no label to compare with."""
    columns = 1 + max((len(row.results) for row in rows), default=0)
    margin, caption, border = 8, 28, 4
    cell_w, cell_h = thumbnail + 2 * border, thumbnail + 2 * border + caption
    sheet = Image.new("RGB", (margin + columns * (cell_w + margin), margin + len(rows) * (cell_h + margin)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font()
    characters = max(8, thumbnail // 6)
    for r, row in enumerate(rows):
        y = margin + r * (cell_h + margin)
        cells = [(row.query_path, "query", row.query_label or "", None)]
        cells += [(p, f"#{i + 1}: {s:.3f}", label, label == row.query_label if row.query_label else None)
                  for i, (p, label, s) in enumerate(row.results)]
        for c, (image_path, title, label, matches) in enumerate(cells):
            x = margin + c * (cell_w + margin)
            colour = TEXT if c == 0 else NEUTRAL if matches is None else MATCH if matches else MISMATCH
            draw.rectangle([x, y, x + cell_w - 1, y + thumbnail + 2 * border - 1], fill=colour)
            sheet.paste(_thumbnail(image_path, thumbnail), (x + border, y + border))
            draw.text((x, y + thumbnail + 2 * border + 1), _shorten(title, characters), fill=TEXT, font=font)
            draw.text((x, y + thumbnail + 2 * border + 14), _shorten(label, characters), fill=colour, font=font)
    _save_picture(sheet, path, "contact_sheet")
    return path


def write_class_chart(rows: list[dict], key: str, title: str, path: Path) -> Path:
    """Horizontal bars, one per class, of ``row[...]`` values in [0, 1] (e.g. Top-1 accuracy)."""
    font = _font()
    name_width = 8 + 7 * max(5, *(len(str(row["class"])) for row in rows)) if rows else 60
    bar_width, bar_height, gap, top = 400, 14, 4, 30
    height = top + len(rows) * (bar_height + gap) + 10
    image = Image.new("RGB", (name_width + bar_width + 70, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((8, 8), title, fill=TEXT, font=font)
    for i, row in enumerate(rows):
        value = _lookup(row, key)
        y = top + i * (bar_height + gap)
        draw.text((8, y + 1), str(row["class"]), fill=TEXT, font=font)
        draw.rectangle([name_width, y, name_width + bar_width, y + bar_height], outline=NEUTRAL)
        colour = MATCH if value >= 0.5 else MISMATCH
        draw.rectangle([name_width, y, name_width + int(round(bar_width * value)), y + bar_height], fill=colour)
        draw.text((name_width + bar_width + 6, y + 1), f"{value:.3f}", fill=TEXT, font=font)
    _save_picture(image, path, "plot")
    return path


def _lookup(row: dict, key: str) -> float:
    """``"top_k.top1"`` -> row["top_k"]["top1"]."""
    value = row
    for part in key.split("."):
        value = value[part]
    return float(value)
