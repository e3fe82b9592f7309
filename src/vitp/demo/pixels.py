"""The demo's pixel task: semantic segmentation of the Sentinel-2 scene into five land-cover kinds.

Every pixel of the scene gets a class from the masks that :func:`vitp.demo.scene.classify_pixels`
computes from the bands (NDVI = (B08-B04)/(B08+B04), MNDWI = (B03-B11)/(B03+B11), reflectance):

=====  ==========  =============================================================  ========
index  class       mask                                                           priority
=====  ==========  =============================================================  ========
0      water       MNDWI > 0.75                                                   1
1      vegetation  NDVI > 0.5                                                     4
2      wetland     0.2 < MNDWI <= 0.75 and NDVI < 0.3                             3
3      sand        B11 > 0.15 and NDVI < 0.2 and mean visible reflectance > 0.14  2
4      bare_soil   NDVI < 0.3 and MNDWI <= 0.2 and not sand                       5
255    (ignore)    no mask holds: 0.3 <= NDVI <= 0.5 with MNDWI <= 0.75           --
=====  ==========  =============================================================  ========

Where masks overlap, the class of lower priority number wins. By their definitions only three pairs
can overlap: sand and wetland (bright wet sand at the water line: sand; 88 pixels of the real scene),
water and vegetation, water and sand (this needs a green reflectance above 1.05); the last two never
occur on the scene. The ignored pixels (about 15 % of the scene) are mixed ones — sparse crops, field
edges, marsh with some green — that no rule claims; they are left out of training and of every metric.

Data set (mmseg's layout, :meth:`vitp.downstream.data.SegmentationDataset.from_root`): square crops
of the true-colour image (``Scene.rgb``) as PNG in ``img_dir/<split>`` and their label maps (8-bit grey,
class indices, 255 = ignore) in ``ann_dir/<split>``, named ``y<top>_x<left>.png``. The split is the
retrieval tiles' checkerboard (blocks of ``tile_size * block_tiles`` pixels, :func:`block_colour`):
``train`` crops tile gallery blocks (colour 0), ``val`` crops tile query blocks less a margin along
every block edge (one tile by default, as ``split_tiles`` removes the edge ring of query tiles), so
that no val pixel lies within ``margin`` pixels of a gallery pixel. A crop with more than half of its
pixels ignored is skipped (and listed in ``pixel_dataset.json``).

Baseline: :func:`rgb_pixel_baseline` classifies each pixel from its own RGB value with a small MLP
(3 -> 32 -> classes) — what colour alone gets, as the colour histogram is for retrieval.
"""

from __future__ import annotations

import logging
import math
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

from vitp.demo.scene import Scene, block_colour
from vitp.downstream.data import ClassTable, SegmentationDataset
from vitp.downstream.metrics import SEGMENTATION, AreaCounter, DenseComparison, DenseEvaluation
from vitp.downstream.pictures import write_palette_png
from vitp.downstream.transforms import Compose
from vitp.errors import DataError
from vitp.files import write_json
from vitp.retrieval.statistics import AHEAD, BEHIND, NO_DIFFERENCE, Interval

logger = logging.getLogger("vitp")

PIXEL_CLASSES = ("water", "vegetation", "wetland", "sand", "bare_soil")
PIXEL_PALETTE = ((30, 100, 210), (40, 160, 50), (0, 150, 140), (240, 210, 70), (150, 95, 50))
PIXEL_CLASS_TABLE = ClassTable.from_names(PIXEL_CLASSES, PIXEL_PALETTE)
IGNORE_INDEX = 255
# The order in which overlapping masks are resolved (the docstring's priority column).
PRIORITY = ("water", "sand", "wetland", "vegetation", "bare_soil")
# (class, rule) rows for a report's table, in class-index order.
PIXEL_RULES = (
    ("water", "MNDWI > 0.75 (wins over every other class)"),
    ("vegetation", "NDVI > 0.5"),
    ("wetland", "0.2 < MNDWI <= 0.75 and NDVI < 0.3 (sand wins where both hold)"),
    ("sand", "B11 > 0.15, NDVI < 0.2, mean visible reflectance > 0.14"),
    ("bare_soil", "NDVI < 0.3, MNDWI <= 0.2, not sand"),
    ("(ignored)", "none of the above: 0.3 <= NDVI <= 0.5 on land (mixed pixels)"),
)
SPLITS = ("train", "val")
MAX_IGNORED_FRACTION = 0.5
SUMMARY_FILE = "pixel_dataset.json"
CLASS_FILE = "classes.txt"
SCENE_LABELS_FILE = "scene_labels.png"
HEADLINE_METRICS = ("mIoU", "aAcc", "mAcc")
RGB_BASELINE_TITLE = "per-pixel RGB MLP"


# ------------------------------------------------------------------------------------------------
# Labels


def pixel_labels(scene: Scene) -> np.ndarray:
    """H x W uint8: the class index of every pixel (the module docstring's table), 255 where no mask holds."""
    missing = [name for name in PIXEL_CLASSES if name not in scene.masks]
    if missing:
        raise ValueError(f"scene has no {', '.join(missing)} mask(s); classify_pixels(scene) computes them")
    conditions = [scene.masks[name] for name in PRIORITY]
    choices = [PIXEL_CLASSES.index(name) for name in PRIORITY]
    return np.select(conditions, choices, default=IGNORE_INDEX).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# The data set


def crop_positions(shape: tuple[int, int], crop: int, block: int, margin: int) -> dict[str, list[tuple[int, int]]]:
    """(top, left) of the ``train`` crops (tiling each gallery block from its corner) and of the ``val``
    crops (tiling each query block less ``margin`` pixels along its edges), sorted. Blocks cut by the
    scene's edge hold the crops that fit; the scene's edge needs no margin (no gallery block lies beyond)."""
    if crop < 1 or block < 1:
        raise ValueError(f"crop and block must be positive, got crop={crop}, block={block}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if crop > block - 2 * margin:
        raise ValueError(f"crop ({crop} px) must fit in a query block of {block} px less a margin of {margin} px "
                         f"on each side ({block - 2 * margin} px)")
    height, width = shape
    positions: dict[str, list[tuple[int, int]]] = {split: [] for split in SPLITS}
    for block_top in range(0, height, block):
        for block_left in range(0, width, block):
            gallery = block_colour(block_top, block_left, block) == 0
            inset = 0 if gallery else margin
            bottom = min(block_top + block - inset, height)
            right = min(block_left + block - inset, width)
            for top in range(block_top + inset, bottom - crop + 1, crop):
                for left in range(block_left + inset, right - crop + 1, crop):
                    positions["train" if gallery else "val"].append((top, left))
    return {split: sorted(found) for split, found in positions.items()}


def crop_name(top: int, left: int, shape: tuple[int, int]) -> str:
    """``y<top>_x<left>.png``, zero-padded so that names sort as positions do."""
    digits = max(4, len(str(max(shape))))
    return f"y{top:0{digits}d}_x{left:0{digits}d}.png"


def write_pixel_dataset(
    scene: Scene,
    root: Path | str,
    crop: int = 64,
    tile_size: int = 32,
    block_tiles: int = 8,
    margin: int | None = None,
    max_ignored: float = MAX_IGNORED_FRACTION,
) -> dict[str, Any]:
    """Write the pixel task's data set under ``root`` (module docstring) and return its summary.

    ``margin`` (default ``tile_size``): pixels kept free along the edges of query blocks. A crop whose
    ignored fraction exceeds ``max_ignored`` is skipped. ``root/img_dir/<split>`` and
    ``root/ann_dir/<split>`` are replaced (crops of an earlier call with other settings are removed);
    besides them: ``classes.txt`` (names and colours, :meth:`ClassTable.read`), ``scene_labels.png``
    (the whole scene's labels as a palette PNG) and ``pixel_dataset.json`` (the returned summary: crop
    counts, skipped crops, labelled pixels per class and the ignored fraction of each split)."""
    if tile_size < 1 or block_tiles < 1:
        raise ValueError(f"tile_size and block_tiles must be positive, got {tile_size} and {block_tiles}")
    if not 0 <= max_ignored < 1:
        raise ValueError(f"max_ignored must be in [0, 1), got {max_ignored}")
    margin = tile_size if margin is None else margin
    block = tile_size * block_tiles
    positions = crop_positions(scene.shape, crop, block, margin)
    labels = pixel_labels(scene)
    rgb = scene.rgb()
    root = Path(root)
    splits = {split: _write_split(rgb, labels, positions[split], crop, root, split, max_ignored) for split in SPLITS}
    PIXEL_CLASS_TABLE.write(root / CLASS_FILE)
    write_palette_png(labels, root / SCENE_LABELS_FILE, PIXEL_CLASS_TABLE)
    scene_counts = np.bincount(labels.ravel(), minlength=256)
    summary = {
        "task": "semantic segmentation of the scene's pixels (labels from spectral indices)",
        "crop_px": crop,
        "block_px": block,
        "margin_px": margin,
        "ground_sample_distance_m": 10,
        "classes": list(PIXEL_CLASSES),
        "ignore_index": IGNORE_INDEX,
        "max_ignored_fraction": max_ignored,
        "scene_fractions": {**{c: float(scene_counts[i] / labels.size) for i, c in enumerate(PIXEL_CLASSES)},
                            "ignored": float(scene_counts[IGNORE_INDEX] / labels.size)},
        "splits": splits,
        "files": {
            "images": {split: f"img_dir/{split}" for split in SPLITS},
            "labels": {split: f"ann_dir/{split}" for split in SPLITS},
            "class_file": CLASS_FILE,
            "scene_labels": SCENE_LABELS_FILE,
        },
    }
    write_json(summary, root / SUMMARY_FILE)
    return summary


def _write_split(rgb: np.ndarray, labels: np.ndarray, positions: list[tuple[int, int]], crop: int, root: Path,
                 split: str, max_ignored: float) -> dict[str, Any]:
    """The crops of one split (its folders emptied first) and their counts."""
    image_dir, label_dir = root / "img_dir" / split, root / "ann_dir" / split
    for folder in (image_dir, label_dir):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    counts = np.zeros(256, dtype=np.int64)
    kept, skipped = 0, []
    for top, left in positions:
        name = crop_name(top, left, labels.shape)
        window = labels[top : top + crop, left : left + crop]
        if np.mean(window == IGNORE_INDEX) > max_ignored:
            skipped.append(name)
            continue
        Image.fromarray(rgb[top : top + crop, left : left + crop]).save(image_dir / name)
        Image.fromarray(window).save(label_dir / name)  # uint8, 2-D: an 8-bit grey PNG
        counts += np.bincount(window.ravel(), minlength=256)
        kept += 1
    total = int(counts.sum())
    return {
        "crops": kept,
        "skipped_mostly_ignored": len(skipped),
        "skipped_names": skipped,
        "labelled_pixels": {c: int(counts[i]) for i, c in enumerate(PIXEL_CLASSES)},
        "ignored_fraction": float(counts[IGNORE_INDEX] / total) if total else 0.0,
    }


# ------------------------------------------------------------------------------------------------
# The RGB baseline


def _samples(root: Path, split: str, classes: ClassTable) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, RGB (H, W, 3) in 0-1, label (H, W)) of each pair of the split that loads; a file that
    fails is reported and left out, as the data set does."""
    dataset = SegmentationDataset.from_root(root, split, classes, Compose([]))  # no transform: 0-255 values
    for index in range(len(dataset)):
        item = dataset[index]
        if "skipped" in item:
            logger.warning("%s: skipped (%s)", item["name"], item["skipped"])
            continue
        yield item["name"], item["image"].permute(1, 2, 0) / 255.0, item["label"]


@contextmanager
def _one_thread():
    """Torch on one intra-op thread for the block. The MLP's matrices are far too small for threads to
    pay: on a busy 2-core machine two threads made a step of 2048 pixels 90 times slower (176 ms vs 2 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int,
           learning_rate: float, generator: torch.Generator) -> None:
    """Adam with a cosine schedule on random mini-batches (drawn from ``generator``) of cross-entropy."""
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        batch = torch.randint(len(labels), (min(batch_size, len(labels)),), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()


def rgb_pixel_baseline(
    root: Path | str,
    classes: ClassTable = PIXEL_CLASS_TABLE,
    seed: int = 0,
    *,
    hidden: int = 32,
    steps: int = 800,
    batch_size: int = 2048,
    learning_rate: float = 1e-2,
    max_train_pixels: int = 200_000,
    prediction_dir: Path | str | None = None,
) -> DenseEvaluation:
    """Per-pixel classification from RGB alone, evaluated on ``root``'s val split.

    An MLP (3 -> ``hidden`` -> classes, ReLU) on standardised RGB, trained with cross-entropy and Adam
    for ``steps`` mini-batches drawn from the train split's labelled pixels (a random subset of at most
    ``max_train_pixels``). The seed fixes the subset, the initialisation and the batches; the global
    torch generator is left as it was. Every val image is predicted whole, and the evaluation's
    per-image areas are keyed by ``SegmentationDataset.names`` (what a paired comparison matches).
    With ``prediction_dir``, each prediction is also written there as a palette PNG of the same name."""
    if hidden < 1 or steps < 1 or batch_size < 1 or max_train_pixels < 1:
        raise ValueError(f"hidden, steps, batch_size and max_train_pixels must be positive, got {hidden}, {steps}, "
                         f"{batch_size}, {max_train_pixels}")
    root = Path(root)
    pixels, labels = _labelled_pixels(root, classes)
    generator = torch.Generator().manual_seed(seed)
    if len(labels) > max_train_pixels:
        chosen = torch.randperm(len(labels), generator=generator)[:max_train_pixels]
        pixels, labels = pixels[chosen], labels[chosen]
    mean, std = pixels.mean(0), pixels.std(0).clamp_min(1e-3)  # a constant channel must not divide by 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initialisation, without moving the caller's generator
        model = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, len(classes)))
    with _one_thread():
        _train(model, (pixels - mean) / std, labels, steps, batch_size, learning_rate, generator)
        return _evaluate(lambda rgb: model((rgb - mean) / std).argmax(1), root, classes, prediction_dir)


def _labelled_pixels(root: Path, classes: ClassTable) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB (N, 3) in 0-1 and class (N,) of every labelled pixel of the train split."""
    samples = list(_samples(root, "train", classes))
    pixels = torch.cat([rgb.reshape(-1, 3) for _, rgb, _ in samples]) if samples else torch.zeros(0, 3)
    labels = torch.cat([label.reshape(-1) for _, _, label in samples]) if samples else torch.zeros(0, dtype=torch.long)
    labelled = labels != IGNORE_INDEX
    if not labelled.any():
        raise DataError(f"{root / 'ann_dir' / 'train'}: no labelled pixels to train the RGB baseline on")
    return pixels[labelled], labels[labelled]


@torch.no_grad()
def _evaluate(classify: Callable[[torch.Tensor], torch.Tensor], root: Path, classes: ClassTable,
              prediction_dir: Path | str | None) -> DenseEvaluation:
    """Areas of ``classify`` (RGB (N, 3) in 0-1 -> class (N,)) on every val image, keyed by its name;
    the predictions written to ``prediction_dir`` as palette PNGs when given."""
    counter = AreaCounter(classes.names, IGNORE_INDEX)
    for name, rgb, label in _samples(root, "val", classes):
        prediction = classify(rgb.reshape(-1, 3)).reshape(label.shape)
        counter.add(name, prediction, label)
        if prediction_dir is not None:
            path = (Path(prediction_dir) / name).with_suffix(".png")
            path.parent.mkdir(parents=True, exist_ok=True)
            write_palette_png(prediction.numpy().astype(np.uint8), path, classes)
    return DenseEvaluation(SEGMENTATION, counter.areas())


# ------------------------------------------------------------------------------------------------
# Report


def _percent(interval: Interval | None, value: float, signed: bool = False, digits: int = 2) -> str:
    """'value [low, high]' in percent (points for a difference); the value alone without an interval."""
    if not math.isfinite(value):
        return "n/a"
    if interval is None or not (math.isfinite(interval.low) and math.isfinite(interval.high)):
        return f"{100 * value:{'+' if signed else ''}.{digits}f}"
    return Interval(100 * interval.value, 100 * interval.low, 100 * interval.high).format(digits, signed)


def _title(titles: dict[str, str], name: str) -> str:
    return titles.get(name, name)


def dense_verdict_sentence(comparison: DenseComparison, titles: dict[str, str]) -> str:
    """'Against the <b>: <a> ahead on ...; no measurable difference on ...; <a> behind on ...' on mIoU,
    aAcc and mAcc: ahead or behind only where the paired interval of a - b excludes 0 (as the demo's
    retrieval verdict, :func:`vitp.demo.evidence.verdict_sentence`)."""
    title_a, title_b = _title(titles, comparison.name_a), _title(titles, comparison.name_b)
    groups: dict[str, list[str]] = {AHEAD: [], NO_DIFFERENCE: [], BEHIND: []}
    for metric in HEADLINE_METRICS:
        groups[comparison.differences[metric].verdict].append(metric)
    words = {AHEAD: f"{title_a} ahead", NO_DIFFERENCE: "no measurable difference", BEHIND: f"{title_a} behind"}
    parts = [f"{words[verdict]} on {', '.join(metrics)}" for verdict, metrics in groups.items() if metrics]
    return f"Against the {title_b}: " + "; ".join(parts) + "."


def class_wins_sentence(comparison: DenseComparison, titles: dict[str, str]) -> str:
    """The classes where b's IoU is higher than a's (point values), and whether the paired interval
    says that is measurable."""
    title_a, title_b = _title(titles, comparison.name_a), _title(titles, comparison.name_b)
    wins = [f"{name} ({'measurably' if d.verdict == BEHIND else 'within noise'})"
            for name, d in comparison.class_differences.items() if math.isfinite(d.value) and d.value < 0]
    if not wins:
        return f"The {title_b} has a higher IoU than the {title_a} in no class."
    return f"Classes where the {title_b} has a higher IoU than the {title_a}: " + "; ".join(wins) + "."


def pixel_report_blocks(evaluations: dict[str, DenseEvaluation], comparisons: dict[str, DenseComparison],
                        titles: dict[str, str]) -> list[tuple[str, Any]]:
    """The pixel task's section as the demo report's blocks (``("h2", text)``, ``("p", text)``,
    ``("table", (header, rows))``): headline metrics and per-class IoU of each method (``evaluations``:
    method -> evaluation, titled by ``titles``), then every paired comparison with its verdict
    (``comparisons``; their ``name_a``/``name_b`` are looked up in ``titles``)."""
    if not evaluations:
        raise ValueError("evaluations must hold at least one method")
    first = next(iter(evaluations.values()))
    if any(e.areas.class_names != first.areas.class_names for e in evaluations.values()):
        raise ValueError("evaluations must share their classes")
    resampled = next((e.intervals for e in evaluations.values() if e.intervals is not None), None)
    intro = (f"Semantic segmentation of the scene's pixels ({', '.join(first.areas.class_names)}), evaluated on "
             f"{len(first.areas)} val crops from the query blocks. Areas are summed over all crops (mmseg's "
             "IoUMetric); ignored pixels are left out. Values in percent")
    if resampled is not None:
        intro += (f"; in brackets {resampled.confidence:.0%} intervals from a percentile bootstrap over the crops "
                  f"({resampled.resamples} resamples, seed {resampled.seed})")
    blocks: list[tuple[str, Any]] = [
        ("h2", "Pixel task: land-cover segmentation"),
        ("p", intro + "."),
        ("table", (["method", *HEADLINE_METRICS], _metric_rows(evaluations, titles))),
        ("table", (["class", "val pixels"] + [f"IoU, {_title(titles, m)}" for m in evaluations],
                   _class_rows(evaluations))),
    ]
    if comparisons:
        confidence = next(iter(comparisons.values())).confidence
        blocks.append(("p", f"a - b on the same val crops, paired-bootstrap {confidence:.0%} intervals (percentage "
                            "points): a method is ahead only where the interval of the difference excludes 0."))
        blocks.append(("table", (["comparison", "metric", "a", "b", "difference [interval]", "verdict"],
                                 [row for c in comparisons.values() for row in _difference_rows(c, titles)])))
        blocks += [("p", dense_verdict_sentence(c, titles) + " " + class_wins_sentence(c, titles))
                   for c in comparisons.values()]
    return blocks


def _metric_rows(evaluations: dict[str, DenseEvaluation], titles: dict[str, str]) -> list[list[str]]:
    rows = []
    for method, evaluation in evaluations.items():
        intervals = evaluation.intervals
        rows.append([_title(titles, method)] + [_percent(intervals.metrics[m] if intervals else None,
                                                         evaluation.metrics[m]) for m in HEADLINE_METRICS])
    return rows


def _class_rows(evaluations: dict[str, DenseEvaluation]) -> list[list]:
    """Per class: its labelled pixels and each method's IoU."""
    first = next(iter(evaluations.values()))
    labelled = first.areas.labelled.sum(0)
    rows = []
    for index, name in enumerate(first.areas.class_names):
        row = [name, int(labelled[index])]
        for evaluation in evaluations.values():
            interval = evaluation.intervals.per_class[name]["IoU"] if evaluation.intervals else None
            row.append(_percent(interval, evaluation.per_class[name]["IoU"]))
        rows.append(row)
    return rows


def _difference_rows(comparison: DenseComparison, titles: dict[str, str]) -> list[list[str]]:
    """a - b on each headline metric, then on each class's IoU."""
    label = f"{_title(titles, comparison.name_a)} - {_title(titles, comparison.name_b)}"
    rows = []
    for metric in HEADLINE_METRICS:
        difference = comparison.differences[metric]
        rows.append([label, metric, _percent(None, comparison.values_a[metric]),
                     _percent(None, comparison.values_b[metric]), _percent(difference, difference.value, signed=True),
                     difference.verdict])
    for name, difference in comparison.class_differences.items():
        verdict = difference.verdict if math.isfinite(difference.low) else "undefined"
        rows.append([label, f"IoU {name}", "", "", _percent(difference, difference.value, signed=True), verdict])
    return rows


def pixel_report_lines(evaluations: dict[str, DenseEvaluation], comparisons: dict[str, DenseComparison],
                       titles: dict[str, str]) -> list[str]:
    """:func:`pixel_report_blocks` as markdown lines."""
    from vitp.demo.report import to_markdown  # the report's renderer (imported late: it loads matplotlib)

    return to_markdown(pixel_report_blocks(evaluations, comparisons, titles)).splitlines()


def pixel_console_lines(evaluations: dict[str, DenseEvaluation], comparisons: dict[str, DenseComparison],
                        titles: dict[str, str]) -> list[str]:
    """A few plain lines for the terminal: each method's mIoU, aAcc and mAcc, then each verdict."""
    width = max(len(_title(titles, m)) for m in evaluations) if evaluations else 0
    lines = ["pixel task (val crops, percent):"]
    for method, evaluation in evaluations.items():
        intervals = evaluation.intervals
        values = "  ".join(f"{m} {_percent(intervals.metrics[m] if intervals else None, evaluation.metrics[m])}"
                           for m in HEADLINE_METRICS)
        lines.append(f"  {_title(titles, method):<{width}}  {values}")
    lines += ["  " + dense_verdict_sentence(c, titles) for c in comparisons.values()]
    return lines
