"""Helpers of the training tests (a module with a unique name): the arguments of a small CPU run,
running it, and the losses a checkpoint logged."""

import json
from pathlib import Path

from vitp.train.arguments import pretrain_arguments
from vitp.train.pretrain import pretrain


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
