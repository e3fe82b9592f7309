"""`vitp demo`: the whole mission on a CPU, on a real Sentinel-2 scene, with a report.

1. data          tiles of the scene, classed from its bands, split spatially (cached)
2. instructions  conversations about the gallery tiles (`vitp data build`) and a tokenizer trained on them
3. pretrain      a tiny InternVL from scratch with TMAug and DropPath (`vitp pretrain`)
4. export        the ViT after pretraining, and the same ViT at its random initialisation (`vitp export-vit`)
5. retrieval     features of gallery and query tiles, FAISS index, Top-1/3/5 and mAP, micro and
                 class-balanced, with bootstrap intervals (`vitp features/evaluate`), for ViTP, the random
                 ViT and a colour histogram; ViTP - baseline with paired-bootstrap intervals
6. report        report.md / report.html: data set, loss curve, metrics, verdict, per-class tables, examples

Opt-in, on the same data: ``seeds`` > 1 pretrains again with further seeds (mean ± std of every
metric), ``ablation`` pretrains variants with one setting changed (:mod:`vitp.demo.ablation`),
``eval_every`` evaluates the ViT of intermediate checkpoints (retrieval against training steps),
``tasks`` ("retrieval", "pixels") adds the pixel task: the ViT fine-tuned for land-cover segmentation
(:mod:`vitp.demo.pixel_task`).
A finished pretraining is reused when the demo runs again with the same settings and seed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitp.data.build import build_instructions
from vitp.data.tokenizer import conversation_texts, save_tokenizer, train_tokenizer
from vitp.demo import ablation as ablations
from vitp.demo.baselines import histogram_features
from vitp.demo.evidence import (
    BOOTSTRAP_RESAMPLES,
    DemoResults,
    MethodResult,
    StepResult,
    VariantResult,
    compare_methods,
    machine_info,
)
from vitp.demo.pixel_task import QUICK_PIXELS, PixelSettings, run_pixel_task
from vitp.demo.report import console_lines, write_report
from vitp.demo.scene import balance, load_sentinel2, split_tiles, write_tiles
from vitp.demo.settings import DEFAULT, QUICK, DemoSettings
from vitp.files import write_json
from vitp.model.checkpoint import build_vlm, save_vlm
from vitp.retrieval.evaluate import evaluate_retrieval
from vitp.retrieval.extract import extract_features
from vitp.retrieval.feature_file import load_features
from vitp.train.arguments import pretrain_arguments
from vitp.train.export import export_vit
from vitp.train.pretrain import pretrain

SYSTEM_MESSAGE = "Answer briefly."  # short: the tiny model reads it in front of every sample
TASKS = ("retrieval", "pixels")
TITLES = {"vitp": "ViTP (pretrained ViT)", "random": "same ViT, random init", "histogram": "RGB colour histogram"}


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def step(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f} s] {message}", flush=True)

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class Shared:
    """What every pretraining run of one demo shares: data, instructions, tokenizer, histogram."""

    out: Path
    data: Path
    data_summary: dict
    meta_path: Path
    tokenizer: Any  # a tokenizers/transformers tokenizer
    histogram: MethodResult


@dataclass
class RunResult:
    """One pretraining (settings + seed) and the retrieval of its ViT and of its random init."""

    settings: DemoSettings
    seed: int
    directory: Path
    vitp: MethodResult
    random: MethodResult
    train_seconds: float  # building the model and pretraining (in the run that did it, if reused)
    reused: bool


def prepare_data(root: Path, settings: DemoSettings) -> dict:
    """Tiles in class folders (gallery/, query/, pretrain/) with metadata; reused when the settings match."""
    key_path = root / "settings.json"
    if key_path.is_file() and json.loads(key_path.read_text()) == settings.data_key():
        return json.loads((root / "dataset.json").read_text())
    shutil.rmtree(root, ignore_errors=True)
    scene = load_sentinel2()
    tiles = split_tiles(scene, settings.tile_size, settings.block_tiles, settings.pretrain_stride)
    tiles = balance(tiles, settings.largest_class_ratio, settings.seed)
    # Pretraining sees the gallery tiles and the extra overlapping tiles inside gallery blocks.
    tiles += [dataclasses.replace(t, split="pretrain") for t in tiles if t.split == "gallery"]
    summary = write_tiles(scene, tiles, settings.tile_size, root)
    key_path.write_text(json.dumps(settings.data_key()))
    return summary


def run_demo(
    out: str | Path = "runs/demo",
    quick: bool = False,
    settings: DemoSettings | None = None,
    seeds: int = 1,
    ablation: str | None = None,
    eval_every: int | None = None,
    retrain: bool = False,
    command: str = "vitp demo",
    tasks: tuple[str, ...] = ("retrieval",),
) -> dict:
    """The demo (see the module docstring); returns the report's path, the time and the numbers.
    ``command`` is the command line the report gives for repeating it."""
    settings = settings or (QUICK if quick else DEFAULT)
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    if eval_every is not None and not 1 <= eval_every <= settings.max_steps:
        raise ValueError(f"eval_every must be between 1 and max_steps ({settings.max_steps}), got {eval_every}")
    variants = ablations.variants(ablation) if ablation else []  # refuses an unknown ablation before any work
    unknown = set(tasks) - set(TASKS)
    if unknown or "retrieval" not in tasks:
        raise ValueError(f"tasks must hold 'retrieval' and may add 'pixels', got {list(tasks)}")
    out = Path(out)
    clock = Stopwatch()
    machine = machine_info()  # before the work: the load average says what else was running
    print(f"{command} -> {out}", flush=True)
    shared = prepare_shared(out, settings, clock)
    seed_list = [settings.seed + i for i in range(seeds)]

    runs: dict[tuple[DemoSettings, int], RunResult] = {}

    def run(run_settings: DemoSettings, seed: int, directory: Path, every: int | None = None) -> RunResult:
        if (run_settings, seed) not in runs:
            runs[run_settings, seed] = pretrain_and_evaluate(shared, run_settings, seed, directory, clock, every, retrain)
        return runs[run_settings, seed]

    main = run(settings, settings.seed, out, eval_every)
    comparisons = {m: compare_methods(main.vitp, baseline, settings.seed)
                   for m, baseline in (("random", main.random), ("histogram", shared.histogram))}
    steps = evaluate_checkpoints(shared, main, clock) if eval_every else []
    seed_runs = [run(settings, seed, out / "runs" / f"seed{seed}") for seed in seed_list]
    variant_results = []
    for variant in variants:
        variant_settings = dataclasses.replace(settings, **variant.changes)
        variant_runs = [run(variant_settings, seed, out / "runs" / f"{ablation}-{variant.label}-seed{seed}")
                        for seed in seed_list]
        variant_results.append(VariantResult(variant, variant_runs))
    reference = variant_results[0] if variant_results else None
    for result in variant_results[1:]:
        result.versus_reference = compare_methods(result.runs[0].vitp, reference.runs[0].vitp, settings.seed,
                                                  result.variant.label, reference.variant.label)

    pixels = None
    if "pixels" in tasks:
        pixels = run_pixel_task(out, main.directory / "vit" / "vit.safetensors",
                                main.directory / "vit_random" / "vit.safetensors", QUICK_PIXELS if quick else PixelSettings(),
                                settings.seed, settings.tile_size, settings.block_tiles, clock)

    results = DemoResults(
        settings=settings, quick=quick, machine=machine, summary=shared.data_summary,
        methods=[main.vitp, main.random, shared.histogram], comparisons=comparisons, main_run=main,
        seed_runs=seed_runs if seeds > 1 else [], ablation=ablation, variants=variant_results, steps=steps,
        seconds=clock.total, command=command, pixels=pixels,
    )
    report_path = write_report(out, results)
    write_json(results.to_dict(), out / "summary.json")
    print()
    print("\n".join(console_lines(results)))
    print()
    print(f"report: {report_path} (and {report_path.with_suffix('.html')}); total {clock.total:.0f} s")
    return {"report": str(report_path), "seconds": clock.total, "results": results.to_dict()}


def prepare_shared(out: Path, settings: DemoSettings, clock: Stopwatch) -> Shared:
    data = out / "data"
    summary = prepare_data(data, settings)
    counts = summary["counts"]
    clock.step(f"data: gallery {sum(counts['gallery'].values())} / query {sum(counts['query'].values())} tiles, "
               f"{sum(counts['pretrain'].values())} for pretraining")

    instructions = out / "instructions"
    build_instructions(data / "pretrain", instructions, name="sentinel2", metadata=data / "pretrain_metadata.csv",
                       seed=settings.seed, check_images=False, progress=False)
    meta_path = instructions / "meta.json"
    tokenizer = train_tokenizer(conversation_texts(meta_path), vocab_size=settings.vocab_size)
    save_tokenizer(tokenizer, out / "tokenizer")
    clock.step("instructions: conversations written, tokenizer trained")

    features = out / "features"
    for split in ("gallery", "query"):
        histogram_features(data / split, features / f"histogram_{split}.npz")
    histogram = evaluate_method("histogram", features / "histogram_query.npz", features / "histogram_gallery.npz",
                                out / "evaluation", settings.seed)
    return Shared(out, data, summary, meta_path, tokenizer, histogram)


def pretrain_and_evaluate(
    shared: Shared, settings: DemoSettings, seed: int, directory: Path, clock: Stopwatch, eval_every: int | None,
    retrain: bool,
) -> RunResult:
    """Pretrain (or reuse a finished pretraining of the same settings and seed), export, evaluate."""
    start = time.perf_counter()
    key = {"settings": dataclasses.asdict(settings), "seed": seed, "eval_every": eval_every,
           "data": settings.data_key()}
    record = directory / "run.json"
    train_seconds = None if retrain else finished_pretraining(directory, key)
    reused = train_seconds is not None
    if reused:
        clock.step(f"pretrain: reusing {directory} (same settings and seed; trained in {train_seconds:.0f} s)")
    else:
        record.unlink(missing_ok=True)
        torch.manual_seed(seed)  # the random initialisation is part of what the seed fixes
        model = build_vlm("internvl-demo", shared.tokenizer, image_size=settings.tile_size,
                          patch_size=settings.tile_size // 8)
        save_vlm(model, directory / "init", shared.tokenizer)
        shutil.rmtree(directory / "pretrain", ignore_errors=True)
        _pretrain(settings, seed, shared.meta_path, directory / "init", directory / "pretrain", eval_every)
        train_seconds = time.perf_counter() - start
        clock.step(f"pretrain: {settings.max_steps} steps, seed {seed}, TMAug {settings.tmaug_prob}, "
                   f"DropPath {settings.drop_path_rate} ({train_seconds:.0f} s)")
        export_vit(directory / "pretrain", directory / "vit")
        export_vit(directory / "init", directory / "vit_random")
        write_json({"key": key, "train_seconds": train_seconds}, record)
    vitp = embed_and_evaluate(shared, "vitp", directory / "vit" / "vit.safetensors", directory, seed)
    random = embed_and_evaluate(shared, "random", directory / "vit_random" / "vit.safetensors", directory, seed)
    clock.step(f"evaluation of {directory}: ViTP and random-init ViT, {BOOTSTRAP_RESAMPLES} bootstrap resamples")
    return RunResult(settings, seed, directory, vitp, random, train_seconds, reused)


def finished_pretraining(directory: Path, key: dict) -> float | None:
    """The pretraining time recorded by an earlier run in ``directory`` with the same ``key``, if that
    run got as far as exporting both ViTs; else None."""
    try:
        record = json.loads((directory / "run.json").read_text())
    except (OSError, ValueError):
        return None
    exported = all((directory / name / "vit.safetensors").is_file() for name in ("vit", "vit_random"))
    if not isinstance(record, dict) or record.get("key") != key or not exported:
        return None
    return float(record["train_seconds"])


def _pretrain(settings: DemoSettings, seed: int, meta_path: Path, init: Path, output: Path, eval_every: int | None) -> None:
    """`vitp pretrain` with the demo's settings (the one place that knows the training API)."""
    pretrain(*pretrain_arguments(
        meta_path=str(meta_path), output_dir=str(output), model_name_or_path=str(init),
        force_image_size=settings.tile_size, max_dynamic_patch=1, use_thumbnail=False, max_seq_length=1024,
        system_message=SYSTEM_MESSAGE, drop_path_rate=settings.drop_path_rate, TMAug_prob=settings.tmaug_prob,
        max_steps=settings.max_steps, learning_rate=settings.learning_rate, grad_checkpoint=False,
        per_device_train_batch_size=settings.batch_size, warmup_ratio=settings.warmup_ratio, weight_decay=0.01,
        lr_scheduler_type="cosine", save_steps=eval_every or settings.max_steps,
        save_total_limit=None if eval_every else 1, logging_steps=max(1, settings.max_steps // 40),
        dataloader_num_workers=1, dataloader_persistent_workers=True, report_to="none", seed=seed,
    ))


def embed_and_evaluate(shared: Shared, method: str, checkpoint: Path, directory: Path, seed: int,
                       tag: str | None = None) -> MethodResult:
    """Features of gallery and query tiles with a ViT checkpoint, then the evaluation."""
    features = directory / "features"
    name = tag or method
    for split in ("gallery", "query"):
        extract_features(shared.data / split, features / f"{name}_{split}.npz", checkpoint, batch_size=128,
                         num_workers=0, device="cpu", dtype="fp32", progress_bar=False)
    return evaluate_method(method, features / f"{name}_query.npz", features / f"{name}_gallery.npz",
                           directory / "evaluation", seed, name)


def evaluate_method(method: str, query_file: Path, gallery_file: Path, evaluation: Path, seed: int,
                    name: str | None = None) -> MethodResult:
    """FAISS exact search, Top-1/3/5 and mAP with bootstrap intervals; the JSON as `vitp evaluate --output`."""
    gallery, queries = load_features(gallery_file), load_features(query_file)
    report = evaluate_retrieval(queries, gallery, top_k=[1, 3, 5], progress_bar=False,
                                bootstrap_resamples=BOOTSTRAP_RESAMPLES, seed=seed)
    write_json(report.to_dict(), evaluation / f"{name or method}.json")
    return MethodResult(method, TITLES[method], report, queries, gallery)


def evaluate_checkpoints(shared: Shared, run: RunResult, clock: Stopwatch) -> list[StepResult]:
    """Retrieval with the ViT of every intermediate checkpoint of ``run`` and of its final model."""
    steps = []
    for step, checkpoint in intermediate_checkpoints(run.directory / "pretrain", run.settings.max_steps):
        vit = run.directory / "steps" / f"step{step}"
        export_vit(checkpoint, vit)
        result = embed_and_evaluate(shared, "vitp", vit / "vit.safetensors", run.directory, run.seed, f"vitp_step{step}")
        steps.append(StepResult(step, result, compare_methods(result, shared.histogram, run.seed),
                                compare_methods(result, run.random, run.seed)))
    steps.append(StepResult(run.settings.max_steps, run.vitp, compare_methods(run.vitp, shared.histogram, run.seed),
                            compare_methods(run.vitp, run.random, run.seed)))
    clock.step(f"checkpoints: retrieval at steps {', '.join(str(s.step) for s in steps)}")
    return steps


def intermediate_checkpoints(output: Path, max_steps: int) -> list[tuple[int, Path]]:
    """(step, directory) of the Trainer's checkpoint-N folders before the last step, by step."""
    found = []
    for path in output.glob("checkpoint-*"):
        step = path.name.split("-", 1)[1]
        if path.is_dir() and step.isdigit() and int(step) < max_steps:
            found.append((int(step), path))
    return sorted(found)
