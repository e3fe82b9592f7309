"""Helpers of the training tests (a module with a unique name): the arguments of a small CPU run,
running it, the losses a checkpoint logged, and a Trainer that records what it trained on."""

import copy
import json
from pathlib import Path

import torch
from transformers import TrainerCallback

import vitp.train.pretrain as pretrain_module
from vitp.train.arguments import pretrain_arguments
from vitp.train.pretrain import VitpTrainer, pretrain


def config(workspace, output, **overrides):
    """The three argument objects of a small CPU run (ViTP's dynamic tiles; no gradient checkpointing)."""
    values = dict(
        meta_path=str(workspace / "data" / "meta.json"), output_dir=str(output), model_preset="internvl-tiny",
        tokenizer=str(workspace / "tok"), force_image_size=56, max_dynamic_patch=2, dynamic_image_size=True,
        use_thumbnail=True, system_message="Answer.", max_steps=6, learning_rate=2e-3, per_device_train_batch_size=4,
        logging_steps=1, save_steps=3, dataloader_num_workers=0, report_to="none", seed=7, grad_checkpoint=False,
    )
    values.update(overrides)
    return pretrain_arguments(**values)


def run(workspace, output, **overrides) -> Path:
    return pretrain(*config(workspace, output, **overrides))


def logged_losses(checkpoint: Path) -> dict[int, float]:
    history = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


class RecordingTrainer(VitpTrainer):
    """VitpTrainer keeping what a test needs to recompute a run on its own: every micro-batch, the loss
    training_step returned for it, and the model's state and gradients before each optimizer step
    (after gradient clipping: give max_grad_norm 0 to see them raw). The newest one is ``latest``."""

    latest: "RecordingTrainer | None" = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.record = {"micro_batches": [], "micro_losses": [], "steps": []}
        self.add_callback(_RecordBeforeOptimizerStep(self.record))
        RecordingTrainer.latest = self

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.record["micro_batches"].append(
            {key: value.clone() if torch.is_tensor(value) else copy.deepcopy(value) for key, value in inputs.items()})
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.record["micro_losses"].append(float(loss))
        return loss


class _RecordBeforeOptimizerStep(TrainerCallback):
    def __init__(self, record: dict):
        self.record = record

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.record["steps"].append({
            "state": {name: tensor.detach().clone() for name, tensor in model.state_dict().items()},
            "grads": {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None},
        })


def recording_trainer() -> None:
    """Make `pretrain` use RecordingTrainer (for a subprocess; in tests use `recorded_run`)."""
    pretrain_module.VitpTrainer = RecordingTrainer


def recorded_run(workspace, output, **overrides) -> dict:
    """`run` with a RecordingTrainer; returns its record."""
    original = pretrain_module.VitpTrainer
    recording_trainer()
    try:
        run(workspace, output, **overrides)
    finally:
        pretrain_module.VitpTrainer = original
    return RecordingTrainer.latest.record
