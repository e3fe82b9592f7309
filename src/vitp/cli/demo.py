"""`vitp demo`: the main job, end to end on built-in Sentinel-2 data."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="ViTP end to end on a built-in Sentinel-2 scene, on a CPU, with a report",
        description="Builds a land-cover tile data set from a real Sentinel-2 scene, pretrains a tiny InternVL "
        "from scratch, exports its ViT and compares retrieval against the random-init ViT and a colour histogram.",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (default: %(default)s)")
    demo.add_argument("--quick", action="store_true", help="a short run (about 3 minutes) that checks the pipeline")
    demo.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from vitp.demo.run import run_demo

    run_demo(args.out, quick=args.quick)
    return 0
