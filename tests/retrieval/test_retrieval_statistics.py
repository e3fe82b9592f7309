"""Class-balanced means, bootstrap intervals and paired comparisons against a plain-loop bootstrap
written here from the definition (module docstring of vitp.retrieval.statistics), and against
the normal approximation of a proportion's sampling spread."""

import json

import numpy as np
import pytest

from retrieval_testing import naive_bootstrap
from vitp.errors import RetrievalError
from vitp.retrieval import statistics
from vitp.retrieval.statistics import QueryResults, bootstrap, compare, load_query_results


def random_results(n=60, seed=1, shift=0.0):
    rng = np.random.default_rng(seed)
    classes = rng.choice(["water", "beach", "marsh", "farmland"], n, p=[0.55, 0.1, 0.15, 0.2])
    classes[:4] = ["water", "beach", "marsh", "farmland"]  # every class present
    return QueryResults(
        [f"/q/{c}/{i}.png" for i, c in enumerate(classes)], classes,
        {"Top-1": (rng.random(n) < 0.8 + shift).astype(float), "mAP": np.clip(rng.random(n) + shift, 0, 1)},
    )


@pytest.mark.parametrize("chunk_elements", [1, 50, statistics._CHUNK_ELEMENTS])
def test_bootstrap_equals_the_plain_loop(monkeypatch, chunk_elements):
    monkeypatch.setattr(statistics, "_CHUNK_ELEMENTS", chunk_elements)  # chunking must not change the draws
    results = random_results()
    fast = bootstrap(results, resamples=200, seed=7)
    slow = naive_bootstrap({m: list(v) for m, v in results.metrics.items()}, list(results.classes), 200, 7)
    for m in results.metrics:
        assert [fast.micro[m].low, fast.micro[m].high] == pytest.approx(slow["micro"][m], rel=1e-12, abs=1e-12)
        assert [fast.class_balanced[m].low, fast.class_balanced[m].high] == pytest.approx(
            slow["class_balanced"][m], rel=1e-12, abs=1e-12)
        for c, row in fast.per_class.items():
            assert [row[m].low, row[m].high] == pytest.approx(slow["per_class"][c][m], rel=1e-12, abs=1e-12)


def test_point_values_micro_class_balanced_and_per_class_by_hand():
    results = QueryResults(["a", "b", "c", "d"], ["x", "x", "x", "y"], {"Top-1": [1, 1, 0, 0]})
    b = bootstrap(results, resamples=50, seed=0)
    assert b.micro["Top-1"].value == pytest.approx(0.5)
    assert b.class_balanced["Top-1"].value == pytest.approx((2 / 3 + 0) / 2)
    assert b.per_class["x"]["Top-1"].value == pytest.approx(2 / 3)
    # class y has one query: every stratified resample is that query, so its interval is a point
    assert (b.per_class["y"]["Top-1"].low, b.per_class["y"]["Top-1"].high) == (0.0, 0.0)
    assert b.queries_per_class == {"x": 3, "y": 1}


def test_interval_width_matches_the_normal_approximation_of_a_proportion():
    # 400 queries, 320 hits: the sampling spread of the mean is sqrt(p (1 - p) / n) = 0.02,
    # so a 95 % interval is about +-1.96 * 0.02 wide.
    hits = np.zeros(400)
    hits[:320] = 1
    results = QueryResults([str(i) for i in range(400)], ["c"] * 400, {"Top-1": hits})
    interval = bootstrap(results, resamples=4000, seed=3).micro["Top-1"]
    assert interval.low < 0.8 < interval.high
    assert interval.high - interval.low == pytest.approx(2 * 1.96 * 0.02, rel=0.1)


def test_same_seed_same_intervals_other_seed_others():
    results = random_results()
    first, again, other = (bootstrap(results, 100, seed) for seed in (5, 5, 6))
    assert first.micro == again.micro and first.class_balanced == again.class_balanced
    assert first.micro != other.micro


def test_paired_comparison_equals_the_plain_loop_on_differences_matched_by_path():
    a, b = random_results(seed=1), random_results(seed=2)
    b = QueryResults(a.image_paths, a.classes, b.metrics)
    shuffled = np.random.default_rng(0).permutation(len(b))  # b's queries in another order: paired by path
    b_shuffled = QueryResults(b.image_paths[shuffled], b.classes[shuffled], {m: v[shuffled] for m, v in b.metrics.items()})
    comparison = compare(a, b_shuffled, resamples=150, seed=4, name_a="vitp", name_b="histogram")
    order = np.argsort(a.image_paths)  # compare works in path order
    differences = {m: list(a.metrics[m][order] - b.metrics[m][order]) for m in a.metrics}
    slow = naive_bootstrap(differences, list(a.classes[order]), 150, 4)
    for m in a.metrics:
        d = comparison.differences
        assert d.micro[m].value == pytest.approx(a.metrics[m].mean() - b.metrics[m].mean())
        assert [d.micro[m].low, d.micro[m].high] == pytest.approx(slow["micro"][m], rel=1e-12, abs=1e-12)
        assert [d.class_balanced[m].low, d.class_balanced[m].high] == pytest.approx(
            slow["class_balanced"][m], rel=1e-12, abs=1e-12)
    assert comparison.a["micro"]["mAP"] == pytest.approx(a.metrics["mAP"].mean())


def test_verdict_follows_the_interval():
    a = random_results(n=300, seed=1)
    tie = compare(a, a, resamples=200)  # identical: every difference is 0
    assert all(i.verdict == statistics.NO_DIFFERENCE for i in tie.differences.micro.values())
    # One query better out of many: a tie, not a lead.
    one_better = QueryResults(a.image_paths, a.classes, {"Top-1": np.r_[1.0, np.zeros(len(a) - 1)]})
    nothing = QueryResults(a.image_paths, a.classes, {"Top-1": np.zeros(len(a))})
    assert compare(one_better, nothing, 500).differences.micro["Top-1"].verdict == statistics.NO_DIFFERENCE
    better = QueryResults(a.image_paths, a.classes, {"Top-1": np.ones(len(a))})
    half = QueryResults(a.image_paths, a.classes, {"Top-1": (np.arange(len(a)) % 2).astype(float)})
    comparison = compare(better, half, 500, name_a="vitp", name_b="random")
    assert comparison.differences.micro["Top-1"].verdict == statistics.AHEAD
    assert compare(half, better, 500).differences.class_balanced["Top-1"].verdict == statistics.BEHIND
    assert any("vitp ahead" in line for line in comparison.lines())


def test_classes_where_the_baseline_wins_are_named():
    paths, classes = ["1", "2", "3", "4"], ["beach", "beach", "water", "water"]
    a = QueryResults(paths, classes, {"mAP": [0.2, 0.4, 1.0, 1.0]})
    b = QueryResults(paths, classes, {"mAP": [0.9, 0.9, 0.5, 0.5]})
    comparison = compare(a, b, 100, name_a="vitp", name_b="histogram")
    assert comparison.classes_where_b_wins("mAP") == ["beach"]
    assert any(line.startswith("histogram is higher on mAP in: beach (0.900 vs 0.300") for line in comparison.lines())


def test_comparison_refuses_different_queries_classes_and_duplicates():
    a = random_results(n=20)
    fewer = QueryResults(a.image_paths[:-1], a.classes[:-1], {m: v[:-1] for m, v in a.metrics.items()})
    with pytest.raises(RetrievalError, match="did not evaluate the same queries.*only in a: 1"):
        compare(a, fewer, 10)
    relabelled = QueryResults(a.image_paths, np.where(a.classes == "water", "sea", a.classes), a.metrics)
    with pytest.raises(RetrievalError, match="different classes.*'water' vs 'sea'"):
        compare(a, relabelled, 10)
    doubled = QueryResults(np.r_[a.image_paths[:-1], a.image_paths[:1]], a.classes, a.metrics)
    with pytest.raises(RetrievalError, match="appears 2 times"):
        compare(doubled, a, 10)
    other_metric = QueryResults(a.image_paths, a.classes, {"mAP@5": a.metrics["mAP"]})
    with pytest.raises(RetrievalError, match="no metric in common"):
        compare(QueryResults(a.image_paths, a.classes, {"Top-1": a.metrics["Top-1"]}), other_metric, 10)


def test_bad_arguments_name_the_parameter():
    results = random_results()
    with pytest.raises(ValueError, match="resamples"):
        bootstrap(results, 0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap(results, 10, confidence=1.5)
    with pytest.raises(ValueError, match="one value per query"):
        QueryResults(["a"], ["x", "y"], {"Top-1": [1]})


def test_load_query_results_reports_damaged_files(tmp_path):
    results = random_results(n=10)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"top_k_accuracy": {}, "per_query": results.to_dict()}))
    loaded = load_query_results(good)
    assert loaded.image_paths.tolist() == results.image_paths.tolist()
    np.testing.assert_array_equal(loaded.metrics["mAP"], results.metrics["mAP"])
    cases = {
        "missing.json": (None, "no such file"),
        "broken.json": ("{", "invalid JSON at line 1"),
        "other.json": (json.dumps({"hello": 1}), "not an evaluation"),
        "old.json": (json.dumps({"top_k_accuracy": {}}), "no per-query results"),
        "bad_values.json": (json.dumps({"top_k_accuracy": {}, "per_query": {
            "image_paths": ["a"], "classes": ["x"], "metrics": {"mAP": [1.5]}}}), "outside \\[0, 1\\]"),
        "ragged.json": (json.dumps({"top_k_accuracy": {}, "per_query": {
            "image_paths": ["a", "b"], "classes": ["x"], "metrics": {"mAP": [1]}}}), "one value per query"),
        "strings.json": (json.dumps({"top_k_accuracy": {}, "per_query": {
            "image_paths": ["a"], "classes": ["x"], "metrics": {"mAP": ["1"]}}}), "list of numbers"),
    }
    for name, (text, message) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(RetrievalError, match=message):
            load_query_results(tmp_path / name)


def test_an_interval_bound_that_is_not_zero_never_prints_as_zero():
    assert statistics.Interval(0.03, 0.0003, 0.064).format(3, signed=True) == "+0.030 [+0.0003, +0.064]"
    assert statistics.Interval(0.0, 0.0, 0.5).format(3) == "0.000 [0.000, 0.500]"
    assert statistics.Interval(-0.2, -0.25, -0.15).format(2) == "-0.20 [-0.25, -0.15]"
