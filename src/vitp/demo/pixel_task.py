"""The demo's pixel task (``vitp demo --tasks retrieval,pixels``): transfer of the pretrained ViT to
land-cover segmentation of the same Sentinel-2 scene.

1. data      per-pixel classes from the band rules (:mod:`vitp.demo.pixels`), 64 px crops: train from the
             gallery blocks, val from the query blocks (the retrieval split)
2. fine-tune ``vitp finetune segment``'s code (:func:`vitp.downstream.train.finetune`) from the pretrained
             ViT and from the same ViT at its random initialisation (the weights pretraining started from)
3. baseline  a per-pixel classifier on the RGB values alone
4. evidence  mIoU, aAcc, mAcc and per-class IoU with bootstrap intervals over the val crops, and paired
             comparisons of the pretrained ViT against both baselines (the verdict rule of the retrieval part)

A finished fine-tuning with the same settings is reused when the demo runs again.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitp.demo.pixels import (
    PIXEL_CLASS_TABLE,
    RGB_BASELINE_TITLE,
    pixel_console_lines,
    pixel_report_blocks,
    rgb_pixel_baseline,
    write_pixel_dataset,
)
from vitp.demo.scene import load_sentinel2
from vitp.downstream.metrics import DenseComparison, DenseEvaluation, load_evaluation, paired_comparison
from vitp.files import read_json, write_json
from vitp.errors import DataError

PIXEL_TITLES = {"vitp": "ViTP (pretrained ViT)", "random": "same ViT, random init", "rgb": RGB_BASELINE_TITLE}
RESAMPLES = 1000


@dataclass(frozen=True)
class PixelSettings:
    """The pixel task's fine-tuning (the same for the pretrained and the random-init ViT)."""

    crop: int = 64  # px at 10 m: 640 m, the ViT's position embedding resized from its 32 px tiles
    max_steps: int = 400  # measured: about a minute per ViT on 2 cores (README, "What `make demo` does")
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    layer_decay_rate: float = 0.9
    neck: str = "simple_fpn"  # the cheaper neck on 2 CPU cores; `vitp finetune` defaults to ViT-Adapter
    head_channels: int = 64
    drop_path_rate: float = 0.1


QUICK_PIXELS = dataclasses.replace(PixelSettings(), max_steps=60)


@dataclass
class PixelResults:
    settings: PixelSettings
    summary: dict[str, Any]  # the pixel data set
    evaluations: dict[str, DenseEvaluation]  # vitp, random, rgb
    comparisons: dict[str, DenseComparison]  # baseline -> vitp - baseline
    seconds: dict[str, float]  # per method: fine-tuning + evaluation (0 when reused)

    def blocks(self) -> list[tuple[str, Any]]:
        intro = (f"Each ViT is fine-tuned for {self.settings.max_steps} steps of {self.settings.batch_size} crops "
                 f"({self.settings.crop} px) with {self.settings.neck} and UPerNet ({self.settings.head_channels} "
                 f"channels), AdamW lr {self.settings.learning_rate:g} with layer decay {self.settings.layer_decay_rate}. "
                 "The random-init ViT starts from the weights that pretraining started from. Train crops come from "
                 "the gallery blocks, val crops from the query blocks. Files: pixels/.")
        return pixel_report_blocks(self.evaluations, self.comparisons, PIXEL_TITLES) + [("p", intro)]

    def console_lines(self) -> list[str]:
        return pixel_console_lines(self.evaluations, self.comparisons, PIXEL_TITLES)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": dataclasses.asdict(self.settings),
            "data": self.summary,
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "methods": {m: {"metrics": e.metrics, "per_class": e.per_class,
                            "intervals": e.intervals.to_dict() if e.intervals else None}
                        for m, e in self.evaluations.items()},
            "comparisons": {m: c.to_dict() for m, c in self.comparisons.items()},
        }


def run_pixel_task(out: Path, vit: Path, random_vit: Path, settings: PixelSettings, seed: int, tile_size: int,
                   block_tiles: int, clock: Any) -> PixelResults:
    """The pixel task of the module docstring, in ``out/pixels``."""
    from vitp.downstream.data import PRESETS
    from vitp.downstream.train import DenseData

    root = out / "pixels"
    summary = write_pixel_dataset(load_sentinel2(), root / "data", crop=settings.crop, tile_size=tile_size,
                                  block_tiles=block_tiles)
    clock.step(f"pixels: {summary['splits']['train']['crops']} train / {summary['splits']['val']['crops']} val crops of {settings.crop} px")
    preset = dataclasses.replace(PRESETS["loveda"], classes=PIXEL_CLASS_TABLE, reduce_zero_label=False,
                                 crop_size=(settings.crop, settings.crop), scale=(settings.crop, settings.crop),
                                 test_scale=None)
    data = DenseData("segmentation", root / "data", preset)
    evaluations, seconds = {}, {}
    for method, checkpoint in (("vitp", vit), ("random", random_vit)):
        start = time.perf_counter()
        evaluations[method], reused = _fine_tune(data, checkpoint, root / method, settings, seed)
        seconds[method] = 0.0 if reused else time.perf_counter() - start
        clock.step(f"pixels: {PIXEL_TITLES[method]} " + ("reused" if reused else f"fine-tuned and evaluated "
                                                         f"({seconds[method]:.0f} s)"))
    start = time.perf_counter()
    evaluations["rgb"] = rgb_pixel_baseline(root / "data", seed=seed, prediction_dir=root / "rgb" / "predictions")
    evaluations["rgb"].add_intervals(RESAMPLES, seed)
    write_json(evaluations["rgb"].to_dict(), root / "rgb" / "evaluation.json")
    seconds["rgb"] = time.perf_counter() - start
    comparisons = {baseline: paired_comparison(evaluations["vitp"], evaluations[baseline], RESAMPLES, seed, "vitp",
                                               baseline) for baseline in ("random", "rgb")}
    clock.step(f"pixels: RGB baseline ({seconds['rgb']:.0f} s), paired comparisons")
    return PixelResults(settings, summary, evaluations, comparisons, seconds)


def _fine_tune(data: Any, checkpoint: Path, output: Path, settings: PixelSettings, seed: int) -> tuple[DenseEvaluation, bool]:
    """Fine-tune and evaluate, or reuse the evaluation of an earlier run with the same key."""
    from vitp import load_vit
    from vitp.downstream.evaluate import EvalSettings
    from vitp.downstream.train import DenseModelSpec, finetune
    from vitp.train.arguments import TrainingArguments

    key = {"settings": dataclasses.asdict(settings), "seed": seed, "vit": _fingerprint(checkpoint)}
    record, evaluation_file = output / "pixel_run.json", output / "evaluation" / "evaluation.json"
    try:
        if read_json(record, DataError) == key and evaluation_file.is_file():
            evaluation = load_evaluation(evaluation_file)  # the file keeps the areas; the intervals are redrawn
            evaluation.add_intervals(RESAMPLES, seed)
            return evaluation, True
    except DataError:
        pass
    shutil.rmtree(output, ignore_errors=True)
    vit = load_vit(checkpoint)
    spec = DenseModelSpec("segmentation", list(PIXEL_CLASS_TABLE.names), [list(c) for c in PIXEL_CLASS_TABLE.palette],
                          dataclasses.asdict(vit.config), neck=settings.neck, image_size=settings.crop,
                          patch_size=None, drop_path_rate=settings.drop_path_rate,
                          head_channels=settings.head_channels)
    args = TrainingArguments(
        output_dir=str(output), max_steps=settings.max_steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, weight_decay=settings.weight_decay, warmup_steps=0.05,
        lr_scheduler_type="cosine", save_strategy="no", logging_steps=max(1, settings.max_steps // 10),
        seed=seed, dataloader_num_workers=0, report_to="none", use_cpu=True,
    )
    finetune(data, vit, spec, args, layer_decay_rate=settings.layer_decay_rate,
             evaluation=EvalSettings(mode="whole", bootstrap=0))  # intervals: drawn once, below, as for a reused run
    write_json(key, record)
    evaluation = load_evaluation(evaluation_file)
    evaluation.add_intervals(RESAMPLES, seed)
    return evaluation, False


def _fingerprint(path: Path) -> str:
    stat = Path(path).stat()
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
