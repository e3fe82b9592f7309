"""`evaluate_retrieval`: the seed's lines, leave-one-out, absent classes, query expansion."""

import json

import numpy as np
import pytest

from vitp.errors import RetrievalError
from vitp.retrieval.evaluate import evaluate_retrieval
from vitp.retrieval.feature_file import FeatureSet
from vitp.retrieval.index import RetrievalIndex
from vitp.retrieval.rerank import l2_normalise
from vitp_testing import parser_refusal

SETTINGS = {"model_fingerprint": "sha256:test", "layer": 2, "pool": "mean", "image_size": 112}


def feature_set(vectors, labels, prefix="g"):
    paths = np.array([f"/data/{prefix}/{label}/{i}.png" for i, label in enumerate(labels)])
    return FeatureSet(l2_normalise(np.asarray(vectors, np.float32)), paths, np.array(labels), dict(SETTINGS), prefix)


def small_case():
    # Gallery on the unit circle at 0, 10, 20, 90, 100 degrees: classes a, a, b, b, b.
    angles = np.deg2rad([0, 10, 20, 90, 100])
    gallery = feature_set(np.stack([np.cos(angles), np.sin(angles)], 1), ["a", "a", "b", "b", "b"])
    # Query 0 (class a) at 19 degrees: ranking 20(b), 10(a), 0(a), ... -> Top-1 miss, Top-3 hit.
    # Query 1 (class b) at 95 degrees: 90(b)/100(b) first -> hit.
    q_angles = np.deg2rad([19, 95])
    queries = feature_set(np.stack([np.cos(q_angles), np.sin(q_angles)], 1), ["a", "b"], prefix="q")
    return queries, gallery


def test_seed_lines_and_values_by_hand():
    queries, gallery = small_case()
    report = evaluate_retrieval(queries, gallery, top_k=[1, 3], progress_bar=False)
    lines = report.summary_lines()
    assert "查询集: (2, 2), 候选集: (5, 2)" in lines
    assert "Top-1 准确率: 0.5000 (1/2)" in lines
    assert "Top-1 accuracy: 0.5000 (1/2)" in lines
    assert "Top-3 准确率: 1.0000 (2/2)" in lines
    # P@3: query 0 has a,a in its top 3 (2/3); query 1 has b,b,b (3/3).
    assert report.precision[3] == pytest.approx((2 / 3 + 1) / 2)
    # Full ranking AP: query 0: relevant at ranks 2, 3 -> (1/2 + 2/3) / 2; query 1: ranks 1, 2, 3 -> 1.
    assert report.mean_average_precision == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1) / 2)
    table = report.class_table_lines()
    assert table[0].split()[:2] == ["class", "queries"] and len(table) == 4
    json.dumps(report.to_dict())  # serialisable as written by --output


def test_absent_query_classes_are_reported_not_counted_as_misses():
    queries, gallery = small_case()
    extra = feature_set(np.vstack([queries.features, [[0.0, 1.0]]]), ["a", "b", "zebra"], prefix="q")
    report = evaluate_retrieval(extra, gallery, top_k=[1], progress_bar=False)
    assert report.num_queries == 3 and report.num_evaluated == 2
    assert report.excluded == {"zebra": 1}
    assert "Top-1 准确率: 0.5000 (1/2)" in report.summary_lines()
    assert any("excluded 1 of 3 queries" in line and "zebra (1)" in line for line in report.summary_lines())


def test_leave_one_out_never_returns_the_query_but_keeps_its_duplicates():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(30, 16))
    vectors[10] = vectors[11]  # an exact duplicate under another name
    labels = [f"c{i % 3}" for i in range(30)]
    labels[11] = labels[10]
    gallery = feature_set(vectors, labels)
    index = RetrievalIndex.build(gallery, progress_bar=False)
    exclude = np.arange(30)
    for qe_k in (0, 3):
        _, ids, _ = index.search(index.prepare_queries(gallery.features), 5, exclude=exclude, qe_k=qe_k)
        assert not (ids == exclude[:, None]).any()
    _, ids, _ = index.search(index.prepare_queries(gallery.features), 5, exclude=exclude)
    assert ids[10, 0] == 11 and ids[11, 0] == 10

    report = evaluate_retrieval(None, gallery, top_k=[1], leave_one_out=True, qe_k=2, progress_bar=False)
    assert report.num_evaluated == 30 and report.leave_one_out
    # Without leave-one-out every query finds itself: warned about.
    plain = evaluate_retrieval(gallery, gallery, top_k=[1], progress_bar=False)
    assert plain.accuracy[1] == 1.0 and plain.self_matches == 30
    assert any("leave_one_out" in line for line in plain.summary_lines())


def test_leave_one_out_excludes_singleton_classes():
    gallery = feature_set(np.eye(4)[:3] + 0.01, ["a", "a", "solo"])
    report = evaluate_retrieval(None, gallery, top_k=[1], leave_one_out=True, progress_bar=False)
    assert report.excluded == {"solo": 1} and report.num_evaluated == 2


def test_gallery_smaller_than_k_counts_missing_ranks_as_misses():
    queries, gallery = small_case()
    report = evaluate_retrieval(queries, gallery, top_k=[1, 10], progress_bar=False)
    assert report.accuracy[10] == 1.0
    assert report.precision[10] == pytest.approx((2 / 10 + 3 / 10) / 2)


def test_bad_requests_are_clear_errors():
    queries, gallery = small_case()
    with pytest.raises(RetrievalError, match="pass leave_one_out"):
        evaluate_retrieval(None, gallery, progress_bar=False)
    with pytest.raises(RetrievalError, match="none of the 2 query images is in the gallery"):
        evaluate_retrieval(queries, gallery, leave_one_out=True, progress_bar=False)
    with pytest.raises(ValueError, match="top_k"):
        evaluate_retrieval(queries, gallery, top_k=[0], progress_bar=False)


@pytest.mark.parametrize(
    "labels, message",
    [(["a", "a", "a"], "only the class 'a'"), (["", "", ""], "no class at all; 3 of its 3 images have no class")],
)
def test_a_gallery_of_fewer_than_two_classes_is_refused(labels, message):
    # Every result would "match", so Top-K and mAP would be 1.0 whatever the features: refuse, saying why.
    gallery = feature_set(np.eye(3) + 0.1, labels)
    with pytest.raises(RetrievalError, match=message + ".*fewer than 2 classes.*meaningless"):
        evaluate_retrieval(None, gallery, leave_one_out=True, progress_bar=False)
    with pytest.raises(RetrievalError, match=message):
        evaluate_retrieval(None, index=RetrievalIndex.build(gallery, progress_bar=False), progress_bar=False)


def test_queries_without_a_class_are_excluded_not_matched_with_other_unlabelled_images():
    queries, gallery = small_case()
    gallery = feature_set(np.vstack([gallery.features, [[0.2, 0.98]]]), ["a", "a", "b", "b", "b", ""])
    unlabelled = feature_set(np.vstack([queries.features, [[0.2, 0.98]]]), ["a", "b", ""], prefix="q")
    report = evaluate_retrieval(unlabelled, gallery, top_k=[1], progress_bar=False)
    assert report.num_evaluated == 2 and report.excluded == {"(no class)": 1}


def test_leave_one_out_on_one_image_per_class_says_the_query_is_its_class_only_image():
    gallery = feature_set(np.eye(3) + 0.1, ["circle", "square", "star"])
    with pytest.raises(RetrievalError, match="that image is the class's only one in the gallery") as refused:
        evaluate_retrieval(None, gallery, leave_one_out=True, progress_bar=False)
    assert "has a class present in the gallery" not in str(refused.value)


def test_zero_pca_dimensions_are_refused_not_taken_as_no_pca():
    queries, gallery = small_case()
    with pytest.raises(RetrievalError, match="pca 0: must be between 1"):
        evaluate_retrieval(queries, gallery, pca_dimensions=0, progress_bar=False)
    index = RetrievalIndex.build(gallery, progress_bar=False)
    with pytest.raises(RetrievalError, match="set when it is built"):
        evaluate_retrieval(queries, index=index, pca_dimensions=0, progress_bar=False)


def unbalanced_case():
    """Three class-a queries (two hits at rank 1) and one class-b query (a miss at rank 1)."""
    angles = np.deg2rad([0, 10, 90, 100])
    gallery = feature_set(np.stack([np.cos(angles), np.sin(angles)], 1), ["a", "a", "b", "b"])
    q_angles = np.deg2rad([2, 8, 80, 30])  # a (hit), a (hit), a (miss: nearest is 90, b), b (miss: nearest is 10, a)
    queries = feature_set(np.stack([np.cos(q_angles), np.sin(q_angles)], 1), ["a", "a", "a", "b"], prefix="q")
    return queries, gallery


def test_class_balanced_metrics_are_the_mean_of_the_per_class_values():
    queries, gallery = unbalanced_case()
    report = evaluate_retrieval(queries, gallery, top_k=[1], progress_bar=False)
    assert report.accuracy[1] == pytest.approx(2 / 4)
    assert report.class_balanced["Top-1"] == pytest.approx((2 / 3 + 0 / 1) / 2)
    per_class_map = {row["class"]: row["map"] for row in report.per_class}
    assert report.class_balanced["mAP"] == pytest.approx((per_class_map["a"] + per_class_map["b"]) / 2)
    assert any(line.startswith("class-balanced (mean over 2 classes): Top-1: 0.3333") for line in report.summary_lines())
    data = report.to_dict()
    assert data["class_balanced"]["Top-1"] == pytest.approx(1 / 3) and data["bootstrap"] is None
    # per-query values, in query order, for pairing two evaluations later
    assert data["per_query"]["image_paths"] == queries.image_paths.tolist()
    assert data["per_query"]["metrics"]["Top-1"] == [1.0, 1.0, 0.0, 0.0]


def test_without_full_map_the_per_query_ap_is_ap_at_the_largest_k():
    queries, gallery = unbalanced_case()
    report = evaluate_retrieval(queries, gallery, top_k=[1, 2], full_map=False, progress_bar=False)
    assert set(report.per_query.metrics) == {"Top-1", "Top-2", "mAP@2"}
    assert report.per_query.metrics["mAP@2"].mean() == pytest.approx(report.map_at_k[2])
    # the class table's interval column is the same metric's
    report.add_intervals(50)
    table = report.class_table_lines()
    assert "mAP@2 95% interval" in table[0] and all("[" in line for line in table[2:]) and len(table) > 2


def test_bootstrap_intervals_in_the_report():
    queries, gallery = unbalanced_case()
    report = evaluate_retrieval(queries, gallery, top_k=[1], progress_bar=False, bootstrap_resamples=300, seed=1)
    intervals = report.intervals
    assert intervals.resamples == 300 and intervals.seed == 1
    assert intervals.micro["Top-1"].value == pytest.approx(report.accuracy[1])
    assert intervals.class_balanced["mAP"].value == pytest.approx(report.class_balanced["mAP"])
    assert intervals.micro["Top-1"].low <= report.accuracy[1] <= intervals.micro["Top-1"].high
    lines = report.summary_lines()
    assert any(line.startswith("95% intervals: percentile bootstrap over queries, 300 resamples, seed 1") for line in lines)
    assert any(line.startswith("Top-1") and "[" in line for line in lines)
    assert "mAP 95% interval" in report.class_table_lines()[0]
    assert json.loads(json.dumps(report.to_dict()))["bootstrap"]["class_balanced"]["Top-1"]["value"] == pytest.approx(1 / 3)


def write_features(tmp_path, sets):
    from vitp.retrieval.feature_file import save_features

    paths = {}
    for name, feature_set_ in sets.items():
        paths[name] = str(save_features(feature_set_, tmp_path / f"{name}.npz"))
    return paths


def test_cli_bootstrap_and_compare(tmp_path, capsys):
    from vitp.cli import main

    queries, gallery = unbalanced_case()
    # A second "method": other gallery vectors for the same images, so that every query hits.
    angles = np.deg2rad([0, 10, 90, 100])
    better_gallery = feature_set(np.stack([np.cos(angles), np.sin(angles)], 1), ["a", "a", "b", "b"])
    q_angles = np.deg2rad([2, 8, 12, 95])
    better_queries = feature_set(np.stack([np.cos(q_angles), np.sin(q_angles)], 1), ["a", "a", "a", "b"], prefix="q")
    files = write_features(tmp_path, {"g": gallery, "q": queries, "g2": better_gallery, "q2": better_queries})
    assert main(["evaluate", "--query_features", files["q"], "--gallery_features", files["g"], "--bootstrap", "200",
                 "--seed", "3", "--output", str(tmp_path / "plain.json"), "--no_progress"]) == 0
    printed = capsys.readouterr().out
    assert "class-balanced (mean over 2 classes)" in printed and "200 resamples, seed 3" in printed
    assert main(["evaluate", "--query_features", files["q2"], "--gallery_features", files["g2"],
                 "--output", str(tmp_path / "better.json"), "--no_progress"]) == 0
    capsys.readouterr()

    assert main(["evaluate", "--compare", str(tmp_path / "better.json"), str(tmp_path / "plain.json"),
                 "--bootstrap", "300", "--output", str(tmp_path / "compare.json")]) == 0
    printed = capsys.readouterr().out
    assert "paired bootstrap: better - plain on 4 shared queries, 300 resamples, seed 0" in printed
    written = json.loads((tmp_path / "compare.json").read_text())
    assert written["values_a"]["micro"]["Top-1"] == 1.0 and written["values_b"]["micro"]["Top-1"] == 0.5
    assert written["differences"]["micro"]["Top-1"]["value"] == pytest.approx(0.5)
    assert written["verdicts"]["micro"]["Top-1"] in ("ahead", "no measurable difference")

    # A comparison of other query sets is refused; so are evaluation inputs next to --compare.
    assert main(["evaluate", "--query_features", files["g"], "--gallery_features", files["g"], "--leave_one_out",
                 "--output", str(tmp_path / "other.json"), "--no_progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--compare", str(tmp_path / "plain.json"), str(tmp_path / "other.json")]) == 2
    assert "did not evaluate the same queries" in capsys.readouterr().err
    assert main(["evaluate", "--compare", str(tmp_path / "plain.json"), str(tmp_path / "better.json"),
                 "--gallery_features", files["g"]]) == 2
    assert "--gallery_features cannot be used with it" in capsys.readouterr().err
    assert "argument --bootstrap: 0: must be >= 1" in parser_refusal(
        ["evaluate", "--query_features", files["q"], "--gallery_features", files["g"], "--bootstrap", "0"], capsys)
    assert main(["evaluate", "--query_features", files["q"]]) == 2
    assert "give the gallery as --gallery_features or --index" in capsys.readouterr().err
