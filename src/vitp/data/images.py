"""Images as InternVL sees them, shared by training and retrieval.

* :func:`load_image` decodes a file safely: corrupt, truncated, empty and oversized files
  (decompression bombs) raise :class:`ImageError` with the reason, before any large allocation.
* :func:`build_transform` is InternVL's per-tile transform: resize to a square bicubically, to
  tensor, ImageNet mean/std.
* :func:`dynamic_preprocess` is InternVL's dynamic resolution: choose a grid of tiles matching the
  aspect ratio, cut row-major tiles, add a thumbnail.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from vitp.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
# Pillow's own decompression-bomb threshold (2 x Image.MAX_IMAGE_PIXELS); checked from the header,
# before decoding, so an oversized file costs nothing.
DEFAULT_MAX_PIXELS = 178_956_970


class ImageError(DataError):
    """An image that cannot be used; ``reason`` is a short phrase for reports, ``kind`` one of
    "unreadable", "empty", "unsupported", "too large", "corrupt"."""

    def __init__(self, path: Path | str, reason: str, kind: str = "corrupt"):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason
        self.kind = kind


def load_image(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file to RGB, or raise :class:`ImageError` saying why it cannot be used."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageError(path, f"cannot read ({err.strerror or err})", "unreadable") from None
    return decode_image(path, path, max_pixels, empty=size == 0)


def decode_image(
    source: Path | BinaryIO, name: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: tuple[str, ...] | None = None, empty: bool = False,
) -> Image.Image:
    """Decode a file or an in-memory stream (an upload) to RGB. The pixel limit is checked from the
    header, before decoding; ``formats`` restricts which of Pillow's decoders may run."""
    if empty:
        raise ImageError(name, "empty file", "empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            with Image.open(source, formats=formats) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(
                        name, f"too large: {width}x{height} = {width * height} pixels > limit {max_pixels}", "too large"
                    )
                image.load()  # decode now, so that truncation is found here and not later
                return to_rgb(image)
    except ImageError as err:  # named as the caller names the source (to_rgb sees only the image)
        raise ImageError(name, err.reason, err.kind) from None
    except UnidentifiedImageError:
        accepted = f" ({', '.join(formats)})" if formats else ""
        raise ImageError(name, f"not an image in a supported format{accepted}", "unsupported") from None
    except Image.DecompressionBombError as err:  # beyond Pillow's hard limit, whatever max_pixels says
        raise ImageError(name, f"too large ({err})", "too large") from None
    except Exception as err:  # noqa: BLE001 - any decoder failure on a bad file is the file's fault
        raise ImageError(name, f"corrupt or truncated image ({type(err).__name__}: {err})", "corrupt") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any mode; 16-bit and float images (common in remote sensing) are scaled to 8 bit
    instead of being clipped."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        image = Image.fromarray(_scaled_to_8_bit(np.asarray(image, dtype=np.float32), image), mode="L")
    return image.convert("RGB")


def _scaled_to_8_bit(array: np.ndarray, image: Image.Image) -> np.ndarray:
    """Stretch the valid range to 0..255. NaN (a usual "no data" value of float rasters) is left out of
    the range, so that it does not turn the whole image black, and becomes 0."""
    valid = np.isfinite(array)
    if not valid.any():
        raise ImageError(getattr(image, "filename", "") or "image", "no valid pixels (every value is NaN or infinite)", "corrupt")
    low, high = float(array[valid].min()), float(array[valid].max())
    scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
    return np.where(valid, scaled, 0.0).round().astype(np.uint8)


def build_transform(image_size: int) -> transforms.Compose:
    """InternVL's tile transform: resize to image_size² (bicubic), to tensor, ImageNet normalisation."""
    return transforms.Compose([
        transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def jpeg_reencode(image: Image.Image, quality: int) -> Image.Image:
    """Re-encode as JPEG at ``quality``: upstream's ``data_augment`` (random quality 75-100)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (columns, rows) with min_num <= columns*rows <= max_num, sorted by tile count.

    Built exactly like upstream (a set, then a stable sort on the product) so that grids with the same
    tile count come in the same order, which decides exact ties below."""
    grids = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def choose_grid(width: int, height: int, min_num: int, max_num: int, image_size: int) -> tuple[int, int]:
    """The (columns, rows) grid whose aspect ratio is closest to the image's; on an exact tie a later
    (larger) grid wins only if the image has more than half the pixels that grid would hold."""
    aspect = width / height
    best, best_difference = (1, 1), float("inf")
    for columns, rows in candidate_grids(min_num, max_num):
        difference = abs(aspect - columns / rows)
        if difference < best_difference:
            best, best_difference = (columns, rows), difference
        elif difference == best_difference and width * height > 0.5 * image_size * image_size * columns * rows:
            best = (columns, rows)
    return best


def count_tiles(width: int, height: int, min_num: int, max_num: int, image_size: int, use_thumbnail: bool) -> int:
    """How many tiles :func:`dynamic_preprocess` makes for an image of this size (no pixels needed)."""
    columns, rows = choose_grid(width, height, min_num, max_num, image_size)
    return columns * rows + (1 if use_thumbnail and columns * rows > 1 else 0)


def dynamic_preprocess(
    image: Image.Image, min_num: int, max_num: int, image_size: int, use_thumbnail: bool
) -> list[Image.Image]:
    """Tiles of ``image``: resized to the chosen grid, cut row-major, plus a thumbnail if more than one.

    ``min_num`` above ``max_num`` happens legitimately when several images share the tile budget
    (``max(1, max_dynamic_patch // n_images)``); as upstream, no grid qualifies and the image is one tile."""
    if min_num < 1 or max_num < 1:
        raise ValueError(f"min_num and max_num must be >= 1, got {min_num} and {max_num}")
    columns, rows = choose_grid(*image.size, min_num, max_num, image_size)
    resized = image.resize((image_size * columns, image_size * rows), Image.BICUBIC)
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(columns)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.BICUBIC))
    return tiles


def iter_image_files(root: Path | str) -> Iterator[Path]:
    """Image files under ``root``, recursively, in a stable (sorted) order; hidden entries skipped.

    A symbolic link with an image name whose target is gone (or a link loop) is listed too: loading it
    fails with the reason, so it is reported among the skipped files instead of vanishing silently."""
    root = Path(root)
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and (path.is_file() or _is_broken_link(path)):
            yield path


def _is_broken_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists()  # exists() follows the link: False if gone or looping


def pixel_values(tiles: list[Image.Image], image_size: int) -> torch.Tensor:
    """Stack tiles into a (tiles, 3, image_size, image_size) normalised tensor."""
    transform = build_transform(image_size)
    return torch.stack([transform(tile) for tile in tiles])
