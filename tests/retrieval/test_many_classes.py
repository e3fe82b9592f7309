"""Per-class values, intervals and paired differences belong to their class, at users' numbers of
classes (UC Merced 21, AID 30, NWPU-RESISC45 45) and with names that sort differently as text and
as numbers ("10" before "2") or as ASCII and unicode ("z" before "é").

The oracles are written here: retrieval by brute force (every gallery image scored and ranked in a
plain loop), per-class means one query at a time, and the bootstrap of the module docstring of
vitp.retrieval.statistics re-stated one resample at a time (retrieval_testing.naive_bootstrap)."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from retrieval_testing import naive_bootstrap
from vitp_testing import plain_class_means
from vitp import build_vit, save_vit
from vitp.cli import main
from vitp.retrieval import metrics
from vitp.retrieval.feature_file import FeatureSet, load_features, save_features
from vitp.retrieval.pictures import MATCH, MISMATCH
from vitp.retrieval.statistics import QueryResults, bootstrap, class_means
from vitp_testing import draw_shape, randomize_

# 14 classes: "10", "100", "11" sort before "2" as text; "Z" < "z" < "ä" < "é" < "水田" by code point.
CLASS_NAMES = ["1", "2", "3", "10", "11", "20", "100", "Z", "z", "cell", "hubble_deep_field", "é", "ä", "水田"]
SETTINGS = {"model_fingerprint": "sha256:test", "layer": 2, "pool": "mean", "image_size": 112}
METRICS = ("Top-1", "Top-3", "mAP")
RESAMPLES, SEED = 300, 5


# --------------------------------------------------------------------------------------------------
# Oracles


def brute_force_retrieval(queries: FeatureSet, gallery: FeatureSet) -> dict[str, list[float]]:
    """Top-1, Top-3 and full-ranking AP of each query: every gallery image scored, ranked best first."""
    found = {name: [] for name in METRICS}
    for vector, label in zip(queries.features.astype(np.float64), queries.labels):
        scores = [float(np.dot(vector, g)) for g in gallery.features.astype(np.float64)]
        ranking = sorted(range(len(scores)), key=lambda i: -scores[i])
        relevant = [gallery.labels[i] == label for i in ranking]
        found["Top-1"].append(float(any(relevant[:1])))
        found["Top-3"].append(float(any(relevant[:3])))
        hits, precision_sum = 0, 0.0
        for rank, is_relevant in enumerate(relevant, start=1):
            if is_relevant:
                hits += 1
                precision_sum += hits / rank
        found["mAP"].append(precision_sum / sum(relevant))
    return found


def per_class_table(values: dict[str, list[float]], classes) -> dict[str, dict[str, float]]:
    """class -> metric -> mean over the class's queries."""
    table = {}
    for metric, column in values.items():
        for name, mean in plain_class_means(column, classes).items():
            table.setdefault(name, {})[metric] = mean
    return table


# --------------------------------------------------------------------------------------------------
# Data: feature vectors whose per-class Top-1 differs from class to class, by construction


def designed_features(hits_of_class, seed: int) -> tuple[FeatureSet, FeatureSet]:
    """Gallery: 3 images per class near the class's axis. Queries of class c: 3 to 6 of them, the
    first ``hits_of_class[c]`` near its axis (found), the others nearer the next class's axis (a miss
    at rank 1, found further down), so per-class Top-1 and mAP differ between classes."""
    rng = np.random.default_rng(seed)
    count = len(CLASS_NAMES)
    axes = np.eye(count)
    gallery_vectors, gallery_labels, gallery_paths = [], [], []
    query_vectors, query_labels, query_paths = [], [], []
    for c, name in enumerate(CLASS_NAMES):
        for i in range(3):
            gallery_vectors.append(axes[c] + rng.normal(0, 0.05, count))
            gallery_labels.append(name)
            gallery_paths.append(f"/data/gallery/{name}/{i}.png")
        for i in range(3 + c % 4):
            near = axes[c] if i < hits_of_class[c] else axes[(c + 1) % count] + 0.5 * axes[c]
            query_vectors.append(near + rng.normal(0, 0.1, count))
            query_labels.append(name)
            query_paths.append(f"/data/查询/{name}/{i:02d}.png")

    def feature_set(vectors, paths, labels, source):
        vectors = np.asarray(vectors, dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return FeatureSet(vectors, np.array(paths), np.array(labels), dict(SETTINGS), source)

    return (feature_set(query_vectors, query_paths, query_labels, "queries"),
            feature_set(gallery_vectors, gallery_paths, gallery_labels, "gallery"))


def two_methods():
    """Method a and method b: the same gallery and query images, found by each with other per-class success."""
    # queries per class: 3, 4, 5, 6, 3, 4, ...; hits of a and b out of those
    hits_a = [0, 1, 2, 3, 1, 4, 5, 2, 3, 0, 4, 6, 2, 3]
    hits_b = [2, 3, 5, 1, 0, 2, 3, 6, 1, 4, 2, 5, 3, 1]
    queries_a, gallery = designed_features(hits_a, seed=0)
    queries_b, _ = designed_features(hits_b, seed=0)
    return queries_a, queries_b, gallery


# --------------------------------------------------------------------------------------------------
# Parsing what the console shows


def class_table(printed: str) -> dict[str, list[str]]:
    """class -> the other cells of its row in the per-class table (`vitp evaluate`)."""
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["class", "queries"])
    rows = {}
    for line in lines[header + 2:]:
        cells = line.split()
        if not cells or cells[0] not in CLASS_NAMES:
            break
        rows[cells[0]] = cells[1:]
    return rows


HIGHER = re.compile(r"(\S+) \((\d\.\d+) vs (\d\.\d+), difference ([+-]\d\.\d+) \[([+-]\d\.\d+), ([+-]\d\.\d+)\]\)")


def higher_lines(printed: str, name_b: str) -> dict[str, list[tuple]]:
    """metric -> [(class, b, a, difference, low, high)] from the "b is higher on <metric> in:" lines."""
    found = {}
    for line in printed.splitlines():
        match = re.match(rf"{re.escape(name_b)} is higher on (\S+) in: (.*)$", line)
        if match:
            found[match.group(1)] = [(m[0], *map(float, m[1:])) for m in HIGHER.findall(match.group(2))]
    return found


def close(printed: float, value: float, digits: int = 3) -> bool:
    return abs(printed - value) <= 0.5 * 10**-digits + 1e-9


# --------------------------------------------------------------------------------------------------
# The mapping of class names to ids


def test_class_ids_give_each_label_the_position_of_its_own_name():
    labels = np.array(["2", "10", "é", "z", "1", "10", "水田", "Z", "2"])
    names, ids = metrics.class_ids(labels)
    assert names.tolist() == sorted(set(labels.tolist()))  # as text, by code point: "10" before "2"
    assert names[ids].tolist() == labels.tolist()
    classes, query_ids, gallery_ids = metrics.encode_labels(labels[:4], labels[4:])
    assert classes[query_ids].tolist() == labels[:4].tolist() and classes[gallery_ids].tolist() == labels[4:].tolist()


def test_class_means_refuses_ids_in_place_of_names():
    # ids read as text would sort "10" before "2" and land on other classes: refused, not guessed
    with pytest.raises(ValueError, match="classes must be class names"):
        class_means(np.ones(12), np.arange(12))
    names, means = class_means(np.arange(12.0), np.array([str(i) for i in range(12)]))
    assert dict(zip(names.tolist(), means.tolist())) == {str(i): float(i) for i in range(12)}


@pytest.mark.parametrize("count", [12, 45])
def test_bootstrap_per_class_values_and_intervals_belong_to_their_class(count):
    rng = np.random.default_rng(count)
    names = [str(i) for i in range(count - 2)] + ["é", "z"]
    classes = [names[i % count] for i in range(4 * count)]
    values = {"Top-1": (rng.random(len(classes)) < 0.5).astype(float).tolist(), "mAP": rng.random(len(classes)).tolist()}
    results = QueryResults([f"/q/{c}/{i}.png" for i, c in enumerate(classes)], classes, values)
    fast = bootstrap(results, RESAMPLES, SEED)
    slow = naive_bootstrap(values, classes, RESAMPLES, SEED)
    expected = per_class_table(values, classes)
    assert set(fast.per_class) == set(names)
    for name in names:
        for metric in values:
            interval = fast.per_class[name][metric]
            assert interval.value == pytest.approx(expected[name][metric], abs=1e-12), (name, metric)
            assert [interval.low, interval.high] == pytest.approx(slow["per_class"][name][metric], abs=1e-12)
            assert interval.low <= interval.value <= interval.high
        assert fast.queries_per_class[name] == classes.count(name)


# --------------------------------------------------------------------------------------------------
# `vitp evaluate --bootstrap` and `--compare`, as a user runs them


def test_evaluate_and_compare_per_class_on_fourteen_classes(tmp_path, capsys):
    queries_a, queries_b, gallery = two_methods()
    files = {}
    for name, features in (("qa", queries_a), ("qb", queries_b), ("g", gallery)):
        files[name] = str(save_features(features, tmp_path / f"{name}.npz"))
    common = ["--top_k", "1", "3", "--bootstrap", str(RESAMPLES), "--seed", str(SEED), "--no_progress"]
    expected, printed = {}, {}
    for method, query_file in (("a", files["qa"]), ("b", files["qb"])):
        assert main(["evaluate", "--query_features", query_file, "--gallery_features", files["g"],
                     "--output", str(tmp_path / f"{method}.json"), "--plot", str(tmp_path / f"{method}.png"), *common]) == 0
        printed[method] = capsys.readouterr().out
        expected[method] = brute_force_retrieval(load_features(query_file), gallery)
    classes = queries_a.labels.tolist()
    per_class = {method: per_class_table(values, classes) for method, values in expected.items()}
    # Per-class values differ from class to class, so values given to the wrong class would show.
    assert len({round(row["Top-1"], 6) for row in per_class["a"].values()}) > 5

    for method in ("a", "b"):
        report = json.loads((tmp_path / f"{method}.json").read_text(encoding="utf-8"))
        want = per_class[method]
        slow = naive_bootstrap({m: expected[method][m] for m in ("Top-1", "mAP")}, classes, RESAMPLES, SEED)
        # the per-class rows of the JSON
        assert [row["class"] for row in report["per_class"]] == sorted(CLASS_NAMES)
        for row in report["per_class"]:
            name = row["class"]
            assert row["queries"] == classes.count(name)
            assert row["top_k"]["top1"] == pytest.approx(want[name]["Top-1"], abs=1e-9), name
            assert row["top_k"]["top3"] == pytest.approx(want[name]["Top-3"], abs=1e-9), name
            assert row["map"] == pytest.approx(want[name]["mAP"], abs=1e-6), name
        # the per-class bootstrap of the JSON: each value its class's, inside its own interval
        stored = report["bootstrap"]["per_class"]
        assert set(stored) == set(CLASS_NAMES)
        for name in CLASS_NAMES:
            for metric in ("Top-1", "mAP"):
                interval = stored[name][metric]
                assert interval["value"] == pytest.approx(want[name][metric], abs=1e-6), (method, name, metric)
                assert [interval["low"], interval["high"]] == pytest.approx(slow["per_class"][name][metric], abs=1e-6)
                assert interval["low"] <= interval["value"] <= interval["high"]
        balanced = np.mean([want[name]["mAP"] for name in CLASS_NAMES])
        assert report["bootstrap"]["class_balanced"]["mAP"]["value"] == pytest.approx(balanced, abs=1e-6)
        assert report["class_balanced"]["mAP"] == pytest.approx(balanced, abs=1e-6)
        # the console's per-class table: class, queries, Top-1, Top-3, P@3, mAP, mAP interval
        table = class_table(printed[method])
        assert set(table) == set(CLASS_NAMES)
        for name, cells in table.items():
            assert int(cells[0]) == classes.count(name)
            assert close(float(cells[1]), want[name]["Top-1"]) and close(float(cells[2]), want[name]["Top-3"]), name
            assert close(float(cells[4]), want[name]["mAP"]), name
            low, high = float(cells[5].strip("[,")), float(cells[6].strip("]"))
            assert close(low, slow["per_class"][name]["mAP"][0]) and close(high, slow["per_class"][name]["mAP"][1])
        # --plot: the bar of each row is as long as its class's Top-1
        chart = np.asarray(Image.open(tmp_path / f"{method}.png").convert("RGB"))
        name_width = 8 + 7 * max(len(name) for name in CLASS_NAMES)
        for i, row in enumerate(report["per_class"]):
            middle = chart[30 + i * 18 + 7, name_width : name_width + 401]
            filled = int((np.all(middle == MATCH, axis=1) | np.all(middle == MISMATCH, axis=1)).sum())
            assert abs(filled - (round(400 * want[row["class"]]["Top-1"]) + 1)) <= 1, row["class"]

    # --compare a.json b.json: a - b, paired by path
    assert main(["evaluate", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--bootstrap",
                 str(RESAMPLES), "--seed", str(SEED), "--output", str(tmp_path / "compare.json")]) == 0
    lines = capsys.readouterr().out
    paths = queries_a.image_paths.tolist()
    order = sorted(range(len(paths)), key=lambda j: paths[j])  # compare works in path order
    differences = {m: [expected["a"][m][j] - expected["b"][m][j] for j in order] for m in METRICS}
    slow = naive_bootstrap(differences, [classes[j] for j in order], RESAMPLES, SEED)
    written = json.loads((tmp_path / "compare.json").read_text(encoding="utf-8"))
    for name in CLASS_NAMES:
        for metric in METRICS:
            a, b = per_class["a"][name][metric], per_class["b"][name][metric]
            assert written["per_class_a"][name][metric] == pytest.approx(a, abs=1e-6)
            assert written["per_class_b"][name][metric] == pytest.approx(b, abs=1e-6)
            difference = written["differences"]["per_class"][name][metric]
            assert difference["value"] == pytest.approx(a - b, abs=1e-6), (name, metric)
            assert [difference["low"], difference["high"]] == pytest.approx(slow["per_class"][name][metric], abs=1e-6)
            assert difference["low"] <= difference["value"] <= difference["high"]
    shown = higher_lines(lines, "b")
    for metric in METRICS:
        b_higher = [name for name in sorted(CLASS_NAMES) if per_class["b"][name][metric] > per_class["a"][name][metric]]
        assert [entry[0] for entry in shown.get(metric, [])] == b_higher, metric
        for name, b, a, difference, low, high in shown.get(metric, []):
            assert close(b, per_class["b"][name][metric]) and close(a, per_class["a"][name][metric]), (name, metric)
            assert close(difference, per_class["a"][name][metric] - per_class["b"][name][metric]), (name, metric)
            assert close(low, slow["per_class"][name][metric][0]) and close(high, slow["per_class"][name][metric][1])
            assert low <= difference <= high
    assert len(shown["Top-1"]) >= 3  # the data make b higher in several classes


# --------------------------------------------------------------------------------------------------
# From image folders: `vitp features` with a tiny ViT, then `vitp evaluate` and `--compare`

SHAPES = ("ellipse", "rectangle", "cross", "stripes")


def test_image_folders_of_fourteen_classes_end_to_end(tmp_path, vit_file, capsys):
    rng = np.random.default_rng(0)
    for split, per_class in (("gallery", 3), ("query", 2)):
        for c, name in enumerate(CLASS_NAMES):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            colour = tuple(int(v) for v in (60 + 190 * ((c * 5) % 14) / 13, 60 + 190 * ((c * 3) % 7) / 6, 250 - 12 * c))
            for i in range(per_class):
                draw_shape(SHAPES[c % 4], colour, rng, size=(36, 36), extent=30).save(folder / f"{name}_{i}.png")
    other_vit = tmp_path / "other_vit.safetensors"  # a second model: other weights
    save_vit(randomize_(build_vit("internvit-tiny"), std=0.2, seed=1).eval(), other_vit)
    for suffix, vit in (("", vit_file), ("1", other_vit)):
        for split in ("gallery", "query"):
            assert main(["features", "--image_dir", str(tmp_path / split), "--output", str(tmp_path / f"{split}{suffix}.npz"),
                         "--vit_checkpoint", str(vit), "--num_workers", "0", "--no_progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    evaluations = {}
    for method, suffix in (("one", ""), ("other", "1")):
        queries, gallery = load_features(tmp_path / f"query{suffix}.npz"), load_features(tmp_path / f"gallery{suffix}.npz")
        assert sorted(set(queries.labels.tolist())) == sorted(CLASS_NAMES)  # the folder names, unicode included
        assert main(["evaluate", "--query_features", str(tmp_path / f"query{suffix}.npz"), "--gallery_features",
                     str(tmp_path / f"gallery{suffix}.npz"), "--top_k", "1", "3", "--bootstrap", "200",
                     "--output", str(tmp_path / f"{method}.json"), "--no_progress"]) == 0
        table = class_table(capsys.readouterr().out)
        want = per_class_table(brute_force_retrieval(queries, gallery), queries.labels.tolist())
        report = json.loads((tmp_path / f"{method}.json").read_text(encoding="utf-8"))
        for name in CLASS_NAMES:
            stored = report["bootstrap"]["per_class"][name]
            for metric in ("Top-1", "mAP"):
                assert stored[metric]["value"] == pytest.approx(want[name][metric], abs=1e-5), (method, name, metric)
                assert stored[metric]["low"] <= stored[metric]["value"] <= stored[metric]["high"]
            assert close(float(table[name][1]), want[name]["Top-1"]) and close(float(table[name][4]), want[name]["mAP"])
        evaluations[method] = want
    assert main(["evaluate", "--compare", str(tmp_path / "one.json"), str(tmp_path / "other.json"),
                 "--bootstrap", "200"]) == 0
    shown = higher_lines(capsys.readouterr().out, "other")
    one, other = evaluations["one"], evaluations["other"]
    for metric in ("Top-1", "mAP"):
        higher = [name for name in sorted(CLASS_NAMES) if other[name][metric] > one[name][metric]]
        assert [entry[0] for entry in shown.get(metric, [])] == higher, metric
        for name, b, a, difference, low, high in shown.get(metric, []):
            assert close(b, other[name][metric]) and close(a, one[name][metric])
            assert close(difference, one[name][metric] - other[name][metric]) and low <= difference <= high
