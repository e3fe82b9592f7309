"""Downstream transfer: the costs of the dense backbone's parts.

    python benchmarks/downstream.py --parts deform [train] [evaluation] [--device cpu|cuda] [--batch_size N] [--repeats 5]
                                    [--vit PRESET|CHECKPOINT] [--image_size 512] [--steps 3] [--dtype fp32|bf16]

(``--deform`` is short for ``--parts deform``.)

deform: multi-scale deformable attention's sampling at ViT-Adapter's real shapes for a 512 px input
(ViT-L: 1024 channels, deform_ratio 0.25 -> 256 value channels in 16 heads, 4 points), in both of its uses:
the injector (the 32x32 ViT tokens attend to the SPM's 3 levels, 64x64 + 32x32 + 16x16) and the extractor
(those 5376 SPM tokens attend to the ViT's one level). Forward, and forward + backward, in seconds per
call (median of alternating rounds) for three formulations of the same operator:
  * vitp: ``vitp.downstream.deformable_attention.deformable_sampling`` (what the adapter runs);
  * reference: upstream's ``ms_deform_attn_core_pytorch`` formulation (per-level ``grid_sample``, the
    levels stacked, then weighted), written out below;
  * gather: one gather over the flattened value with explicit bilinear weights (the candidate that did
    not win: kept here so the choice can be re-measured on other hardware).
The outputs are checked to agree before timing; ratios are reference / vitp and gather / vitp (> 1:
vitp is faster), measured in the same run.

train: one training step of ViTP's segmentation model (UPerNet: ``build_upernet_segmentor``, 7 classes as
LoveDA) on the dense encoder (``build_encoder``, patch 16) with each neck, SimpleFPN and ViT-Adapter, each
with and without gradient checkpointing: ``model.loss(pixels, labels)["total"].backward()`` (under bf16
autocast with ``--dtype bf16``) and an AdamW step. Images/s are the median of alternating rounds in one
process (the two settings of a neck share one model and toggle ``set_grad_checkpointing``); peak memory
is measured in a fresh process per setting, built with ``grad_checkpoint=``, over one step after a
warm-up step (so AdamW's state exists): on CUDA ``torch.cuda.max_memory_allocated`` minus what was
allocated before the model was built (tensor bytes); on the CPU the growth of the process's peak resident
set (/proc VmHWM, reset after the warm-up) over its resident set before the model was built (tensor bytes
plus the allocator's slack). Both count weights, gradients, AdamW state and activations. Ratios are
against SimpleFPN without checkpointing, measured in the same run. The CPU defaults to internvit-small
(a 300M ViT at 512 px takes minutes per step on a few cores); CUDA to internvit-300m (ViTP's ViT-L).

evaluation: the costs of evaluating at users' sizes, each against a plain baseline in the same run.
Bootstrap intervals of a 2000-image, 16-class segmentation evaluation with 1000 resamples
(``DenseEvaluation.add_intervals``: every resample's areas summed by one matrix product per chunk)
against a loop that sums each resample's rows one resample at a time; and sliding-window inference on
a 4000 x 4000 image with iSAID's crop 896 / stride 448 (64 windows, 4 per forward) through a 1x1
convolution, against the same convolution on the whole image (the windowing's overhead).

Each part is one function taking the parsed arguments, registered in ``PARTS`` (the choices of --parts).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from peak_memory import reset_peak, status_kb
from vitp.downstream.backbone import build_encoder
from vitp.downstream.deformable_attention import deformable_sampling
from vitp.downstream.segmentor import build_upernet_segmentor

# ViT-L (InternViT-300M) at 512 px with patch 16, as ViTP's segmentation configs run it
DIM, HEADS, POINTS, DEFORM_RATIO = 1024, 16, 4, 0.25
SPM_LEVELS = [(64, 64), (32, 32), (16, 16)]  # strides 8, 16, 32
VIT_GRID = [(32, 32)]


# --------------------------------------------------------------------------------------------------
# Timing


def median_seconds(candidates: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, float]:
    """Median seconds per call of each candidate, in alternating rounds (a shared machine's drifts hit
    every candidate alike), after one warm-up call each."""
    for run in candidates.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------------------------------
# --parts deform


def reference_sampling(value, spatial_shapes, sampling_locations, attention_weights):
    """Upstream's ``ms_deform_attn_core_pytorch`` formulation: grid_sample per level, stack, weight, sum."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        level_value = value_list[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, h, w)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(batch, heads * head_dim, queries)
    return output.transpose(1, 2)


def gather_sampling(value, spatial_shapes, sampling_locations, attention_weights):
    """The same operator as one gather: the 4 neighbours of every point, their bilinear weights (zero off
    the map) times the attention weight, and a weighted sum of the gathered rows."""
    batch, length, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    device = value.device
    sizes = torch.tensor(spatial_shapes, dtype=value.dtype, device=device)
    height, width = sizes[:, 0].view(1, 1, 1, levels, 1, 1), sizes[:, 1].view(1, 1, 1, levels, 1, 1)
    starts = torch.tensor([0] + [h * w for h, w in spatial_shapes][:-1], device=device).cumsum(0)
    x = sampling_locations[..., 0:1] * width - 0.5
    y = sampling_locations[..., 1:2] * height - 0.5
    x0, y0 = x.floor(), y.floor()
    xs = torch.cat([x0, x0 + 1, x0, x0 + 1], -1)
    ys = torch.cat([y0, y0, y0 + 1, y0 + 1], -1)
    fx, fy = x - x0, y - y0
    bilinear = torch.cat([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)
    inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    weights = bilinear * inside * attention_weights.unsqueeze(-1)
    index = (ys.clamp(0) .minimum(height - 1) * width + xs.clamp(0).minimum(width - 1)).long()
    index = index + starts.view(1, 1, 1, levels, 1, 1)
    index = index.permute(0, 2, 1, 3, 4, 5).reshape(batch, heads, queries, levels * points * 4)
    weights = weights.permute(0, 2, 1, 3, 4, 5).reshape(batch, heads, queries, levels * points * 4)
    offset = (torch.arange(batch * heads, device=device) * length).view(batch, heads, 1, 1)
    rows = value.permute(0, 2, 1, 3).reshape(batch * heads * length, head_dim)
    gathered = rows.index_select(0, (index + offset).flatten()).view(batch, heads, queries, -1, head_dim)
    output = (weights.unsqueeze(-2) @ gathered).squeeze(-2)  # (B, heads, Lq, head_dim)
    return output.transpose(1, 2).reshape(batch, queries, heads * head_dim)


FORMULATIONS = {"vitp": deformable_sampling, "reference": reference_sampling, "gather": gather_sampling}


def deform_inputs(queries: int, spatial_shapes, batch: int, device: str):
    """Value, locations and weights as the adapter makes them (softmax over a head's points, offsets of
    a few pixels around the reference point, some points off the map)."""
    generator = torch.Generator().manual_seed(0)
    head_dim = int(DIM * DEFORM_RATIO) // HEADS
    length = sum(h * w for h, w in spatial_shapes)
    levels = len(spatial_shapes)
    value = torch.randn(batch, length, HEADS, head_dim, generator=generator)
    reference = torch.rand(batch, queries, 1, 1, 1, 2, generator=generator)
    offsets = torch.randn(batch, queries, HEADS, levels, POINTS, 2, generator=generator) * 3
    normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=torch.float32).view(1, 1, 1, levels, 1, 2)
    locations = reference + offsets / normalizer
    weights = torch.randn(batch, queries, HEADS, levels * POINTS, generator=generator).softmax(-1)
    weights = weights.view(batch, queries, HEADS, levels, POINTS)
    return [t.to(device).requires_grad_() for t in (value, locations, weights)]


def run_deform(args: argparse.Namespace) -> None:
    batch = args.batch_size or 2
    print(f"multi-scale deformable attention sampling, ViT-L at 512 px (batch {batch}), {device_name(args.device)}")
    uses = {
        "injector  (1024 ViT queries, 3 levels)": (VIT_GRID[0][0] * VIT_GRID[0][1], SPM_LEVELS),
        "extractor (5376 SPM queries, 1 level) ": (sum(h * w for h, w in SPM_LEVELS), VIT_GRID),
    }
    for use, (queries, shapes) in uses.items():
        inputs = deform_inputs(queries, shapes, batch, args.device)
        with torch.no_grad():
            outputs = {name: fn(inputs[0], shapes, *inputs[1:]) for name, fn in FORMULATIONS.items()}
        for name, output in outputs.items():
            difference = (output - outputs["vitp"]).abs().max().item()
            if difference > 1e-4:
                raise SystemExit(f"{use}: {name} differs from vitp by {difference:.2e}")

        def forward(fn):
            def run():
                with torch.no_grad():
                    fn(inputs[0], shapes, *inputs[1:])
            return run

        def forward_backward(fn):
            def run():
                fn(inputs[0], shapes, *inputs[1:]).sum().backward()
            return run

        for label, wrap in (("forward", forward), ("forward+backward", forward_backward)):
            seconds = median_seconds({name: wrap(fn) for name, fn in FORMULATIONS.items()}, args.repeats, args.device)
            listed = "  ".join(f"{name} {seconds[name] * 1e3:8.2f} ms" for name in FORMULATIONS)
            print(f"{use} {label:17s} {listed}   reference/vitp {seconds['reference'] / seconds['vitp']:5.2f}x"
                  f"   gather/vitp {seconds['gather'] / seconds['vitp']:5.2f}x")


# --------------------------------------------------------------------------------------------------
# --parts train

NUM_CLASSES = 7  # LoveDA's (ViTP's iSAID/LoveDA/UAVid configs differ only in this)
PATCH_SIZE = 16  # every ViTP downstream config resizes the patch kernel 14 -> 16
NECKS = {"simple_fpn": "SimpleFPN", "adapter": "ViT-Adapter"}
# (neck, gradient checkpointing); the first is the baseline of the ratios
TRAIN_SETTINGS = [("simple_fpn", False), ("simple_fpn", True), ("adapter", False), ("adapter", True)]
DEFAULT_VIT = {"cpu": "internvit-small", "cuda": "internvit-300m"}
DEFAULT_TRAIN_BATCH = {"cpu": 1, "cuda": 8}  # ViTP trains 1 image per GPU; 8 gives a GPU enough work to time


def build_segmentor(vit: str, neck: str, image_size: int, grad_checkpoint: bool, device: str,
                    head_channels: int = 512) -> nn.Module:
    """ViTP's segmentation model on ``vit`` (a preset name: random weights; or a checkpoint), in train mode.
    ``head_channels``: UPerHead's width (ViTP's 512; smaller only for rehearsals on tiny models)."""
    torch.manual_seed(0)
    encoder = build_encoder(vit, neck=neck, image_size=image_size, patch_size=PATCH_SIZE,
                            grad_checkpoint=grad_checkpoint)
    return build_upernet_segmentor(encoder, num_classes=NUM_CLASSES, channels=head_channels).to(device).train()


def segmentation_batch(batch: int, image_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normalised pixels and labels, with an ignored (255) strip as a padded crop has."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (batch, image_size, image_size), generator=generator)
    labels[:, :, image_size - image_size // 8 :] = 255
    return pixels.to(device), labels.to(device)


def training_step(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, dtype: str) -> Callable[[], None]:
    """One step as a segmentation run takes it: fp32 weights, the loss under autocast (bf16) or not (fp32),
    backward, AdamW (fused on CUDA), gradients freed."""
    device_type = pixels.device.type
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, weight_decay=0.1, fused=device_type == "cuda")  # ViTP's

    def step() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model.loss(pixels, labels)["total"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def step_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of ``step`` as it executes (matmuls, convolutions, attention; recomputation under
    gradient checkpointing included), counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def peak_training_memory(vit: str, neck: str, grad_checkpoint: bool, image_size: int, batch: int, dtype: str,
                         device: str, threads: int) -> int | None:
    """Peak memory in bytes of one training step (after a warm-up step) over what this process held before
    the model was built; meant for a fresh process (see the module's docstring). None where /proc is missing."""
    torch.set_num_threads(threads)
    pixels, labels = segmentation_batch(batch, image_size, device)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    else:
        before = status_kb("VmRSS") * 1024
    step = training_step(build_segmentor(vit, neck, image_size, grad_checkpoint, device), pixels, labels, dtype)
    step()  # AdamW's state is made here
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    reset_peak()
    step()
    peak = status_kb("VmHWM") * 1024
    return peak - before if peak and before else None


def in_fresh_process(function: Callable, *args) -> object:
    """``function(*args)`` in a new spawned process: its memory is not mixed with this one's (freed memory
    the allocator keeps, other models)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def setting_name(neck: str, grad_checkpoint: bool) -> str:
    return f"{NECKS[neck]}{' + grad ckpt' if grad_checkpoint else ''}"


def format_gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def run_train(args: argparse.Namespace) -> None:
    vit = args.vit or DEFAULT_VIT[args.device]
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    batch = args.batch_size or DEFAULT_TRAIN_BATCH[args.device]
    size = args.image_size
    print(f"UPerNet training step (loss + backward + AdamW), {vit} at {size} px (patch {PATCH_SIZE}), batch {batch}, "
          f"{dtype}, {device_name(args.device)}")
    if args.vit is None and args.device == "cpu":
        print(f"  (CPU default ViT: {vit}, a small one; --vit internvit-300m for ViTP's ViT-L, minutes per step here)")
    memory_kind = ("torch.cuda.max_memory_allocated over the memory allocated before the model was built"
                   if args.device == "cuda" else
                   "growth of the peak resident set (/proc VmHWM) over the resident set before the model was built")
    print(f"  peak memory: one step after a warm-up, fresh process per setting; {memory_kind}")

    started = time.perf_counter()
    memory = {setting: in_fresh_process(peak_training_memory, vit, *setting, size, batch, dtype, args.device,
                                        torch.get_num_threads())
              for setting in TRAIN_SETTINGS}
    pixels, labels = segmentation_batch(batch, size, args.device)
    models = {neck: build_segmentor(vit, neck, size, False, args.device) for neck in NECKS}
    steps = {neck: training_step(model, pixels, labels, dtype) for neck, model in models.items()}

    def configured(neck: str, grad_checkpoint: bool) -> Callable[[], None]:
        def run() -> None:
            models[neck].encoder.set_grad_checkpointing(grad_checkpoint)
            steps[neck]()
        return run

    seconds = median_seconds({setting: configured(*setting) for setting in TRAIN_SETTINGS}, args.steps, args.device)
    base_rate, base_memory = batch / seconds[TRAIN_SETTINGS[0]], memory[TRAIN_SETTINGS[0]]
    print(f"  median of {args.steps} alternating rounds after a warm-up step each; ratios vs "
          f"{setting_name(*TRAIN_SETTINGS[0])} (= 1.00)")
    print()
    print("| config | parameters | images/s | images/s ratio | peak memory | memory ratio |")
    print("|---|---|---|---|---|---|")
    for neck, grad_checkpoint in TRAIN_SETTINGS:
        rate, peak = batch / seconds[(neck, grad_checkpoint)], memory[(neck, grad_checkpoint)]
        parameters = sum(p.numel() for p in models[neck].parameters())
        memory_ratio = "n/a" if peak is None or not base_memory else f"{peak / base_memory:.2f}"
        print(f"| {setting_name(neck, grad_checkpoint)} | {parameters / 1e6:.1f}M | {rate:.3f} | {rate / base_rate:.2f} | "
              f"{format_gib(peak)} | {memory_ratio} |")
    print(f"\ntrain part: {time.perf_counter() - started:.0f} s")


# --------------------------------------------------------------------------------------------------
# --parts evaluation


def run_evaluation(args: argparse.Namespace) -> None:
    import numpy as np

    from vitp.downstream.inference import slide_inference
    from vitp.downstream.metrics import SEGMENTATION, DenseEvaluation, ImageAreas

    rng = np.random.default_rng(10)
    labelled = rng.integers(0, 50_000, (2000, 16))
    predicted = rng.integers(0, 50_000, (2000, 16))
    areas = ImageAreas([f"{i}.png" for i in range(2000)], np.minimum(labelled, predicted) // 2, predicted, labelled,
                       [f"class {i}" for i in range(16)])
    stacked = areas.stacked.astype(np.float64)

    def resample_by_resample():
        picks = np.random.default_rng(0).integers(0, len(stacked), (1000, len(stacked)))
        return [stacked[row].sum(0) for row in picks]

    seconds = median_seconds({"vitp": lambda: DenseEvaluation(SEGMENTATION, areas).add_intervals(1000),
                              "loop": resample_by_resample}, args.repeats, "cpu")
    print(f"bootstrap, 2000 images x 16 classes x 1000 resamples: {seconds['vitp']:.2f} s; one resample at a time "
          f"(sums only) {seconds['loop']:.2f} s; ratio {seconds['loop'] / seconds['vitp']:.1f}")

    convolution = nn.Conv2d(3, 16, 1).to(args.device).eval()
    image = torch.randn(1, 3, 4000, 4000, device=args.device)
    with torch.no_grad():
        seconds = median_seconds({
            "slide": lambda: slide_inference(convolution, image, crop=896, stride=448, windows_per_forward=4),
            "whole": lambda: convolution(image),
        }, args.repeats, args.device)
    print(f"sliding window, 4000 x 4000, crop 896 / stride 448 (64 windows), 1x1 conv, {device_name(args.device)}: "
          f"{seconds['slide']:.2f} s; the whole image at once {seconds['whole']:.2f} s; "
          f"ratio {seconds['slide'] / seconds['whole']:.1f}")


# --------------------------------------------------------------------------------------------------

PARTS: dict[str, Callable[[argparse.Namespace], None]] = {"deform": run_deform, "train": run_train,
                                                          "evaluation": run_evaluation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=[], help="what to measure")
    parser.add_argument("--deform", action="store_true", help="short for --parts deform")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch_size", type=int, default=None,
                        help="deform: 2; train: 1 on the CPU (ViTP's images per GPU), 8 on CUDA")
    parser.add_argument("--repeats", type=int, default=5, help="deform, evaluation: timed rounds")
    parser.add_argument("--vit", default=None,
                        help="train: a vision preset (vitp.model.vision.PRESETS) or a ViT checkpoint; "
                             "default internvit-small on the CPU, internvit-300m on CUDA")
    parser.add_argument("--image_size", type=int, default=512, help="train: crop size in pixels")
    parser.add_argument("--steps", type=int, default=3, help="train: timed rounds")
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16"),
                        help="train: bf16 runs the loss under bf16 autocast; default bf16 on CUDA, fp32 on the CPU")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    for name in ("batch_size", "image_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be a positive integer")
    if args.steps <= 0 or args.repeats <= 0:
        parser.error("--steps and --repeats must be positive")
    chosen = list(dict.fromkeys(args.parts + (["deform"] if args.deform else [])))
    if not chosen:
        parser.error(f"choose what to measure: --parts {' '.join(PARTS)}")
    for name in chosen:
        PARTS[name](args)


if __name__ == "__main__":
    main()
