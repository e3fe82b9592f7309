"""`vitp data check|convert|build` and `vitp tokenizer train`: the instruction data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vitp.cli.types import NO_PROGRESS_HELP, fraction, int_at_least, progress_option

CHECK_DESCRIPTION = (
    "Report every problem as file:line: what is wrong, then counts per dataset; exit 1 if there is any problem. "
    "The data flags are `vitp pretrain`'s (upstream's DataTrainingArguments, same defaults: give the values your "
    "training uses, e.g. --dynamic_image_size True --use_thumbnail True --max_dynamic_patch 6); "
    "--conv_style defaults to internvl2_5 here."
)


def check_parser():
    """HfArgumentParser over the training data flags plus the check's own (tokenizer, patch size)."""
    from dataclasses import dataclass, field

    from transformers import HfArgumentParser

    from vitp.train.arguments import DataTrainingArguments

    @dataclass
    class CheckArguments:
        tokenizer: str | None = field(default=None, metadata={
            "help": "tokenizer directory: also count tokens and find samples that would be truncated"})
        patch_size: int = field(default=14, metadata={"help": "the ViT's patch size"})
        no_progress: bool = field(default=False, metadata={"help": NO_PROGRESS_HELP})

    return HfArgumentParser((DataTrainingArguments, CheckArguments), prog="vitp data check", description=CHECK_DESCRIPTION,
                            exit_on_error=False)


def data_settings(data_args, patch_size: int):
    """DataSettings from the flags, refused up front (DataSettingsError) if no sample could be built."""
    from vitp.data import dataset
    from vitp.data.check import validate_data_settings, validate_image_geometry
    from vitp.model.projector import tokens_per_tile

    # before tokens_per_tile, which would divide by a zero patch size
    validate_image_geometry(data_args.force_image_size, patch_size, data_args.down_sample_ratio)
    tokens = tokens_per_tile(data_args.force_image_size, patch_size, data_args.down_sample_ratio)
    data_args.conv_style = data_args.conv_style or "internvl2_5"
    settings = dataset.data_settings(data_args, data_args.force_image_size, tokens)
    validate_data_settings(settings, patch_size)
    return settings


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="check or build instruction data (meta JSON + JSONL)")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    # the flags go to HfArgumentParser ('+' as the only prefix keeps argparse from reading them)
    check = commands.add_parser(
        "check", prefix_chars="+", add_help=False,
        help="validate a meta JSON, its JSONL files and images without training (META [training data flags])",
    )
    check.add_argument("argv", nargs=argparse.REMAINDER)
    check.set_defaults(handler=_run_check)

    convert = commands.add_parser(
        "convert",
        help="a JSON list of samples to JSONL (upstream's tools/json2jsonl.py)",
        description="Write DATA.jsonl beside DATA.json, one sample per line, 'id' set to its index and non-ASCII "
        "text kept as it is, as upstream's tools/json2jsonl.py does, except that a leading system turn is kept "
        "(upstream drops it; vitp trains with it as the sample's system message).",
    )
    convert.add_argument("path", help="a .json file holding a list of samples")
    convert.add_argument("--output", help="the JSONL to write (default: the same name with .jsonl)")
    convert.set_defaults(handler=_run_convert)

    build = commands.add_parser(
        "build", parents=[progress_option(NO_PROGRESS_HELP)],
        help="turn a class-folder image set into instruction JSONL + meta JSON",
        description="Folder name = class. Writes <name>.jsonl and meta.json (and a held-out split if asked).",
    )
    build.add_argument("--image_dir", required=True, help="folder with one sub-folder of images per class")
    build.add_argument("--output_dir", required=True)
    build.add_argument("--name", help="dataset name (default: the image folder's name)")
    build.add_argument("--metadata", help="CSV or JSON of per-image attributes (column/key 'image' = relative path)")
    build.add_argument("--holdout_fraction", type=fraction, default=0.0, help="fraction of each class held out")
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
    train.add_argument("--vocab_size", type=_vocab_size, default=400,
                       help="target vocabulary, at least 256 bytes + the special tokens (default: %(default)s)")
    train.set_defaults(handler=_run_tokenizer_train)


def _vocab_size(text: str) -> int:
    """At least every byte and special token, which the trainer keeps whatever the size asked for."""
    from vitp.data.tokenizer import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE, SPECIAL_TOKENS  # only when the flag is given

    return int_at_least(MIN_VOCAB_SIZE, f"256 bytes + {len(SPECIAL_TOKENS)} special tokens", MAX_VOCAB_SIZE)(text)


def _run_check(args: argparse.Namespace) -> int:
    from vitp import progress
    from vitp.data.check import check_data
    from vitp.data.tokenizer import load_tokenizer
    from vitp.errors import ConfigError

    parser = check_parser()
    if {"-h", "--help"} & set(args.argv):
        parser.print_help()
        return 0
    argv = list(args.argv)
    if argv and not argv[0].startswith("-"):  # `vitp data check META [flags]`
        argv = ["--meta_path", argv[0]] + argv[1:]
    try:
        data_args, check_args = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    except (argparse.ArgumentError, ValueError) as err:
        raise ConfigError(str(err)) from None
    if not data_args.meta_path:
        raise ConfigError("give the meta JSON: vitp data check META.json [flags]")
    if check_args.no_progress:
        progress.disable()
    settings = data_settings(data_args, check_args.patch_size)
    tokenizer = load_tokenizer(check_args.tokenizer) if check_args.tokenizer else None
    report = check_data(data_args.meta_path, settings, tokenizer, report_problem=progress.write)
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


def _run_convert(args: argparse.Namespace) -> int:
    from vitp.data.meta import json_list_to_jsonl

    source = Path(args.path)
    output = Path(args.output) if args.output else source.with_suffix(".jsonl")
    count = json_list_to_jsonl(source, output)
    print(f"wrote {count} samples to {output}")
    return 0


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
