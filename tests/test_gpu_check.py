"""benchmarks/gpu_check.sh: valid bash, and its CPU dry run passes every step it can run on a CPU and
writes the table (so that the script is ready the day a GPU is lent)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_script_is_valid_bash_and_refuses_unknown_arguments():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    result = subprocess.run(["bash", str(SCRIPT), "--gpus", "2"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown argument '--gpus'" in result.stderr


@pytest.mark.slow
def test_dry_run_passes_and_writes_the_table(tmp_path):
    environment = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "OMP_NUM_THREADS": "2"}
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=600,
                            env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    table = (tmp_path / "gpu_check.md").read_text()
    for step in ("prepare", "gpu-tests", "torchrun", "features", "train", "downstream"):
        assert f"| {step} | pass |" in table, (step, table)
    for step in ("zero1", "zero2", "zero3", "fsdp2"):
        assert f"| {step} | skipped |" in table and "needs CUDA" in table
    assert "| internvit-tiny 112px | 4 |" in table  # the features rows
    assert table.count("| drop 0.75 |") == 2 and "| on | off |" in table  # the four train-step settings
    assert "| UPerNet (32 ch) + ViT-Adapter on internvit-tiny 64px | 2 |" in table  # the downstream row
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {s["step"]: s["result"] for s in summary["steps"]}
    assert steps["gpu-tests"] == "pass" and len(summary["measurements"]) == 7
    downstream = next(m for m in summary["measurements"] if m["section"] == "downstream")
    assert downstream["images_per_s"] > 0 and downstream["gflop_per_image"] > 0  # counted, not n/a
    assert "passed" in next(s["note"] for s in summary["steps"] if s["step"] == "gpu-tests")
