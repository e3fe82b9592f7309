"""Metrics of segmentation and change detection as mmseg / opencd's ``IoUMetric`` define them, with
bootstrap intervals over images and paired comparisons of two runs.

Every metric comes from three areas per class, **summed over the whole evaluation set** (never a mean
of per-image scores), over pixels whose label is not ``ignore_index`` (255):

* intersection I_c (label c predicted c), predicted area P_c, labelled area L_c; union U_c = P_c + L_c - I_c
* IoU_c = I_c / U_c, Acc_c = Recall_c = I_c / L_c, Precision_c = I_c / P_c, Dice_c = 2 I_c / (P_c + L_c),
  Fscore_c = (1 + b^2) Precision_c Recall_c / (b^2 Precision_c + Recall_c) = (1 + b^2) I_c / (b^2 L_c + P_c)
* aAcc = sum I / sum L; mIoU, mAcc, mDice, mFscore, mPrecision, mRecall: means over classes that skip
  NaN (numpy's ``nanmean``, as mmseg prints them).

A ratio is NaN where its denominator is 0: IoU, Dice and Fscore of a class absent from both the labels
and the predictions, Acc/Recall of a class absent from the labels, Precision of a class never
predicted — and a NaN class is left out of the mean. (mmseg computes Fscore from precision and recall,
so a class that is labelled and predicted but never hit gets 0/0 = NaN there and drops out of
mFscore; here it counts as 0, its value in the closed form. The two agree wherever a class has been
hit at least once, which on real data sets is every class.)

Change detection (two classes, 1 = changed) reports what papers quote — Precision, Recall, F1 and IoU
of the changed class — with aAcc and opencd's two-class mIoU and mFscore beside them.

Intervals: percentile bootstrap over images. A resample draws n images with replacement — uniforms
``u`` of shape (resamples, n) from ``numpy.random.default_rng(seed)``, slot j taking image
``floor(u[j] * n)`` (:func:`vitp.retrieval.statistics.resample_indices`) — sums their areas, and computes
every metric from those sums. A paired comparison matches two runs by image name and applies the same
resamples to both; a difference's verdict names a run only where its interval excludes 0.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from vitp.errors import DataError
from vitp.files import read_json
from vitp.retrieval.statistics import AHEAD, BEHIND, CONFIDENCE, NO_DIFFERENCE, Interval, resample_indices

SEGMENTATION, CHANGE_DETECTION = "segmentation", "change_detection"
TASKS = (SEGMENTATION, CHANGE_DETECTION)
IGNORE_INDEX = 255
CHANGED = 1  # the changed class of change detection
CLASS_METRICS = ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall")
INTERVAL_CLASS_METRICS = ("IoU", "Acc", "Fscore")  # per-class metrics that get bootstrap intervals
# Resample slots x images counted at a time: about 64 MB of float64.
_CHUNK_ELEMENTS = 8 * 2**20


# ------------------------------------------------------------------------------------------------
# Areas of one image


def image_areas(prediction, label, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(3, num_classes) int64: intersection, predicted and labelled area of each class in one image.

    ``prediction`` and ``label`` are class-index maps of the same shape, numpy arrays or torch tensors
    (tensors are counted on their device). Pixels labelled ``ignore_index`` are left out."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if tuple(prediction.shape) != tuple(label.shape):
        raise ValueError(f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)} must have one shape")
    if isinstance(prediction, torch.Tensor) or isinstance(label, torch.Tensor):
        return _areas_torch(torch.as_tensor(prediction), torch.as_tensor(label), num_classes, ignore_index)
    prediction, label = np.asarray(prediction).ravel(), np.asarray(label).ravel()
    valid = label != ignore_index
    prediction, label = prediction[valid].astype(np.int64), label[valid].astype(np.int64)
    _check_range(prediction, label, num_classes, ignore_index)
    hit = prediction == label
    return np.stack([
        np.bincount(label[hit], minlength=num_classes),
        np.bincount(prediction, minlength=num_classes),
        np.bincount(label, minlength=num_classes),
    ]).astype(np.int64)


def _areas_torch(prediction: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int) -> np.ndarray:
    label = label.to(prediction.device).reshape(-1)
    valid = label != ignore_index
    prediction, label = prediction.reshape(-1)[valid].long(), label[valid].long()
    if len(label):
        _check_range(np.array([prediction.min().item(), prediction.max().item()]),
                     np.array([label.min().item(), label.max().item()]), num_classes, ignore_index)
    hit = prediction == label
    areas = torch.stack([
        torch.bincount(label[hit], minlength=num_classes),
        torch.bincount(prediction, minlength=num_classes),
        torch.bincount(label, minlength=num_classes),
    ])
    return areas.cpu().numpy().astype(np.int64)


def _check_range(prediction: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int) -> None:
    for name, values in (("prediction", prediction), ("label", label)):
        if len(values) and (values.min() < 0 or values.max() >= num_classes):
            bad = values[(values < 0) | (values >= num_classes)][0]
            raise ValueError(f"{name} holds class {int(bad)}, outside 0-{num_classes - 1}"
                             + (f" (and not the ignore index {ignore_index})" if name == "label" else ""))


# ------------------------------------------------------------------------------------------------
# Areas of an evaluation set


@dataclass
class ImageAreas:
    """Per-image areas of an evaluation: what the metrics, the bootstrap and a later comparison need."""

    names: np.ndarray  # str [n], unique
    intersection: np.ndarray  # int64 [n, C]
    predicted: np.ndarray  # int64 [n, C]
    labelled: np.ndarray  # int64 [n, C]
    class_names: tuple[str, ...]

    def __post_init__(self):
        self.names = np.asarray(self.names, dtype=str).reshape(-1)
        self.class_names = tuple(str(c) for c in self.class_names)
        shape = (len(self.names), len(self.class_names))
        for field_name in ("intersection", "predicted", "labelled"):
            array = np.asarray(getattr(self, field_name), dtype=np.int64).reshape(shape) if len(self.names) else \
                np.zeros(shape, dtype=np.int64)
            setattr(self, field_name, array)
        if len(np.unique(self.names)) != len(self.names):
            unique, counts = np.unique(self.names, return_counts=True)
            raise ValueError(f"image names must be unique; {str(unique[counts > 1][0])!r} appears {counts.max()} times")
        if (self.intersection < 0).any() or (self.intersection > np.minimum(self.predicted, self.labelled)).any():
            raise ValueError("areas must satisfy 0 <= intersection <= min(predicted, labelled)")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def stacked(self) -> np.ndarray:
        """[n, 3C]: intersection, predicted, labelled side by side (what resampling sums)."""
        return np.concatenate([self.intersection, self.predicted, self.labelled], axis=1)

    def totals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.intersection.sum(0), self.predicted.sum(0), self.labelled.sum(0)

    def select(self, indices: np.ndarray) -> "ImageAreas":
        return ImageAreas(self.names[indices], self.intersection[indices], self.predicted[indices],
                          self.labelled[indices], self.class_names)

    @classmethod
    def concatenate(cls, parts: Sequence["ImageAreas"]) -> "ImageAreas":
        """One set from several (the shards of a distributed evaluation)."""
        if not parts:
            raise ValueError("parts must hold at least one ImageAreas")
        if any(p.class_names != parts[0].class_names for p in parts):
            raise ValueError("parts must have the same class names")
        return cls(np.concatenate([p.names for p in parts]), np.concatenate([p.intersection for p in parts]),
                   np.concatenate([p.predicted for p in parts]), np.concatenate([p.labelled for p in parts]),
                   parts[0].class_names)

    def to_dict(self) -> dict[str, Any]:
        return {"names": self.names.tolist(), "intersection": self.intersection.tolist(),
                "predicted": self.predicted.tolist(), "labelled": self.labelled.tolist()}

    @classmethod
    def from_dict(cls, data: Any, class_names: Sequence[str], source: str) -> "ImageAreas":
        """Read ``to_dict``'s form back, saying what is wrong with a damaged one."""
        keys = ("names", "intersection", "predicted", "labelled")
        if not isinstance(data, dict) or not all(key in data for key in keys):
            raise DataError(f"{source}: 'per_image' must be an object with {', '.join(keys)}")
        if not isinstance(data["names"], list) or not all(isinstance(n, str) for n in data["names"]):
            raise DataError(f"{source}: 'per_image.names' must be a list of strings")
        arrays = {}
        for key in keys[1:]:
            try:
                array = np.asarray(data[key], dtype=np.float64)
            except (TypeError, ValueError):
                raise DataError(f"{source}: 'per_image.{key}' must be a list of lists of numbers") from None
            expected = (len(data["names"]), len(class_names))
            if array.size == 0 and expected[0] == 0:
                array = np.zeros(expected)
            if array.shape != expected or not np.isfinite(array).all() or (array != np.round(array)).any():
                raise DataError(f"{source}: 'per_image.{key}' must hold {expected[0]} rows of {expected[1]} whole "
                                f"numbers (one per class), found shape {array.shape}")
            arrays[key] = array.astype(np.int64)
        try:
            return cls(data["names"], arrays["intersection"], arrays["predicted"], arrays["labelled"], class_names)
        except ValueError as err:
            raise DataError(f"{source}: 'per_image': {err}") from None


class AreaCounter:
    """Collects :func:`image_areas` image by image: ``add(name, prediction, label)``, then ``areas()``."""

    def __init__(self, class_names: Sequence[str], ignore_index: int = IGNORE_INDEX):
        self.class_names = tuple(class_names)
        self.ignore_index = ignore_index
        self._names: list[str] = []
        self._rows: list[np.ndarray] = []

    def add(self, name: str, prediction, label) -> np.ndarray:
        areas = image_areas(prediction, label, len(self.class_names), self.ignore_index)
        self._names.append(str(name))
        self._rows.append(areas)
        return areas

    def areas(self) -> ImageAreas:
        rows = np.stack(self._rows) if self._rows else np.zeros((0, 3, len(self.class_names)), dtype=np.int64)
        return ImageAreas(self._names, rows[:, 0], rows[:, 1], rows[:, 2], self.class_names)


# ------------------------------------------------------------------------------------------------
# Metrics from summed areas (any leading shape: one evaluation, or a batch of resamples)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(numerator, dtype=np.float64) / np.asarray(denominator, dtype=np.float64)


def _nanmean(values: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a mean of nothing is NaN, which is what we want
        return np.nanmean(values, axis=-1)


def class_scores(intersection, predicted, labelled, beta: float = 1.0) -> dict[str, np.ndarray]:
    """Per-class IoU, Acc, Dice, Fscore, Precision, Recall (the module docstring's definitions)."""
    intersection, predicted, labelled = (np.asarray(a, dtype=np.float64) for a in (intersection, predicted, labelled))
    recall = _ratio(intersection, labelled)
    return {
        "IoU": _ratio(intersection, predicted + labelled - intersection),
        "Acc": recall,
        "Dice": _ratio(2 * intersection, predicted + labelled),
        "Fscore": _ratio((1 + beta**2) * intersection, beta**2 * labelled + predicted),
        "Precision": _ratio(intersection, predicted),
        "Recall": recall,
    }


def summary_scores(task: str, intersection, predicted, labelled, beta: float = 1.0) -> dict[str, np.ndarray]:
    """The headline metrics of ``task`` from summed areas ([..., C] each)."""
    scores = class_scores(intersection, predicted, labelled, beta)
    overall = _ratio(np.sum(intersection, axis=-1), np.sum(labelled, axis=-1))
    means = {f"m{name}": _nanmean(scores[name]) for name in ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall")}
    if task == SEGMENTATION:
        return {"aAcc": overall, **means}
    if task == CHANGE_DETECTION:
        return {
            "F1": scores["Fscore"][..., CHANGED],
            "Precision": scores["Precision"][..., CHANGED],
            "Recall": scores["Recall"][..., CHANGED],
            "IoU": scores["IoU"][..., CHANGED],
            "aAcc": overall,
            "mIoU": means["mIoU"],
            "mFscore": means["mFscore"],
        }
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


# ------------------------------------------------------------------------------------------------
# Bootstrap


def _resampled_sums(stacked: np.ndarray, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Chunks of (rows, K): the column sums of ``stacked`` [n, K] over each resample of its rows."""
    n = len(stacked)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    weights = stacked.astype(np.float64)  # exact: pixel counts stay far below 2^53
    for picks in resample_indices(np.zeros(n), resamples, rng, chunk):
        rows = len(picks)
        offsets = (np.arange(rows) * n)[:, None]
        counts = np.bincount((picks + offsets).ravel(), minlength=rows * n).reshape(rows, n)
        yield counts @ weights


def _split(sums: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return sums[..., :num_classes], sums[..., num_classes : 2 * num_classes], sums[..., 2 * num_classes :]


def _check_bootstrap_arguments(resamples: int, confidence: float, n: int) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if n == 0:
        raise ValueError("there are no images to resample")


def _interval(point: float, samples: np.ndarray, confidence: float) -> Interval:
    samples = samples[np.isfinite(samples)]
    if not np.isfinite(point) or len(samples) == 0:
        return Interval(float(point), math.nan, math.nan)
    low, high = np.quantile(samples, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    return Interval(float(point), float(low), float(high))


@dataclass
class BootstrapIntervals:
    """Intervals of the headline metrics and of the per-class IoU, Acc and Fscore."""

    metrics: dict[str, Interval]
    per_class: dict[str, dict[str, Interval]]  # class -> metric -> interval
    resamples: int
    seed: int
    confidence: float = CONFIDENCE

    def to_dict(self) -> dict[str, Any]:
        return {
            "resamples": self.resamples,
            "seed": self.seed,
            "confidence": self.confidence,
            "method": "percentile bootstrap over images; each resample's metrics from its summed areas",
            "metrics": {name: _interval_dict(i) for name, i in self.metrics.items()},
            "per_class": {c: {name: _interval_dict(i) for name, i in row.items()} for c, row in self.per_class.items()},
        }


def _interval_dict(interval: Interval) -> dict[str, float | None]:
    return {key: _finite_or_none(value) for key, value in interval.to_dict().items()}


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None  # JSON has no NaN


def bootstrap_intervals(
    areas: ImageAreas, task: str, resamples: int, seed: int = 0, confidence: float = CONFIDENCE, beta: float = 1.0
) -> BootstrapIntervals:
    """Percentile intervals of every headline metric and of per-class IoU/Acc/Fscore (module docstring)."""
    _check_bootstrap_arguments(resamples, confidence, len(areas))
    num_classes = len(areas.class_names)
    point_summary = summary_scores(task, *areas.totals(), beta)
    point_class = class_scores(*areas.totals(), beta)
    summaries: dict[str, list[np.ndarray]] = {name: [] for name in point_summary}
    per_class: dict[str, list[np.ndarray]] = {name: [] for name in INTERVAL_CLASS_METRICS}
    for sums in _resampled_sums(areas.stacked, resamples, seed):
        parts = _split(sums, num_classes)
        for name, values in summary_scores(task, *parts, beta).items():
            summaries[name].append(values)
        scores = class_scores(*parts, beta)
        for name in INTERVAL_CLASS_METRICS:
            per_class[name].append(scores[name])
    samples = {name: np.concatenate(chunks) for name, chunks in summaries.items()}
    class_samples = {name: np.concatenate(chunks) for name, chunks in per_class.items()}
    return BootstrapIntervals(
        metrics={name: _interval(float(point_summary[name]), samples[name], confidence) for name in samples},
        per_class={
            c: {name: _interval(float(point_class[name][i]), class_samples[name][:, i], confidence)
                for name in INTERVAL_CLASS_METRICS}
            for i, c in enumerate(areas.class_names)
        },
        resamples=resamples,
        seed=seed,
        confidence=confidence,
    )


# ------------------------------------------------------------------------------------------------
# An evaluation


def _percent(value: float) -> str:
    return "  nan" if not np.isfinite(value) else f"{100 * value:5.2f}"


def _percent_interval(interval: Interval) -> str:
    if not np.isfinite(interval.low):
        return _percent(interval.value).strip()
    return Interval(100 * interval.value, 100 * interval.low, 100 * interval.high).format(2)


@dataclass
class DenseEvaluation:
    """Metrics of a segmentation or change-detection run, from its per-image areas."""

    task: str
    areas: ImageAreas
    beta: float = 1.0
    ignore_index: int = IGNORE_INDEX
    intervals: BootstrapIntervals | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == CHANGE_DETECTION and len(self.areas.class_names) != 2:
            raise ValueError(f"change detection has 2 classes (unchanged, changed), got {len(self.areas.class_names)}")

    @property
    def metrics(self) -> dict[str, float]:
        return {name: float(v) for name, v in summary_scores(self.task, *self.areas.totals(), self.beta).items()}

    @property
    def per_class(self) -> dict[str, dict[str, float]]:
        scores = class_scores(*self.areas.totals(), self.beta)
        return {c: {name: float(scores[name][i]) for name in CLASS_METRICS} for i, c in enumerate(self.areas.class_names)}

    def add_intervals(self, resamples: int, seed: int = 0, confidence: float = CONFIDENCE) -> BootstrapIntervals:
        self.intervals = bootstrap_intervals(self.areas, self.task, resamples, seed, confidence, self.beta)
        return self.intervals

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "classes": list(self.areas.class_names),
            "ignore_index": self.ignore_index,
            "beta": self.beta,
            "num_images": len(self.areas),
            "metrics": {name: _finite_or_none(v) for name, v in self.metrics.items()},
            "per_class": {c: {name: _finite_or_none(v) for name, v in row.items()} for c, row in self.per_class.items()},
            "bootstrap": self.intervals.to_dict() if self.intervals else None,
            "per_image": self.areas.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "DenseEvaluation":
        if not isinstance(data, dict) or data.get("task") not in TASKS or "per_image" not in data:
            raise DataError(f"{source}: not a segmentation or change-detection evaluation (expected 'task' "
                            f"one of {', '.join(TASKS)} and 'per_image')")
        classes = data.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise DataError(f"{source}: 'classes' must be a non-empty list of class names")
        beta = data.get("beta", 1.0)
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
            raise DataError(f"{source}: 'beta' must be a positive number")
        areas = ImageAreas.from_dict(data["per_image"], classes, source)
        try:
            return cls(data["task"], areas, float(beta), int(data.get("ignore_index", IGNORE_INDEX)))
        except ValueError as err:
            raise DataError(f"{source}: {err}") from None

    def summary_lines(self) -> list[str]:
        """Headline metrics in percent (as mmseg prints them), with intervals when computed."""
        task = "segmentation" if self.task == SEGMENTATION else "change detection"
        lines = [f"{task}: {len(self.areas)} images, {len(self.areas.class_names)} classes "
                 "(areas summed over all images, ignore index excluded)"]
        if self.intervals is None:
            lines.append("  ".join(f"{name}: {_percent(v).strip()}" for name, v in self.metrics.items()))
            return lines
        b = self.intervals
        lines.append(f"{b.confidence:.0%} intervals: percentile bootstrap over images, {b.resamples} resamples, "
                     f"seed {b.seed}")
        width = max(len(name) for name in b.metrics)
        lines += [f"{name:<{width}}  {_percent_interval(i)}" for name, i in b.metrics.items()]
        return lines

    def class_table_lines(self) -> list[str]:
        """One row per class: IoU, Acc, Fscore, Precision, Recall in percent (and the IoU interval)."""
        width = max(5, *(len(c) for c in self.areas.class_names))
        names = ("IoU", "Acc", "Fscore", "Precision", "Recall")
        header = f"{'class':<{width}}  " + "  ".join(f"{n:>9}" for n in names)
        if self.intervals is not None:
            header += f"  {'IoU ' + format(self.intervals.confidence, '.0%') + ' interval':>20}"
        lines = [header, "-" * len(header)]
        for c, row in self.per_class.items():
            line = f"{c:<{width}}  " + "  ".join(f"{_percent(row[n]):>9}" for n in names)
            if self.intervals is not None:
                i = self.intervals.per_class[c]["IoU"]
                line += f"  {'' if not np.isfinite(i.low) else f'[{100 * i.low:.2f}, {100 * i.high:.2f}]':>20}"
            lines.append(line)
        return lines


def load_evaluation(path: str | Path) -> DenseEvaluation:
    """An evaluation saved as ``DenseEvaluation.to_dict`` JSON (``vitp.files.write_json``)."""
    path = Path(path)
    return DenseEvaluation.from_dict(read_json(path, DataError), str(path))


# ------------------------------------------------------------------------------------------------
# Paired comparison of two runs


@dataclass
class DenseComparison:
    """a - b on the images both evaluated, with paired-bootstrap intervals of the differences."""

    task: str
    name_a: str
    name_b: str
    num_images: int
    values_a: dict[str, float]
    values_b: dict[str, float]
    differences: dict[str, Interval]
    class_differences: dict[str, Interval]  # class -> IoU difference
    resamples: int
    seed: int
    confidence: float = CONFIDENCE

    def winner(self, difference: Interval) -> str:
        return {AHEAD: f"{self.name_a} ahead", BEHIND: f"{self.name_b} ahead"}.get(difference.verdict, NO_DIFFERENCE)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "a": self.name_a,
            "b": self.name_b,
            "num_images": self.num_images,
            "resamples": self.resamples,
            "seed": self.seed,
            "confidence": self.confidence,
            "values_a": {k: _finite_or_none(v) for k, v in self.values_a.items()},
            "values_b": {k: _finite_or_none(v) for k, v in self.values_b.items()},
            "differences": {k: _interval_dict(i) for k, i in self.differences.items()},
            "verdicts": {k: i.verdict for k, i in self.differences.items()},
            "class_iou_differences": {c: _interval_dict(i) for c, i in self.class_differences.items()},
        }

    def lines(self) -> list[str]:
        width_a, width_b = max(8, len(self.name_a)), max(8, len(self.name_b))
        width = max(6, *(len(n) for n in self.differences))
        header = (f"{'metric':<{width}}  {self.name_a:>{width_a}}  {self.name_b:>{width_b}}  "
                  f"{'difference [' + format(self.confidence, '.0%') + ' interval]':<30}  verdict")
        lines = [f"paired bootstrap: {self.name_a} - {self.name_b} on {self.num_images} shared images, "
                 f"{self.resamples} resamples, seed {self.seed} (values in percent)", header, "-" * len(header)]
        for name, diff in self.differences.items():
            lines.append(f"{name:<{width}}  {_percent(self.values_a[name]):>{width_a}}  "
                         f"{_percent(self.values_b[name]):>{width_b}}  {_percent_interval(diff):<30}  "
                         f"{self.winner(diff) if np.isfinite(diff.low) else 'undefined'}")
        ahead = [c for c, i in self.class_differences.items() if np.isfinite(i.low) and i.verdict == BEHIND]
        if ahead:
            lines.append(f"{self.name_b} has the higher IoU (interval excludes 0) on: " + ", ".join(ahead))
        lines.append("a verdict names a run only where the interval of the difference excludes 0")
        return lines


def _paired(a: ImageAreas, b: ImageAreas, name_a: str, name_b: str) -> tuple[ImageAreas, ImageAreas]:
    """``a`` and ``b`` on the same images in the same order; refuses different image sets, classes or
    ground truth (the labelled areas of an image must agree)."""
    if a.class_names != b.class_names:
        raise DataError(f"{name_a} and {name_b} have different classes ({', '.join(a.class_names)} vs "
                        f"{', '.join(b.class_names)})")
    only_a, only_b = np.setdiff1d(a.names, b.names), np.setdiff1d(b.names, a.names)
    if len(only_a) or len(only_b):
        examples = "; ".join(f"only in {n}: {len(o)} (e.g. {o[0]})" for o, n in ((only_a, name_a), (only_b, name_b)) if len(o))
        raise DataError(f"{name_a} and {name_b} did not evaluate the same images ({len(a)} and {len(b)}; {examples}): "
                        "a paired comparison needs both runs on the same images")
    a, b = a.select(np.argsort(a.names)), b.select(np.argsort(b.names))
    differ = np.flatnonzero((a.labelled != b.labelled).any(axis=1))
    if len(differ):
        raise DataError(f"{name_a} and {name_b} were scored against different labels on {len(differ)} images (e.g. "
                        f"{a.names[differ[0]]}: labelled pixels per class differ): compare runs on the same ground truth")
    return a, b


def paired_comparison(
    a: DenseEvaluation, b: DenseEvaluation, resamples: int, seed: int = 0, name_a: str = "a", name_b: str = "b",
    confidence: float = CONFIDENCE,
) -> DenseComparison:
    """Paired-bootstrap intervals of a - b for every headline metric and every class's IoU."""
    if a.task != b.task:
        raise DataError(f"{name_a} is {a.task} and {name_b} is {b.task}: compare runs of one task")
    if a.beta != b.beta:
        raise DataError(f"{name_a} and {name_b} use different F-score betas ({a.beta} and {b.beta})")
    areas_a, areas_b = _paired(a.areas, b.areas, name_a, name_b)
    _check_bootstrap_arguments(resamples, confidence, len(areas_a))
    num_classes = len(areas_a.class_names)
    values_a = summary_scores(a.task, *areas_a.totals(), a.beta)
    values_b = summary_scores(a.task, *areas_b.totals(), a.beta)
    iou_a = class_scores(*areas_a.totals(), a.beta)["IoU"]
    iou_b = class_scores(*areas_b.totals(), a.beta)["IoU"]
    both = np.concatenate([areas_a.stacked, areas_b.stacked], axis=1)
    differences: dict[str, list[np.ndarray]] = {name: [] for name in values_a}
    class_differences = []
    for sums in _resampled_sums(both, resamples, seed):
        sums_a, sums_b = sums[:, : 3 * num_classes], sums[:, 3 * num_classes :]
        scores_a = summary_scores(a.task, *_split(sums_a, num_classes), a.beta)
        scores_b = summary_scores(a.task, *_split(sums_b, num_classes), a.beta)
        for name in differences:
            differences[name].append(scores_a[name] - scores_b[name])
        class_differences.append(class_scores(*_split(sums_a, num_classes), a.beta)["IoU"]
                                 - class_scores(*_split(sums_b, num_classes), a.beta)["IoU"])
    class_samples = np.concatenate(class_differences)
    return DenseComparison(
        task=a.task,
        name_a=name_a,
        name_b=name_b,
        num_images=len(areas_a),
        values_a={k: float(v) for k, v in values_a.items()},
        values_b={k: float(v) for k, v in values_b.items()},
        differences={name: _interval(float(values_a[name] - values_b[name]), np.concatenate(chunks), confidence)
                     for name, chunks in differences.items()},
        class_differences={c: _interval(float(iou_a[i] - iou_b[i]), class_samples[:, i], confidence)
                           for i, c in enumerate(areas_a.class_names)},
        resamples=resamples,
        seed=seed,
        confidence=confidence,
    )
