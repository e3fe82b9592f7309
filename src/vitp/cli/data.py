"""`vitp data check`, `vitp data build` and `vitp tokenizer train`: the instruction data."""

from __future__ import annotations

import argparse
import sys


def add_data_settings(parser: argparse.ArgumentParser) -> None:
    """The upstream flags that decide how a sample is built (shared with `vitp pretrain`)."""
    parser.add_argument("--force_image_size", type=int, default=448, help="tile size in pixels (default: %(default)s)")
    parser.add_argument("--patch_size", type=int, default=14, help="ViT patch size (default: %(default)s)")
    parser.add_argument("--down_sample_ratio", type=float, default=0.5, help="pixel-shuffle ratio (default: %(default)s)")
    parser.add_argument("--min_dynamic_patch", type=int, default=1)
    parser.add_argument("--max_dynamic_patch", type=int, default=12, help="tiles per image (default: %(default)s)")
    parser.add_argument("--use_thumbnail", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--dynamic_image_size", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--max_seq_length", type=int, default=4096)
    parser.add_argument("--system_message", help="system prompt for lines without a system turn (default: InternVL's)")


def data_settings(args: argparse.Namespace):
    """DataSettings from the flags, refused up front (DataSettingsError) if no sample could be built."""
    from vitp.data import dataset
    from vitp.data.check import validate_data_settings, validate_image_geometry
    from vitp.model.projector import tokens_per_tile

    # before tokens_per_tile, which would divide by a zero patch size
    validate_image_geometry(args.force_image_size, args.patch_size, args.down_sample_ratio)
    tokens = tokens_per_tile(args.force_image_size, args.patch_size, args.down_sample_ratio)
    settings = dataset.data_settings(args, args.force_image_size, tokens)
    validate_data_settings(settings, args.patch_size)
    return settings


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="check or build instruction data (meta JSON + JSONL)")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check",
        help="validate a meta JSON, its JSONL files and images without training",
        description="Report every problem as file:line: what is wrong, then counts per dataset. "
        "Exits 1 if there is any problem.",
    )
    check.add_argument("meta_path", help="meta JSON (upstream format)")
    check.add_argument("--tokenizer", help="tokenizer directory: also count tokens and find samples that would be truncated")
    add_data_settings(check)
    check.set_defaults(handler=_run_check)

    build = commands.add_parser(
        "build",
        help="turn a class-folder image set into instruction JSONL + meta JSON",
        description="Folder name = class. Writes <name>.jsonl and meta.json (and a held-out split if asked).",
    )
    build.add_argument("--image_dir", required=True, help="folder with one sub-folder of images per class")
    build.add_argument("--output_dir", required=True)
    build.add_argument("--name", help="dataset name (default: the image folder's name)")
    build.add_argument("--metadata", help="CSV or JSON of per-image attributes (column/key 'image' = relative path)")
    build.add_argument("--holdout_fraction", type=float, default=0.0, help="fraction of each class held out")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--data_augment", action="store_true", help="set data_augment (JPEG re-encoding) in the meta")
    build.add_argument("--no_check_images", dest="check_images", action="store_false", help="do not decode every image")
    build.set_defaults(handler=_run_build)

    tokenizer = subparsers.add_parser("tokenizer", help="train a small tokenizer for tiny models and CPU demos")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    train = tokenizer_commands.add_parser(
        "train", help="byte-level BPE from the conversations of a meta JSON, with ChatML and image tokens"
    )
    train.add_argument("--meta_path", required=True)
    train.add_argument("--output_dir", required=True)
    train.add_argument("--vocab_size", type=int, default=400,
                       help="target vocabulary, at least 256 bytes + the special tokens (default: %(default)s)")
    train.set_defaults(handler=_run_tokenizer_train)


def _run_check(args: argparse.Namespace) -> int:
    from vitp.data.check import check_data
    from vitp.data.tokenizer import load_tokenizer

    settings = data_settings(args)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    report = check_data(args.meta_path, settings, tokenizer, report_problem=print)
    print()
    print(report.table())
    if tokenizer is None:
        print("(no --tokenizer: token counts and truncation not checked)")
    if report.warnings:
        print(f"{len(report.warnings)} warning(s) (the 'warning:' lines above): the data is still used")
    if report.ok:
        print("no problems found")
        return 0
    print(f"{len(report.problems)} problem(s) found: bad lines would be skipped in training, "
          "dataset and meta-key problems must be fixed", file=sys.stderr)
    return 1


def _run_build(args: argparse.Namespace) -> int:
    from vitp.data.build import build_instructions

    result = build_instructions(
        args.image_dir, args.output_dir, name=args.name, metadata=args.metadata,
        holdout_fraction=args.holdout_fraction, seed=args.seed, check_images=args.check_images,
        data_augment=args.data_augment,
    )
    for line in result.skipped:
        print(f"skipped {line}")
    for note in result.notes:
        print(note)
    print(f"classes: {', '.join(f'{label} ({n})' for label, n in result.classes.items())}")
    print(f"conversations: {result.train} train, {result.holdout} held out; {len(result.skipped)} image(s) skipped")
    if result.unmatched_metadata:
        print(f"{result.unmatched_metadata} metadata entries matched no image")
    for path in result.files:
        print(f"wrote {path}")
    return 0


def _run_tokenizer_train(args: argparse.Namespace) -> int:
    from vitp.data.tokenizer import save_tokenizer, skipped_summary, train_tokenizer_on_meta

    tokenizer, skipped = train_tokenizer_on_meta(args.meta_path, vocab_size=args.vocab_size)
    if skipped:
        print(f"skipped {skipped_summary(skipped)}; `vitp data check {args.meta_path}` lists them")
    save_tokenizer(tokenizer, args.output_dir)
    print(f"tokenizer with {len(tokenizer)} tokens written to {args.output_dir}")
    return 0
