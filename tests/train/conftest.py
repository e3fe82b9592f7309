"""Fixtures of the training tests: a small image + conversation data set with its tokenizer, tiny
checkpoints, and the arguments of a small CPU run."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitp.data.build import build_instructions
from vitp.data.tokenizer import conversation_texts, load_tokenizer, save_tokenizer, train_tokenizer
from vitp.model.checkpoint import build_vlm, save_vlm
from vitp.train.arguments import pretrain_arguments
from vitp.train.pretrain import pretrain

COLOURS = {"water": (30, 60, 170), "forest": (30, 120, 40), "sand": (200, 180, 120)}


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """Class folders of coloured, noisy images -> instruction data -> tokenizer."""
    root = tmp_path_factory.mktemp("pretrain")
    rng = np.random.default_rng(0)
    for label, colour in COLOURS.items():
        for i in range(8):
            size = (int(rng.integers(48, 120)), int(rng.integers(48, 120)))
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            path = root / "images" / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    build_instructions(root / "images", root / "data", seed=0, progress=False)
    tokenizer = train_tokenizer(conversation_texts(root / "data" / "meta.json"), vocab_size=320)
    save_tokenizer(tokenizer, root / "tok")
    return root


@pytest.fixture(scope="session")
def small_meta(workspace):
    """The first 6 conversations of the workspace: enough for an epoch of a launch script on a CPU."""
    data = workspace / "small"
    data.mkdir(exist_ok=True)
    lines = (workspace / "data" / "images.jsonl").read_text().splitlines()[:6]
    (data / "small.jsonl").write_text("\n".join(lines) + "\n")
    meta = {"small": {"root": str(workspace / "images"), "annotation": str(data / "small.jsonl"),
                      "data_augment": False, "repeat_time": 1, "length": 6}}
    (data / "meta.json").write_text(json.dumps(meta))
    return data / "meta.json"


@pytest.fixture(scope="session")
def tiny_qwen2_checkpoint(workspace):
    """An InternVL checkpoint directory with a Qwen2 LLM (as InternVL2-1B / InternVL2.5-1B), tiny."""
    directory = workspace / "InternVL-tiny-qwen2"
    if not directory.is_dir():
        tokenizer = load_tokenizer(workspace / "tok")
        save_vlm(build_vlm("internvl-tiny", tokenizer), directory, tokenizer)
    return directory


def config(workspace, output, **overrides):
    """The three argument objects of a small CPU run (ViTP's dynamic tiles; no gradient checkpointing)."""
    values = dict(
        meta_path=str(workspace / "data" / "meta.json"), output_dir=str(output), model_preset="internvl-tiny",
        tokenizer=str(workspace / "tok"), force_image_size=56, max_dynamic_patch=2, dynamic_image_size=True,
        use_thumbnail=True, system_message="Answer.", max_steps=6, learning_rate=2e-3, per_device_train_batch_size=4,
        logging_steps=1, save_steps=3, dataloader_num_workers=0, report_to="none", seed=7, grad_checkpoint=False,
    )
    values.update(overrides)
    return pretrain_arguments(**values)


def run(workspace, output, **overrides) -> Path:
    return pretrain(*config(workspace, output, **overrides))


def logged_losses(checkpoint: Path) -> dict[int, float]:
    history = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}
