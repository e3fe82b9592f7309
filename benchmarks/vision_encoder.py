"""Forward throughput of vitp's InternViT against transformers' InternVLVisionModel, same weights; and the
memory a ViT needs, computed from its shapes.

    python benchmarks/vision_encoder.py [--preset internvit-300m] [--device cpu|cuda] [--dtype fp32|bf16]
    python benchmarks/vision_encoder.py --memory --preset internvit-6b-448 [--gpus 8] [--device cuda]

Throughput: images/s for both and the ratio (ours / transformers). Both run in the same process on the
same inputs after a warm-up; the outputs are checked to agree before timing.

--memory: bf16 weights, activations per image for feature extraction, and per-GPU model states and
activations for training with DeepSpeed ZeRO-3 (bf16 weights and gradients, fp32 master weights and Adam
moments: 16 bytes per parameter, sharded over --gpus), with and without gradient checkpointing; all from
the preset's shapes (the model is built on the meta device, nothing is allocated). With --device cuda it
also measures the peak memory of a bf16 extraction batch and prints it against the estimate.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import InternVLVisionModel

from vitp import VisionConfig, build_vit, save_vit, vision_config
from vitp.model.vision import InternViT, count_parameters
from vitp.options import PRECISIONS, torch_dtype


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


GB = 1e9


def memory_estimate(config: VisionConfig, gpus: int) -> dict[str, float]:
    """Bytes a ViT of ``config`` needs, from its shapes (bf16 activations, 2 bytes per element).

    Extraction keeps one block's tensors alive at a time; the widest moment is the MLP: its input, the
    normed input, fc1's output and GELU's output (1 + 1 + 4 + 4 token widths for a 4x MLP), plus the
    residual stream. Training without checkpointing keeps, per block, what backward needs: the block
    input, both norms' outputs, q/k/v and their QK-norms, the attention output, fc1's and GELU's outputs.
    With checkpointing only each block's input is kept, and one block is recomputed at a time."""
    with torch.device("meta"):
        parameters = count_parameters(InternViT(config))
    tokens, width = config.num_patches + 1, config.hidden_size
    mlp = config.intermediate_size / width
    token_bytes = tokens * width * 2
    one_block_live = (3 + 2 * mlp) * token_bytes  # residual + norm + MLP input, fc1 and GELU outputs
    per_block_saved = (1 + 2 + 3 + (2 if config.qk_norm else 0) + 1 + 2 * mlp) * token_bytes
    per_layer_params = (parameters - (config.num_patches + 1 + config.patch_size**2 * 3 + 2) * width) / config.num_layers
    return {
        "parameters": parameters,
        "weights_bf16": parameters * 2,
        "extract_per_image": one_block_live,
        "zero3_states_per_gpu": parameters * 16 / gpus,
        "zero3_gathered_layer": per_layer_params * 2 * 2,  # the layer computed and the one prefetched
        "train_per_tile_checkpointed": config.num_layers * token_bytes + per_block_saved,
        "train_per_tile_plain": config.num_layers * per_block_saved,
    }


def print_memory(args: argparse.Namespace) -> None:
    config = vision_config(args.preset)
    estimate = memory_estimate(config, args.gpus)
    print(f"{args.preset}: {estimate['parameters'] / 1e9:.2f}B parameters, {config.num_layers} layers, "
          f"{config.num_patches + 1} tokens per {config.image_size}px tile (bf16 activations)")
    print("feature extraction (bf16, no gradients):")
    print(f"  weights                         {estimate['weights_bf16'] / GB:7.1f} GB")
    print(f"  activations per image           {estimate['extract_per_image'] / GB:7.3f} GB"
          f"  -> batch 64: {(estimate['weights_bf16'] + 64 * estimate['extract_per_image']) / GB:.1f} GB in all")
    print(f"training, DeepSpeed ZeRO-3 over {args.gpus} GPUs (ViT only; add the LLM's share):")
    print(f"  model states per GPU (16 B/param) {estimate['zero3_states_per_gpu'] / GB:5.1f} GB"
          f"  (one GPU without ZeRO: {estimate['parameters'] * 16 / GB:.1f} GB)")
    print(f"  gathered layers (ZeRO-3)        {estimate['zero3_gathered_layer'] / GB:7.2f} GB")
    print(f"  activations per tile, checkpointed {estimate['train_per_tile_checkpointed'] / GB:5.2f} GB"
          f"  (ViTP's 4 samples x up to 7 tiles: {28 * estimate['train_per_tile_checkpointed'] / GB:.1f} GB)")
    print(f"  activations per tile, plain     {estimate['train_per_tile_plain'] / GB:7.2f} GB")
    if args.device == "cuda":
        model = build_vit(config).to("cuda", torch.bfloat16).eval()
        pixels = torch.randn(args.batch_size, 3, config.image_size, config.image_size, device="cuda", dtype=torch.bfloat16)
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            model(pixels)
        measured = torch.cuda.max_memory_allocated()
        expected = estimate["weights_bf16"] + args.batch_size * estimate["extract_per_image"] + pixels.numel() * 2
        print(f"measured peak, extraction batch {args.batch_size}: {measured / GB:.2f} GB; "
              f"estimate {expected / GB:.2f} GB; ratio {measured / expected:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="internvit-300m")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=tuple(PRECISIONS))
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="print the memory the preset needs (see above)")
    parser.add_argument("--gpus", type=int, default=8, help="--memory: GPUs ZeRO-3 shards over (default: %(default)s)")
    args = parser.parse_args()
    if args.memory:
        print_memory(args)
        return

    dtype = torch_dtype(args.dtype)
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
