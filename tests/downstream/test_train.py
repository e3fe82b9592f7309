"""Fine-tuning on the Trainer: ViTP's layer-wise decay, a one-image overfit, exact resume after SIGKILL,
the command line on real files (unicode paths, 12 classes), strict checkpoints."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from downstream_testing import write_change_dataset, write_segmentation_dataset
from vitp import build_vit
from vitp.cli import main
from vitp.downstream.data import PRESETS, ClassTable
from vitp.downstream.evaluate import EvalSettings
from vitp.downstream.train import (
    DenseData,
    DenseModelSpec,
    build_dense_model,
    finetune,
    layer_decay_groups,
    load_dense_model,
)
from vitp.downstream.transforms import Compose, Normalize
from vitp.errors import WeightFormatError
from vitp.train.arguments import TrainingArguments

ENVIRONMENT = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}


def tiny_spec(task="segmentation", neck="simple_fpn", classes=("a", "b", "c"), image_size=32, **changes):
    vision = dataclasses.asdict(build_vit("internvit-tiny").config)
    table = ClassTable.from_names(classes)
    return DenseModelSpec(task, list(table.names), [list(c) for c in table.palette], vision, neck=neck,
                          image_size=image_size, head_channels=16, **changes)


# --------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay


def upstream_layer(name: str, num_layers: int) -> int:
    """ViTP's get_num_layer_for_vit (mmseg/mmcv_custom/layer_decay_optimizer_constructor_intertvit_adp.py),
    re-stated on vitp's parameter names."""
    if name == "encoder.neck.level_embed":
        return 0
    if name.startswith(("encoder.vit.pos_embed", "encoder.vit.patch_embed")):
        return 0
    if name.startswith("encoder.vit.blocks."):
        return int(name.split(".")[3]) + 1
    return num_layers - 1


@pytest.mark.parametrize("neck", ["adapter", "simple_fpn"])
@pytest.mark.parametrize("freeze_vit", [False, True])
def test_layer_decay_groups_follow_vitps_rule(neck, freeze_vit):
    model = build_dense_model(tiny_spec(neck=neck), freeze_vit=freeze_vit)
    groups = layer_decay_groups(model, learning_rate=1e-4, weight_decay=0.05, decay_rate=0.9)
    num_layers = 2 + 2  # internvit-tiny: 2 blocks
    seen = {}
    for group in groups:
        for name, parameter in zip(group["names"], group["params"]):
            assert name not in seen
            seen[name] = group
            layer = upstream_layer(name, num_layers)
            assert group["layer"] == layer, name
            assert group["lr"] == pytest.approx(1e-4 * 0.9 ** (num_layers - 1 - layer)), name
            no_decay = parameter.ndim == 1 or name.endswith(".bias")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(seen) == trainable
    assert not any(n.startswith("encoder.vit.") for n in seen) if freeze_vit else \
        {g["layer"] for g in groups} == set(range(num_layers))
    # the position embedding is 3-D: upstream decays it (its by-name exception never matches prefixed names)
    if not freeze_vit:
        assert seen["encoder.vit.pos_embed"]["weight_decay"] == 0.05


# --------------------------------------------------------------------------------------------------
# Training


def blocky_image(root: Path, split: str, name: str, size: int = 64) -> None:
    """Three classes in blocks of distinct colours (what one image lets a model learn exactly). 64 px: at
    32 px the head's 1/32 map is one pixel, whose pooled copies have no variance for BatchNorm to learn."""
    label = np.zeros((size, size), np.uint8)
    label[:, size // 2 :] = 1
    label[size // 2 :, : size // 2] = 2
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], np.uint8)
    for folder, array in (("img_dir", colours[label]), ("ann_dir", label)):
        path = root / folder / split / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)


@pytest.mark.slow
def test_one_image_is_learnt_exactly(tmp_path):
    root = tmp_path / "数据"
    blocky_image(root, "train", "only")
    blocky_image(root, "val", "only")
    preset = dataclasses.replace(PRESETS["loveda"], classes=ClassTable.from_names(["a", "b", "c"]),
                                 reduce_zero_label=False, test_scale=None)
    data = DenseData("segmentation", root, preset, train_transform=Compose([Normalize()]))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=120, per_device_train_batch_size=1,
                             learning_rate=5e-3, warmup_steps=0, lr_scheduler_type="constant", save_strategy="no",
                             logging_steps=20, report_to="none", seed=0, use_cpu=True)
    output = finetune(data, None, tiny_spec(image_size=64), args, layer_decay_rate=1.0,
                      evaluation=EvalSettings(mode="whole", bootstrap=0))
    evaluation = json.loads((output / "evaluation" / "evaluation.json").read_text())
    assert evaluation["metrics"]["mIoU"] == 1.0 and evaluation["metrics"]["aAcc"] == 1.0
    assert (output / "loss.png").is_file() and (output / "evaluation" / "predictions" / "only.png.png").is_file()
    model, spec = load_dense_model(output)  # the saved model predicts what was evaluated
    assert spec == tiny_spec(image_size=64)
    prediction = np.asarray(Image.open(output / "evaluation" / "predictions" / "only.png.png"))
    assert np.array_equal(prediction, np.asarray(Image.open(root / "ann_dir" / "val" / "only.png")))


def finetune_command(data: Path, output: Path, *extra: str) -> list[str]:
    return ["segment", "--data", str(data), "--classes", str(data / "classes.txt"), "--reduce_zero_label", "false",
            "--vit", "internvit-tiny", "--random_init", "--neck", "simple_fpn", "--crop_size", "32",
            "--head_channels", "16", "--output_dir", str(output), "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-3", "--warmup_steps", "1", "--logging_steps", "1", "--seed", "5",
            "--dataloader_num_workers", "1", "--eval_crop", "32", "--eval_stride", "24", "--bootstrap", "20", *extra]


@pytest.fixture(scope="module")
def twelve_classes(tmp_path_factory):
    """A 12-class data set of odd-sized images under a unicode path."""
    root = tmp_path_factory.mktemp("ft") / "données"
    write_segmentation_dataset(root, "train", num_images=4, sizes=[(45, 37), (40, 40), (50, 33), (39, 41)],
                               num_classes=12)
    write_segmentation_dataset(root, "val", num_images=2, size=(47, 35), num_classes=12, seed=1)
    (root / "classes.txt").write_text("".join(f"{n}\n" for n in ["1", "2", "10", "Z", "z", "é", "水田", "c", "d", "e",
                                                                   "f", "g"]))
    return root


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(twelve_classes, tmp_path):
    """4 images, batch 2: 2 steps an epoch; killed after the step-3 checkpoint (mid-epoch 2), then run again."""
    steps = ["--max_steps", "6", "--save_steps", "3", "--val_split", "none"]

    def command(output):  # both runs in processes with the same thread settings: the same float sums
        return [sys.executable, "-m", "vitp.cli", "finetune", *finetune_command(twelve_classes, output, *steps)]

    straight_run = subprocess.run(command(tmp_path / "straight"), env=ENVIRONMENT, capture_output=True, text=True,
                                  timeout=600)
    assert straight_run.returncode == 0, straight_run.stderr
    command = command(tmp_path / "killed")
    process = subprocess.Popen(command, env=ENVIRONMENT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "checkpoint-3" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not state.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert state.is_file() and not (tmp_path / "killed" / "model.safetensors").exists()
    resumed = subprocess.run(command, env=ENVIRONMENT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    again = load_file(tmp_path / "killed" / "model.safetensors")
    assert straight.keys() == again.keys()
    for name in straight:
        assert torch.equal(straight[name], again[name]), name


@pytest.mark.slow
def test_the_command_line_trains_evaluates_and_compares_on_twelve_classes(twelve_classes, tmp_path, capsys):
    output = tmp_path / "运行"
    assert main(["finetune", *finetune_command(twelve_classes, output, "--max_steps", "2", "--save_steps", "2")]) == 0
    evaluation = json.loads((output / "evaluation" / "evaluation.json").read_text())
    assert evaluation["classes"] == ["1", "2", "10", "Z", "z", "é", "水田", "c", "d", "e", "f", "g"]
    assert sorted(evaluation["per_image"]["names"]) == ["tile_000.png", "tile_001.png"]
    assert evaluation["bootstrap"]["resamples"] == 20
    assert (output / "evaluation" / "overlays.png").is_file() and (output / "loss.png").is_file()
    spec = json.loads((output / "finetune.json").read_text())
    assert spec["classes"] == evaluation["classes"] and spec["patch_size"] == 16

    again = tmp_path / "again"
    assert main(["finetune", "evaluate", "--model", str(output), "--data", str(twelve_classes), "--output", str(again),
                 "--eval_mode", "slide", "--eval_crop", "32", "--eval_stride", "24", "--bootstrap", "20"]) == 0
    assert json.loads((again / "evaluation.json").read_text())["per_image"] == evaluation["per_image"]
    capsys.readouterr()
    assert main(["evaluate", "--compare", str(output / "evaluation" / "evaluation.json"), str(again / "evaluation.json"),
                 "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "0.00 [0.00, 0.00]" in printed  # the same predictions: a zero difference


@pytest.mark.slow
def test_change_detection_trains_and_reports_the_changed_class(tmp_path):
    root = tmp_path / "levir"
    write_change_dataset(root, "train", num_images=2, size=(40, 36))
    write_change_dataset(root, "val", num_images=2, size=(40, 36), seed=1)
    assert main(["finetune", "change", "--data", str(root), "--vit", "internvit-tiny", "--random_init", "--neck",
                 "adapter", "--crop_size", "32", "--head_channels", "16", "--output_dir", str(tmp_path / "run"),
                 "--max_steps", "1", "--per_device_train_batch_size", "2", "--dataloader_num_workers", "0",
                 "--eval_crop", "32", "--eval_stride", "16", "--bootstrap", "10"]) == 0
    evaluation = json.loads((tmp_path / "run" / "evaluation" / "evaluation.json").read_text())
    assert evaluation["task"] == "change_detection" and evaluation["classes"] == ["unchanged", "changed"]
    assert {"Precision", "Recall", "F1", "IoU"} <= set(evaluation["metrics"])


def test_resuming_into_checkpoints_of_another_model_is_refused(twelve_classes, tmp_path, capsys):
    output = tmp_path / "run"
    model = build_dense_model(tiny_spec())
    from vitp.downstream.train import save_dense_model

    save_dense_model(model, tiny_spec(), output / "checkpoint-2")
    (output / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    assert main(["finetune", *finetune_command(twelve_classes, output, "--max_steps", "4")]) == 2
    assert "holds checkpoints of another model (classes: ['a', 'b', 'c'] there" in capsys.readouterr().err


def test_checkpoints_load_strictly(tmp_path):
    spec = tiny_spec()
    from vitp.downstream.train import save_dense_model

    model = build_dense_model(spec)
    state = model.state_dict()
    state.pop("decode_head.conv_seg.bias")
    save_dense_model(model, spec, tmp_path / "run", state_dict=state)
    with pytest.raises(WeightFormatError, match=r"missing \(1\): decode_head.conv_seg.bias"):
        load_dense_model(tmp_path / "run")
    (tmp_path / "run" / "finetune.json").write_text(json.dumps({**spec.to_dict(), "colour": 1}))
    with pytest.raises(WeightFormatError, match=r"unknown keys \['colour'\]"):
        load_dense_model(tmp_path / "run")


def test_the_command_line_names_what_is_missing(tmp_path, capsys):
    (tmp_path / "img_dir" / "train").mkdir(parents=True)
    code = main(["finetune", "segment", "--data", str(tmp_path), "--vit", "internvit-tiny", "--output_dir",
                 str(tmp_path / "out")])
    assert code == 2
    assert f"{tmp_path / 'ann_dir' / 'train'} is missing (mmseg's layout" in capsys.readouterr().err
    assert main(["finetune", "segment", "--data", str(tmp_path), "--vit", "no/such.safetensors", "--output_dir",
                 str(tmp_path / "out"), "--val_split", "none"]) == 2


def test_each_epoch_draws_its_own_augmentations_also_after_a_resume():
    """The Trainer's state.epoch is epoch + fraction done (restored on resume): the data set gets the epoch."""
    from types import SimpleNamespace

    from vitp.downstream.train import SetDataEpoch

    class Recorder:
        epoch = None

        def set_epoch(self, epoch):
            self.epoch = epoch

    recorder = Recorder()
    callback = SetDataEpoch(recorder)
    for state_epoch, expected in ((0.0, 0), (1.0, 1), (1.5, 1), (2.9999999, 2), (3.0, 3)):
        callback.on_epoch_begin(None, SimpleNamespace(epoch=state_epoch), None)
        assert recorder.epoch == expected


def test_a_layer_decay_rate_above_one_is_refused_before_anything_is_read(tmp_path, capsys):
    assert main(["finetune", "segment", "--data", str(tmp_path / "nowhere"), "--vit", "internvit-tiny",
                 "--output_dir", str(tmp_path / "out"), "--layer_decay_rate", "1.5"]) == 2
    assert "--layer_decay_rate must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_the_command_line_knows_the_dense_tasks_without_importing_them():
    from vitp.cli.retrieval import DENSE_TASKS
    from vitp.downstream.metrics import TASKS

    assert DENSE_TASKS == TASKS


@pytest.mark.slow
def test_two_torchrun_ranks_train_together_and_evaluate_every_image_once(twelve_classes, tmp_path):
    """DDP over gloo on CPUs; each rank evaluates every 2nd image and rank 0 joins them in data-set order:
    the same per-image areas as one process evaluating the saved model."""
    output = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "vitp.cli", "finetune", *finetune_command(twelve_classes, output, "--max_steps", "2", "--save_steps", "2",
                                                        "--dataloader_num_workers", "0")]
    finished = subprocess.run(command, env=ENVIRONMENT, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["log_history"][0]["images_per_second"] > 0
    sharded = json.loads((output / "evaluation" / "evaluation.json").read_text())
    assert main(["finetune", "evaluate", "--model", str(output), "--data", str(twelve_classes), "--output",
                 str(tmp_path / "one"), "--eval_crop", "32", "--eval_stride", "24", "--bootstrap", "20"]) == 0
    alone = json.loads((tmp_path / "one" / "evaluation.json").read_text())
    assert sharded["per_image"] == alone["per_image"]
    assert sorted(p.name for p in (output / "evaluation" / "predictions").iterdir()) == ["tile_000.png.png",
                                                                                         "tile_001.png.png"]


def test_bf16_autocast_trains_on_the_cpu(twelve_classes, tmp_path):
    assert main(["finetune", *finetune_command(twelve_classes, tmp_path / "bf16", "--max_steps", "1", "--bf16",
                                               "--val_split", "none", "--dataloader_num_workers", "0")]) == 0
    loss = json.loads((tmp_path / "bf16" / "trainer_state.json").read_text())["log_history"][0]["loss"]
    assert np.isfinite(loss)
