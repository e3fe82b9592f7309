"""Feature extraction: the seed's loop against `vitp features`, same model and images, in one run.

    python benchmarks/features.py [--preset internvit-300m] [--images 16] [--batch_size 8]
                                  [--dtype bf16] [--num_workers N] [--device cpu|cuda]

* seed: ``extract_features.py`` of the seed guide — one image at a time, fp32, PIL open + torchvision
  transform, forward, mean, normalise (the InternViT is vitp's, with the same weights; the seed's
  ``InternVisionModel`` is the same network).
* vitp: :func:`vitp.retrieval.extract.extract_features` — DataLoader workers, batches, ``--dtype``, shards,
  atomic output — with the model already loaded (both timings exclude loading the checkpoint).

Prints images/s for both and the ratio, and the achieved GFLOP/s (analytic FLOPs of the ViT forward)
as a fraction of this machine's matmul peak measured in the same run (the best rate of a few large
GEMMs in each dtype, measured before and after the extraction runs), and as a fraction of the median
rate of the ViT's own GEMM shapes (on a shared CPU the best burst can be twice what is sustained).
The load average is printed too: other work on the machine lowers both numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision import transforms

from vitp import build_vit, save_vit
from vitp.model.vision import VisionConfig
from vitp.options import PRECISIONS, torch_dtype
from vitp.retrieval.extract import extract_features, load_feature_model
from vitp.retrieval.feature_file import load_features


def vit_forward_flops(config: VisionConfig, layers: int | None = None) -> float:
    """Multiply-adds x 2 of one image through the patch embedding and ``layers`` blocks."""
    patches = config.num_patches
    tokens = patches + 1
    dim, mlp = config.hidden_size, config.intermediate_size
    embed = 2 * patches * (3 * config.patch_size**2) * dim
    linear = 2 * tokens * (3 * dim * dim + dim * dim + 2 * dim * mlp)  # qkv, proj, fc1, fc2
    attention = 2 * 2 * tokens * tokens * dim  # q @ k^T and attn @ v over all heads
    return embed + (layers if layers is not None else config.num_layers) * (linear + attention)


def matmul_peak(dtype: torch.dtype, device: str, config: VisionConfig, batch: int, repeats: int = 3) -> float:
    """Best FLOP/s of a few large GEMMs: square ones and the ViT's own MLP shapes."""
    tokens = batch * (config.num_patches + 1)
    shapes = [(4096, 4096, 4096), (2048, 2048, 2048),
              (tokens, config.hidden_size, config.intermediate_size), (tokens, config.intermediate_size, config.hidden_size)]
    return max(max(gemm_rates(m, k, n, dtype, device, repeats)) for m, k, n in shapes)


def sustained_vit_gemm_rate(dtype: torch.dtype, device: str, config: VisionConfig, batch: int, repeats: int = 5) -> float:
    """Median FLOP/s of the ViT's own linear layers as bare GEMMs (qkv, proj, fc1, fc2), one after the
    other as in a forward: what the linear layers could reach here, without bursts (a shared or
    turbo-boosted CPU shows short bursts far above the rate it sustains)."""
    tokens, dim, mlp = batch * (config.num_patches + 1), config.hidden_size, config.intermediate_size
    rates = []
    for m, k, n in ((tokens, dim, 3 * dim), (tokens, dim, dim), (tokens, dim, mlp), (tokens, mlp, dim)):
        rates += gemm_rates(m, k, n, dtype, device, repeats)
    return statistics.median(rates)


def gemm_rates(m: int, k: int, n: int, dtype: torch.dtype, device: str, repeats: int) -> list[float]:
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    a @ b  # warm-up
    rates = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        rates.append(2 * m * k * n / (time.perf_counter() - start))
    return rates


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def model_forward_rate(feature_model, batch_size: int, device: str, repeats: int = 2) -> float:
    """Images/s of the ViT forward alone (random pixels, after a warm-up): vitp's ceiling on this machine."""
    size = feature_model.image_size
    pixels = torch.randn(batch_size, 3, size, size, device=device)
    with torch.inference_mode():
        feature_model.model(pixels)
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            feature_model.model(pixels)
        _synchronize(device)
    return repeats * batch_size / (time.perf_counter() - start)


def make_images(root: Path, count: int) -> list[Path]:
    """Photos-sized JPEGs (640x480) with coloured shapes, in 4 class folders."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        x, y = (int(v) for v in rng.integers(0, 400, 2))
        draw.ellipse([x, y, x + 200, y + 150], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        path = folder / f"img{i:05d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return sorted(paths)


def seed_extract(model: torch.nn.Module, paths: list[Path], device: str) -> tuple[np.ndarray, float]:
    """The seed's loop: one image at a time, fp32, mean over all tokens, L2 normalisation."""
    size = model.config.image_size
    transform = transforms.Compose([
        transforms.Resize((size, size)),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    features = []
    start = time.perf_counter()
    with torch.no_grad():
        for path in paths:
            image = Image.open(path).convert("RGB")
            pixel_values = transform(image).unsqueeze(0).to(device)
            hidden_states = model(pixel_values)  # last layer, [1, N, D]
            feature = hidden_states.mean(dim=1)
            feature = feature / feature.norm(dim=-1, keepdim=True)
            features.append(feature.cpu().numpy()[0])
    return np.array(features), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="internvit-300m")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--dtype", default="bf16", choices=tuple(PRECISIONS))
    parser.add_argument("--num_workers", type=int, help="vitp's decoding workers (default: vitp's default)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp / "images", args.images)
        save_vit(build_vit(args.preset).eval(), tmp / "vit.safetensors")
        config = load_feature_model(tmp / "vit.safetensors", device="cpu", dtype="fp32").model.config
        flops = vit_forward_flops(config)
        load_before = os.getloadavg()[0]
        peak = {name: matmul_peak(torch_dtype(name), args.device, config, args.batch_size) for name in ("fp32", args.dtype)}

        seed_model = load_feature_model(tmp / "vit.safetensors", device=args.device, dtype="fp32")
        seed_features, seed_seconds = seed_extract(seed_model.model, paths, args.device)
        del seed_model

        vitp_model = load_feature_model(tmp / "vit.safetensors", device=args.device, dtype=args.dtype)
        start = time.perf_counter()
        extract_features(tmp / "images", tmp / "features.npz", feature_model=vitp_model, batch_size=args.batch_size,
                         num_workers=args.num_workers, progress_bar=False)
        vitp_seconds = time.perf_counter() - start
        vitp_features = load_features(tmp / "features.npz").features

        forward_rate = model_forward_rate(vitp_model, args.batch_size, args.device)

        for name in peak:  # the best rate seen, before or after
            peak[name] = max(peak[name], matmul_peak(torch_dtype(name), args.device, config, args.batch_size))
        sustained = sustained_vit_gemm_rate(torch_dtype(args.dtype), args.device, config, args.batch_size)
        load_after = os.getloadavg()[0]

    seed_rate, vitp_rate = args.images / seed_seconds, args.images / vitp_seconds
    seed_gflops, vitp_gflops = flops * seed_rate / 1e9, flops * vitp_rate / 1e9
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    agreement = float(np.mean(np.sum(seed_features * vitp_features, axis=1)))
    print(f"{args.preset} at {config.image_size} px ({flops / 1e9:.1f} GFLOP per image), {args.images} images "
          f"640x480 JPEG, {device}; load average {load_before:.2f} before, {load_after:.2f} after")
    print(f"matmul peak measured: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, {args.dtype} {peak[args.dtype] / 1e9:.0f} GFLOP/s")
    print(f"seed loop (batch 1, fp32):               {seed_rate:7.3f} images/s  {seed_gflops:7.0f} GFLOP/s = "
          f"{seed_gflops * 1e9 / peak['fp32']:.0%} of fp32 peak")
    print(f"vitp features (batch {args.batch_size}, {args.dtype}, workers): {vitp_rate:7.3f} images/s  {vitp_gflops:7.0f} "
          f"GFLOP/s = {vitp_gflops * 1e9 / peak[args.dtype]:.0%} of {args.dtype} peak")
    print(f"  ViT forward alone (batch {args.batch_size}, {args.dtype}):   {forward_rate:7.3f} images/s  "
          f"{flops * forward_rate / 1e9:7.0f} GFLOP/s = {flops * forward_rate / peak[args.dtype]:.0%} of {args.dtype} peak")
    print(f"  sustained rate of the ViT's GEMM shapes ({args.dtype}, median): {sustained / 1e9:.0f} GFLOP/s; vitp features "
          f"reach {vitp_gflops * 1e9 / sustained:.0%} of it, the forward alone {flops * forward_rate / sustained:.0%}")
    print(f"ratio vitp / seed:                       {vitp_rate / seed_rate:7.2f}x")
    print(f"mean cosine(seed feature, vitp feature): {agreement:.4f} (seed: bilinear resize, mean incl. CLS, fp32)")


if __name__ == "__main__":
    main()
