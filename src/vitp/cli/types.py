"""Argument types and shared option groups of the command line: values are checked here, where they
are parsed, so a bad one is refused (exit 2, argparse's one-line message) before anything is loaded.

Each type raises ``argparse.ArgumentTypeError``, which argparse prints as
``vitp CMD: error: argument --flag: <message>``. The library below trusts these values; when a
Python caller passes junk it raises a plain ``ValueError`` naming the parameter.
"""

from __future__ import annotations

import argparse
from typing import Callable

from vitp.options import FAISS_DEVICES, PRECISIONS

DEVICES_HELP = "auto (cuda if available; under torchrun each rank's own GPU), cpu, cuda or cuda:N"
DTYPES = ("auto", *PRECISIONS)
NO_PROGRESS_HELP = ("no progress bar on a terminal, no progress lines in a captured log (without it: a bar on a "
                    "terminal, a plain line every VITP_PROGRESS_SECONDS (30) seconds otherwise)")


# --------------------------------------------------------------------------------------------------
# Types


def _number(text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        expected = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}") from None


def int_at_least(least: int, what: str = "", most: int | None = None) -> Callable[[str], int]:
    """A whole number >= ``least`` (and <= ``most`` if given); ``what`` says why, in the message."""

    def parse(text: str) -> int:
        value = _number(text, int)
        if value < least or (most is not None and value > most):
            bounds = f">= {least}" if most is None else f"from {least} to {most}"
            raise argparse.ArgumentTypeError(f"{value}: must be {bounds}{f' ({what})' if what else ''}")
        return value

    parse.__name__ = "int"  # argparse names the type in "invalid int value" messages
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0, "0 = off")


def positive_float(text: str) -> float:
    """A number > 0 (inf and nan refused)."""
    value = _number(text, float)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: must be a number > 0")
    return value


def non_negative_float(text: str) -> float:
    """A number >= 0 (inf and nan refused)."""
    value = _number(text, float)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: must be a number >= 0")
    return value


def fraction(text: str) -> float:
    """A fraction of a whole, in [0, 1)."""
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be a fraction in [0, 1)")
    return value


def port(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535; else the OS takes it modulo 65536, or blames the host."""
    value = _number(text, int)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value}: must be between 0 and 65535 (0 = any free port)")
    return value


def byte_size(text: str) -> int:
    """A memory size such as 4GB or 512MB (powers of 1024), more than 0 bytes."""
    from vitp.retrieval.backends.autoindex import parse_memory  # light: no FAISS import

    try:
        size = parse_memory(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 bytes")
    return size


def json_object(text: str) -> dict:
    """A JSON object given inline, e.g. '{"nlist": 1024}'."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"nlist\": 1024}'")
    return value


# --------------------------------------------------------------------------------------------------
# Option groups shared by several subcommands (argparse parents)


def vit_options(dtype_default: str | None = "auto", batch_options: bool = True) -> argparse.ArgumentParser:
    """--device and --dtype of the ViT (--dtype default None = the gallery's), and with
    ``batch_options`` --batch_size and --num_workers of the image reader."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--device", default="auto", help=f"where the ViT runs: {DEVICES_HELP} (default: %(default)s)")
    parent.add_argument(
        "--dtype", choices=DTYPES, default=dtype_default,
        help="ViT precision; auto = bf16 on GPU, fp32 on CPU (bf16 is much faster on CPUs with AMX/AVX512-BF16)"
        + (" (default: %(default)s)" if dtype_default else " (default: the gallery's)"),
    )
    if batch_options:
        parent.add_argument("--batch_size", type=positive_int, default=32, help="images per ViT forward (default: %(default)s)")
        parent.add_argument("--num_workers", type=non_negative_int,
                            help="image-decoding processes; 0 decodes in the main process (default: min(8, CPU count))")
    return parent


def faiss_device_option() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--faiss_device", choices=FAISS_DEVICES, default="auto",
        help="where FAISS searches: auto = all visible GPUs if this FAISS build has GPU support (default: %(default)s)",
    )
    return parent


def progress_option(help: str = "no progress bar") -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--no_progress", action="store_true", help=help)
    return parent
