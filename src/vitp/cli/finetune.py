"""`vitp finetune segment|change|evaluate`: the ViT on semantic segmentation and change detection.

Flags keep the names users know: the transformers Trainer's (``--max_steps``, ``--learning_rate``, ...) and
ViTP's config fields (``--layer_decay_rate``, ``--drop_path_rate``, ``--crop_size``). Defaults are ViTP's
recipes (LoveDA for ``segment``, LEVIR-CD for ``change``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitp.cli.types import fraction, int_at_least, non_negative_float, positive_float, positive_int, progress_option

# ViTP's configs: mmseg/ViTP_configs/vitp_loveda_upernet.py and opencd/ViTP_configs/vitp_levir_upernet.py
RECIPES = {
    "segment": {"preset": "loveda", "learning_rate": 1e-5, "weight_decay": 0.1, "batch": 1, "crop": 512,
                "eval_mode": "slide", "eval_crop": 512, "eval_stride": 384},
    "change": {"preset": "levir-cd", "learning_rate": 1e-4, "weight_decay": 0.05, "batch": 4, "crop": 256,
               "eval_mode": "slide", "eval_crop": 256, "eval_stride": 128},
}
SEGMENTATION_PRESETS = ("loveda", "isaid", "uavid")  # vitp.downstream.data.PRESETS, written out: no torch import
WARMUP_FRACTION = 1500 / 80000  # ViTP: 1500 linear warm-up iterations of 80k
SCHEDULERS = ("cosine", "polynomial", "linear", "constant_with_warmup")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune", help="fine-tune the ViT for segmentation or change detection, and evaluate",
        description="Transfer: the ViT with ViT-Adapter (or SimpleFPN) and UPerNet, trained as ViTP's configs do "
                    "(AdamW with layer-wise learning-rate decay, warm-up then cosine), evaluated with mmseg's "
                    "metrics and bootstrap intervals.",
    )
    commands = parser.add_subparsers(dest="finetune_command", required=True, metavar="TASK")
    for task, helptext in (("segment", "semantic segmentation on mmseg's layout (img_dir/, ann_dir/)"),
                           ("change", "change detection on LEVIR-CD's layout (A/, B/, label/ per split)")):
        command = commands.add_parser(task, help=helptext, parents=[progress_option()], description=helptext)
        _add_data_flags(command, task)
        _add_model_flags(command, task)
        _add_training_flags(command, task)
        _add_evaluation_flags(command, task)
        command.set_defaults(handler=_run_finetune, task=task)

    evaluate = commands.add_parser("evaluate", parents=[progress_option()],
                                   help="evaluate a fine-tuned model (a `vitp finetune` output folder) on a split")
    evaluate.add_argument("--model", required=True, help="a vitp finetune output_dir (finetune.json + model.safetensors)")
    evaluate.add_argument("--data", required=True, help="the data set's root folder")
    evaluate.add_argument("--split", default="val", help="split to evaluate (default: %(default)s)")
    evaluate.add_argument("--preset", help="the data preset whose test scale applies (default: the task's ViTP preset)")
    evaluate.add_argument("--folders", nargs=3, metavar=("BEFORE", "AFTER", "LABEL"), default=("A", "B", "label"),
                          help="change detection: the folder names inside each split (default: A B label)")
    evaluate.add_argument("--output", required=True, help="folder for evaluation.json, predictions/ and overlays.png")
    evaluate.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: %(default)s)")
    _add_evaluation_flags(evaluate, None)
    evaluate.set_defaults(handler=_run_evaluate)


def _add_data_flags(parser: argparse.ArgumentParser, task: str) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=True, help="the data set's root folder")
    group.add_argument("--train_split", default="train", help="(default: %(default)s)")
    group.add_argument("--val_split", default="val", help="evaluated after training; 'none' to skip (default: %(default)s)")
    if task == "segment":
        group.add_argument("--preset", choices=SEGMENTATION_PRESETS, default="loveda",
                           help="classes and augmentation values of one of ViTP's configs (default: %(default)s)")
        group.add_argument("--classes", help="a class file (JSON {\"classes\": [...], \"palette\": [...]} or one "
                                             "'name [r g b]' per line) replacing the preset's classes")
        group.add_argument("--reduce_zero_label", choices=("true", "false"),
                           help="label 0 is 'no data' and 1..C are the classes (LoveDA; default: the preset's)")
    else:
        group.add_argument("--folders", nargs=3, metavar=("BEFORE", "AFTER", "LABEL"), default=("A", "B", "label"),
                           help="folder names inside each split (default: A B label; WHU-CD: A B OUT)")
    group.add_argument("--scan", choices=("full", "headers"), default="full",
                       help="check every file when the data set is opened (full decodes them; default: %(default)s)")


def _add_model_flags(parser: argparse.ArgumentParser, task: str) -> None:
    recipe = RECIPES[task]
    group = parser.add_argument_group("model")
    group.add_argument("--vit", required=True,
                       help="the pretrained ViT: any checkpoint vitp reads (vitp export-vit output, InternVL directory, "
                            "ViTP release file) or a preset name (internvit-300m ...) for random weights")
    group.add_argument("--random_init", action="store_true",
                       help="the --vit architecture with random weights (the baseline that shows what pretraining gives)")
    group.add_argument("--neck", choices=("adapter", "simple_fpn"), default="adapter",
                       help="adapter: ViT-Adapter as ViTP; simple_fpn: ViTDet's (default: %(default)s)")
    group.add_argument("--crop_size", type=positive_int, default=recipe["crop"],
                       help="training crop, which also sizes the position embedding (default: %(default)s)")
    group.add_argument("--patch_size", default="16", help="resize the patch embedding to this size, as ViTP (14 -> 16), "
                                                          "or 'keep' (default: %(default)s)")
    group.add_argument("--drop_path_rate", type=fraction, default=0.1, help="(default: %(default)s)")
    group.add_argument("--head_channels", type=positive_int, default=512, help="UPerNet's width (default: %(default)s)")
    group.add_argument("--grad_checkpoint", action="store_true", help="recompute ViT blocks in backward (less memory)")
    group.add_argument("--freeze_vit", action="store_true", help="train the neck and head only")


def _add_training_flags(parser: argparse.ArgumentParser, task: str) -> None:
    recipe = RECIPES[task]
    group = parser.add_argument_group("training (the transformers Trainer's names)")
    group.add_argument("--output_dir", required=True, help="checkpoints, model.safetensors, loss.png, evaluation/")
    length = group.add_mutually_exclusive_group()
    length.add_argument("--max_steps", type=positive_int, help="optimizer steps (default: 80000, ViTP's)")
    length.add_argument("--num_train_epochs", type=positive_float, help="epochs instead of --max_steps")
    group.add_argument("--per_device_train_batch_size", type=positive_int, default=recipe["batch"],
                       help="(default: %(default)s, ViTP's per GPU)")
    group.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    group.add_argument("--learning_rate", type=positive_float, default=recipe["learning_rate"], help="(default: %(default)s)")
    group.add_argument("--weight_decay", type=non_negative_float, default=recipe["weight_decay"], help="(default: %(default)s)")
    group.add_argument("--layer_decay_rate", type=positive_float, default=0.9,
                       help="layer-wise learning-rate decay, at most 1 (default: %(default)s)")
    group.add_argument("--lr_scheduler_type", choices=SCHEDULERS, default="cosine",
                       help="after the warm-up; polynomial is mmseg's poly with power 1 (default: %(default)s)")
    warmup = group.add_mutually_exclusive_group()
    warmup.add_argument("--warmup_steps", type=int_at_least(0, "warm-up steps"), help="linear warm-up steps")
    warmup.add_argument("--warmup_ratio", type=fraction, help=f"warm-up as a fraction of the steps (default: "
                                                               f"{WARMUP_FRACTION:.5f}, ViTP's 1500 of 80k)")
    group.add_argument("--max_grad_norm", type=non_negative_float, default=0.0,
                       help="clip gradients to this norm; 0: no clipping, as ViTP (default: %(default)s)")
    precision = group.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    precision.add_argument("--fp16", action="store_true", help="float16 autocast with loss scaling (ViTP's)")
    group.add_argument("--save_steps", type=positive_int, default=4000, help="checkpoint every N steps (default: %(default)s)")
    group.add_argument("--save_total_limit", type=positive_int, default=2, help="checkpoints kept (default: %(default)s)")
    group.add_argument("--logging_steps", type=positive_int, default=50, help="(default: %(default)s)")
    group.add_argument("--seed", type=int, default=3407, help="(default: %(default)s, ViTP's)")
    group.add_argument("--dataloader_num_workers", type=int_at_least(0, "workers"), default=2)
    group.add_argument("--overwrite_output_dir", action="store_true",
                       help="start over instead of resuming from the checkpoints in --output_dir")
    group.add_argument("--use_cpu", action="store_true", help="train on the CPU even where a GPU is visible")


def _add_evaluation_flags(parser: argparse.ArgumentParser, task: str | None) -> None:
    recipe = RECIPES.get(task, {})
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval_mode", choices=("slide", "whole"), default=recipe.get("eval_mode", "slide"),
                       help="sliding window (ViTP's) or the whole image at once (default: %(default)s)")
    group.add_argument("--eval_crop", type=positive_int, default=recipe.get("eval_crop"),
                       help="sliding window size (default: the task's ViTP value; evaluate: the model's crop size)")
    group.add_argument("--eval_stride", type=positive_int, default=recipe.get("eval_stride"),
                       help="sliding window stride (default: the task's ViTP value; evaluate: 3/4 of the crop)")
    group.add_argument("--bootstrap", type=int_at_least(0, "resamples"), default=1000,
                       help="bootstrap resamples of the 95%% intervals; 0: none (default: %(default)s)")
    group.add_argument("--no_masks", action="store_true", help="do not write the predicted masks (palette PNGs)")


# --------------------------------------------------------------------------------------------------


def _run_finetune(args: argparse.Namespace) -> int:
    import dataclasses

    from vitp.downstream.train import DenseData, DenseModelSpec, finetune
    from vitp.errors import ConfigError

    if not 0 < args.layer_decay_rate <= 1:  # refused before the data and the ViT are read
        raise ConfigError(f"--layer_decay_rate must be in (0, 1], got {args.layer_decay_rate}")
    task = "segmentation" if args.task == "segment" else "change_detection"
    data = _data(args, task)
    vit = _load_vit(args.vit)
    vision = dataclasses.asdict(vit.config)
    if args.random_init:
        vit = None  # build_dense_model makes a random ViT of the same architecture
    patch_size = None if args.patch_size == "keep" else _patch_size(args.patch_size)
    spec = DenseModelSpec(task, list(data.preset.classes.names), [list(c) for c in data.preset.classes.palette],
                          vision, neck=args.neck, image_size=args.crop_size, patch_size=patch_size,
                          drop_path_rate=args.drop_path_rate, head_channels=args.head_channels,
                          reduce_zero_label=data.preset.reduce_zero_label)
    finetune(data, vit, spec, _training_arguments(args), layer_decay_rate=args.layer_decay_rate,
             grad_checkpoint=args.grad_checkpoint, freeze_vit=args.freeze_vit,
             evaluation=_eval_settings(args, args.crop_size) if data.val_split else None)
    print(f"fine-tuned model: {args.output_dir}")
    return 0


def _data(args: argparse.Namespace, task: str):
    import dataclasses

    from vitp.downstream.data import PRESETS, ClassTable
    from vitp.downstream.train import DenseData
    from vitp.errors import ConfigError

    root = Path(args.data)
    if not root.is_dir():
        raise ConfigError(f"--data {root}: no such folder")
    val_split = None if args.val_split.lower() == "none" else args.val_split
    crop = (args.crop_size, args.crop_size)
    if task == "segmentation":
        preset = PRESETS[args.preset]
        changes = {"crop_size": crop}
        if args.classes:
            changes["classes"] = ClassTable.read(args.classes)
        if args.reduce_zero_label:
            changes["reduce_zero_label"] = args.reduce_zero_label == "true"
        preset = dataclasses.replace(preset, **changes)
        for split in filter(None, (args.train_split, val_split)):
            for folder in (root / "img_dir" / split, root / "ann_dir" / split):
                if not folder.is_dir():
                    raise ConfigError(f"--data {root}: {folder} is missing (mmseg's layout: img_dir/<split>, "
                                      f"ann_dir/<split>)")
        return DenseData(task, root, preset, args.train_split, val_split, scan=args.scan)
    preset = dataclasses.replace(PRESETS["levir-cd"], crop_size=crop)
    for split in filter(None, (args.train_split, val_split)):
        for name in args.folders:
            if not (root / split / name).is_dir():
                raise ConfigError(f"--data {root}: {root / split / name} is missing (LEVIR-CD's layout: "
                                  f"<split>/{'/, <split>/'.join(args.folders)}/)")
    return DenseData(task, root, preset, args.train_split, val_split, tuple(args.folders), scan=args.scan)


def _load_vit(source: str):
    from vitp.downstream.backbone import vit_from_source
    from vitp.errors import ConfigError
    from vitp.model.vision import PRESETS

    if source not in PRESETS and not Path(source).exists():
        raise ConfigError(f"--vit {source}: no such file or folder, and not a preset ({', '.join(sorted(PRESETS))})")
    return vit_from_source(source)


def _patch_size(text: str) -> int:
    from vitp.errors import ConfigError

    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--patch_size must be a positive integer or 'keep', got {text!r}")
    return int(text)


def _training_arguments(args: argparse.Namespace):
    from vitp.train.arguments import TrainingArguments

    warmup = args.warmup_steps if args.warmup_steps is not None else (
        args.warmup_ratio if args.warmup_ratio is not None else WARMUP_FRACTION)
    length = ({"num_train_epochs": args.num_train_epochs, "max_steps": -1} if args.num_train_epochs
              else {"max_steps": args.max_steps or 80000})
    return TrainingArguments(
        output_dir=args.output_dir, **length, per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay, lr_scheduler_type=args.lr_scheduler_type,
        lr_scheduler_kwargs={"lr_end": 0.0, "power": 1.0} if args.lr_scheduler_type == "polynomial" else {},
        warmup_steps=warmup, max_grad_norm=args.max_grad_norm, bf16=args.bf16, fp16=args.fp16,
        save_strategy="steps", save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps, seed=args.seed, dataloader_num_workers=args.dataloader_num_workers,
        overwrite_output_dir=args.overwrite_output_dir, use_cpu=args.use_cpu, report_to="none",
    )


def _eval_settings(args: argparse.Namespace, crop_size: int):
    from vitp.downstream.evaluate import EvalSettings
    from vitp.errors import ConfigError

    crop = args.eval_crop or crop_size
    stride = args.eval_stride or max(1, crop * 3 // 4)
    if stride > crop:
        raise ConfigError(f"--eval_stride {stride} is larger than --eval_crop {crop}: windows would leave gaps")
    return EvalSettings(mode=args.eval_mode, crop=(crop, crop), stride=(stride, stride), bootstrap=args.bootstrap,
                        seed=getattr(args, "seed", 0), write_masks=not args.no_masks)


def _run_evaluate(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from vitp.downstream.data import PRESETS
    from vitp.downstream.evaluate import evaluate_split
    from vitp.downstream.train import DenseData, load_dense_model
    from vitp.errors import ConfigError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, spec = load_dense_model(args.model, device)
    default_preset = "loveda" if spec.task == "segmentation" else "levir-cd"
    if args.preset and args.preset not in PRESETS:
        raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {args.preset!r}")
    preset = dataclasses.replace(PRESETS[args.preset or default_preset], classes=spec.class_table,
                                 reduce_zero_label=spec.reduce_zero_label)
    if not Path(args.data).is_dir():
        raise ConfigError(f"--data {args.data}: no such folder")
    data = DenseData(spec.task, Path(args.data), preset, val_split=args.split, change_folders=tuple(args.folders))
    evaluate_split(model, spec, data, _eval_settings(args, spec.image_size), Path(args.output), device)
    return 0
