"""Feature extraction, top to bottom: a folder of images -> an ``.npz`` features file or an embedding store.

1. list the images (recursively, sorted) and cut the list into fixed batches of ``batch_size``; under
   torchrun each rank takes a contiguous run of batches (:mod:`~vitp.retrieval.extract.reader`);
2. load the ViT in fp32, fingerprint it, cast it (:mod:`~vitp.retrieval.extract.embedder`);
3. decode on DataLoader workers, embed, and write shards as batches finish; a bad file is recorded
   with its reason (:mod:`~vitp.retrieval.extract.store`);
4. when every rank is done, assemble the output in file order and list the skipped files.

Resuming: a run that finds ``<output>.partial/`` keeps every image whose path, size and modification
time match a shard, and computes only the rest. The batches are fixed slices of the sorted list and
shards hold whole batches, so a resumed run - or a run with another number of ranks - feeds the ViT
exactly the batches a single uninterrupted run would, and the output is identical. Every image of the
list ends with a row or a reason of its own (unreadable, too large); an image with neither stops the run
before any output is written (see ``store.finish_output``).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from vitp.progress import progress

import vitp
from vitp.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS
from vitp.errors import RetrievalError
from vitp.options import STORE_DTYPES
from vitp.retrieval import embedding_store
from vitp.retrieval.extract import embedder
from vitp.retrieval.extract.embedder import FeatureModel, extraction_settings, load_feature_model
from vitp.retrieval.extract.reader import (
    FileStamp,
    ImageBatch,
    ImageFiles,
    check_num_workers,
    fixed_batches,
    image_batches,
    list_images,
    rank_batches,
    warn_about_images_in_the_root,
)
from vitp.retrieval.extract.store import (
    ShardWriter,
    check_same_file_list,
    check_store_output,
    finish_output,
    open_partial_run,
    skipped_report_path,
)
from vitp.retrieval.extract.world import World, launched_world
from vitp.retrieval.feature_file import FeatureSet, labels_from_paths

logger = logging.getLogger("vitp")


@dataclass
class ExtractionResult:
    output: Path
    shape: tuple[int, int]  # (images embedded, feature dimension)
    settings: dict
    skipped: list[tuple[str, str]]  # (path, reason), every rank's
    num_found: int
    num_reused: int  # images taken from a partial run's shards (by all ranks)
    skipped_report: Path | None
    seconds: float
    world: World
    feature_set: FeatureSet | None  # the .npz output in memory (rank 0); None for an embedding store


def embedded_batches(
    feature_model: FeatureModel, dataset: ImageFiles, batches: list[list[int]], num_workers: int | None, layer: int,
    pool: str,
) -> Iterator[tuple[ImageBatch, np.ndarray | None]]:
    """Decode on DataLoader workers, embed on the model's device: (batch, float32 rows or None)."""
    pin_memory = feature_model.device.type == "cuda"
    for batch in image_batches(dataset, batches, num_workers, pin_memory):
        rows = None
        if batch.pixel_values is not None:
            pixels = batch.pixel_values.to(feature_model.device, non_blocking=True)
            rows = embedder.embed_batch(feature_model.model, pixels, layer, pool).cpu().numpy()
        yield batch, rows


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
    store_dtype: str = "float32",
    store_shard_size: int = 100_000,
) -> ExtractionResult:
    """Embed every image under ``image_dir`` into ``output``: an ``.npz`` file, or an embedding store
    folder for any other name. Under torchrun every rank calls this; see the module docstring."""
    start = time.perf_counter()
    image_dir, output = Path(image_dir), Path(output)
    is_store = embedding_store.is_store_path(output)
    _check_arguments(image_dir, batch_size, shard_size, num_workers, max_pixels, store_dtype, store_shard_size)
    if is_store:
        check_store_output(output)
    files = list_images(image_dir)
    if not files:
        raise RetrievalError(f"image_dir {image_dir}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")

    with launched_world() as world:
        if world.is_main:
            warn_about_images_in_the_root(image_dir, files)
        names = [str(path) for path in files]
        check_same_file_list(names, world)
        if feature_model is None:
            if vit_checkpoint is None:
                raise RetrievalError("a ViT checkpoint is needed (vit_checkpoint)")
            feature_model = load_feature_model(
                vit_checkpoint, vit_config=vit_config, image_size=image_size, device=device, dtype=dtype,
                local_rank=world.local_rank,
            )
        settings = extraction_settings(feature_model, select_layer, pool, max_pixels)
        settings.update(image_dir=os.path.abspath(image_dir), batch_size=batch_size, device=feature_model.device.type)
        directory, done, run_number = open_partial_run(output, settings, restart, world)

        # Fixed batches over the whole sorted list: the ViT sees the same batches whatever the ranks or resumes.
        batches = fixed_batches(len(files), batch_size)
        mine = [batches[b] for b in rank_batches(len(batches), world.rank, world.size)]
        stamps = {i: FileStamp.of(files[i]) for batch in mine for i in batch}
        pending = [[i for i in batch if not done.is_done(names[i], stamps[i])] for batch in mine]
        pending = [batch for batch in pending if batch]
        num_mine = sum(len(batch) for batch in mine)
        num_reused = num_mine - sum(len(batch) for batch in pending)

        writer = ShardWriter(directory, run_number, world.rank)
        dataset = ImageFiles(files, feature_model.image_size, max_pixels)
        description = "features" if world.size == 1 else f"features (rank 0 of {world.size})"
        bar = progress(total=num_mine, initial=num_reused, unit="img", desc=description, smoothing=0.1,
                       show=progress_bar and world.is_main)
        try:
            with _sigterm_as_interrupt():
                for batch, rows in embedded_batches(feature_model, dataset, pending, num_workers, settings["layer"], pool):
                    for index, reason in batch.failures:
                        writer.add_skipped(names[index], reason, stamps[index])
                    if rows is not None:
                        writer.add([names[i] for i in batch.indices], rows, [stamps[i] for i in batch.indices])
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
        num_reused = sum(world.gather(num_reused))  # also waits until every rank's shards are written

        assembled = finish_output(output, names, settings, world, store_dtype=store_dtype,
                                  store_shard_size=store_shard_size)
    report = skipped_report_path(output) if assembled.skipped else None
    return ExtractionResult(
        output, (assembled.count, assembled.dimension), {**settings, "num_images": assembled.count},
        assembled.skipped, len(files), num_reused, report, time.perf_counter() - start, world, assembled.feature_set,
    )


def _check_arguments(image_dir: Path, batch_size: int, shard_size: int, num_workers: int | None, max_pixels: int,
                     store_dtype: str, store_shard_size: int) -> None:
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size), ("store_shard_size", store_shard_size),
                        ("max_pixels", max_pixels)):  # max_pixels 0 would skip every image as "too large"
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    check_num_workers(num_workers)
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype {store_dtype!r}: expected one of {', '.join(STORE_DTYPES)}")
    if not image_dir.is_dir():
        raise RetrievalError(f"image_dir {image_dir}: not a directory")


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
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_num_workers(num_workers)
    settings = extraction_settings(feature_model, select_layer, pool, max_pixels)
    dataset = ImageFiles(paths, feature_model.image_size, max_pixels)
    batches = [list(batch) for batch in fixed_batches(len(paths), batch_size)]
    rows, kept, skipped = [], [], []
    with progress(total=len(paths), unit="img", desc="queries", show=progress_bar and len(paths) >= 2) as bar:
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


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Schedulers (and torchrun, when another rank fails) stop jobs with SIGTERM; treat it like Ctrl-C
    so that finished batches are saved."""
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
