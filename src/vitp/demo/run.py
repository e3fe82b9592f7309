"""`vitp demo`: the whole mission on a CPU, on a real Sentinel-2 scene, with a report.

1. data       tiles of the scene, classed from its bands, split spatially (cached)
2. instructions  conversations about the gallery tiles (`vitp data build`) and a tokenizer trained on them
3. pretrain   a tiny InternVL from scratch with TMAug and DropPath (`vitp pretrain`)
4. export     the ViT after pretraining, and the same ViT at its random initialisation (`vitp export-vit`)
5. retrieval  features of gallery and query tiles, FAISS index, Top-1/3/5 and mAP (`vitp features/evaluate`)
              for ViTP, the random ViT and a colour histogram
6. report     report.md / report.html with the data set, the loss curve, the metrics and examples
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from vitp.data.build import build_instructions
from vitp.data.tokenizer import conversation_texts, save_tokenizer, train_tokenizer
from vitp.demo.baselines import histogram_features
from vitp.demo.report import MethodResult, write_report
from vitp.demo.scene import balance, load_sentinel2, split_tiles, write_tiles
from vitp.model.checkpoint import build_vlm, save_vlm
from vitp.retrieval.evaluate import evaluate_retrieval
from vitp.retrieval.feature_file import load_features
from vitp.retrieval.features import extract_features
from vitp.train.export import export_vit
from vitp.train.arguments import pretrain_arguments
from vitp.train.pretrain import pretrain

SYSTEM_MESSAGE = "Answer briefly."  # short: the tiny model reads it in front of every sample


@dataclass(frozen=True)
class DemoSettings:
    tile_size: int = 32  # pixels at 10 m: 320 m tiles
    block_tiles: int = 8  # checkerboard blocks of 8 x 8 tiles (2.56 km)
    pretrain_stride: int = 16  # extra pretraining tiles overlapping by half, inside gallery blocks only
    largest_class_ratio: float = 2.0  # cap on the largest class (water), relative to the second largest
    max_steps: int = 2000
    batch_size: int = 16
    learning_rate: float = 5e-4
    warmup_ratio: float = 0.05
    tmaug_prob: float = 0.75  # upstream's --TMAug_prob: drop 75 % of the image tokens of 25 % of samples
    drop_path_rate: float = 0.1
    vocab_size: int = 400
    seed: int = 0

    def data_key(self) -> dict:
        return {k: getattr(self, k) for k in ("tile_size", "block_tiles", "pretrain_stride", "largest_class_ratio", "seed")}


DEFAULT = DemoSettings()
QUICK = dataclasses.replace(DEFAULT, pretrain_stride=32, max_steps=150)


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def step(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f} s] {message}", flush=True)

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


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


def run_demo(out: str | Path = "runs/demo", quick: bool = False, settings: DemoSettings | None = None) -> dict:
    settings = settings or (QUICK if quick else DEFAULT)
    out = Path(out)
    clock = Stopwatch()
    print(f"vitp demo ({'quick' if quick else 'default'} run) -> {out}", flush=True)

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

    model = build_vlm("internvl-demo", tokenizer, image_size=settings.tile_size, patch_size=settings.tile_size // 8)
    save_vlm(model, out / "init", tokenizer)
    shutil.rmtree(out / "pretrain", ignore_errors=True)
    pretrain(*pretrain_arguments(
        meta_path=str(meta_path), output_dir=str(out / "pretrain"), model_name_or_path=str(out / "init"),
        force_image_size=settings.tile_size, max_dynamic_patch=1, use_thumbnail=False, max_seq_length=1024,
        system_message=SYSTEM_MESSAGE, drop_path_rate=settings.drop_path_rate, TMAug_prob=settings.tmaug_prob,
        max_steps=settings.max_steps, learning_rate=settings.learning_rate, grad_checkpoint=False,
        per_device_train_batch_size=settings.batch_size, warmup_ratio=settings.warmup_ratio, weight_decay=0.01,
        lr_scheduler_type="cosine", save_steps=settings.max_steps, save_total_limit=1,
        logging_steps=max(1, settings.max_steps // 40), dataloader_num_workers=1, dataloader_persistent_workers=True,
        report_to="none", seed=settings.seed,
    ))
    clock.step(f"pretrain: {settings.max_steps} steps")

    export_vit(out / "pretrain", out / "vit")
    export_vit(out / "init", out / "vit_random")
    features = out / "features"
    for method, checkpoint in (("vitp", out / "vit" / "vit.safetensors"), ("random", out / "vit_random" / "vit.safetensors")):
        for split in ("gallery", "query"):
            extract_features(data / split, features / f"{method}_{split}.npz", checkpoint, batch_size=128,
                             num_workers=0, device="cpu", dtype="fp32", progress_bar=False)
    for split in ("gallery", "query"):
        histogram_features(data / split, features / f"histogram_{split}.npz")
    clock.step("features: ViTP, random-init ViT and colour histogram")

    results = []
    for method, title in (("vitp", "ViTP (pretrained ViT)"), ("random", "same ViT, random init"),
                          ("histogram", "RGB colour histogram")):
        gallery = load_features(features / f"{method}_gallery.npz")
        queries = load_features(features / f"{method}_query.npz")
        report = evaluate_retrieval(queries, gallery, top_k=[1, 3, 5])
        (out / "evaluation").mkdir(parents=True, exist_ok=True)
        (out / "evaluation" / f"{method}.json").write_text(json.dumps(report.to_dict(), indent=2))
        results.append(MethodResult(method, title, report, queries, gallery))
    clock.step("evaluation: FAISS exact inner-product search, Top-1/3/5 and mAP")

    report_path = write_report(out, summary, results, settings, quick, clock.total)
    table = results_table(results)
    print()
    print(table)
    print()
    print(f"report: {report_path} (and {report_path.with_suffix('.html')}); total {clock.total:.0f} s")
    return {"report": str(report_path), "seconds": clock.total,
            "results": {r.method: r.report.to_dict() for r in results}}


def results_table(results: list) -> str:
    lines = [f"{'method':<24} {'Top-1':>6} {'Top-3':>6} {'Top-5':>6} {'mAP':>6}"]
    for result in results:
        acc = result.report.accuracy
        lines.append(f"{result.title:<24} {acc[1]:>6.3f} {acc[3]:>6.3f} {acc[5]:>6.3f} "
                     f"{result.report.mean_average_precision:>6.3f}")
    return "\n".join(lines)
