"""Captured logs (a Slurm job, `> run.log 2>&1`) stay readable: no redrawn progress bars, a plain
progress line at most every VITP_PROGRESS_SECONDS, and every `file:line:` problem at the start of a line."""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from vitp import build_vit, progress, save_vit
from vitp.cli import main
from vitp_testing import draw_shape, randomize_

SRC = Path(__file__).resolve().parents[1] / "src"
PROGRESS_LINE = re.compile(r"^[\w ().,-]+: \d+(/\d+)? \(\d+\.\d \w+/s\)(, done in \d+ s)?$")


def image_tree(root: Path, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for label, colour, kind in (("disk", (220, 40, 40), "ellipse"), ("square", (40, 180, 60), "rectangle")):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            draw_shape(kind, colour, rng).save(root / label / f"{label}_{i}.png")
    return root


def messy_meta(root: Path) -> Path:
    """A dataset of 40 lines, 3 of them bad, so that progress and problems interleave."""
    image_tree(root / "images", per_class=1)
    good = {"image": "disk/disk_0.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                          {"from": "gpt", "value": "A disk."}]}
    lines = [json.dumps(good)] * 40
    lines[3] = json.dumps({**good, "image": "disk/missing.png"})
    lines[17] = "{not json"
    lines[30] = json.dumps({"image": "disk/disk_0.png"})
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    meta = {"messy": {"root": str(root / "images"), "annotation": str(root / "data.jsonl"), "repeat_time": 1, "length": 40}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root / "meta.json"


def test_data_check_captured_to_a_file_puts_every_problem_at_the_start_of_a_line(tmp_path):
    meta = messy_meta(tmp_path)
    log = tmp_path / "check.log"
    environment = {**os.environ, "PYTHONPATH": str(SRC), "VITP_PROGRESS_SECONDS": "0"}
    with log.open("w") as stream:  # as `vitp data check META > check.log 2>&1`
        code = subprocess.run([sys.executable, "-m", "vitp.cli", "data", "check", str(meta)], stdout=stream,
                              stderr=subprocess.STDOUT, env=environment, timeout=120).returncode
    text = log.read_text()
    assert code == 1, text
    assert "\r" not in text
    lines = text.splitlines()
    for number in (4, 18, 31):
        assert any(line.startswith(f"{tmp_path / 'data.jsonl'}:{number}: ") for line in lines), (number, text)
    assert any(PROGRESS_LINE.match(line) and line.startswith("checking messy: ") for line in lines), text


def test_every_long_command_writes_whole_lines_when_captured(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VITP_PROGRESS_SECONDS", "0")  # a progress line at every update
    monkeypatch.chdir(tmp_path)
    image_tree(tmp_path / "gallery")
    save_vit(randomize_(build_vit("internvit-tiny"), std=0.05).eval(), tmp_path / "vit.safetensors")
    commands = [
        ["data", "build", "--image_dir", "gallery", "--output_dir", "data"],
        ["features", "--image_dir", "gallery", "--output", "gallery.npz", "--vit_checkpoint", "vit.safetensors",
         "--batch_size", "2", "--num_workers", "0"],
        ["index", "build", "--features", "gallery.npz", "--output", "gallery.index"],
        ["search", "--index", "gallery.index", "--image", "gallery", "--batch_size", "2", "--num_workers", "0"],
        ["evaluate", "--gallery_features", "gallery.npz", "--leave_one_out", "--top_k", "1"],
    ]
    progress_lines = 0
    for command in commands:
        code = main(command)
        captured = capsys.readouterr()
        assert code == 0, (command, captured.err[-2000:])
        assert "\r" not in captured.out + captured.err, command
        progress_lines += sum(bool(PROGRESS_LINE.match(line)) for line in captured.err.splitlines())
    assert progress_lines >= 2  # data build's and features' counters, as lines

    # --no_progress: not even the plain lines
    main(commands[1][:4] + ["again.npz"] + commands[1][5:] + ["--no_progress"])
    assert not any(PROGRESS_LINE.match(line) for line in capsys.readouterr().err.splitlines())


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_bar_is_drawn_and_problem_lines_still_start_a_line(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(sys, "stdout", terminal)
    for item in progress.progress(range(5), desc="checking"):
        if item == 2:
            progress.write("data.jsonl:3: image x.png not found")
    text = terminal.getvalue()
    assert "\r" in text  # a redrawn bar
    start = text.index("data.jsonl:3:")
    assert text[start - 1] in "\r\n"


def test_plain_progress_lines_are_rate_limited():
    stream = io.StringIO()
    counter = progress.PlainProgress(None, total=1000, desc="index", unit="vec", initial=0, show=True, stream=stream,
                                     seconds=3600)
    for _ in range(1000):
        counter.update(1)
    counter.close()
    assert stream.getvalue() == ""  # an hour apart: nothing within a fast run, and no closing line without any
    counter = progress.PlainProgress(None, total=10, desc="index", unit="vec", initial=0, show=True, stream=stream,
                                     seconds=0)
    counter.update(4)
    counter.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("index: 4/10 (") and lines[-1].endswith(" s") and len(lines) == 2
    assert all(PROGRESS_LINE.match(line) for line in lines)
