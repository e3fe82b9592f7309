"""Fixtures of the training tests: a small image + conversation data set with its tokenizer and tiny
checkpoints (helpers are in train_testing.py)."""

import json

import numpy as np
import pytest
from PIL import Image

from vitp.data.build import build_instructions
from vitp.data.tokenizer import conversation_texts, load_tokenizer, save_tokenizer, train_tokenizer
from vitp.model.checkpoint import build_vlm, save_vlm

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


@pytest.fixture(scope="session")
def tiny_internlm2_checkpoint(workspace):
    """An InternVL remote-code checkpoint with an InternLM2 LLM and its sentencepiece tokenizer (as
    InternVL2-2B / InternVL2.5-2B), tiny."""
    from vitp_testing import write_internlm2_internvl_checkpoint

    directory = workspace / "InternVL-tiny-internlm2"
    if not directory.is_dir():
        write_internlm2_internvl_checkpoint(directory, template="internlm2-chat")
    return directory
