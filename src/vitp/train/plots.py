"""Pictures of a training run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curve(log_history: list[dict], path: Path) -> Path | None:
    """Training loss against step (and the learning rate on a second axis) from the Trainer's logs."""
    points = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    if not points:
        return None
    steps, losses = zip(*points)
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    axis.plot(steps, losses, color="tab:blue", label="loss")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.grid(alpha=0.3)
    handles = axis.get_lines()
    rates = [(entry["step"], entry["learning_rate"]) for entry in log_history if "learning_rate" in entry]
    if rates:
        twin = axis.twinx()
        handles += twin.plot(*zip(*rates), color="tab:orange", alpha=0.6, label="learning rate")
        twin.set_ylabel("learning rate")
    axis.legend(handles, [line.get_label() for line in handles], loc="upper right")
    axis.set_title("ViTP pretraining")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
