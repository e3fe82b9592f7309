"""README's retrieval block runs as written: on the layout `make demo` leaves (runs/demo/data/gallery,
runs/demo/data/query, runs/demo/vit/vit.safetensors), here filled with small drawn images and a tiny ViT."""

import re
import shlex
from pathlib import Path

import numpy as np

from vitp import build_vit, save_vit
from vitp.cli import main
from vitp_testing import draw_shape, randomize_

README = Path(__file__).resolve().parents[1] / "README.md"
SHAPES = {"disk": ((220, 40, 40), "ellipse"), "square": ((40, 180, 60), "rectangle"), "stripes": ((50, 70, 220), "stripes")}


def readme_block(name: str) -> list[str]:
    """The commands of the README code block between `<!-- readme-test: NAME -->` and `<!-- /readme-test -->`
    (continuation lines joined)."""
    found = re.search(rf"<!-- readme-test: {name} -->\s*```bash\n(.*?)```\s*<!-- /readme-test -->", README.read_text(),
                      re.DOTALL)
    assert found, f"README.md has no readme-test block {name!r}"
    return [line for line in found.group(1).replace("\\\n", " ").splitlines() if line.strip()]


def demo_layout(root: Path, per_class: int = 5) -> None:
    rng = np.random.default_rng(0)
    for split in ("gallery", "query"):
        for label, (colour, kind) in SHAPES.items():
            folder = root / "runs" / "demo" / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                draw_shape(kind, colour, rng).save(folder / f"{label}_{i}.png")
    save_vit(randomize_(build_vit("internvit-tiny"), std=0.05).eval(), root / "runs" / "demo" / "vit" / "vit.safetensors")


def test_the_readme_retrieval_block_runs_as_written(tmp_path, monkeypatch, capsys):
    demo_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    commands = readme_block("retrieval")
    assert any("--leave_one_out" in command for command in commands)
    for command in commands:
        words = shlex.split(command)
        assert words[0] == "vitp", command
        code = main(words[1:])
        captured = capsys.readouterr()
        assert code == 0, f"{command}\n{captured.out[-1500:]}\n{captured.err[-1500:]}"
    for written in ("features/gallery.npz", "features/query.npz", "gallery.index", "results.json", "sheet.png",
                    "eval.json", "eval_qe.json"):
        assert (tmp_path / written).exists(), written
