"""`vitp convert-vit`: the vision encoder's checkpoint formats."""

from __future__ import annotations

import argparse

DTYPES = {"keep": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert-vit",
        help="convert a ViT between checkpoint formats",
        description=(
            "Read the ViT of any supported checkpoint (InternVL remote-code or transformers directory, "
            "InternVLVisionModel directory, ViTP release file, timm state dict; format auto-detected) and "
            "write it as a ViTP-release safetensors with InternViT keys plus a JSON config (--to vitp), or "
            "as a transformers InternVLVisionModel directory (--to hf)."
        ),
    )
    parser.add_argument("source", help="checkpoint directory or weights file")
    parser.add_argument("destination", help="--to vitp: a .safetensors path; --to hf: a directory")
    parser.add_argument("--to", choices=("vitp", "hf"), required=True, help="output format")
    parser.add_argument("--key_prefix", default="vision_model.", help="key prefix in --to vitp files (default: %(default)s)")
    parser.add_argument("--vit_config", help="preset name or JSON config, for weights saved without one")
    parser.add_argument("--num_heads", type=int, help="override the number of attention heads of --vit_config")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="keep", help="precision written (default: as stored)")
    parser.set_defaults(handler=_run_convert_vit)


def _run_convert_vit(args: argparse.Namespace) -> int:
    import torch

    from vitp.model.vit_checkpoint import config_from_argument, convert_vit
    from vitp.model.vision import count_parameters

    config = None
    if args.vit_config:
        overrides = {"num_heads": args.num_heads} if args.num_heads else {}
        config = config_from_argument(args.vit_config, **overrides)
    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    checkpoint, model, files = convert_vit(
        args.source, args.destination, args.to, config=config, key_prefix=args.key_prefix, dtype=dtype
    )
    cfg = model.config
    print(f"read   {checkpoint.path}: {checkpoint.describe()}")
    print(
        f"model  InternViT {count_parameters(model) / 1e6:.1f}M params: {cfg.num_layers} layers, hidden "
        f"{cfg.hidden_size}, heads {cfg.num_heads}, patch {cfg.patch_size}, image {cfg.image_size}"
    )
    for path in files:
        print(f"wrote  {path}")
    return 0
