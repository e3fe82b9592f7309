"""Helpers of the data tests (a module with a unique name, importable from every test folder): images,
JSONL files and meta JSONs written by the tests, and data settings."""

import json

import numpy as np
from PIL import Image


def save_image(path, width, height, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def write_dataset(directory, lines, name="ds", **meta_fields):
    """Write lines (dicts or raw strings) as JSONL and a meta JSON for them; returns the meta path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "images").mkdir(exist_ok=True)
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    (directory / f"{name}.jsonl").write_text(text)
    meta = {name: {"root": "images", "annotation": f"{name}.jsonl", "data_augment": False, "repeat_time": 1,
                   "length": len(lines), **meta_fields}}
    meta_path = directory / f"meta_{name}.json"
    meta_path.write_text(json.dumps(meta))
    return meta_path


def conversation(question="<image>\nWhat is in this image?", answer="A harbour."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def settings(**overrides):
    """DataSettings as training resolves them: upstream's flag defaults (DataTrainingArguments), with
    28-px tiles of 4 tokens, ViTP's dynamic tiling with a thumbnail and the internvl2_5 template, and
    any field overridden."""
    from vitp.data.dataset import data_settings
    from vitp.train.arguments import DataTrainingArguments

    values = {"dynamic_image_size": True, "use_thumbnail": True, "conv_style": "internvl2_5", **overrides}
    force_image_size, num_image_token = values.pop("force_image_size", 28), values.pop("num_image_token", 4)
    return data_settings(DataTrainingArguments(**values), force_image_size, num_image_token)
