"""Batched, resumable feature extraction: a folder of images -> an ``.npz`` features file.

The run, top to bottom (:func:`extract_features`):

1. list the images (recursively, sorted) and cut the list into fixed batches of ``batch_size``;
2. load the ViT once in fp32, fingerprint its weights (so that features from another model are
   recognised later), then cast it to the compute dtype;
3. decode and transform images on DataLoader workers, run the ViT on each batch, pool (mean over
   patch tokens, or CLS) and L2-normalise;
4. every ``shard_size`` images (or ``shard_seconds``) write what is done as a shard in
   ``<output>.partial/``; a bad file is recorded there too, with the reason;
5. at the end, assemble the shards in file order into the output, atomically; write the skipped
   files to ``<output stem>.skipped.txt``; remove the shards.

Resuming: a run that finds ``<output>.partial/`` (from a killed run) keeps every image whose path,
size and modification time match a shard, and computes only the rest. The batches are fixed slices
of the sorted file list and shards hold whole batches, so a resumed run feeds the ViT exactly the
batches an uninterrupted run would, and the output is identical. Settings that change what a feature
means (model, layer, pooling, image size, dtype) must match the partial run's, or the run stops.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import vitp
from vitp.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageError,
    build_transform,
    iter_image_files,
    load_image,
)
from vitp.errors import VitpError
from vitp.model.vision import InternViT
from vitp.retrieval.feature_file import (
    FEATURES_FORMAT,
    FeatureSet,
    labels_from_paths,
    save_features,
    write_npz,
)
from vitp.tensor_io import atomic_path, write_json

logger = logging.getLogger("vitp")

POOLS = ("mean", "cls")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Settings that a resumed run must share with the partial run it continues (they change the numbers).
RESUME_KEYS = ("model_fingerprint", "layer", "pool", "image_size", "dtype", "max_pixels")


class ExtractionError(VitpError):
    """Feature extraction cannot start or continue."""


# --------------------------------------------------------------------------------------------------
# Device, dtype and model


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExtractionError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ExtractionError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto``: bf16 on a GPU that has it (fp16 otherwise), fp32 on CPU (the seed's precision; pass
    ``bf16`` explicitly on CPUs with AMX or AVX512-BF16, where it is several times faster)."""
    if dtype == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if dtype not in DTYPES:
        raise ExtractionError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    return dtype


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the weights as fp32 (names, shapes, values): the same weights give the same
    fingerprint whatever file format or precision they were stored in."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        values = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
        digest.update(f"{name}:{tuple(values.shape)};".encode())
        digest.update(memoryview(values).cast("B"))
    return "sha256:" + digest.hexdigest()[:32]


@dataclass
class FeatureModel:
    """A ViT ready to embed images, with what identifies its features."""

    model: InternViT
    checkpoint: str
    fingerprint: str
    device: torch.device
    dtype: str

    @property
    def image_size(self) -> int:
        return self.model.config.image_size


def load_feature_model(
    vit_checkpoint: str | Path,
    *,
    vit_config: vitp.VisionConfig | None = None,
    image_size: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> FeatureModel:
    """Load the ViT in fp32 (for the fingerprint), then move it to the compute device and dtype."""
    torch_device = resolve_device(device)
    dtype_name = resolve_dtype(dtype, torch_device)
    model = vitp.load_vit(vit_checkpoint, config=vit_config, image_size=image_size, dtype=torch.float32)
    fingerprint = model_fingerprint(model)
    model = model.to(torch_device, DTYPES[dtype_name]).eval()
    return FeatureModel(model, str(Path(vit_checkpoint).resolve()), fingerprint, torch_device, dtype_name)


def extraction_settings(feature_model: FeatureModel, select_layer: int, pool: str, max_pixels: int) -> dict[str, Any]:
    """What produced a set of features; stored in the features file and in every index built from it."""
    model = feature_model.model
    if pool not in POOLS:
        raise ExtractionError(f"--pool {pool!r}: expected one of {', '.join(POOLS)}")
    try:
        layer = model.resolve_layer(select_layer)
    except ValueError as err:
        raise ExtractionError(f"--select_layer: {err}") from None
    return {
        "format": FEATURES_FORMAT,
        "vitp_version": vitp.__version__,
        "vit_checkpoint": feature_model.checkpoint,
        "model_fingerprint": feature_model.fingerprint,
        "model_config": model.config.to_dict(),
        "select_layer": select_layer,
        "layer": layer,  # select_layer resolved to 0..num_layers, so that -1 and 24 compare equal
        "pool": pool,
        "image_size": model.config.image_size,
        "normalization": "l2",
        "dtype": feature_model.dtype,
        "max_pixels": max_pixels,
    }


@torch.inference_mode()
def embed_batch(model: InternViT, pixel_values: torch.Tensor, layer: int, pool: str) -> torch.Tensor:
    """Pooled, L2-normalised float32 features of one batch: (B, 3, H, W) -> (B, D)."""
    tokens = model(pixel_values, select_layer=layer)  # (B, 1 + patches, D), CLS first
    if pool == "cls":
        pooled = tokens[:, 0].float()
    else:
        pooled = tokens[:, 1:].mean(dim=1, dtype=torch.float32)
    return F.normalize(pooled, dim=-1)


# --------------------------------------------------------------------------------------------------
# Images


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
        raise ExtractionError(
            f"--num_workers {num_workers}: must be >= 0 (0 decodes images in the main process; "
            f"default min(8, CPU count) = {default_num_workers()})"
        )


def embedded_batches(
    feature_model: FeatureModel,
    dataset: ImageFiles,
    batches: list[list[int]],
    num_workers: int | None,
    layer: int,
    pool: str,
) -> Iterator[tuple[ImageBatch, np.ndarray | None]]:
    """Decode on DataLoader workers, embed on the model's device: (batch, float32 rows or None)."""
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=default_num_workers() if num_workers is None else num_workers,
        collate_fn=collate_images,
        pin_memory=feature_model.device.type == "cuda",
    )
    for batch in loader:
        rows = None
        if batch.pixel_values is not None:
            pixels = batch.pixel_values.to(feature_model.device, non_blocking=True)
            rows = embed_batch(feature_model.model, pixels, layer, pool).cpu().numpy()
        yield batch, rows


def embed_files(
    feature_model: FeatureModel,
    paths: list[Path],
    select_layer: int,
    pool: str,
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress_bar: bool = True,
) -> tuple[FeatureSet | None, list[tuple[str, str]]]:
    """Features of a few files in memory (queries): no shards. Returns (features or None, skipped)."""
    if batch_size < 1:
        raise ExtractionError(f"--batch_size must be >= 1, got {batch_size}")
    check_num_workers(num_workers)
    settings = extraction_settings(feature_model, select_layer, pool, max_pixels)
    dataset = ImageFiles(paths, feature_model.image_size, max_pixels)
    batches = [list(range(i, min(i + batch_size, len(paths)))) for i in range(0, len(paths), batch_size)]
    rows, kept, skipped = [], [], []
    with tqdm(total=len(paths), unit="img", desc="queries", disable=not progress_bar or len(paths) < 2) as bar:
        for batch, batch_rows in embedded_batches(feature_model, dataset, batches, num_workers, settings["layer"], pool):
            skipped += [(str(paths[i]), reason) for i, reason in batch.failures]
            if batch_rows is not None:
                rows.append(batch_rows)
                kept += [str(paths[i]) for i in batch.indices]
            bar.update(len(batch.indices) + len(batch.failures))
    if not kept:
        return None, skipped
    image_paths = np.array(kept, dtype=str)
    return FeatureSet(np.concatenate(rows), image_paths, labels_from_paths(image_paths), settings, "query images"), skipped


# --------------------------------------------------------------------------------------------------
# Shards: what a run has done so far


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


@dataclass
class Progress:
    """Per-path results read from shards: where a path's feature row is, or why it was skipped."""

    arrays: list[np.ndarray] = field(default_factory=list)  # the shards' feature arrays
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (array, row)
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason
    stamps: dict[str, FileStamp] = field(default_factory=dict)

    def is_done(self, path: str, stamp: FileStamp) -> bool:
        return (path in self.rows or path in self.skipped) and self.stamps.get(path) == stamp


class ShardWriter:
    """Buffers results and writes them to ``<partial>/shard-NNNNNN.npz`` atomically."""

    def __init__(self, directory: Path, first_number: int):
        self.directory = directory
        self.number = first_number
        self.clear()

    def clear(self) -> None:
        self.paths: list[str] = []
        self.rows: list[np.ndarray] = []
        self.stamps: list[FileStamp] = []
        self.skipped: list[tuple[str, str, FileStamp]] = []
        self.started = time.monotonic()

    def add(self, paths: list[str], rows: np.ndarray, stamps: list[FileStamp]) -> None:
        self.paths += paths
        self.rows.append(rows)
        self.stamps += stamps

    def add_skipped(self, path: str, reason: str, stamp: FileStamp) -> None:
        self.skipped.append((path, reason, stamp))

    def __len__(self) -> int:
        return len(self.paths) + len(self.skipped)

    def flush(self) -> None:
        if not len(self):
            return
        dimension = self.rows[0].shape[1] if self.rows else 0
        arrays = {
            "features": np.concatenate(self.rows) if self.rows else np.zeros((0, dimension), np.float32),
            "image_paths": np.array(self.paths, dtype=str),
            "sizes": np.array([s.size for s in self.stamps], dtype=np.int64),
            "mtimes": np.array([s.mtime_ns for s in self.stamps], dtype=np.int64),
            "skipped_paths": np.array([p for p, _, _ in self.skipped], dtype=str),
            "skipped_reasons": np.array([r for _, r, _ in self.skipped], dtype=str),
            "skipped_sizes": np.array([s.size for _, _, s in self.skipped], dtype=np.int64),
            "skipped_mtimes": np.array([s.mtime_ns for _, _, s in self.skipped], dtype=np.int64),
        }
        write_npz(arrays, self.directory / f"shard-{self.number:06d}.npz")
        self.number += 1
        self.clear()


def partial_directory(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def skipped_report_path(output: Path) -> Path:
    """``gallery.npz`` -> ``gallery.skipped.txt``."""
    return output.with_name(output.stem + ".skipped.txt")


def read_progress(directory: Path) -> tuple[Progress, int]:
    """Everything the shards in ``directory`` hold, and the number for the next shard."""
    progress = Progress()
    shards = sorted(directory.glob("shard-*.npz"))
    for shard in shards:
        try:
            with np.load(shard, allow_pickle=False) as data:
                members = {name: data[name] for name in data.files}
            features = members["features"]
            for row, (path, size, mtime) in enumerate(zip(members["image_paths"], members["sizes"], members["mtimes"])):
                # A later shard wins: it holds a recomputation of an image that changed on disk.
                progress.rows[str(path)] = (len(progress.arrays), row)
                progress.skipped.pop(str(path), None)
                progress.stamps[str(path)] = FileStamp(int(size), int(mtime))
            progress.arrays.append(features)
            for path, reason, size, mtime in zip(
                members["skipped_paths"], members["skipped_reasons"], members["skipped_sizes"], members["skipped_mtimes"]
            ):
                progress.skipped[str(path)] = str(reason)
                progress.rows.pop(str(path), None)
                progress.stamps[str(path)] = FileStamp(int(size), int(mtime))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            # Shards are written atomically, so this is outside damage; the images are simply recomputed.
            logger.warning("ignoring unreadable shard %s (%s); its images will be recomputed", shard, err)
    next_number = 1 + max((int(s.stem.split("-")[1]) for s in shards), default=-1)
    return progress, next_number


def open_partial_run(output: Path, settings: dict[str, Any], restart: bool) -> tuple[Path, Progress, int]:
    """The shard directory for this run: continued if it matches, refused if it was made differently."""
    directory = partial_directory(output)
    manifest_path = directory / "manifest.json"
    if directory.exists() and (restart or not manifest_path.is_file()):
        # Without a manifest nothing says how its shards were made, so they cannot be trusted.
        if not restart:
            logger.warning("%s has no manifest.json; discarding it and starting over", directory)
        shutil.rmtree(directory)
    if manifest_path.is_file():
        try:
            previous = json.loads(manifest_path.read_text(encoding="utf-8"))["settings"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ExtractionError(
                f"{manifest_path}: unreadable ({err}); remove {directory} or pass --restart to start over"
            ) from None
        differences = [
            f"{key}: {previous.get(key)!r} before, {settings.get(key)!r} now"
            for key in RESUME_KEYS
            if previous.get(key) != settings.get(key)
        ]
        if differences:
            raise ExtractionError(
                f"{directory} holds a partial run made with different settings:\n  " + "\n  ".join(differences)
                + "\nRun with the same settings to continue it, or pass --restart to discard it."
            )
        progress, next_number = read_progress(directory)
        return directory, progress, next_number
    directory.mkdir(parents=True, exist_ok=True)
    write_json({"settings": settings}, manifest_path)
    return directory, Progress(), 0


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class ExtractionResult:
    output: Path
    feature_set: FeatureSet
    skipped: list[tuple[str, str]]  # (path, reason)
    num_found: int
    num_reused: int  # images taken from a partial run's shards
    skipped_report: Path | None
    seconds: float


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Schedulers stop jobs with SIGTERM; treat it like Ctrl-C so that finished batches are saved."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def extract_features(
    image_dir: str | Path,
    output: str | Path,
    vit_checkpoint: str | Path | None = None,
    *,
    feature_model: FeatureModel | None = None,
    vit_config: vitp.VisionConfig | None = None,
    image_size: int | None = None,
    select_layer: int = -1,
    pool: str = "mean",
    batch_size: int = 32,
    num_workers: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    shard_size: int = 2048,
    shard_seconds: float = 300.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    restart: bool = False,
    progress_bar: bool = True,
) -> ExtractionResult:
    """Embed every image under ``image_dir`` and write ``output`` (.npz); see the module docstring."""
    start = time.perf_counter()
    image_dir, output = Path(image_dir), Path(output)
    if output.suffix != ".npz":
        output = output.with_name(output.name + ".npz")  # as np.savez does
    if batch_size < 1 or shard_size < 1:
        raise ExtractionError(f"--batch_size and --shard_size must be >= 1 (got {batch_size} and {shard_size})")
    check_num_workers(num_workers)
    if max_pixels < 1:  # 0 would skip every image as "too large"
        raise ExtractionError(f"--max_pixels {max_pixels}: must be >= 1 (leave it out for Pillow's bomb limit)")
    if not image_dir.is_dir():
        raise ExtractionError(f"--image_dir {image_dir}: not a directory")
    # Absolute, but not resolved: a symlinked image keeps its own folder, which is its class.
    files = [Path(os.path.abspath(path)) for path in iter_image_files(image_dir)]
    if not files:
        raise ExtractionError(f"--image_dir {image_dir}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    _warn_about_images_in_the_root(image_dir, files)

    if feature_model is None:
        if vit_checkpoint is None:
            raise ExtractionError("a ViT checkpoint is needed (--vit_checkpoint)")
        feature_model = load_feature_model(
            vit_checkpoint, vit_config=vit_config, image_size=image_size, device=device, dtype=dtype
        )
    settings = extraction_settings(feature_model, select_layer, pool, max_pixels)
    settings.update(image_dir=os.path.abspath(image_dir), batch_size=batch_size, device=feature_model.device.type)

    directory, done, next_number = open_partial_run(output, settings, restart)
    names = [str(path) for path in files]
    stamps = [FileStamp.of(path) for path in files]
    # Fixed batches over the whole sorted list: the ViT sees the same batches whether or not the run resumed.
    batches = [list(range(i, min(i + batch_size, len(files)))) for i in range(0, len(files), batch_size)]
    pending = [[i for i in batch if not done.is_done(names[i], stamps[i])] for batch in batches]
    pending = [batch for batch in pending if batch]
    num_reused = len(files) - sum(len(batch) for batch in pending)

    writer = ShardWriter(directory, next_number)
    dataset = ImageFiles(files, feature_model.image_size, max_pixels)
    bar = tqdm(total=len(files), initial=num_reused, unit="img", desc="features", disable=not progress_bar, smoothing=0.1)
    num_skipped = sum(1 for name, stamp in zip(names, stamps) if name in done.skipped and done.is_done(name, stamp))
    try:
        with _sigterm_as_interrupt():
            for batch, rows in embedded_batches(feature_model, dataset, pending, num_workers, settings["layer"], pool):
                for index, reason in batch.failures:
                    writer.add_skipped(names[index], reason, stamps[index])
                if rows is not None:
                    writer.add([names[i] for i in batch.indices], rows, [stamps[i] for i in batch.indices])
                num_skipped += len(batch.failures)
                bar.set_postfix(skipped=num_skipped, refresh=False)
                bar.update(len(batch.indices) + len(batch.failures))
                if len(writer) >= shard_size or time.monotonic() - writer.started >= shard_seconds:
                    writer.flush()
    except BaseException as err:
        # Whatever stopped the run (Ctrl-C, SIGTERM, a full GPU, a bug), keep every finished batch:
        # the same command continues from here.
        _keep_finished_work(writer, err)
        raise
    finally:
        bar.close()
    writer.flush()

    done, _ = read_progress(directory)
    feature_set, skipped = _assemble(names, done, settings)
    if feature_set is None:
        raise ExtractionError(
            f"--image_dir {image_dir}: none of the {len(files)} image files could be read; "
            f"first: {skipped[0][0]}: {skipped[0][1]}"
        )
    save_features(feature_set, output)
    report = _write_skipped_report(output, skipped)
    shutil.rmtree(directory)
    return ExtractionResult(
        output, feature_set, skipped, len(files), num_reused, report, time.perf_counter() - start
    )


def _keep_finished_work(writer: ShardWriter, err: BaseException) -> None:
    """Flush the buffered results of a run that is stopping, without hiding why it stopped."""
    try:
        writer.flush()
    except Exception as flush_error:  # noqa: BLE001 - the original error matters more
        logger.warning("could not save the last finished images to %s (%s)", writer.directory, flush_error)
        return
    if not isinstance(err, KeyboardInterrupt):  # the CLI says this itself for Ctrl-C
        logger.warning("stopped by an error; finished images are kept in %s: run the same command again to "
                       "continue", writer.directory)


def _warn_about_images_in_the_root(image_dir: Path, files: list[Path]) -> None:
    """An image's class is its folder's name, so images directly in --image_dir all get the root
    folder's name as their class, which is rarely what was meant."""
    root = Path(os.path.abspath(image_dir))
    in_root = [path for path in files if path.parent == root]
    if in_root:
        logger.warning(
            "%d of the %d images are directly in --image_dir %s, not in a class folder: their label (class) is "
            "the root folder's name %r (first: %s)", len(in_root), len(files), image_dir, root.name, in_root[0].name
        )


def _assemble(names: list[str], done: Progress, settings: dict[str, Any]) -> tuple[FeatureSet | None, list[tuple[str, str]]]:
    """Rows in file order, copied once into the output array."""
    kept = [name for name in names if name in done.rows]
    skipped = [(name, done.skipped.get(name, "not processed (internal error)")) for name in names if name not in done.rows]
    if not kept:
        return None, skipped
    dimension = next(array.shape[1] for array in done.arrays if len(array))
    features = np.empty((len(kept), dimension), dtype=np.float32)
    for out_row, name in enumerate(kept):
        array, row = done.rows[name]
        features[out_row] = done.arrays[array][row]
    image_paths = np.array(kept, dtype=str)
    settings = {**settings, "num_images": len(kept), "num_skipped": len(skipped)}
    return FeatureSet(features, image_paths, labels_from_paths(image_paths), settings), skipped


def _write_skipped_report(output: Path, skipped: list[tuple[str, str]]) -> Path | None:
    """One ``path<TAB>reason`` line per skipped file; a stale report from an earlier run is removed."""
    report = skipped_report_path(output)
    if not skipped:
        report.unlink(missing_ok=True)
        return None
    with atomic_path(report) as tmp:
        tmp.write_text("".join(f"{path}\t{reason}\n" for path, reason in skipped), encoding="utf-8")
    return report
