"""Packed training (--use_packed_ds) against padded batches: tokens/s and peak memory.

    python benchmarks/packing.py [--device cpu|cuda] [--samples 48] [--batch_size 8] [--max_packed_tokens 2048]

A data set of mixed lengths is written to a temporary folder: images of six aspect ratios (1 to 6
tiles, plus a thumbnail, with max_dynamic_patch 6) and short or long answers. The same samples are
trained once as padded batches of --batch_size (the default order) and once packed by upstream's
buffer algorithm (vitp.train.packing, strict_mode off), with the real dataset, collators and model
(forward, backward, AdamW step). Batches are built before the clock starts, so the numbers are the
model's. Each mode runs in its own process (peak memory is that process's: RSS on a CPU, allocated
memory on a GPU), alternating for --rounds rounds; medians are printed with the packed/padded ratio.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# (width, height): 1x1, 2x1 + thumbnail, 3x1 + thumbnail, 2x2 + thumbnail, 1x5 + thumbnail, 3x2 + thumbnail
SIZES = [(224, 224), (448, 224), (672, 224), (448, 448), (224, 1120), (672, 448)]
WORDS = "the scene shows farmland forest water roads houses a river and fields near the coast with boats".split()
TEXT = dict(model_type="qwen2", hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=True)


def make_data(directory: Path, count: int) -> Path:
    """``count`` samples: each image size with a short and a long answer, in turn."""
    rng = np.random.default_rng(0)
    (directory / "images").mkdir(parents=True)
    lines = []
    for index in range(count):
        width, height = SIZES[index % len(SIZES)]
        pixels = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((width, height)).save(directory / "images" / f"{index}.png")
        words = rng.choice(WORDS, size=6 if (index // len(SIZES)) % 2 == 0 else 120)
        lines.append({"image": f"{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the scene."}, {"from": "gpt", "value": " ".join(words)}]})
    (directory / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    meta = {"bench": {"root": str(directory / "images"), "annotation": str(directory / "data.jsonl"), "repeat_time": 1}}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory / "meta.json"


def build(meta: Path, args: argparse.Namespace):
    """Tokenizer, dataset, a fresh model and the batches of both modes (the same samples)."""
    from vitp.data.dataset import Collator, InstructionDataset, data_settings
    from vitp.data.meta import read_meta
    from vitp.data.templates import IMG_CONTEXT, prepare_tokenizer
    from vitp.data.tokenizer import conversation_texts, train_tokenizer
    from vitp.model.vision import PRESETS
    from vitp.model.vlm import VisionLanguageModel, VLMConfig
    from vitp.train.arguments import DataTrainingArguments
    from vitp.train.packing import PackedBatchSampler, PackedCollator, PackedItems

    tokenizer = train_tokenizer(conversation_texts(meta), vocab_size=400)
    prepare_tokenizer(tokenizer)
    vision = PRESETS["internvit-tiny"].replace(image_size=224)
    config = VLMConfig(vision=vision, text={**TEXT, "vocab_size": len(tokenizer)},
                       image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT))
    data_args = DataTrainingArguments(dynamic_image_size=True, use_thumbnail=True, max_dynamic_patch=6,
                                      conv_style="internvl2_5", system_message="Answer.", max_seq_length=4096)
    settings = data_settings(data_args, vision.image_size, config.num_image_token)
    dataset = InstructionDataset(read_meta(meta), tokenizer, settings, replace_bad=False)
    order = np.random.default_rng(1).permutation(len(dataset)).tolist()
    collate = Collator(tokenizer.pad_token_id)
    padded = [collate([dataset[i] for i in order[s : s + args.batch_size]]) for s in range(0, len(order), args.batch_size)]
    sampler = PackedBatchSampler(dataset, 1, args.max_packed_tokens, 64, 8, replacement=False, resampling=False, seed=1)
    items, packed_collate, packed, seen = PackedItems(dataset), PackedCollator(tokenizer.pad_token_id, "token"), [], 0
    for keys in sampler:
        packed.append(packed_collate([items[key] for key in keys]))
        seen += len(keys)
        if seen >= len(dataset):  # one pass: every sample once
            break
    return config, padded, packed


def train_once(config, batches, device: str) -> float:
    """Seconds for one pass over the batches: forward, backward and an optimizer step each."""
    from vitp.model.vlm import VisionLanguageModel

    torch.manual_seed(0)
    model = VisionLanguageModel(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items() if k not in ("where", "dropped")}
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


def worker(meta: str, args: argparse.Namespace, mode: str, results) -> None:
    """One mode in its own process, so that its peak memory is its own."""
    torch.set_num_threads(args.threads)
    config, padded, packed = build(Path(meta), args)
    batches = padded if mode == "padded" else packed
    seconds = train_once(config, batches, args.device)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    slots = sum(b["input_ids"].numel() for b in batches)
    peak = (torch.cuda.max_memory_allocated() if args.device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    results.put({"mode": mode, "seconds": seconds, "tokens": tokens, "slots": slots, "steps": len(batches),
                 "peak_bytes": peak})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_packed_tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as directory:
        meta = make_data(Path(directory), args.samples)
        runs: dict[str, list[dict]] = {"padded": [], "packed": []}
        for _ in range(args.rounds):
            for mode in runs:  # alternating, so that drifts of a shared machine hit both alike
                results = context.Queue()
                process = context.Process(target=worker, args=(str(meta), args, mode, results))
                process.start()
                runs[mode].append(results.get())
                process.join()
    print(f"{args.device} ({args.threads} threads); {args.samples} samples of 1-7 tiles (224 px, "
          f"{TEXT['num_hidden_layers']}x{TEXT['hidden_size']} Qwen2 LLM), short and long answers; one pass per round, "
          f"median of {args.rounds} rounds")
    speed = {}
    for mode, results in runs.items():
        first = results[0]
        seconds = statistics.median(r["seconds"] for r in results)
        peak = statistics.median(r["peak_bytes"] for r in results)
        speed[mode] = first["tokens"] / seconds
        print(f"  {mode:6s}: {first['steps']:3d} steps, {first['tokens']} tokens in {first['slots']} slots "
              f"({1 - first['tokens'] / first['slots']:.0%} padding), {seconds:6.2f} s, {speed[mode]:7.0f} tokens/s, "
              f"peak memory {peak / 2**20:6.0f} MiB")
    print(f"  packed / padded tokens/s: {speed['packed'] / speed['padded']:.2f}x")


if __name__ == "__main__":
    main()
