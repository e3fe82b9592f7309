"""Throughput of the training data pipeline: dataset + collator, 448-px tiles, max_dynamic_patch 6.

    python benchmarks/data.py [--images 48] [--batch_size 4] [--num_workers 2]

Builds a small data set in a temporary folder (JPEG photos-like images of several aspect ratios, one
multi-turn conversation each), then prints samples/s and tiles/s without and with DataLoader workers,
and the cost of upstream's image-token expansion (writing 256 x tiles <IMG_CONTEXT> tokens into the
text before tokenising) against vitp's (expanding one token in id space), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitp.data.dataset import Collator, InstructionDataset, data_settings
from vitp.data.meta import Turn, read_meta
from vitp.data.templates import IMG_CONTEXT, IMG_END, IMG_START, ConversationTokenizer, prepare_tokenizer
from vitp.data.tokenizer import train_tokenizer
from vitp.train.arguments import DataTrainingArguments

SIZES = [(1024, 768), (768, 1024), (1600, 800), (600, 600), (2000, 1000), (900, 1200)]
QUESTION = "<image>\nDescribe the land cover of this scene and estimate the water fraction."
ANSWER = "Farmland with scattered trees along a river; water covers about 12% of the area."


def make_dataset(directory: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    (directory / "images").mkdir(parents=True)
    lines = []
    for index in range(count):
        width, height = SIZES[index % len(SIZES)]
        base = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((width, height), Image.BILINEAR)
        image.save(directory / "images" / f"{index}.jpg", quality=90)
        turns = [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER}] * 3
        turns[2]["value"] = "Is there water?"
        lines.append(json.dumps({"image": f"{index}.jpg", "conversations": turns}))
    (directory / "data.jsonl").write_text("\n".join(lines) + "\n")
    meta = {"bench": {"root": "images", "annotation": "data.jsonl", "data_augment": False, "repeat_time": 1}}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory / "meta.json"


def samples_per_second(dataset, collator, batch_size: int, workers: int) -> tuple[float, float]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collator)
    start = time.perf_counter()
    samples = tiles = 0
    for batch in loader:
        samples += len(batch["input_ids"])
        tiles += int(batch["num_tiles"].sum())
    elapsed = time.perf_counter() - start
    return samples / elapsed, tiles / elapsed


def expansion_costs(tokenizer, repeats: int = 50) -> tuple[float, float]:
    """Seconds per conversation: upstream's string expansion vs vitp's id-space expansion (7 tiles)."""
    counts = [256 * 7]
    turns = (Turn("human", QUESTION), Turn("gpt", ANSWER))
    ours = ConversationTokenizer(tokenizer)
    start = time.perf_counter()
    for _ in range(repeats):
        ours(turns, None, counts)
    vitp_time = (time.perf_counter() - start) / repeats
    text = QUESTION.replace("<image>", IMG_START + IMG_CONTEXT * counts[0] + IMG_END)
    start = time.perf_counter()
    for _ in range(repeats):
        tokenizer(f"<|im_start|>user\n{text}<|im_end|>\n", add_special_tokens=False)
        tokenizer(f"<|im_start|>assistant\n{ANSWER}<|im_end|>\n", add_special_tokens=False)
    upstream_time = (time.perf_counter() - start) / repeats
    return upstream_time, vitp_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_workers", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        meta_path = make_dataset(Path(directory), args.images)
        tokenizer = train_tokenizer([QUESTION, ANSWER] * 20, vocab_size=400)
        prepare_tokenizer(tokenizer)
        flags = DataTrainingArguments(dynamic_image_size=True, use_thumbnail=True, max_dynamic_patch=6,
                                      conv_style="internvl2_5")
        settings = data_settings(flags, force_image_size=448, num_image_token=256)
        dataset = InstructionDataset(read_meta(meta_path), tokenizer, settings)
        collator = Collator(tokenizer.pad_token_id)
        serial, serial_tiles = samples_per_second(dataset, collator, args.batch_size, 0)
        parallel, parallel_tiles = samples_per_second(dataset, collator, args.batch_size, args.num_workers)
    upstream_time, vitp_time = expansion_costs(tokenizer)

    print(f"{args.images} images (448-px tiles, max_dynamic_patch 6, thumbnail), batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    print(f"dataset + collator, 0 workers:  {serial:7.1f} samples/s  {serial_tiles:7.1f} tiles/s")
    print(f"dataset + collator, {args.num_workers} workers:  {parallel:7.1f} samples/s  {parallel_tiles:7.1f} tiles/s"
          f"  ({parallel / serial:.2f}x)")
    print(f"image-token expansion, 7 tiles: upstream (text) {upstream_time * 1e3:.2f} ms, "
          f"vitp (ids) {vitp_time * 1e3:.2f} ms  ({upstream_time / vitp_time:.1f}x)")


if __name__ == "__main__":
    main()
