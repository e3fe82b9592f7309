"""ViTP pretraining (stage 1), on the transformers Trainer.

Read top to bottom: build or load the model and tokenizer, build the dataset, configure the Trainer
(one process, torchrun, DeepSpeed ZeRO or FSDP all go through it), resume if the output folder holds
checkpoints, train, save a transformers-native InternVL directory and draw the loss curve.

What the Trainer does not do, ``VitpTrainer`` adds: checkpoints written as transformers InternVL
directories (and read back strictly on resume), and logs of tokens/s, TMAug statistics and the
samples the data checks dropped (each bad line reported once).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import SchedulerType

from vitp.data.check import validate_data_settings
from vitp.data.dataset import Collator, InstructionDataset, data_settings
from vitp.data.meta import read_meta, require_samples_per_epoch
from vitp.data.tokenizer import load_tokenizer
from vitp.errors import ConfigError, WeightFormatError
from vitp.model.checkpoint import build_vlm, load_vlm, load_vlm_weights, save_vlm
from vitp.model.tmaug import TMAugConfig
from vitp.model.vlm import VisionLanguageModel
from vitp.tensor_io import open_tensor_source
from vitp.train.plots import plot_loss_curve

logger = logging.getLogger("vitp")
TRAINER_STATE = "trainer_state.json"


@dataclass
class PretrainConfig:
    """Every setting of a run; the names are upstream's flags where they exist."""

    meta_path: str
    output_dir: str
    model_name_or_path: str | None = None  # InternVL remote-code or transformers directory
    model_preset: str | None = None  # or a from-scratch preset (internvl-tiny, internvl-small, internvl-demo)
    tokenizer: str | None = None  # tokenizer directory for a from-scratch model
    # data (upstream names)
    force_image_size: int | None = None  # default: the model's tile size
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    use_thumbnail: bool = True
    dynamic_image_size: bool = True
    max_seq_length: int = 4096
    system_message: str | None = None
    # model
    vision_select_layer: int | None = None
    drop_path_rate: float = 0.0
    freeze_llm: bool = False
    freeze_backbone: bool = False
    freeze_mlp: bool = False
    grad_checkpoint: bool = False
    # TMAug: either upstream's single flag, or the explicit triple
    TMAug_prob: float | None = None
    tmaug_prob: float = 0.0
    tmaug_ratio: float = 0.0
    tmaug_mode: str = "drop"
    # optimisation (passed to TrainingArguments)
    max_steps: int = 1000
    learning_rate: float = 2e-5
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    lr_scheduler_type: str = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 42
    bf16: bool = False
    save_steps: int = 500
    save_total_limit: int | None = 3
    logging_steps: int = 10
    dataloader_num_workers: int = 2
    deepspeed: str | None = None
    fsdp: str = ""
    fsdp_config: str | None = None
    report_to: str = "tensorboard"
    resume_from_checkpoint: str | None = None  # default: the last checkpoint in output_dir, if any
    overwrite_output_dir: bool = False

    def __post_init__(self) -> None:
        """Refuse values the Trainer would misread (max_steps -1 means 3 epochs to it) or fail on late.
        The data flags are checked by vitp.data.check.validate_data_settings, as for `vitp data check`,
        once the model says the tile size; force_image_size here because the model is built with it."""
        at_least_one = ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "save_steps",
                        "logging_steps")
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.force_image_size is not None and self.force_image_size < 1:
            raise ConfigError(f"--force_image_size must be a positive number of pixels, got {self.force_image_size}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"--save_total_limit must be at least 1 (or left out), got {self.save_total_limit}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate < 0 or self.weight_decay < 0:
            raise ConfigError(f"--learning_rate and --weight_decay must not be negative, got {self.learning_rate}, {self.weight_decay}")
        schedulers = [kind.value for kind in SchedulerType]
        if self.lr_scheduler_type not in schedulers:
            raise ConfigError(f"--lr_scheduler_type {self.lr_scheduler_type!r} is not one of {', '.join(schedulers)}")
        if self.freeze_llm and self.freeze_backbone and self.freeze_mlp:
            raise ConfigError("--freeze_llm, --freeze_backbone and --freeze_mlp together leave nothing to train")
        self.tmaug()  # validates the TMAug settings now, not after the model is built

    def tmaug(self) -> TMAugConfig:
        try:
            if self.TMAug_prob is not None:
                if self.tmaug_prob or self.tmaug_ratio:
                    raise ConfigError("give either --TMAug_prob (upstream) or --tmaug_prob/--tmaug_ratio, not both")
                return TMAugConfig.from_upstream(self.TMAug_prob)
            return TMAugConfig(prob=self.tmaug_prob, ratio=self.tmaug_ratio, mode=self.tmaug_mode)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def pretrain(config: PretrainConfig) -> Path:
    check_parallelism(config)
    output = prepare_output_dir(config)
    resume = resume_checkpoint(config)
    done = resume is not None and global_step(resume) >= config.max_steps
    if done:  # a re-run of a finished run: training on would step past --max_steps and rotate checkpoints out
        logger.warning("%s already reached --max_steps %d: nothing to train (raise --max_steps to go on)",
                       resume, config.max_steps)
        if (output / "model.safetensors").is_file():
            return output
    set_seed(config.seed)
    model, tokenizer = load_model(config)
    if done:  # the run was stopped after its last checkpoint, before the final save: write it from there
        load_vlm_weights(model, Path(resume))
        if is_main_process():
            save_vlm(model, output, tokenizer)
        return output
    model.freeze(llm=config.freeze_llm, backbone=config.freeze_backbone, mlp=config.freeze_mlp)
    if config.grad_checkpoint:
        model.set_gradient_checkpointing(True)
    settings = data_settings(config, model.vlm_config.vision.image_size, model.vlm_config.num_image_token)
    specs = read_meta(config.meta_path)
    validate_data_settings(settings, model.vlm_config.vision.patch_size, specs)
    dataset = InstructionDataset(specs, tokenizer, settings, train=True)
    require_samples_per_epoch(specs, [len(index) for index in dataset.indexes])
    trainer = VitpTrainer(
        model=model,
        args=training_arguments(config),
        train_dataset=dataset,
        data_collator=Collator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    if resume:
        logger.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        plot_loss_curve(trainer.state.log_history, Path(config.output_dir) / "loss.png")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return Path(config.output_dir)


def check_parallelism(config: PretrainConfig) -> None:
    """Refuse a sharding request that would otherwise be ignored: on CPUs accelerate runs every
    process as plain DDP whatever --fsdp says, so a user would get a full model copy per process."""
    if config.fsdp and config.deepspeed:
        raise ConfigError("give --deepspeed or --fsdp, not both")
    if config.deepspeed:
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("--deepspeed needs the deepspeed package: pip install -e '.[deepspeed]'")
        if not Path(config.deepspeed).is_file():
            raise ConfigError(f"--deepspeed {config.deepspeed}: no such file (configs/zero1.json is ViTP's)")
    if config.fsdp_config and not Path(config.fsdp_config).is_file():
        raise ConfigError(f"--fsdp_config {config.fsdp_config}: no such file (see configs/fsdp.json)")
    if (config.fsdp or config.deepspeed) and not torch.cuda.is_available():
        flag = "--fsdp" if config.fsdp else "--deepspeed"
        raise ConfigError(
            f"{flag} shards the model over GPUs, and no CUDA GPU is visible: on CPUs the processes would run as "
            f"plain data parallel, each with a full copy of the model. Leave out {flag} to train that way."
        )


def load_model(config: PretrainConfig) -> tuple[VisionLanguageModel, Any]:
    """A checkpoint directory, or a preset from scratch with a tokenizer directory."""
    tmaug = config.tmaug()
    if config.model_name_or_path:
        if config.model_preset:
            raise ConfigError("give --model_name_or_path or --model_preset, not both")
        model, tokenizer = load_vlm(config.model_name_or_path, tmaug=tmaug, drop_path_rate=config.drop_path_rate,
                                    image_size=config.force_image_size)
    elif config.model_preset:
        if not config.tokenizer:
            raise ConfigError("a from-scratch --model_preset needs --tokenizer (see `vitp tokenizer train`)")
        tokenizer = load_tokenizer(config.tokenizer)
        overrides = {"drop_path_rate": config.drop_path_rate}
        if config.force_image_size:
            overrides["image_size"] = config.force_image_size
        model = build_vlm(config.model_preset, tokenizer, tmaug, **overrides)
    else:
        raise ConfigError("give --model_name_or_path (a checkpoint) or --model_preset (from scratch)")
    if config.vision_select_layer is not None:
        try:
            model.vision_model.resolve_layer(config.vision_select_layer)  # validates the index
        except ValueError as err:
            raise ConfigError(f"--vision_select_layer: {err}") from None
        model.vlm_config = dataclasses.replace(model.vlm_config, select_layer=config.vision_select_layer)
    return model, tokenizer


def training_arguments(config: PretrainConfig) -> TrainingArguments:
    on_gpu = torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # transformers 5 reads the TensorBoard folder from the environment; set it for every run (not
    # setdefault), or a second run in the same process would write into the first one's folder.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(config.output_dir) / "runs")
    return TrainingArguments(
        output_dir=config.output_dir,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float below 1 is a fraction of max_steps
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler_type,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        bf16=config.bf16,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        report_to=[] if config.report_to in ("", "none") else [config.report_to],
        dataloader_num_workers=config.dataloader_num_workers,
        dataloader_persistent_workers=config.dataloader_num_workers > 0,
        remove_unused_columns=False,  # the collator's extra fields (num_tiles, where, dropped) are used
        deepspeed=config.deepspeed,
        fsdp=config.fsdp,
        fsdp_config=config.fsdp_config,
        ddp_backend="gloo" if distributed and not on_gpu else None,  # torchrun on CPUs (tests, laptops)
        ddp_find_unused_parameters=False,
        use_cpu=not on_gpu,
        disable_tqdm=False,
    )


def prepare_output_dir(config: PretrainConfig) -> Path:
    """The output directory, created; with --overwrite_output_dir an earlier run's checkpoints are
    removed first, or a later run without the flag would resume from them."""
    output = Path(config.output_dir)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output_dir {output} is a file, not a directory")
    if config.overwrite_output_dir and is_main_process():
        for old in checkpoints(output):
            shutil.rmtree(old)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    output.mkdir(parents=True, exist_ok=True)
    return output


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch (or the only process), before the Trainer exists to say so."""
    return int(os.environ.get("RANK", "0")) == 0


def checkpoints(output: Path) -> list[Path]:
    """checkpoint-N directories of a run, newest first."""
    found = [path for path in output.glob("checkpoint-*") if path.is_dir() and path.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda path: int(path.name.split("-", 1)[1]), reverse=True)


def resume_checkpoint(config: PretrainConfig) -> str | None:
    """An explicit --resume_from_checkpoint, else the newest complete checkpoint-N in output_dir (as
    upstream, which takes the newest; one a kill left half-written is skipped with a warning)."""
    if config.resume_from_checkpoint:
        problem = checkpoint_problem(Path(config.resume_from_checkpoint))
        if problem:
            raise ConfigError(f"--resume_from_checkpoint {config.resume_from_checkpoint}: {problem}")
        return config.resume_from_checkpoint
    output = Path(config.output_dir)
    if config.overwrite_output_dir or not output.is_dir():
        return None
    for candidate in checkpoints(output):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return str(candidate)
        logger.warning("not resuming from %s: %s", candidate, problem)
    return None


def checkpoint_problem(directory: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a save interrupted by a kill), or None."""
    if not directory.is_dir():
        return "not a directory"
    if global_step(directory) is None:
        return f"{TRAINER_STATE} is missing or unreadable (the save was interrupted)"
    weights = directory / "model.safetensors"
    if weights.is_file():
        try:
            open_tensor_source(weights)  # safetensors checks that the data covers what the header names
        except WeightFormatError as err:
            return f"{weights.name} is truncated or unreadable ({err})"
    optimizer = directory / "optimizer.pt"
    if optimizer.exists() and optimizer.stat().st_size == 0:
        return "optimizer.pt is empty (the save was interrupted)"
    return None


def global_step(checkpoint: str | Path) -> int | None:
    """The step a checkpoint was saved at, from its trainer state; None if that is missing or unreadable."""
    try:
        return int(json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class VitpTrainer(Trainer):
    """The transformers Trainer with vitp's checkpoints and logs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._window = {"answer_tokens": 0, "sequence_tokens": 0, "tmaug_samples": 0, "tmaug_tokens": 0, "samples": 0}
        self._window_start = time.perf_counter()
        self._dropped_total = 0
        self._reported_lines: set[str] = set()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._record_drops(inputs.pop("dropped", []))
        inputs.pop("tile_sample_index", None)  # the model uses num_tiles, which carries the same facts
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            self._window["answer_tokens"] += outputs.answer_tokens or 0
            self._window["sequence_tokens"] += outputs.sequence_tokens or 0
            self._window["samples"] += len(inputs["input_ids"])
            for key, value in (outputs.tmaug or {}).items():
                if key != "samples":
                    self._window[key] += value
        return (loss, outputs) if return_outputs else loss

    def _record_drops(self, dropped: list[tuple[str, str, str]]) -> None:
        self._dropped_total += len(dropped)
        for where, kind, reason in dropped:
            if where not in self._reported_lines:
                self._reported_lines.add(where)
                logger.warning("skipped %s (%s): %s", where, kind, reason)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log line: add this window's throughput and TMAug figures
            totals = torch.tensor(
                [self._window[k] for k in ("answer_tokens", "sequence_tokens", "tmaug_samples", "tmaug_tokens", "samples")]
                + [self._dropped_total],
                dtype=torch.float64, device=self.args.device,
            )
            if self.args.world_size > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            answer, sequence, tmaug_samples, tmaug_tokens, samples, dropped = totals.tolist()
            elapsed = max(time.perf_counter() - self._window_start, 1e-9)
            logs["tokens_per_second"] = round(sequence / elapsed, 1)
            logs["answer_tokens"] = int(answer)
            if self.model.tmaug.active:
                logs["tmaug_sample_fraction"] = round(tmaug_samples / max(samples, 1), 4)
                logs["tmaug_tokens"] = int(tmaug_tokens)
            logs["dropped_samples"] = int(dropped)
            self._window = dict.fromkeys(self._window, 0)
            self._window_start = time.perf_counter()
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Every checkpoint is a transformers-native InternVL directory."""
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        save_vlm(model, output_dir, self.processing_class, state_dict=state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume reads the directory `_save` wrote, strictly (DeepSpeed/FSDP keep their own formats)."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_vlm_weights(model or self.model, Path(resume_from_checkpoint))
