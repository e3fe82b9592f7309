"""`vitp demo`: the main job, end to end on built-in Sentinel-2 data."""

from __future__ import annotations

import argparse

from vitp.cli.types import positive_int, progress_option
from vitp.demo.ablation import ABLATIONS  # light modules: names and dataclasses only
from vitp.demo.settings import DEFAULT, QUICK


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        parents=[progress_option("no training progress bar (without a terminal there is none: the loss lines are "
                                 "printed)")],
        help="ViTP end to end on a built-in Sentinel-2 scene, on a CPU, with a report",
        description="Builds a land-cover tile data set from a real Sentinel-2 scene, pretrains a tiny InternVL "
        "from scratch, exports its ViT and compares retrieval against the random-init ViT and a colour histogram: "
        "micro and class-balanced Top-1/3/5 and mAP with 95%% bootstrap intervals, and paired-bootstrap intervals "
        "of the differences. A finished pretraining with the same settings is reused when run again.",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (default: %(default)s)")
    demo.add_argument("--quick", action="store_true", help="a short run (1-3 minutes) that checks the pipeline")
    demo.add_argument("--steps", type=positive_int, metavar="N", help=f"pretraining steps (default: {DEFAULT.max_steps}; --quick: {QUICK.max_steps})")
    demo.add_argument("--seed", type=int, default=DEFAULT.seed,
                      help="seed of the data split and the pretraining (default: %(default)s)")
    demo.add_argument("--seeds", type=positive_int, default=1, metavar="N",
                      help="pretrain N times with seeds seed, seed+1, ... and report mean ± std of every metric")
    demo.add_argument("--ablation", choices=ABLATIONS,
                      help="also pretrain with one setting changed, all else equal: tmaug = TMAug off and upstream "
                           "--TMAug_prob 0.5/0.75/0.9; droppath = DropPath 0 and 0.1 (3 or 1 more pretrainings per seed)")
    demo.add_argument("--eval_every", type=positive_int, metavar="N",
                      help="also evaluate retrieval with the ViT of every N-th step's checkpoint (mAP against steps)")
    demo.add_argument("--tasks", type=_tasks, default=("retrieval",), metavar="retrieval,pixels",
                      help="pixels (or retrieval,pixels) adds the transfer task: the ViT fine-tuned for land-cover segmentation of the scene "
                           "against the random-init ViT and a per-pixel RGB classifier (about 5 more minutes; "
                           "default: retrieval)")
    demo.add_argument("--retrain", action="store_true",
                      help="pretrain again even where a finished pretraining of the same settings exists")
    demo.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import dataclasses

    from vitp.demo.run import run_demo
    from vitp.errors import ConfigError

    settings = QUICK if args.quick else DEFAULT
    settings = dataclasses.replace(settings, seed=args.seed, max_steps=args.steps or settings.max_steps)
    if args.eval_every is not None and args.eval_every > settings.max_steps:
        raise ConfigError(f"--eval_every {args.eval_every} is more than the {settings.max_steps} pretraining steps")
    run_demo(args.out, quick=args.quick, settings=settings, seeds=args.seeds, ablation=args.ablation,
             eval_every=args.eval_every, retrain=args.retrain, command=_command(args), tasks=args.tasks)
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command line that repeats this demo (for the report)."""
    parts = ["vitp demo"]
    for flag, value in (("--quick", args.quick), ("--steps", args.steps), ("--seed", args.seed),
                        ("--seeds", args.seeds if args.seeds > 1 else None), ("--ablation", args.ablation),
                        ("--eval_every", args.eval_every),
                        ("--tasks", ",".join(args.tasks) if args.tasks != ("retrieval",) else None)):
        if value is True:
            parts.append(flag)
        elif value:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def _tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [t for t in tasks if t not in ("retrieval", "pixels")]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"expected retrieval, pixels or retrieval,pixels, got {text!r}")
    # the pixel task fine-tunes the pretrained ViT, whose retrieval is evaluated anyway
    return ("retrieval", *(t for t in tasks if t != "retrieval"))
