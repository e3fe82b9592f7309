"""Training step: vitp's model against transformers' InternVLForConditionalGeneration, and TMAug drop.

    python benchmarks/train_step.py [--device cpu|cuda] [--dtype fp32|bf16] [--steps 5]

Same weights, same batch (image tokens >= 80 % of every sequence), forward + backward:
1. transformers InternVLForConditionalGeneration vs vitp -> tokens/s of both and the ratio (vitp runs
   the LM head on the answer positions only; with Qwen2.5's 151,674-token vocabulary the logits of every
   position are the largest tensor of a step);
2. vitp without TMAug vs TMAug ``drop`` at ratio 0.75 on every sample -> step time ratio (upstream pads
   the dropped sequence back to its old length, so it saves nothing).
Both are measured with Qwen2.5's vocabulary and with a tiny one, where the token-proportional LLM work
dominates (as in InternVL with a large LLM). The model is small enough for a CPU. The share of the step
spent in the ViT is printed: TMAug cannot shorten that part.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import InternVLForConditionalGeneration

from vitp.data.templates import IMG_CONTEXT, prepare_tokenizer
from vitp.data.tokenizer import train_tokenizer
from vitp.model.checkpoint import save_vlm
from vitp.model.tmaug import TMAugConfig
from vitp.model.vision import PRESETS
from vitp.model.vlm import VisionLanguageModel, VLMConfig
from vitp.options import torch_dtype

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


def median_steps(steps: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds per step of each candidate, measured in alternating rounds so that drifts of a
    shared machine (other processes, clocks) hit every candidate alike."""
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def measure(vocab_size: int, args: argparse.Namespace, tokenizer) -> None:
    """Print the three comparisons for one LLM vocabulary size."""
    config = VLMConfig(vision=PRESETS["internvit-tiny"], text={**TEXT, "vocab_size": max(vocab_size, len(tokenizer))},
                       image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT))
    dtype = torch_dtype(args.dtype)
    torch.manual_seed(0)
    ours = VisionLanguageModel(config).train()
    with tempfile.TemporaryDirectory() as directory:
        save_vlm(ours, directory, tokenizer)
        theirs = InternVLForConditionalGeneration.from_pretrained(directory, dtype=dtype).to(args.device).train()
    tmaug_model = VisionLanguageModel(config, TMAugConfig(prob=1.0, ratio=0.75, mode="drop")).train()
    tmaug_model.load_state_dict(ours.state_dict())
    ours, tmaug_model = ours.to(args.device, dtype), tmaug_model.to(args.device, dtype)
    ids, mask, labels, pixels, tiles = make_batch(ours, args.samples, args.tiles, args.text_tokens, args.device)
    pixels = pixels.to(dtype)
    tokens = int(mask.sum())
    image_share = float((ids == config.image_token_id).float().mean())

    def step(model, **inputs):
        def run():
            model.zero_grad(set_to_none=True)
            model(**inputs).loss.backward()
        return run

    def vit_only():
        ours.zero_grad(set_to_none=True)
        ours.extract_feature(pixels).float().square().mean().backward()

    vitp_inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, num_tiles=tiles, labels=labels)
    timings = median_steps({
        "ours": step(ours, **vitp_inputs),
        "theirs": step(theirs, input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels),
        "vit": vit_only,
        "tmaug": step(tmaug_model, **vitp_inputs),
    }, args.steps, args.device)
    theirs_time, ours_time, vit_time, tmaug_time = (timings[k] for k in ("theirs", "ours", "vit", "tmaug"))
    print(f"vocabulary {config.text['vocab_size']}: batch {args.samples} x {ids.shape[1]} tokens ({image_share:.0%} "
          f"image tokens, {args.tiles} tiles of {config.num_image_token} tokens per sample)")
    print(f"  transformers InternVLForConditionalGeneration: {theirs_time * 1e3:8.1f} ms/step  {tokens / theirs_time:7.0f} tokens/s")
    print(f"  vitp VisionLanguageModel:                      {ours_time * 1e3:8.1f} ms/step  {tokens / ours_time:7.0f} tokens/s"
          f"  ratio {theirs_time / ours_time:.2f}x")
    print(f"  vitp + TMAug drop 0.75 on every sample:        {tmaug_time * 1e3:8.1f} ms/step  "
          f"step time {tmaug_time / ours_time:.2f}x of no TMAug  (ViT part of a step: {vit_time / ours_time:.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tiles", type=int, default=8)
    parser.add_argument("--text_tokens", type=int, default=24)
    parser.add_argument("--vocab_sizes", type=int, nargs="+", default=[151_674, 512],
                        help="LLM vocabularies to measure: Qwen2.5's (InternVL2.5-1B) and a tiny one, where the "
                             "token-proportional LLM work dominates as in a large LLM")
    args = parser.parse_args()

    tokenizer = train_tokenizer(["a small benchmark corpus with some words"] * 10, vocab_size=300)
    prepare_tokenizer(tokenizer)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{device_name}, {args.dtype}; ViT {PRESETS['internvit-tiny'].num_layers}x{PRESETS['internvit-tiny'].hidden_size}, "
          f"LLM Qwen2 {TEXT['num_hidden_layers']}x{TEXT['hidden_size']}; forward + backward, median of {args.steps} "
          f"alternating rounds")
    for vocab_size in args.vocab_sizes:
        measure(vocab_size, args, tokenizer)


if __name__ == "__main__":
    main()
