"""Downstream metrics against an independent confusion-matrix computation (a plain loop over pixels),
the NaN rule for absent classes, ignore 255, bootstrap and paired comparison restated one resample
at a time, and the saved JSON form."""

import json
import math

import numpy as np
import pytest
import torch

from downstream_testing import SIXTEEN_CLASSES
from vitp.downstream.metrics import (
    CHANGE_DETECTION,
    SEGMENTATION,
    AreaCounter,
    DenseEvaluation,
    ImageAreas,
    image_areas,
    load_evaluation,
    paired_comparison,
)
from vitp.errors import DataError
from vitp.files import write_json


def confusion_matrix(prediction, label, num_classes, ignore=255):
    """Rows: label, columns: prediction; one pixel at a time."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, l in zip(np.asarray(prediction).ravel().tolist(), np.asarray(label).ravel().tolist()):
        if l != ignore:
            matrix[l, p] += 1
    return matrix


def metrics_from_matrix(matrix, beta=1.0):
    """mmseg's definitions from a summed confusion matrix, class by class, NaN where 0/0."""
    num_classes = len(matrix)
    per_class = {k: [] for k in ("IoU", "Acc", "Fscore", "Dice", "Precision")}

    def ratio(a, b):
        return math.nan if b == 0 else a / b

    for c in range(num_classes):
        tp = matrix[c, c]
        fn = matrix[c, :].sum() - tp  # labelled c, predicted otherwise
        fp = matrix[:, c].sum() - tp  # predicted c, labelled otherwise
        per_class["IoU"].append(ratio(tp, tp + fp + fn))
        per_class["Acc"].append(ratio(tp, tp + fn))
        per_class["Precision"].append(ratio(tp, tp + fp))
        per_class["Dice"].append(ratio(2 * tp, 2 * tp + fp + fn))
        per_class["Fscore"].append(ratio((1 + beta**2) * tp, (1 + beta**2) * tp + beta**2 * fn + fp))

    def nanmean(values):
        kept = [v for v in values if not math.isnan(v)]
        return sum(kept) / len(kept) if kept else math.nan

    summary = {"aAcc": np.trace(matrix) / matrix.sum(), **{f"m{k}": nanmean(v) for k, v in per_class.items()}}
    return summary, per_class


def random_maps(rng, num_images, num_classes, shape=(25, 33), absent=(), never_predicted=()):
    """Labels with some 255s and with classes in ``absent`` nowhere; predictions right 60 % of the time,
    never predicting the classes in ``absent`` or ``never_predicted``."""
    allowed_labels = [c for c in range(num_classes) if c not in absent]
    allowed_predictions = [c for c in allowed_labels if c not in never_predicted]
    pairs = []
    for _ in range(num_images):
        label = rng.choice(allowed_labels, shape).astype(np.uint8)
        prediction = np.where(rng.random(shape) < 0.6, label, rng.choice(allowed_predictions, shape)).astype(np.uint8)
        prediction = np.where(np.isin(prediction, never_predicted), allowed_predictions[0], prediction).astype(np.uint8)
        label[rng.random(shape) < 0.1] = 255
        pairs.append((prediction, label))
    return pairs


def evaluate(pairs, class_names, task=SEGMENTATION, beta=1.0):
    counter = AreaCounter(class_names)
    for i, (prediction, label) in enumerate(pairs):
        counter.add(f"图 {i}.png", prediction, label)
    return DenseEvaluation(task, counter.areas(), beta)


def assert_close(actual, expected):
    assert (math.isnan(actual) and math.isnan(expected)) or actual == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_segmentation_metrics_equal_an_independent_confusion_matrix(beta):
    rng = np.random.default_rng(0)
    # 16 classes: 13 absent from labels and predictions (NaN everywhere), 5 labelled but never predicted
    pairs = random_maps(rng, 6, 16, absent=(13,), never_predicted=(5,))
    pairs[0][0][0, :3] = 14  # 14 predicted in pixels of image 0 ...
    for prediction, label in pairs:
        label[label == 14] = 0  # ... and never labelled: IoU 0, Acc NaN
    evaluation = evaluate(pairs, SIXTEEN_CLASSES, beta=beta)
    matrix = sum(confusion_matrix(p, l, 16) for p, l in pairs)
    summary, per_class = metrics_from_matrix(matrix, beta)
    for name, value in summary.items():
        assert_close(evaluation.metrics[name], value)
    for c, name in enumerate(SIXTEEN_CLASSES):
        for metric in per_class:
            assert_close(evaluation.per_class[name][metric], per_class[metric][c])
    iou = [evaluation.per_class[n]["IoU"] for n in SIXTEEN_CLASSES]
    assert math.isnan(iou[13]) and iou[14] == 0 and iou[5] == 0
    assert math.isnan(evaluation.per_class[SIXTEEN_CLASSES[14]]["Acc"])
    assert evaluation.metrics["mIoU"] == pytest.approx(np.mean([v for i, v in enumerate(iou) if i != 13]))


def test_ignored_pixels_count_nowhere_whatever_is_predicted_there():
    rng = np.random.default_rng(1)
    prediction, label = random_maps(rng, 1, 16)[0]
    other = prediction.copy()
    other[label == 255] = rng.integers(0, 16, int((label == 255).sum()))
    assert np.array_equal(image_areas(prediction, label, 16), image_areas(other, label, 16))
    assert image_areas(prediction, label, 16)[2].sum() == (label != 255).sum()


def test_areas_are_summed_over_images_not_averaged():
    label = [np.zeros((10, 10), np.uint8), np.zeros((2, 2), np.uint8)]
    label[0][:, 5:] = 1
    prediction = [label[0].copy(), np.ones((2, 2), np.uint8)]  # a big right image and a small wrong one
    evaluation = evaluate(list(zip(prediction, label)), ["a", "b"])
    summary, _ = metrics_from_matrix(sum(confusion_matrix(p, l, 2) for p, l in zip(prediction, label)))
    assert evaluation.metrics["mIoU"] == pytest.approx(summary["mIoU"])
    per_image = np.nanmean([metrics_from_matrix(confusion_matrix(p, l, 2))[0]["mIoU"] for p, l in zip(prediction, label)])
    assert abs(evaluation.metrics["mIoU"] - per_image) > 0.1


def test_change_detection_reports_the_changed_class():
    rng = np.random.default_rng(2)
    pairs = [(rng.integers(0, 2, (40, 40)), rng.integers(0, 2, (40, 40))) for _ in range(3)]
    pairs[1][1][:4] = 255
    evaluation = evaluate(pairs, ["unchanged", "changed"], task=CHANGE_DETECTION)
    tp = fp = fn = tn = 0
    for prediction, label in pairs:
        for p, l in zip(prediction.ravel().tolist(), label.ravel().tolist()):
            if l == 255:
                continue
            tp += p == 1 and l == 1
            fp += p == 1 and l == 0
            fn += p == 0 and l == 1
            tn += p == 0 and l == 0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    m = evaluation.metrics
    assert m["Precision"] == pytest.approx(precision) and m["Recall"] == pytest.approx(recall)
    assert m["F1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert m["IoU"] == pytest.approx(tp / (tp + fp + fn)) and m["aAcc"] == pytest.approx((tp + tn) / (tp + fp + fn + tn))
    iou_unchanged = tn / (tn + fp + fn)
    assert m["mIoU"] == pytest.approx((iou_unchanged + tp / (tp + fp + fn)) / 2)


def test_torch_tensors_give_the_same_areas_and_bad_values_are_refused():
    rng = np.random.default_rng(3)
    prediction, label = random_maps(rng, 1, 16)[0]
    assert np.array_equal(image_areas(torch.from_numpy(prediction), torch.from_numpy(label), 16),
                          image_areas(prediction, label, 16))
    with pytest.raises(ValueError, match="label holds class 16, outside 0-15"):
        image_areas(prediction, np.full_like(label, 16), 16)
    with pytest.raises(ValueError, match="prediction holds class 20"):
        image_areas(torch.full(label.shape, 20), torch.from_numpy(label), 16)
    with pytest.raises(ValueError, match="one shape"):
        image_areas(prediction[:, :-1], label, 16)


def test_a_class_hit_never_counts_zero_in_mfscore():
    """mmseg's per-class F-score is 0/0 = NaN for a class predicted and labelled but never hit; the
    closed form gives it 0, so mFscore does not improve by missing a class entirely."""
    label = np.array([[0, 0, 1, 1]], np.uint8)
    prediction = np.array([[1, 1, 0, 0]], np.uint8)
    evaluation = evaluate([(prediction, label)], ["a", "b"])
    assert evaluation.per_class["a"]["Fscore"] == 0 and evaluation.metrics["mFscore"] == 0


def naive_intervals(areas, resamples, seed, metric, confidence=0.95):
    """One resample at a time: slot j takes image floor(u_j * n); the metric from the summed matrix."""
    rng = np.random.default_rng(seed)
    n = len(areas)
    values = []
    for _ in range(resamples):
        u = rng.random(n)
        picked = [min(int(u[j] * n), n - 1) for j in range(n)]
        totals = [sum(getattr(areas, k)[i] for i in picked) for k in ("intersection", "predicted", "labelled")]
        values.append(metric(*totals))
    values = np.array([v for v in values if not math.isnan(v)])
    return np.quantile(values, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])


def miou_of(intersection, predicted, labelled):
    union = predicted + labelled - intersection
    ious = [i / u for i, u in zip(intersection, union) if u > 0]
    return sum(ious) / len(ious)


def test_bootstrap_resamples_images_and_resums_their_areas():
    rng = np.random.default_rng(4)
    evaluation = evaluate(random_maps(rng, 12, 16, absent=(13,)), SIXTEEN_CLASSES)
    intervals = evaluation.add_intervals(resamples=300, seed=5)
    low, high = naive_intervals(evaluation.areas, 300, 5, miou_of)
    assert intervals.metrics["mIoU"].low == pytest.approx(low) and intervals.metrics["mIoU"].high == pytest.approx(high)
    assert intervals.metrics["mIoU"].low < evaluation.metrics["mIoU"] < intervals.metrics["mIoU"].high
    class_low, class_high = naive_intervals(evaluation.areas, 300, 5, lambda i, p, l: i[3] / (p[3] + l[3] - i[3]))
    assert intervals.per_class[SIXTEEN_CLASSES[3]]["IoU"].low == pytest.approx(class_low)
    assert intervals.per_class[SIXTEEN_CLASSES[3]]["IoU"].high == pytest.approx(class_high)
    absent = intervals.per_class[SIXTEEN_CLASSES[13]]["IoU"]
    assert math.isnan(absent.value) and math.isnan(absent.low)
    lines = evaluation.summary_lines() + evaluation.class_table_lines()
    assert any(line.startswith("mIoU") and "[" in line for line in lines)
    assert any(line.startswith("建筑物") for line in lines)


def test_paired_comparison_matches_images_by_name_and_resamples_both_alike():
    rng = np.random.default_rng(6)
    pairs = random_maps(rng, 10, 16)
    better = [(np.where(rng.random(l.shape) < 0.5, np.where(l == 255, p, l), p).astype(np.uint8), l) for p, l in pairs]
    a, b = evaluate(better, SIXTEEN_CLASSES), evaluate(pairs, SIXTEEN_CLASSES)
    b.areas = b.areas.select(np.arange(len(pairs))[::-1])  # another order: pairing is by name
    comparison = paired_comparison(a, b, resamples=200, seed=9, name_a="tuned", name_b="baseline")

    both = ImageAreas(a.areas.names, a.areas.intersection, a.areas.predicted, a.areas.labelled, a.areas.class_names)
    b_sorted = b.areas.select(np.argsort(b.areas.names))
    stacked = ImageAreas(both.names, np.concatenate([both.intersection, b_sorted.intersection], 1),
                         np.concatenate([both.predicted, b_sorted.predicted], 1),
                         np.concatenate([both.labelled, b_sorted.labelled], 1), SIXTEEN_CLASSES * 2)
    low, high = naive_intervals(stacked, 200, 9, lambda i, p, l: miou_of(i[:16], p[:16], l[:16]) - miou_of(i[16:], p[16:], l[16:]))
    diff = comparison.differences["mIoU"]
    assert diff.value == pytest.approx(a.metrics["mIoU"] - b.metrics["mIoU"])
    assert (diff.low, diff.high) == (pytest.approx(low), pytest.approx(high))
    assert diff.verdict == "ahead" and comparison.to_dict()["verdicts"]["mIoU"] == "ahead"
    assert any("tuned ahead" in line for line in comparison.lines())
    same = paired_comparison(a, a, resamples=50)
    assert same.differences["mIoU"].value == 0 and same.differences["mIoU"].verdict == "no measurable difference"


def test_paired_comparison_refuses_different_images_or_ground_truth():
    rng = np.random.default_rng(7)
    pairs = random_maps(rng, 4, 3)
    a = evaluate(pairs, ["x", "y", "z"])
    fewer = evaluate(pairs[:3], ["x", "y", "z"])
    with pytest.raises(DataError, match=r"did not evaluate the same images \(4 and 3; only in a: 1 \(e.g. 图 3.png\)"):
        paired_comparison(a, fewer, resamples=10)
    relabelled = [(p, np.where(l == 0, 1, l).astype(np.uint8)) for p, l in pairs]
    with pytest.raises(DataError, match="different labels on 4 images"):
        paired_comparison(a, evaluate(relabelled, ["x", "y", "z"]), resamples=10)
    with pytest.raises(DataError, match="compare runs of one task"):
        paired_comparison(a, DenseEvaluation(CHANGE_DETECTION, evaluate(random_maps(rng, 2, 2), ["u", "c"]).areas), 10)


def test_saved_evaluation_reads_back_and_compares_later(tmp_path):
    rng = np.random.default_rng(8)
    evaluation = evaluate(random_maps(rng, 5, 16, absent=(13,)), SIXTEEN_CLASSES)
    evaluation.add_intervals(100)
    path = tmp_path / "评估" / "run.json"
    write_json(evaluation.to_dict(), path)
    data = json.loads(path.read_text(encoding="utf-8"))  # strict JSON: NaN is stored as null
    assert data["per_class"][SIXTEEN_CLASSES[13]]["IoU"] is None and data["metrics"]["mIoU"] is not None
    loaded = load_evaluation(path)
    assert loaded.metrics == evaluation.metrics or all(
        (math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(loaded.metrics.values(), evaluation.metrics.values()))
    assert list(loaded.areas.names) == list(evaluation.areas.names)
    assert paired_comparison(loaded, evaluation, resamples=20).differences["mIoU"].value == 0


@pytest.mark.parametrize("damage, expected", [
    (lambda d: d.pop("per_image"), "not a segmentation or change-detection evaluation"),
    (lambda d: d["per_image"]["intersection"].pop(), "must hold 5 rows of 16 whole numbers"),
    (lambda d: d["per_image"]["names"].__setitem__(1, d["per_image"]["names"][0]), "image names must be unique"),
    (lambda d: d.__setitem__("classes", []), "'classes' must be a non-empty list"),
])
def test_damaged_evaluation_file_is_named(tmp_path, damage, expected):
    data = evaluate(random_maps(np.random.default_rng(9), 5, 16), SIXTEEN_CLASSES).to_dict()
    damage(data)
    path = tmp_path / "damaged.json"
    write_json(data, path)
    with pytest.raises(DataError, match=expected) as caught:
        load_evaluation(path)
    assert str(path) in str(caught.value)


def test_bootstrap_at_users_sizes():
    """2000 images x 16 classes x 1000 resamples (its speed: benchmarks/downstream.py --parts evaluation)."""
    rng = np.random.default_rng(10)
    labelled = rng.integers(0, 50_000, (2000, 16))
    predicted = rng.integers(0, 50_000, (2000, 16))
    intersection = np.minimum(labelled, predicted) // 2
    areas = ImageAreas([f"{i}.png" for i in range(2000)], intersection, predicted, labelled, SIXTEEN_CLASSES)
    intervals = DenseEvaluation(SEGMENTATION, areas).add_intervals(1000)
    for name, interval in intervals.metrics.items():
        assert interval.low <= interval.value <= interval.high, name
    assert len(intervals.per_class) == 16
