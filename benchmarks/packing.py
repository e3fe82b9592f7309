"""Packed training (--use_packed_ds) against padded batches: tokens/s and peak memory.

    python benchmarks/packing.py [--device cpu|cuda] [--samples 32] [--batch_size 16] [--max_packed_tokens 8192]
    python benchmarks/packing.py --max_packed_tokens 0   # packs as large as the largest padded batch

A data set of mixed lengths is written to a temporary folder: images of six aspect ratios (1 to 6
tiles, plus a thumbnail, with max_dynamic_patch 6) and short or long answers. The same samples are
trained as padded batches of --batch_size (a random order, as the default sampler) and packed by
upstream's buffer algorithm (vitp.train.packing, strict_mode off, as many tiles per pack as the padded
batch has), with the real dataset, collators and model (forward, backward, AdamW step), the model
built as `vitp pretrain` builds it for each mode. Batches are built before the clock starts, so the
numbers are the model's. Time: both modes in one process, alternating for --rounds passes, the
fastest pass of each (the least disturbed by other work on a shared machine). Peak memory: each mode
once more in a process of its own, during training, above what the process held before (resident
memory on a CPU, allocated memory on a GPU).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TILE = 448  # InternVL's tile: 256 image tokens after pixel shuffle
# (width, height) in tiles: 1x1, 2x1 + thumbnail, 3x1 + thumbnail, 2x2 + thumbnail, 1x5 + thumbnail, 3x2 + thumbnail
SIZES = [(1, 1), (2, 1), (3, 1), (2, 2), (1, 5), (3, 2)]
WORDS = "the scene shows farmland forest water roads houses a river and fields near the coast with boats".split()
TEXT = dict(model_type="qwen2", hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=True)


def make_data(directory: Path, count: int) -> Path:
    """``count`` samples: each image size with a short and a long answer, in turn."""
    rng = np.random.default_rng(0)
    (directory / "images").mkdir(parents=True)
    lines = []
    for index in range(count):
        width, height = (TILE * n for n in SIZES[index % len(SIZES)])
        pixels = rng.integers(0, 255, (height // 32, width // 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((width, height)).save(directory / "images" / f"{index}.png")
        words = rng.choice(WORDS, size=8 if (index // len(SIZES)) % 2 == 0 else 200)
        lines.append({"image": f"{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the scene."}, {"from": "gpt", "value": " ".join(words)}]})
    (directory / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    meta = {"bench": {"root": str(directory / "images"), "annotation": str(directory / "data.jsonl"), "repeat_time": 1}}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory / "meta.json"


def build(meta: Path, args: argparse.Namespace):
    """The model config and the batches of both modes (the same samples, once each)."""
    from vitp.data.dataset import Collator, InstructionDataset, data_settings
    from vitp.data.meta import read_meta
    from vitp.data.templates import IMG_CONTEXT, prepare_tokenizer
    from vitp.data.tokenizer import conversation_texts, train_tokenizer
    from vitp.model.vision import PRESETS
    from vitp.model.vlm import VLMConfig
    from vitp.train.arguments import DataTrainingArguments
    from vitp.train.packing import PackedBatchSampler, PackedCollator, PackedItems

    tokenizer = train_tokenizer(conversation_texts(meta), vocab_size=400)
    prepare_tokenizer(tokenizer)
    vision = PRESETS["internvit-tiny"].replace(image_size=TILE)
    config = VLMConfig(vision=vision, text={**TEXT, "vocab_size": len(tokenizer)},
                       image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT))
    data_args = DataTrainingArguments(dynamic_image_size=True, use_thumbnail=True, max_dynamic_patch=6,
                                      conv_style="internvl2_5", system_message="Answer.", max_seq_length=4096)
    settings = data_settings(data_args, vision.image_size, config.num_image_token)
    dataset = InstructionDataset(read_meta(meta), tokenizer, settings, replace_bad=False)
    order = np.random.default_rng(1).permutation(len(dataset)).tolist()
    collate = Collator(tokenizer.pad_token_id)
    padded = [collate([dataset[i] for i in order[s : s + args.batch_size]]) for s in range(0, len(order), args.batch_size)]
    most_tiles = max(int(b["num_tiles"].sum()) for b in padded)  # a pack may hold what a padded batch holds
    max_tokens = args.max_packed_tokens or max(b["input_ids"].numel() for b in padded)  # 0: as a padded batch
    sampler = PackedBatchSampler(dataset, 1, max_tokens, most_tiles, 8, replacement=False, resampling=False, seed=1)
    items, packed_collate, packed, seen = PackedItems(dataset), PackedCollator(tokenizer.pad_token_id, "token"), [], 0
    for keys in sampler:
        packed.append(packed_collate([items[key] for key in keys]))
        seen += len(keys)
        if seen >= len(dataset):  # one pass: every sample once
            break
    return config, {"padded": padded, "packed": packed}


def train_once(config, batches, device: str, packed: bool) -> float:
    """Seconds for one pass over the batches: forward, backward and an optimizer step each."""
    from vitp.model.vlm import VisionLanguageModel, use_packed_attention

    torch.manual_seed(0)
    model = VisionLanguageModel(config).to(device).train()
    if packed:
        use_packed_attention(model)  # as `vitp pretrain --use_packed_ds` does
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items() if k != "dropped"}
              for b in batches]
    model(**inputs[0]).loss.backward()  # warm-up
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for batch in inputs:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def memory_worker(meta: str, args: argparse.Namespace, mode: str, results) -> None:
    """One pass of one mode in its own process: the peak memory of training, above what the process
    held before it (on a CPU, resident memory sampled every 5 ms)."""
    torch.set_num_threads(args.threads)
    config, batches = build(Path(meta), args)
    batches = batches[mode]
    if args.device == "cuda":
        train_once(config, batches, args.device, packed=mode == "packed")
        results.put(torch.cuda.max_memory_allocated())
        return
    baseline, peak, done = resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    train_once(config, batches, args.device, packed=mode == "packed")
    done.set()
    sampler.join()
    results.put(peak[0] - baseline)


def peak_memory(meta: Path, args: argparse.Namespace, mode: str) -> int:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=memory_worker, args=(str(meta), args, mode, results))
    process.start()
    peak = results.get()
    process.join()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_packed_tokens", type=int, default=8192,
                        help="upstream's default; 0: as many tokens as the largest padded batch has slots")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads (on a shared machine 1 avoids threads waiting for each other)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as directory:
        meta = make_data(Path(directory), args.samples)
        config, batches = build(meta, args)
        seconds: dict[str, list[float]] = {"padded": [], "packed": []}
        for _ in range(args.rounds):
            for mode in seconds:  # alternating, so that drifts of a shared machine hit both alike
                seconds[mode].append(train_once(config, batches[mode], args.device, packed=mode == "packed"))
        peaks = {mode: peak_memory(meta, args, mode) for mode in seconds}
    print(f"{args.device} ({args.threads} threads); {args.samples} samples of 1-7 tiles ({TILE} px), "
          f"{TEXT['num_hidden_layers']}x{TEXT['hidden_size']} Qwen2 LLM, short and long answers; fastest of "
          f"{args.rounds} passes")
    speed = {}
    for mode, times in seconds.items():
        tokens = sum(int(b["attention_mask"].sum()) for b in batches[mode])
        slots = sum(b["input_ids"].numel() for b in batches[mode])
        speed[mode] = tokens / min(times)
        print(f"  {mode:6s}: {len(batches[mode]):3d} steps, {tokens} tokens in {slots} slots "
              f"({1 - tokens / slots:.0%} padding), {min(times):6.2f} s, {speed[mode]:7.0f} tokens/s, "
              f"peak memory of training {peaks[mode] / 2**20:6.0f} MiB")
    print(f"  packed / padded tokens/s: {speed['packed'] / speed['padded']:.2f}x")


if __name__ == "__main__":
    main()
