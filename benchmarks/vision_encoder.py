"""Forward throughput of vitp's InternViT against transformers' InternVLVisionModel, same weights.

    python benchmarks/vision_encoder.py [--preset internvit-300m] [--device cpu|cuda] [--dtype fp32|bf16]

Prints images/s for both and the ratio (ours / transformers). Both run in the same process on the same
inputs after a warm-up; the outputs are checked to agree before timing.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import InternVLVisionModel

from vitp import build_vit, save_vit

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def images_per_second(forward, pixels: torch.Tensor, repeats: int, device: str) -> float:
    forward(pixels)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        forward(pixels)
    if device == "cuda":
        torch.cuda.synchronize()
    return repeats * pixels.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="internvit-300m")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    dtype = DTYPES[args.dtype]
    ours = build_vit(args.preset).eval()
    with tempfile.TemporaryDirectory() as directory:
        save_vit(ours, directory, to="hf")
        theirs = InternVLVisionModel.from_pretrained(directory, dtype=dtype).to(args.device).eval()
    ours = ours.to(args.device, dtype)
    size = ours.config.image_size
    pixels = torch.randn(args.batch_size, 3, size, size, device=args.device, dtype=dtype)

    with torch.inference_mode():
        difference = (ours(pixels).float() - theirs(pixels).last_hidden_state.float()).abs().max().item()
        ours_rate = images_per_second(lambda x: ours(x), pixels, args.repeats, args.device)
        theirs_rate = images_per_second(lambda x: theirs(x), pixels, args.repeats, args.device)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.preset} {size}px, batch {args.batch_size}, {args.dtype}, {device_name}")
    print(f"max |ours - transformers| on the last hidden state: {difference:.2e}")
    print(f"transformers InternVLVisionModel: {theirs_rate:8.2f} images/s")
    print(f"vitp InternViT (timm):            {ours_rate:8.2f} images/s")
    print(f"ratio vitp / transformers:        {ours_rate / theirs_rate:8.2f}x")


if __name__ == "__main__":
    main()
