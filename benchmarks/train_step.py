"""Training step: vitp's model against transformers' InternVLForConditionalGeneration, and TMAug drop.

    python benchmarks/train_step.py [--device cpu|cuda] [--dtype fp32|bf16] [--steps 5]

Same weights, same batch (image tokens >= 80 % of every sequence), forward + backward:
1. transformers InternVLForConditionalGeneration vs vitp -> tokens/s of both and the ratio;
2. vitp without TMAug vs TMAug ``drop`` at ratio 0.75 on every sample -> step time ratio (upstream pads
   the dropped sequence back to its old length, so it saves nothing).
The model is small enough for a CPU; its LLM is the larger part, as in InternVL where the LLM sees
every tile's tokens. The share of the step spent in the ViT is printed: TMAug cannot shorten that part.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import InternVLForConditionalGeneration

from vitp.data.tokenizer import train_tokenizer
from vitp.model.checkpoint import save_vlm
from vitp.model.tmaug import TMAugConfig
from vitp.model.vision import PRESETS
from vitp.model.vlm import VisionLanguageModel, VLMConfig
from vitp.data.template import IMG_CONTEXT, prepare_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEXT = dict(model_type="qwen2", hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)


def make_batch(model: VisionLanguageModel, samples: int, tiles: int, text: int, device: str):
    ctx, per_tile = model.vlm_config.image_token_id, model.vlm_config.num_image_token
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(samples):
        words = torch.randint(20, 300, (text,), generator=generator).tolist()
        rows.append(words[: text // 2] + [ctx] * (tiles * per_tile) + words[text // 2 :])
    ids = torch.tensor(rows, device=device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : text // 2 + tiles * per_tile] = -100  # the answer is the text after the image
    size = model.vlm_config.vision.image_size
    pixels = torch.randn(samples * tiles, 3, size, size, generator=generator).to(device)
    return ids, mask, labels, pixels, torch.full((samples,), tiles, device=device)


def median_step(step, repeats: int, device: str) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tiles", type=int, default=8)
    parser.add_argument("--text_tokens", type=int, default=24)
    args = parser.parse_args()

    tokenizer = train_tokenizer(["a small benchmark corpus with some words"] * 10, vocab_size=300)
    prepare_tokenizer(tokenizer)
    config = VLMConfig(vision=PRESETS["internvit-tiny"], text={**TEXT, "vocab_size": len(tokenizer)},
                       image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT))
    dtype = DTYPES[args.dtype]
    ours = VisionLanguageModel(config).train()
    with tempfile.TemporaryDirectory() as directory:
        save_vlm(ours, directory, tokenizer)
        theirs = InternVLForConditionalGeneration.from_pretrained(directory, dtype=dtype).to(args.device).train()
    ours = ours.to(args.device, dtype)
    ids, mask, labels, pixels, tiles = make_batch(ours, args.samples, args.tiles, args.text_tokens, args.device)
    pixels = pixels.to(dtype)
    tokens = int(mask.sum())
    image_share = float((ids == config.image_token_id).float().mean())

    def ours_step():
        ours.zero_grad(set_to_none=True)
        ours(ids, mask, pixels, tiles, labels=labels).loss.backward()

    def theirs_step():
        theirs.zero_grad(set_to_none=True)
        theirs(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss.backward()

    def vit_only():
        ours.zero_grad(set_to_none=True)
        ours.extract_feature(pixels).float().square().mean().backward()

    theirs_time = median_step(theirs_step, args.steps, args.device)
    ours_time = median_step(ours_step, args.steps, args.device)
    vit_time = median_step(vit_only, args.steps, args.device)
    ours.tmaug = TMAugConfig(prob=1.0, ratio=0.75, mode="drop")
    tmaug_time = median_step(ours_step, args.steps, args.device)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{device_name}, {args.dtype}: batch {args.samples} x {ids.shape[1]} tokens "
          f"({image_share:.0%} image tokens, {args.tiles} tiles of {config.num_image_token} tokens per sample); "
          f"ViT {config.vision.num_layers}x{config.vision.hidden_size}, LLM {TEXT['num_hidden_layers']}x{TEXT['hidden_size']}")
    print(f"transformers InternVLForConditionalGeneration: {theirs_time * 1e3:8.1f} ms/step  {tokens / theirs_time:9.0f} tokens/s")
    print(f"vitp VisionLanguageModel:                      {ours_time * 1e3:8.1f} ms/step  {tokens / ours_time:9.0f} tokens/s"
          f"  ratio {theirs_time / ours_time:.2f}x")
    print(f"vitp + TMAug drop 0.75 on every sample:        {tmaug_time * 1e3:8.1f} ms/step  "
          f"step time {tmaug_time / ours_time:.2f}x of no TMAug  (ViT part of a step: {vit_time / ours_time:.0%})")


if __name__ == "__main__":
    main()
