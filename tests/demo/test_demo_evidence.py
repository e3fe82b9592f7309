"""The demo's verdict follows the paired intervals; the ablation variants are upstream's settings."""

import numpy as np
import pytest

from vitp.demo import ablation
from vitp.demo.evidence import baseline_wins_sentence, headline, verdict_sentence
from vitp.model.tmaug import TMAugConfig
from vitp.retrieval.statistics import QueryResults, compare

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
