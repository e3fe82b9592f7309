"""Fine-tuning a ViT for segmentation or change detection, on the transformers Trainer.

Read top to bottom: open the data sets (every pair checked, bad ones skipped and reported), build the model
(the pretrained ViT with a neck and UPerNet, :class:`DenseModelSpec`), give AdamW ViTP's layer-wise
learning-rate decay, train with the Trainer (one process or torchrun DDP, bf16/fp16 autocast, warm-up
then cosine or poly, checkpoints every ``save_steps``, exact resume from the newest complete one), save
``model.safetensors`` + ``finetune.json``, draw ``loss.png`` and evaluate on the validation split
(:mod:`vitp.downstream.evaluate`).

What the Trainer does not do, :class:`DenseTrainer` adds: the optimizer's parameter groups
(:func:`layer_decay_groups`), the epoch of the data set's augmentation draws (so a resumed run draws what
an uninterrupted one draws), batches with unreadable samples (skipped and logged, never a crash), strict
safetensors checkpoints with the model's description beside them, and images/s in the logs.

ViTP's recipes (``mmseg/ViTP_configs``, ``opencd/ViTP_configs``): AdamW, betas (0.9, 0.999), LoveDA lr
1e-5 / weight decay 0.1, LEVIR-CD lr 1e-4 / 0.05, layer decay 0.9 over 24 + 2 layers, 1500 linear
warm-up iterations then cosine to 0, 80k iterations, 8 GPUs x batch 1 (segmentation) or 4 (change), fp16,
SyncBN. mmseg warms up from 1e-6 x lr, transformers from 0: the first steps differ by that much.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from transformers import Trainer, TrainerCallback, set_seed

from vitp.downstream.backbone import NECKS, build_encoder
from vitp.downstream.data import ChangeDataset, ClassTable, DatasetPreset, SegmentationDataset, collate
from vitp.downstream.metrics import CHANGE_DETECTION, SEGMENTATION, TASKS
from vitp.downstream.segmentor import build_upernet_change_detector, build_upernet_segmentor
from vitp.errors import ConfigError, WeightFormatError
from vitp.files import read_json, write_json
from vitp.model.formats.keymap import KeyMap, Rename
from vitp.model.vision import VisionConfig
from vitp.model.weights import read_state
from vitp.progress import bars_shown
from vitp.tensor_io import open_tensor_source, save_safetensors
from vitp.train.arguments import TrainingArguments
from vitp.train.plots import plot_loss_curve
from vitp.train.pretrain import LogFirstAndLastStep, checkpoint_problem, global_step, resume_checkpoint

logger = logging.getLogger("vitp")
SPEC_FILE = "finetune.json"
WEIGHTS_FILE = "model.safetensors"
LAYER_DECAY_RATE = 0.9  # ViTP's configs, every task
SAME_NAMES = KeyMap([Rename("{rest}", "{rest}")])  # model.safetensors holds the model's own state_dict names


# --------------------------------------------------------------------------------------------------
# What a fine-tuned model is


@dataclass
class DenseModelSpec:
    """Everything that rebuilds a fine-tuned model without its pretrained ViT (``finetune.json``)."""

    task: str  # "segmentation" | "change_detection"
    classes: list[str]
    palette: list[list[int]]
    vision: dict[str, Any]  # the pretrained ViT's VisionConfig, before adapt_vit
    neck: str = "adapter"
    image_size: int = 512  # the training crop, which sizes the position embedding
    patch_size: int | None = 16  # ViTP resizes 14 -> 16; None keeps the ViT's
    drop_path_rate: float = 0.1
    head_channels: int = 512
    reduce_zero_label: bool = False
    ignore_index: int = 255

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.neck not in NECKS:
            raise ValueError(f"neck must be one of {', '.join(NECKS)}, got {self.neck!r}")
        if self.task == CHANGE_DETECTION and len(self.classes) != 2:
            raise ValueError(f"change detection has 2 classes, got {self.classes}")

    @property
    def class_table(self) -> ClassTable:
        return ClassTable.from_names(self.classes, self.palette)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, directory: Path) -> "DenseModelSpec":
        path = Path(directory) / SPEC_FILE
        data = read_json(path, WeightFormatError, object_only=True)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = set(data) - names, {f.name for f in dataclasses.fields(cls)
                                              if f.default is dataclasses.MISSING} - set(data)
        if unknown or missing:
            raise WeightFormatError(f"{path}: not a vitp fine-tuning description (unknown keys {sorted(unknown)}, "
                                    f"missing {sorted(missing)})")
        try:
            spec = cls(**data)
            VisionConfig(**spec.vision)
        except (ValueError, TypeError, ConfigError) as err:
            raise WeightFormatError(f"{path}: {err}") from err
        return spec


def build_dense_model(spec: DenseModelSpec, vit: Any = None, *, grad_checkpoint: bool = False,
                      freeze_vit: bool = False) -> nn.Module:
    """The model ``spec`` describes, on ``vit`` (an InternViT, a checkpoint path or a preset name: the
    pretrained weights) or, without one, on a randomly initialised ViT of ``spec.vision``."""
    source = vit if vit is not None else VisionConfig(**spec.vision)
    encoder = build_encoder(source, neck=spec.neck, image_size=spec.image_size, patch_size=spec.patch_size,
                            drop_path_rate=spec.drop_path_rate, grad_checkpoint=grad_checkpoint, freeze_vit=freeze_vit)
    if spec.task == SEGMENTATION:
        return build_upernet_segmentor(encoder, len(spec.classes), channels=spec.head_channels,
                                       ignore_index=spec.ignore_index)
    return build_upernet_change_detector(encoder, channels=spec.head_channels, ignore_index=spec.ignore_index)


def save_dense_model(model: nn.Module, spec: DenseModelSpec, directory: Path,
                     state_dict: dict[str, torch.Tensor] | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = state_dict if state_dict is not None else model.state_dict()
    save_safetensors({k: v.detach().contiguous() for k, v in tensors.items()}, directory / WEIGHTS_FILE,
                     metadata={"format": "pt", "vitp": "dense"})
    write_json(spec.to_dict(), directory / SPEC_FILE)


def load_dense_weights(model: nn.Module, directory: Path) -> None:
    """Strict (the project's one loader, ``vitp.model.weights.read_state``): a missing, unexpected or
    misshapen tensor is an error naming it."""
    path = Path(directory) / WEIGHTS_FILE
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state = read_state(open_tensor_source(path), SAME_NAMES, expected,
                       [f"{path}: does not fit the model of {SPEC_FILE}"])
    model.load_state_dict(state, strict=True)


def load_dense_model(directory: Path | str, device: str | torch.device = "cpu") -> tuple[nn.Module, DenseModelSpec]:
    """A fine-tuned model (``finetune.json`` + ``model.safetensors``), in eval mode."""
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightFormatError(f"{directory}: not a directory (expected a fine-tuning output with {SPEC_FILE})")
    spec = DenseModelSpec.read(directory)
    model = build_dense_model(spec)
    load_dense_weights(model, directory)
    return model.to(device).eval(), spec


# --------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay


def layer_decay_groups(model: nn.Module, learning_rate: float, weight_decay: float,
                       decay_rate: float = LAYER_DECAY_RATE) -> list[dict[str, Any]]:
    """AdamW parameter groups by ViTP's rule (``InternViTAdapterLayerDecayOptimizerConstructor``, BEiT's):
    with L = ViT depth + 2, the embeddings are layer 0, ViT block i layer i + 1, everything else (neck,
    heads) layer L - 1 (``DenseEncoder.layer_id``); a parameter of layer l learns at
    ``learning_rate * decay_rate ** (L - 1 - l)``. 1-D parameters and biases get no weight decay (the
    position embedding, 3-D, does: upstream's by-name exception never matches its prefixed names).
    Frozen parameters are left out. Each group also names its ``layer`` and ``lr_scale``."""
    if not 0 < decay_rate <= 1:
        raise ValueError(f"decay_rate must be in (0, 1], got {decay_rate}")
    encoder = model.encoder
    top = encoder.num_layers - 1
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        layer = encoder.layer_id(name.removeprefix("encoder.")) if name.startswith("encoder.") else top
        decays = not (parameter.ndim == 1 or name.endswith(".bias"))
        if (layer, decays) not in groups:
            scale = decay_rate ** (top - layer)
            groups[layer, decays] = {"params": [], "names": [], "layer": layer, "lr_scale": scale,
                                     "lr": learning_rate * scale, "weight_decay": weight_decay if decays else 0.0}
        groups[layer, decays]["params"].append(parameter)
        groups[layer, decays]["names"].append(name)
    return [groups[key] for key in sorted(groups)]


# --------------------------------------------------------------------------------------------------
# The trainer


def collate_for_training(items: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``model(pixels, labels)`` takes, plus the samples that could not be read (name, reason)."""
    batch = collate(items)
    return {"pixels": batch.image, "labels": batch.label, "skipped": batch.skipped}


class SetDataEpoch(TrainerCallback):
    """Tell the data set which epoch starts, before the Trainer's DataLoader copies it into its workers:
    its augmentation draws are a function of (seed, epoch, index), so a run resumed mid-epoch draws what
    an uninterrupted run draws (``state.epoch`` is ``epoch + fraction done``, restored on resume)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(math.floor(state.epoch + 1e-9))
        return control


class DenseTrainer(Trainer):
    """The transformers Trainer with layer-wise decay, skipped samples and dense checkpoints."""

    def __init__(self, *args: Any, spec: DenseModelSpec, layer_decay_rate: float = LAYER_DECAY_RATE,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.layer_decay_rate = layer_decay_rate
        self._images = 0
        self._skipped_total = 0
        self._window_start = time.perf_counter()
        self._reported: set[str] = set()

    def train(self, *args: Any, **kwargs: Any):
        self._window_start = time.perf_counter()  # images/s counts from the first step, not from construction
        return super().train(*args, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model or self.model)
            groups = layer_decay_groups(model or self.model, self.args.learning_rate, self.args.weight_decay,
                                        self.layer_decay_rate)
            for group in groups:
                group.pop("names")  # kept out of the optimizer's state file
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator  # the batches carry only what the model takes

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        return None  # each batch's loss is its own pixel mean (mmseg's); the Trainer divides by the accumulation

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop("skipped", [])
        self._record_skipped(skipped)
        if inputs["pixels"] is None:  # every sample of this batch was unreadable: a zero step keeps DDP in step
            loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            return (loss, {"loss": loss}) if return_outputs else loss
        outputs = model(inputs["pixels"], inputs["labels"])
        self._images += inputs["pixels"].shape[0]
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def _record_skipped(self, skipped: list[tuple[str, str]]) -> None:
        self._skipped_total += len(skipped)
        for name, reason in skipped:
            if name not in self._reported:
                self._reported.add(name)
                logger.warning("skipped %s during training: %s", name, reason)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            counts = torch.tensor([self._images, self._skipped_total], dtype=torch.float64, device=self.args.device)
            if self.args.world_size > 1:
                counts = self.accelerator.reduce(counts, reduction="sum")
            elapsed = max(time.perf_counter() - self._window_start, 1e-9)
            logs["images_per_second"] = round(float(counts[0]) / elapsed, 2)
            logs["skipped_images"] = int(counts[1])
            self._images, self._window_start = 0, time.perf_counter()
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:
            model = self.accelerator.unwrap_model(self.model)
            save_dense_model(model, self.spec, Path(output_dir or self.args.output_dir), state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_dense_weights(self.accelerator.unwrap_model(model or self.model), Path(resume_from_checkpoint))


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class DenseData:
    """Where the data is and how it is read and augmented."""

    task: str
    root: Path
    preset: DatasetPreset  # classes, label encoding and augmentation values (possibly the user's)
    train_split: str = "train"
    val_split: str | None = "val"
    change_folders: tuple[str, str, str] = ("A", "B", "label")
    scan: str = "full"
    train_transform: Callable | None = None  # instead of the preset's training pipeline

    def open(self, split: str, train: bool, seed: int) -> SegmentationDataset | ChangeDataset:
        if train:
            transform = self.train_transform or self.preset.train_pipeline()
        else:
            transform = self.preset.eval_pipeline()
        if self.task == SEGMENTATION:
            return SegmentationDataset.from_root(self.root, split, self.preset.classes, transform,
                                                 reduce_zero_label=self.preset.reduce_zero_label, scan=self.scan,
                                                 seed=seed)
        return ChangeDataset.from_root(self.root, split, transform, folders=self.change_folders,
                                       classes=self.preset.classes, scan=self.scan, seed=seed)


def finetune(
    data: DenseData,
    vit: Any,
    spec: DenseModelSpec,
    training_args: TrainingArguments,
    *,
    layer_decay_rate: float = LAYER_DECAY_RATE,
    grad_checkpoint: bool = False,
    freeze_vit: bool = False,
    evaluation: Any = None,
) -> Path:
    """Fine-tune ``vit`` (a checkpoint path, preset name or InternViT; None: random initialisation) as
    ``spec`` says on ``data``, into ``training_args.output_dir``; then evaluate on ``data.val_split`` with
    ``evaluation`` (an :class:`vitp.downstream.evaluate.EvalSettings`; None: no evaluation). A folder
    holding checkpoints of this run is resumed from its newest complete one."""
    output = Path(training_args.output_dir)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output_dir {output} is a file, not a directory")
    if not bars_shown():  # a captured log: the Trainer prints its log lines instead of a bar
        training_args.disable_tqdm = True
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = False  # every trainable parameter gets a gradient (tested)
    if not torch.cuda.is_available():  # pinned memory needs an accelerator (a warning every epoch otherwise)
        training_args.dataloader_pin_memory = False
    resume = resume_checkpoint(training_args)
    if resume is not None:
        _check_same_model(Path(resume), spec)
    set_seed(training_args.seed)

    train_set = data.open(data.train_split, train=True, seed=training_args.seed)
    model = build_dense_model(spec, vit, grad_checkpoint=grad_checkpoint, freeze_vit=freeze_vit)
    if training_args.world_size > 1 and torch.cuda.is_available() and not training_args.use_cpu:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # ViTP's SyncBN: statistics over every GPU's batch
    elif training_args.world_size > 1:
        logger.warning("BatchNorm statistics are per process on the CPU (SyncBatchNorm needs CUDA)")

    output.mkdir(parents=True, exist_ok=True)
    trainer = DenseTrainer(model=model, args=training_args, train_dataset=train_set,
                           data_collator=collate_for_training, spec=spec, layer_decay_rate=layer_decay_rate,
                           callbacks=[SetDataEpoch(train_set), LogFirstAndLastStep()])
    finished = resume is not None and 0 < training_args.max_steps <= (global_step(resume) or 0)
    if finished:
        logger.warning("%s already reached max_steps %d: nothing to train", resume, training_args.max_steps)
        load_dense_weights(model, Path(resume))
    else:
        if resume:
            logger.info("resuming from %s", resume)
        result = trainer.train(resume_from_checkpoint=resume)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    trainer.save_model(str(output))
    if trainer.is_world_process_zero() and trainer.state.log_history:
        plot_loss_curve(trainer.state.log_history, output / "loss.png")
    if evaluation is not None and data.val_split:
        from vitp.downstream.evaluate import evaluate_split

        model = trainer.accelerator.unwrap_model(trainer.model)
        _use_saved_buffers(model)
        evaluate_split(model, spec, data, evaluation, output / "evaluation", device=training_args.device)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return output


def _use_saved_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), which is what was saved. DDP copies
    them from rank 0 before each forward, and each rank's last forward then updates its own copy from its
    own batch (without SyncBatchNorm the ranks end with different statistics); every rank evaluates a share
    of the images, so each must evaluate the saved model."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def _check_same_model(checkpoint: Path, spec: DenseModelSpec) -> None:
    """A checkpoint of another model (other classes, neck, sizes) is not resumed silently."""
    try:
        saved = DenseModelSpec.read(checkpoint)
    except WeightFormatError as err:
        raise ConfigError(f"cannot resume from {checkpoint}: {err}") from err
    if saved != spec:
        differences = [f"{key}: {getattr(saved, key)!r} there, {getattr(spec, key)!r} now"
                       for key in spec.to_dict() if getattr(saved, key) != getattr(spec, key)]
        raise ConfigError(f"{checkpoint.parent} holds checkpoints of another model ({'; '.join(differences)}): "
                          f"use another output_dir, or the same settings to continue")


__all__ = [
    "DenseData", "DenseModelSpec", "DenseTrainer", "build_dense_model", "checkpoint_problem", "finetune",
    "layer_decay_groups", "load_dense_model", "save_dense_model",
]
