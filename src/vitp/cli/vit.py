"""`vitp convert-vit` and `vitp export-vit`: the vision encoder's checkpoint formats."""

from __future__ import annotations

import argparse

from vitp.cli.types import positive_int
from vitp.options import PRECISIONS

DTYPES = {"keep": None, **PRECISIONS}
# vitp.model.vit_checkpoint.SAVE_FORMATS and vitp.train.export.EXPORT_FORMATS, written out: importing those
# modules here would import torch for every `vitp --help` (a test keeps them equal)
SAVE_FORMS = ("vitp", "hf", "internvit")
EXPORT_FORMS = ("vitp+hf", "vitp", "hf", "internvit")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert-vit",
        help="convert a ViT between checkpoint formats",
        description=(
            "Read the ViT of any supported checkpoint (InternVL remote-code or transformers directory, "
            "InternViT or InternVLVisionModel directory, ViTP release file, timm state dict; InternViT-300M or "
            "-6B; format auto-detected) and write it as a ViTP-release safetensors with InternViT keys plus a "
            "JSON config (--to vitp), a transformers InternVLVisionModel directory (--to hf), or an "
            "InternVisionModel directory as upstream's tools/extract_vit.py writes it (--to internvit)."
        ),
    )
    parser.add_argument("source", help="checkpoint directory or weights file")
    parser.add_argument("destination", help="--to vitp: a .safetensors path; --to hf / internvit: a directory")
    parser.add_argument("--to", choices=SAVE_FORMS, required=True, help="output format")
    parser.add_argument("--key_prefix", default="vision_model.", help="key prefix in --to vitp files (default: %(default)s)")
    _add_config_flags(parser)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="keep", help="precision written (default: as stored)")
    parser.set_defaults(handler=_run_convert_vit)

    export = subparsers.add_parser(
        "export-vit",
        help="take the ViT out of a pretrained checkpoint (upstream's tools/extract_vit.py)",
        description=(
            "Write the ViT of a pretraining checkpoint (or of any checkpoint vitp reads, including a "
            ".bin/.pth file). Both spellings work: `vitp export-vit CHECKPOINT OUTPUT` (as upstream's "
            "extract_vit.py) and `vitp export-vit --checkpoint CHECKPOINT --output OUTPUT` (the seed guide's). "
            "OUTPUT is a directory that gets --format's files, or a weights file name (vit.safetensors; a "
            ".pth name is written as .safetensors) that gets one ViTP-release file."
        ),
    )
    export.add_argument("checkpoint", nargs="?", help="a pretraining checkpoint or run directory, or any InternVL checkpoint")
    export.add_argument("output", nargs="?", help="output directory (or weights file name)")
    export.add_argument("--checkpoint", dest="checkpoint_flag", metavar="CHECKPOINT", help="the same as the first argument")
    export.add_argument("--output", dest="output_flag", metavar="OUTPUT", help="the same as the second argument")
    export.add_argument(
        "--format", choices=EXPORT_FORMS, default="vitp+hf",
        help="vitp+hf: OUTPUT/vit.safetensors (+ vit.json, ViTP's release form) and OUTPUT/hf/ (transformers "
             "InternVLVisionModel); vitp or hf: one of them; internvit: OUTPUT as an InternVisionModel directory, "
             "as upstream's extract_vit.py writes it (default: %(default)s)",
    )
    export.add_argument("--key_prefix", default="vision_model.", help="key prefix in vit.safetensors (default: %(default)s)")
    _add_config_flags(export)
    export.add_argument("--dtype", choices=tuple(DTYPES), default="keep", help="precision written (default: as stored)")
    export.set_defaults(handler=_run_export_vit)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vit_config", help="preset name or JSON config, for weights saved without one")
    parser.add_argument("--num_heads", type=positive_int, help="override the number of attention heads of --vit_config")


def _config(args: argparse.Namespace):
    from vitp.model.vit_checkpoint import config_from_argument

    if not args.vit_config:
        return None
    return config_from_argument(args.vit_config, **({"num_heads": args.num_heads} if args.num_heads else {}))


def _dtype(args: argparse.Namespace):
    import torch

    return getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None


def _run_convert_vit(args: argparse.Namespace) -> int:
    from vitp.model.vision import count_parameters
    from vitp.model.vit_checkpoint import convert_vit

    checkpoint, model, files = convert_vit(
        args.source, args.destination, args.to, config=_config(args), key_prefix=args.key_prefix, dtype=_dtype(args)
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


def _run_export_vit(args: argparse.Namespace) -> int:
    from vitp.errors import ConfigError
    from vitp.train.export import export_vit

    paths = {}
    for name in ("checkpoint", "output"):
        positional, flag = getattr(args, name), getattr(args, f"{name}_flag")
        if positional and flag and positional != flag:
            raise ConfigError(f"{name} given twice ({positional} and --{name} {flag}); give it once")
        if not (positional or flag):
            raise ConfigError(f"no {name} given: `vitp export-vit CHECKPOINT OUTPUT`, or --{name} {name.upper()}")
        paths[name] = positional or flag
    files = export_vit(
        paths["checkpoint"], paths["output"], form=args.format, key_prefix=args.key_prefix, dtype=_dtype(args),
        config=_config(args),
    )
    for path in files:
        print(f"wrote {path}")
    return 0
