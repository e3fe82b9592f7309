"""The demo's verdict follows the paired intervals; its per-class tables and sentences name each
class's own values at many classes; the ablation variants are upstream's settings."""

from types import SimpleNamespace

import numpy as np
import pytest

from vitp.demo import ablation
from vitp.demo.evidence import MethodResult, baseline_wins_sentence, compare_methods, headline, verdict_sentence
from vitp.demo.report import class_difference_rows, class_rows
from vitp.model.tmaug import TMAugConfig
from vitp.retrieval.evaluate import evaluate_retrieval
from vitp.retrieval.feature_file import FeatureSet
from vitp.retrieval.statistics import QueryResults, compare
from vitp_testing import plain_class_means

CLASSES = ["water"] * 200 + ["beach"] * 40 + ["farmland"] * 40
PATHS = [f"/q/{c}/{i}.png" for i, c in enumerate(CLASSES)]


def results(top1, ap):
    return QueryResults(PATHS, CLASSES, {"Top-1": np.asarray(top1, float), "mAP": np.asarray(ap, float)})


def vitp_random_histogram():
    rng = np.random.default_rng(0)
    n = len(CLASSES)
    beach = np.array([c == "beach" for c in CLASSES])
    vitp = results(np.ones(n), np.full(n, 0.9) - 0.2 * beach)
    random = results(rng.random(n) < 0.5, np.full(n, 0.5))  # far behind everywhere
    # The histogram: the same as ViTP except a little better on a few beach tiles: a tie overall.
    histogram_ap = vitp.metrics["mAP"].copy()
    histogram_ap[np.flatnonzero(beach)[:3]] += 0.05
    histogram = results(np.ones(n), histogram_ap)
    return vitp, random, histogram


def test_headline_says_ahead_only_where_the_interval_excludes_zero():
    vitp, random, histogram = vitp_random_histogram()
    comparisons = {"random": compare(vitp, random, 500, name_a="vitp", name_b="random"),
                   "histogram": compare(vitp, histogram, 500, name_a="vitp", name_b="histogram")}
    titles = {"random": "random init", "histogram": "colour histogram"}
    text = headline(comparisons, titles)
    assert text.startswith("Pretraining helped: on class-balanced mAP the pretrained ViT is ahead of the random init")
    assert "not measurably different from the colour histogram" in text
    assert verdict_sentence(comparisons["histogram"], "colour histogram") == (
        "Against the colour histogram: no measurable difference on micro Top-1, micro mAP, "
        "class-balanced Top-1, class-balanced mAP.")
    assert verdict_sentence(comparisons["random"], "random init") == (
        "Against the random init: ViTP ahead on micro Top-1, micro mAP, class-balanced Top-1, class-balanced mAP.")


def test_the_classes_where_a_baseline_wins_are_named_and_judged_by_their_interval():
    vitp, random, histogram = vitp_random_histogram()
    sentence = baseline_wins_sentence(compare(vitp, histogram, 300, name_a="vitp", name_b="histogram"), "histogram")
    assert sentence == "Classes where the histogram scores higher than ViTP: beach (mAP within noise)."
    # a baseline better on every beach tile: measurably
    better_beach = results(np.ones(len(CLASSES)), np.where(np.array(CLASSES) == "beach", 1.0, 0.5))
    sentence = baseline_wins_sentence(compare(vitp, better_beach, 300), "histogram")
    assert sentence == "Classes where the histogram scores higher than ViTP: beach (mAP measurably)."
    tie = baseline_wins_sentence(compare(vitp, vitp, 100), "histogram")
    assert tie == "The histogram is not higher than ViTP in any class on Top-1 or mAP."


def test_pretraining_that_did_not_help_is_said_so():
    vitp, random, _ = vitp_random_histogram()
    comparisons = {"random": compare(random, vitp, 300), "histogram": compare(random, vitp, 300)}
    text = headline(comparisons, {"random": "random init", "histogram": "histogram"})
    assert text.startswith("Pretraining hurt") and "behind the random init" in text


def test_tmaug_ablation_uses_upstreams_tmaug_prob_meaning():
    variants = ablation.variants("tmaug")
    assert [v.label for v in variants] == ["off", "0.5", "0.75", "0.9"]
    assert variants[0].changes == {"tmaug_prob": None}
    # upstream's TMAug_prob P: a sample is augmented with probability 1 - P and loses a fraction P of its tokens
    for v in variants[1:]:
        p = v.changes["tmaug_prob"]
        config = TMAugConfig.from_upstream(p)
        assert (config.prob, config.ratio) == (pytest.approx(1 - p), p) and v.x == p
    assert {v.label: v.paper for v in variants} == {"off": 52.8, "0.5": None, "0.75": 54.6, "0.9": 54.3}
    assert [v.changes for v in ablation.variants("droppath")] == [{"drop_path_rate": 0.0}, {"drop_path_rate": 0.1}]
    with pytest.raises(ValueError, match="ablation must be one of tmaug, droppath"):
        ablation.variants("dropout")


# --------------------------------------------------------------------------------------------------
# Many classes, with names that sort differently as text and as numbers ("10" before "2") and unicode

MANY_CLASSES = ["1", "2", "3", "10", "11", "20", "100", "Z", "z", "cell", "hubble_deep_field", "é", "ä", "水田"]


def method_on_many_classes(method, seed):
    """An evaluated method: class-centred random vectors, 4 gallery and 5 query tiles a class (the
    same tile paths for every method, as the demo's methods share their tiles)."""
    centres = np.random.default_rng(100).normal(size=(len(MANY_CLASSES), 16))
    rng = np.random.default_rng(seed)
    settings = {"model_fingerprint": "sha256:test", "layer": 2, "pool": "mean", "image_size": 112}

    def tiles(split, per_class):
        labels = np.repeat(MANY_CLASSES, per_class)
        vectors = np.repeat(centres, per_class, axis=0) + rng.normal(0, 1.0, (len(labels), 16))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        paths = np.array([f"/demo/{split}/{label}/{i}.png" for i, label in enumerate(labels)])
        return FeatureSet(vectors.astype(np.float32), paths, labels, settings, split)

    gallery, queries = tiles("gallery", 4), tiles("query", 5)
    report = evaluate_retrieval(queries, gallery, top_k=[1, 3, 5], progress_bar=False, bootstrap_resamples=200, seed=0)
    return MethodResult(method, method, report, queries, gallery)


def test_per_class_tables_give_each_class_its_own_values_and_intervals():
    methods = {name: method_on_many_classes(name, seed) for name, seed in (("vitp", 1), ("random", 2), ("histogram", 3))}
    classes = methods["vitp"].queries.labels.tolist()
    means = {name: {metric: plain_class_means(values, classes) for metric, values in m.report.per_query.metrics.items()}
             for name, m in methods.items()}
    assert len({round(v, 6) for v in means["vitp"]["mAP"].values()}) > 5  # classes differ: a mix-up would show

    rows = class_rows(methods["vitp"])
    assert sorted(row[0] for row in rows) == sorted(MANY_CLASSES)
    for name, queries, top1, top3, top5, map_cell in rows:
        assert queries == classes.count(name)
        assert [top1, top3, top5] == [f"{means['vitp'][f'Top-{k}'][name]:.3f}" for k in (1, 3, 5)], name
        value, low, high = (float(x) for x in map_cell.replace("[", "").replace(",", "").replace("]", "").split())
        assert value == pytest.approx(means["vitp"]["mAP"][name], abs=5e-4), name
        assert low <= value <= high

    comparisons = {baseline: compare_methods(methods["vitp"], methods[baseline], seed=0) for baseline in ("random", "histogram")}
    results = SimpleNamespace(method=methods.__getitem__, comparisons=comparisons)
    for row in class_difference_rows(results):
        name, cells = row[0], row[2:]
        for cell, (baseline, metric) in zip(cells, [(b, m) for b in ("random", "histogram") for m in ("Top-1", "mAP")]):
            value, low, high = (float(x) for x in cell.replace("[", "").replace(",", "").replace("]", "").split())
            expected = means["vitp"][metric][name] - means[baseline][metric][name]
            assert value == pytest.approx(expected, abs=5e-4), (name, baseline, metric)
            assert low <= value <= high


def test_the_classes_where_a_baseline_wins_at_many_classes():
    classes = [name for name in MANY_CLASSES for _ in range(6)]
    paths = [f"/q/{name}/{i}.png" for i, name in enumerate(classes)]
    is_class = {name: np.array([c == name for c in classes]) for name in MANY_CLASSES}
    vitp_top1 = np.where(is_class["é"], 0.0, 1.0)
    vitp = QueryResults(paths, classes, {"Top-1": vitp_top1, "mAP": np.full(len(classes), 0.8)})
    baseline_map = np.where(is_class["10"], 0.9, 0.8)  # higher on every "10" tile: measurable
    baseline_map[np.flatnonzero(is_class["2"])[0]] += 0.05  # higher on one "2" tile: within noise
    baseline = QueryResults(paths, classes, {"Top-1": np.ones(len(classes)), "mAP": baseline_map})  # all of "é" found
    sentence = baseline_wins_sentence(compare(vitp, baseline, 500, name_a="vitp", name_b="histogram"), "histogram")
    assert sentence == ("Classes where the histogram scores higher than ViTP: é (Top-1 measurably); 10 (mAP measurably); "
                        "2 (mAP within noise).")
