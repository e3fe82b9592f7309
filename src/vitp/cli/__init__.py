"""The `vitp` command line. Each stage's subcommands live in their own module (``vitp.cli.<stage>``),
which only parses arguments and calls one library function per subcommand."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from vitp.cli import data, demo, finetune, retrieval, serve, train, vit
from vitp.errors import VitpError

STAGES = (vit, data, train, retrieval, finetune, serve, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitp", description="Visual Instruction Pretraining and image retrieval.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        stage.register(subparsers)
    return parser


def configure_logging() -> None:
    """vitp's own messages (e.g. a resampled position embedding) go to stderr as 'vitp: ...'."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vitp: %(message)s"))
    logger = logging.getLogger("vitp")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    if getattr(args, "no_progress", False):
        from vitp import progress

        progress.disable()
    try:
        return args.handler(args)
    except VitpError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `vitp ... | head` stopped reading: not an error, and nothing more to print
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
