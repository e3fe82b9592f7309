"""Evaluating a dense model on a data set: inference per image, areas, metrics, pictures.

Each image goes through the data set's evaluation pipeline (resized to the test scale where the preset
says so), then whole-image or sliding-window inference (:mod:`vitp.downstream.inference`, mmseg's
``test_cfg``), the logits are resized to the label's (the file's) size and the argmax is scored against
the label (:mod:`vitp.downstream.metrics`). Under torchrun every rank takes every ``world_size``-th
image and rank 0 joins the areas, in data-set order, so the result does not depend on the number of
processes.

Written to the output folder: ``evaluation.json`` (metrics, per-class table, bootstrap intervals and the
per-image areas that ``vitp evaluate --compare`` pairs), ``predictions/<image name>.png`` (palette PNGs of
the predicted classes), ``overlays.png`` (a contact sheet: image, label and prediction of the first images)
and ``skipped.txt`` when files could not be read.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from vitp.downstream.inference import slide_inference, whole_inference
from vitp.downstream.metrics import AreaCounter, DenseEvaluation, ImageAreas, class_scores
from vitp.downstream.pictures import OverlayRow, write_overlay_sheet, write_palette_png
from vitp.files import write_json, write_text
from vitp.progress import progress

logger = logging.getLogger("vitp")
MODES = ("slide", "whole")


@dataclass
class EvalSettings:
    """How a model is evaluated (ViTP's LoveDA defaults: slide, crop 512, stride 384)."""

    mode: str = "slide"
    crop: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (384, 384)
    size_divisor: int | None = None  # whole-image mode: pad to a multiple (open-cd's 32)
    bootstrap: int = 1000  # resamples of the intervals; 0: none
    seed: int = 0
    write_masks: bool = True
    sheet_images: int = 8
    windows_per_forward: int = 4
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16 on a GPU

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.bootstrap < 0 or self.sheet_images < 0:
            raise ValueError("bootstrap and sheet_images must be 0 or more")


def predict(model: nn.Module, pixels: torch.Tensor, settings: EvalSettings, output_size: tuple[int, int]) -> torch.Tensor:
    """Class indices ``[B, *output_size]`` of ``pixels`` ``[B, C, H, W]``."""
    device_type = pixels.device.type
    autocast = (torch.autocast(device_type, dtype=settings.autocast_dtype) if settings.autocast_dtype is not None
                else nullcontext())
    with autocast:
        if settings.mode == "slide":
            logits = slide_inference(model, pixels, settings.crop, settings.stride,
                                     windows_per_forward=settings.windows_per_forward, output_size=output_size)
        else:
            logits = whole_inference(model, pixels, size_divisor=settings.size_divisor, output_size=output_size)
    return logits.float().argmax(dim=1)


def evaluate_dataset(
    model: nn.Module, dataset: Any, task: str, settings: EvalSettings, output: Path | None,
    device: torch.device | str = "cpu", classes: Any = None,
) -> DenseEvaluation | None:
    """Evaluate ``model`` on every pair of ``dataset`` (a SegmentationDataset or ChangeDataset with its
    evaluation pipeline); write the files of the module docstring to ``output`` (None: nothing written).
    Returns the evaluation on rank 0, None on the other ranks."""
    classes = classes if classes is not None else dataset.classes
    rank, world = _world()
    was_training = model.training
    model.eval()
    counter = AreaCounter(classes.names)
    indexes, rows, skipped = [], [], []
    for index in progress(range(rank, len(dataset), world), desc="evaluate", unit="image"):
        item = dataset[index]
        if "skipped" in item:
            skipped.append((item["name"], item["skipped"]))
            continue
        label = item["label"].numpy()
        pixels = item["image"][None].to(device)
        prediction = predict(model, pixels, settings, label.shape)[0].cpu().numpy().astype(np.uint8)
        image = counter.add(item["name"], prediction, label)  # [3, C]: intersection, predicted, labelled
        indexes.append(index)
        if output is not None and settings.write_masks:
            write_palette_png(prediction, output / "predictions" / f"{item['name']}.png", classes)
        if output is not None and index < settings.sheet_images:  # the first images of the set, on any rank
            rows.append((index, _overlay_row(dataset.pairs[index], prediction, label, image)))
    model.train(was_training)
    areas, rows, skipped = _gather(indexes, counter.areas(), rows, skipped, rank, world)
    if rank != 0:
        return None
    if not len(areas):
        raise ValueError(f"no image of {dataset.source} could be evaluated ({len(skipped)} skipped)")
    evaluation = DenseEvaluation(task, areas)
    if settings.bootstrap:
        evaluation.add_intervals(settings.bootstrap, settings.seed)
    if output is not None:
        _write_outputs(evaluation, rows, skipped, classes, output)
    return evaluation


def _overlay_row(pair: Any, prediction: np.ndarray, label: np.ndarray, areas: np.ndarray) -> OverlayRow:
    iou = class_scores(*areas)["IoU"]
    caption = f"mIoU {100 * np.nanmean(iou):.1f}" if np.isfinite(iou).any() else ""
    return OverlayRow(pair.name, [str(path) for path in pair.images], prediction, label, caption)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(indexes: list[int], areas: ImageAreas, rows: list, skipped: list, rank: int,
            world: int) -> tuple[ImageAreas, list, list]:
    """Every rank's areas joined in data-set order (and its sheet rows and skipped files) on rank 0."""
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (indexes, areas, rows, skipped))
    else:
        parts = [(indexes, areas, rows, skipped)]
    if rank != 0:
        return areas, [], []
    order = np.argsort(np.concatenate([np.asarray(p[0], dtype=np.int64) for p in parts]), kind="stable")
    joined = ImageAreas.concatenate([p[1] for p in parts]).select(order)
    rows = [row for _, row in sorted((r for p in parts for r in p[2]), key=lambda r: r[0])]
    return joined, rows, [s for p in parts for s in p[3]]


def _write_outputs(evaluation: DenseEvaluation, rows: list[OverlayRow], skipped: list, classes: Any,
                   output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    write_json(evaluation.to_dict(), output / "evaluation.json")
    if rows:
        write_overlay_sheet(rows, classes, output / "overlays.png")
    report = output / "skipped.txt"
    if skipped:
        write_text("".join(f"{name}\t{reason}\n" for name, reason in skipped), report)
        logger.warning("%d image(s) could not be evaluated (listed in %s)", len(skipped), report)
    else:
        report.unlink(missing_ok=True)


def evaluate_split(model: nn.Module, spec: Any, data: Any, settings: EvalSettings, output: Path,
                   device: torch.device | str = "cpu") -> DenseEvaluation | None:
    """Evaluate on ``data.val_split`` and print the summary (rank 0)."""
    dataset = data.open(data.val_split, train=False, seed=settings.seed)
    evaluation = evaluate_dataset(model, dataset, spec.task, settings, output, device, spec.class_table)
    if evaluation is not None:
        print("\n".join(evaluation.summary_lines() + [""] + evaluation.class_table_lines()), flush=True)
        print(f"evaluation: {output / 'evaluation.json'}", flush=True)
    return evaluation
