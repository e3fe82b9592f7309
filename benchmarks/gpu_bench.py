"""The measuring and checking parts of benchmarks/gpu_check.sh (run that script; these are its steps).

    python benchmarks/gpu_bench.py environment [--dry-run]
    python benchmarks/gpu_bench.py prepare --work DIR                 # images, instruction data, tokenizer
    python benchmarks/gpu_bench.py features --results FILE [--dry-run]
    python benchmarks/gpu_bench.py train --results FILE [--dry-run]
    python benchmarks/gpu_bench.py downstream --results FILE [--dry-run]
    python benchmarks/gpu_bench.py resume --work DIR --name NAME [--dry-run] [-- PRETRAIN FLAGS]
    python benchmarks/gpu_bench.py table --results FILE --steps FILE [--out DIR]

features: ViT forward images/s of `vitp features`'s model (load_feature_model: bf16 on the device) at
batch 32 and 64, and MFU = FLOPs per image (benchmarks/features.py: linear layers, about 2 x parameters
x tokens, plus attention's 4 x tokens^2 x width per layer) x images/s / the card's peak dense bf16 FLOP/s
(a table by GPU name; MFU n/a on other cards and on CPUs).

train: one optimizer step as `vitp pretrain --bf16` takes it (fp32 weights, bf16 autocast, fused AdamW)
of InternViT-300M + a random Qwen2-0.5B-shaped LLM (Qwen2.5's 151,674-token vocabulary), with SDPA
restricted to the flash kernel where the shapes allow it; tokens/s (median of alternating rounds,
benchmarks/train_step.py) and peak allocated memory, grad checkpointing on/off x TMAug drop on/off.

downstream: one training step of ViTP's segmentation model at 512 px (benchmarks/downstream.py: UPerNet on
InternViT-300M + ViT-Adapter, patch 16, 7 classes; fp32 weights, the loss under bf16 autocast, backward,
fused AdamW; no gradient checkpointing, so every counted FLOP is a model FLOP): images/s (median of
alternating rounds), peak allocated memory, and MFU = FLOPs of one step (counted by
torch.utils.flop_counter.FlopCounterMode on a real step: matmuls, convolutions, attention) x steps/s / the
card's peak dense bf16 FLOP/s (PEAK_BF16_FLOPS, as for features). The batch is halved on running out of memory.

resume: `vitp pretrain` under torchrun --nproc_per_node 1: two steps saving every step, then the same
command with max_steps 3; passes when the second run resumed (checkpoint-1 and -2 untouched, "resuming
from" logged, global_step 3) and transformers' InternVLForConditionalGeneration loads the result with no
missing or unexpected weights.

--dry-run: tiny models on the CPU (fp32 training, no DeepSpeed/FSDP), to prove the script end to end.
Results are JSON lines in --results; `table` turns them and the script's step lines into the report.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Peak dense bf16 tensor FLOP/s (no sparsity) from the vendors' data sheets, matched in order against
# torch.cuda.get_device_name().
PEAK_BF16_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM / HBM3
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
]

# Qwen2-0.5B's shape (Qwen2.5-0.5B, the LLM of InternVL2.5-1B); random weights.
QWEN2_05B = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=1_000_000.0, tie_word_embeddings=True, vocab_size=151_674)
TINY_LLM = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True, vocab_size=512)

# Sizes of the full (GPU) run and of the CPU dry run.
SIZES = {
    False: dict(vit="internvit-300m", batches=(32, 64), repeats=5, llm=QWEN2_05B, samples=8, tiles=4, text=128,
                steps=3),
    True: dict(vit="internvit-tiny", batches=(2, 4), repeats=1, llm=TINY_LLM, samples=2, tiles=2, text=16, steps=1),
}


# ViTP's segmentation training at its crop size, and the dry run's tiny stand-in.
DOWNSTREAM_SIZES = {
    False: dict(vit="internvit-300m", image_size=512, head_channels=512, batches=(8, 4, 2, 1), repeats=3),
    True: dict(vit="internvit-tiny", image_size=64, head_channels=32, batches=(2,), repeats=1),
}


def peak_bf16_flops(device_name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def append_result(path: Path, row: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------------------------------
# environment


def environment(args: argparse.Namespace) -> int:
    """What the run has: CUDA, the GPU, DeepSpeed, flash-attn, FAISS GPU. Exit 2 without CUDA unless dry."""
    import importlib.util

    import torch

    cuda = torch.cuda.is_available()
    print(f"device: {device_name()}; torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 "
          f"{'yes' if cuda and torch.cuda.is_bf16_supported() else 'n/a'}")
    for package in ("deepspeed", "flash_attn", "faiss"):
        print(f"{package}: {'installed' if importlib.util.find_spec(package) else 'missing'}")
    if not cuda and not args.dry_run:
        print("no CUDA GPU is visible: run with --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------------------------------
# prepare


def prepare(args: argparse.Namespace) -> int:
    """Class folders of coloured, noisy images -> instruction data (vitp data build) -> tokenizer."""
    import numpy as np
    from PIL import Image

    from vitp.data.build import build_instructions
    from vitp.data.tokenizer import save_tokenizer, train_tokenizer_on_meta

    work = Path(args.work)
    rng = np.random.default_rng(0)
    for label, colour in {"water": (30, 60, 170), "forest": (30, 120, 40), "sand": (200, 180, 120)}.items():
        for i in range(8):
            height, width = (int(v) for v in rng.integers(48, 120, 2))
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
            path = work / "images" / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    build_instructions(work / "images", work / "data", seed=0, progress=False)
    tokenizer, _ = train_tokenizer_on_meta(work / "data" / "meta.json", vocab_size=320)
    save_tokenizer(tokenizer, work / "tok")
    print(f"data: {work / 'data' / 'meta.json'}; tokenizer: {work / 'tok'} ({len(tokenizer)} tokens)")
    return 0


# --------------------------------------------------------------------------------------------------
# features


def features(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    from features import model_forward_rate, vit_forward_flops
    from vitp import build_vit, save_vit
    from vitp.retrieval.extract import load_feature_model

    sizes = SIZES[args.dry_run]
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    name = device_name()
    peak = peak_bf16_flops(name) if device == "cuda" else None
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = Path(directory) / "vit.safetensors"
        save_vit(build_vit(sizes["vit"]).eval(), checkpoint)
        feature_model = load_feature_model(checkpoint, device=device, dtype="bf16")
    flops = vit_forward_flops(feature_model.model.config)
    for batch in sizes["batches"]:
        rate = model_forward_rate(feature_model, batch, device, repeats=sizes["repeats"])
        mfu = flops * rate / peak if peak else None
        row = {"section": "features", "model": f"{sizes['vit']} {feature_model.image_size}px", "batch": batch,
               "dtype": "bf16", "images_per_s": rate, "gflop_per_image": flops / 1e9, "mfu": mfu, "device": name}
        append_result(Path(args.results), row)
        print(f"features {row['model']} batch {batch}: {rate:.1f} images/s, "
              f"MFU {'n/a' if mfu is None else f'{mfu:.1%}'}")
    return 0


# --------------------------------------------------------------------------------------------------
# train


def flash_only():
    """SDPA restricted to the flash kernel (CUDA): the step fails loudly rather than silently falling
    back to a slower kernel; ``train`` retries without the restriction and says so."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def train(args: argparse.Namespace) -> int:
    import contextlib

    import torch

    from train_step import make_batch, median_steps
    from vitp.data.templates import IMG_CONTEXT, prepare_tokenizer
    from vitp.data.tokenizer import train_tokenizer
    from vitp.model.tmaug import TMAugConfig
    from vitp.model.vision import PRESETS, count_parameters
    from vitp.model.vlm import VisionLanguageModel, VLMConfig

    sizes = SIZES[args.dry_run]
    cuda = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if cuda else "cpu"
    tokenizer = train_tokenizer(["a small benchmark corpus with some words"] * 10, vocab_size=300)
    prepare_tokenizer(tokenizer)
    config = VLMConfig(vision=PRESETS[sizes["vit"]], text=sizes["llm"],
                       image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT))
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: initialising 0.8B parameters on the CPU takes long
        model = VisionLanguageModel(config).train()  # fp32 weights, as the Trainer keeps them
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    ids, mask, labels, pixels, tiles = make_batch(model, sizes["samples"], sizes["tiles"], sizes["text"], device)
    tokens = int(mask.sum())
    drop = TMAugConfig(prob=1.0, ratio=0.75, mode="drop")
    restrictions = {}  # per setting: flash only where SDPA accepts it (TMAug's re-padding adds a mask)

    def configured_step(checkpointing: bool, tmaug: bool):
        def step():
            model.set_gradient_checkpointing(checkpointing)
            model.tmaug = drop if tmaug else TMAugConfig()
            with restrictions[(checkpointing, tmaug)][0](), torch.autocast(device, dtype=torch.bfloat16):
                loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, num_tiles=tiles,
                             labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    settings = {(c, t): configured_step(c, t) for c in (False, True) for t in (False, True)}
    for key, step in settings.items():
        restrictions[key] = (flash_only, "flash") if cuda else (contextlib.nullcontext, "cpu")
        try:
            step()
        except RuntimeError as err:  # no flash kernel for these shapes/masks: measure what SDPA picks
            restrictions[key] = (contextlib.nullcontext, f"SDPA default (flash refused: {str(err)[:60]})")
            optimizer.zero_grad(set_to_none=True)
    timings = median_steps(settings, sizes["steps"], device)
    llm_parameters = count_parameters(model.language_model)
    for (checkpointing, tmaug), seconds in timings.items():
        peak = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            settings[(checkpointing, tmaug)]()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**30
        row = {"section": "train", "model": f"{sizes['vit']} + Qwen2 {llm_parameters / 1e6:.1f}M "
                                            f"(vocab {config.text['vocab_size']})",
               "grad_checkpointing": checkpointing, "tmaug": "drop 0.75" if tmaug else "off",
               "batch": f"{sizes['samples']} x {ids.shape[1]} tokens ({sizes['tiles']} tiles)",
               "tokens_per_s": tokens / seconds, "peak_gib": peak, "attention": restrictions[(checkpointing, tmaug)][1],
               "device": device_name()}
        append_result(Path(args.results), row)
        print(f"train gc={checkpointing} tmaug={row['tmaug']}: {row['tokens_per_s']:.0f} tokens/s, peak "
              f"{'n/a' if peak is None else f'{peak:.1f} GiB'} ({row['attention']})")
    return 0


# --------------------------------------------------------------------------------------------------
# downstream


def downstream(args: argparse.Namespace) -> int:
    import torch

    from downstream import build_segmentor, median_seconds, segmentation_batch, step_flops, training_step

    sizes = DOWNSTREAM_SIZES[args.dry_run]
    cuda = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if cuda else "cpu"
    name = device_name()
    model = build_segmentor(sizes["vit"], "adapter", sizes["image_size"], False, device, sizes["head_channels"])
    for batch in sizes["batches"]:  # the largest that fits
        pixels, labels = segmentation_batch(batch, sizes["image_size"], device)
        step = training_step(model, pixels, labels, "bf16")
        try:
            step()  # warm-up; AdamW's state is made here
            break
        except torch.cuda.OutOfMemoryError:
            print(f"downstream: batch {batch} ran out of memory; trying a smaller one")
        # freed after the handler, which holds the failed step's frames (and their tensors) while it runs
        del pixels, labels, step
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    else:
        raise RuntimeError(f"downstream: out of memory even at batch {sizes['batches'][-1]}")
    flops = step_flops(step)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds({"step": step}, sizes["repeats"], device)["step"]
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    peak = peak_bf16_flops(name) if cuda else None
    mfu = flops / seconds / peak if peak else None
    row = {"section": "downstream",
           "model": f"UPerNet ({sizes['head_channels']} ch) + ViT-Adapter on {sizes['vit']} {sizes['image_size']}px",
           "batch": batch, "dtype": "bf16 autocast", "images_per_s": batch / seconds,
           "gflop_per_image": flops / batch / 1e9, "tflop_per_s": flops / seconds / 1e12, "mfu": mfu,
           "peak_gib": peak_memory, "device": name}
    append_result(Path(args.results), row)
    print(f"downstream {row['model']} batch {batch}: {row['images_per_s']:.2f} images/s, "
          f"{row['gflop_per_image']:.0f} GFLOP/image per step, MFU {or_na(mfu, '{:.1%}')}, "
          f"peak {or_na(peak_memory, '{:.1f} GiB')}")
    return 0


# --------------------------------------------------------------------------------------------------
# resume


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resume(args: argparse.Namespace) -> int:
    """Two steps, then a rerun to three that must resume; the result must load into transformers."""
    work, output = Path(args.work), Path(args.work) / "runs" / args.name
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "vitp.cli", "pretrain",
        "--meta_path", str(work / "data" / "meta.json"), "--output_dir", str(output),
        "--model_preset", "internvl-tiny", "--tokenizer", str(work / "tok"), "--force_image_size", "56",
        "--max_dynamic_patch", "2", "--per_device_train_batch_size", "2", "--save_steps", "1",
        "--logging_steps", "1", "--report_to", "none", "--dataloader_num_workers", "0",
    ] + ([] if args.dry_run else ["--bf16", "True"]) + args.flags
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(steps: int) -> str:
        port = ["--master_port", str(free_port())]
        full = command[:5] + port + command[5:] + ["--max_steps", str(steps)]
        result = subprocess.run(full, capture_output=True, text=True, env=environment)
        log = result.stdout + result.stderr
        (output.parent / f"{args.name}-{steps}.log").write_text(log)
        if result.returncode != 0:
            raise RuntimeError(f"pretrain to step {steps} exited with {result.returncode}:\n{log[-3000:]}")
        return log

    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        launch(2)
        first = {n: (output / n / "model.safetensors").stat().st_mtime_ns for n in ("checkpoint-1", "checkpoint-2")}
        log = launch(3)
        problems = check_resumed(output, first, log)
    except (RuntimeError, OSError) as err:
        problems = [str(err)]
    if problems:
        print(f"{args.name}: FAIL\n" + "\n".join(problems))
        return 1
    print(f"{args.name}: resumed at step 2, finished at 3; transformers loads the checkpoint")
    return 0


def check_resumed(output: Path, first: dict[str, int], log: str) -> list[str]:
    from transformers import InternVLForConditionalGeneration

    problems = []
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    if state["global_step"] != 3:
        problems.append(f"checkpoint-3: global_step {state['global_step']}, expected 3")
    for name, stamp in first.items():
        if (output / name / "model.safetensors").stat().st_mtime_ns != stamp:
            problems.append(f"{name} was rewritten: the second run started afresh instead of resuming")
    if "resuming from" not in log:
        problems.append("the second run did not log 'resuming from'")
    for directory in (output, output / "checkpoint-3"):
        _, info = InternVLForConditionalGeneration.from_pretrained(directory, output_loading_info=True)
        wrong = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if wrong:
            problems.append(f"{directory.name}: transformers found {wrong}")
    return problems


# --------------------------------------------------------------------------------------------------
# table


def or_na(value: float | None, form: str) -> str:
    return "n/a" if value is None else form.format(value)


def table(args: argparse.Namespace) -> int:
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines()] if Path(args.results).exists() else []
    steps = [line.split("\t") for line in Path(args.steps).read_text().splitlines() if line.strip()]
    name = next((r["device"] for r in rows if "device" in r), None) or device_name()
    lines = [f"# vitp GPU check: {name}", ""]
    features_rows = [r for r in rows if r["section"] == "features"]
    if features_rows:
        lines += ["## Feature extraction (ViT forward, bf16)", "",
                  "| model | batch | images/s | GFLOP/image | MFU |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['batch']} | {r['images_per_s']:.1f} | {r['gflop_per_image']:.1f} | "
                  f"{or_na(r['mfu'], '{:.1%}')} |" for r in features_rows]
        lines.append("")
    train_rows = [r for r in rows if r["section"] == "train"]
    if train_rows:
        lines += [f"## Train step (bf16 autocast, AdamW; {train_rows[0]['model']}; batch {train_rows[0]['batch']})",
                  "",
                  "| grad checkpointing | TMAug | tokens/s | peak memory | attention |", "|---|---|---|---|---|"]
        lines += [f"| {'on' if r['grad_checkpointing'] else 'off'} | {r['tmaug']} | {r['tokens_per_s']:.0f} | "
                  f"{or_na(r['peak_gib'], '{:.1f} GiB')} | {r['attention']} |" for r in train_rows]
        lines.append("")
    downstream_rows = [r for r in rows if r["section"] == "downstream"]
    if downstream_rows:
        lines += ["## Downstream training step (segmentation: loss + backward + AdamW, bf16 autocast, no grad "
                  "checkpointing)", "",
                  "| model | batch | images/s | GFLOP/image (fwd+bwd) | TFLOP/s | MFU | peak memory |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['batch']} | {r['images_per_s']:.2f} | {r['gflop_per_image']:.1f} | "
                  f"{r['tflop_per_s']:.2f} | {or_na(r['mfu'], '{:.1%}')} | {or_na(r['peak_gib'], '{:.1f} GiB')} |"
                  for r in downstream_rows]
        lines.append("")
    lines += ["## Steps", "", "| step | result | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {step} | {status} | {seconds} | {note} |" for step, status, seconds, note in steps]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.md").write_text(text)
        summary = {"device": name, "measurements": rows,
                   "steps": [dict(zip(("step", "result", "seconds", "note"), s)) for s in steps]}
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for command, handler in (("environment", environment), ("prepare", prepare), ("features", features),
                             ("train", train), ("downstream", downstream), ("resume", resume), ("table", table)):
        sub = commands.add_parser(command)
        sub.set_defaults(handler=handler)
        sub.add_argument("--dry-run", dest="dry_run", action="store_true", help="tiny models on the CPU")
    commands.choices["prepare"].add_argument("--work", required=True)
    for command in ("features", "train", "downstream"):
        commands.choices[command].add_argument("--results", required=True)
    commands.choices["resume"].add_argument("--work", required=True)
    commands.choices["resume"].add_argument("--name", required=True)
    commands.choices["resume"].add_argument("flags", nargs="*", help="more `vitp pretrain` flags (after --)")
    commands.choices["table"].add_argument("--results", required=True)
    commands.choices["table"].add_argument("--steps", required=True)
    commands.choices["table"].add_argument("--out", default=os.environ.get("OUT") or None)
    args = parser.parse_args()
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
