"""The reader of feature extraction: which files, in which batches, on which rank, decoded how.

* :func:`list_images` — every image under a folder, recursively, in sorted order, as absolute paths;
* :func:`fixed_batches` — the sorted list cut into batches of ``batch_size``; the batches never depend
  on how many processes run or on what an earlier run already did, so every image is always embedded
  in the same batch (and gets the same numbers);
* :func:`rank_batches` — the contiguous run of batches one torchrun rank embeds;
* :class:`ImageFiles` / :func:`image_batches` — decoding and InternVL's transform on DataLoader workers;
  a file that cannot be decoded comes back as a failure with its reason, never as an exception.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from vitp.data.images import DEFAULT_MAX_PIXELS, ImageError, build_transform, iter_image_files, load_image

logger = logging.getLogger("vitp")


def list_images(image_dir: Path) -> list[Path]:
    """Absolute, but not resolved: a symlinked image keeps its own folder, which is its class."""
    return [Path(os.path.abspath(path)) for path in iter_image_files(image_dir)]


def fixed_batches(count: int, batch_size: int) -> list[range]:
    return [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def rank_batches(num_batches: int, rank: int, world_size: int) -> range:
    """Batch numbers of one rank: contiguous and balanced (sizes differ by at most one batch), so the
    ranks' outputs, read in rank order, are the files in sorted order."""
    return range(rank * num_batches // world_size, (rank + 1) * num_batches // world_size)


@dataclass(frozen=True)
class FileStamp:
    """Size and modification time: an image replaced under the same name is computed again."""

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> "FileStamp":
        try:
            stat = path.stat()
        except OSError:
            return cls(-1, -1)  # unreadable now; the loader will report why
        return cls(stat.st_size, stat.st_mtime_ns)


class ImageFiles(Dataset):
    """Item ``i``: (i, pixel tensor or None, reason the file was skipped or None)."""

    def __init__(self, paths: list[Path], image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.paths = paths
        self.transform = build_transform(image_size)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = load_image(self.paths[index], self.max_pixels)
        except ImageError as err:
            return index, None, err.reason
        return index, self.transform(image), None


@dataclass
class ImageBatch:
    indices: list[int]  # of the images that decoded, in batch order
    pixel_values: torch.Tensor | None
    failures: list[tuple[int, str]]  # (index, reason)

    def pin_memory(self) -> "ImageBatch":
        if self.pixel_values is not None:
            self.pixel_values = self.pixel_values.pin_memory()
        return self


def collate_images(items: list[tuple[int, torch.Tensor | None, str | None]]) -> ImageBatch:
    good = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    failures = [(index, reason) for index, pixels, reason in items if pixels is None]
    pixel_values = torch.stack([pixels for _, pixels in good]) if good else None
    return ImageBatch([index for index, _ in good], pixel_values, failures)


def default_num_workers() -> int:
    return min(8, os.cpu_count() or 1)


def check_num_workers(num_workers: int | None) -> None:
    if num_workers is not None and num_workers < 0:
        raise ValueError(
            f"num_workers {num_workers}: must be >= 0 (0 decodes images in the main process; "
            f"default min(8, CPU count) = {default_num_workers()})"
        )


def image_batches(
    dataset: ImageFiles, batches: list[list[int]], num_workers: int | None, pin_memory: bool
) -> Iterator[ImageBatch]:
    """The given batches of ``dataset``, decoded on DataLoader workers, in order."""
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=default_num_workers() if num_workers is None else num_workers,
        collate_fn=collate_images,
        pin_memory=pin_memory,
    )
    yield from loader


def warn_about_images_in_the_root(image_dir: Path, files: list[Path]) -> None:
    """An image's class is its folder's name, so images directly in the image folder all get the root
    folder's name as their class, which is rarely what was meant."""
    root = Path(os.path.abspath(image_dir))
    in_root = [path for path in files if path.parent == root]
    if in_root:
        logger.warning(
            "%d of the %d images are directly in image_dir %s, not in a class folder: their label (class) is "
            "the root folder's name %r (first: %s)", len(in_root), len(files), image_dir, root.name, in_root[0].name
        )
