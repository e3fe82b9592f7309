"""`vitp pretrain` on a CPU: the loss falls, resume repeats the same losses, freezing, checkpoints that
transformers loads, a 2-process torchrun (gloo), bad lines skipped, export-vit bit-exact."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import InternVLForConditionalGeneration, InternVLVisionModel

from vitp.cli import main
from vitp import load_vit
from vitp.model.checkpoint import load_vlm
from vitp.train.export import export_vit

from train_testing import logged_losses, run

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.slow
def test_loss_falls_and_the_run_writes_everything(workspace, tmp_path):
    output = run(workspace, tmp_path / "run", max_steps=40, save_steps=10, save_total_limit=2,
                 logging_steps=5, drop_path_rate=0.1, TMAug_prob=0.5, report_to="tensorboard")
    history = json.loads((output / "checkpoint-40" / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses[-1] < 0.7 * losses[0]
    assert all("tokens_per_second" in e and "tmaug_sample_fraction" in e for e in history if "loss" in e)
    assert (output / "loss.png").stat().st_size > 1000
    model = InternVLForConditionalGeneration.from_pretrained(output)
    assert model.config.vision_config.image_size == [56, 56]
    # a checkpoint every 10 steps, the 2 newest kept
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-30", "checkpoint-40"]
    assert list((output / "runs").rglob("events.out.tfevents.*")), "no TensorBoard event file"


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_loss_sequence(workspace, tmp_path):
    full = tmp_path / "full"
    run(workspace, full, drop_path_rate=0.1, tmaug_prob=0.5, tmaug_ratio=0.5)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")  # as if killed after step 3
    run(workspace, resumed, drop_path_rate=0.1, tmaug_prob=0.5, tmaug_ratio=0.5)
    first, second = logged_losses(full / "checkpoint-6"), logged_losses(resumed / "checkpoint-6")
    assert sorted(second) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert second[step] == pytest.approx(first[step], abs=1e-6), step
    a = load_file(full / "model.safetensors")
    b = load_file(resumed / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_freezing_flags_keep_weights_fixed(workspace, tmp_path):
    output = run(workspace, tmp_path / "frozen", max_steps=2, save_steps=100,
                 freeze_llm=True, freeze_mlp=True)
    untouched = tmp_path / "init"
    run(workspace, untouched, max_steps=2, save_steps=100, learning_rate=0.0)
    trained, initial = load_file(output / "model.safetensors"), load_file(untouched / "model.safetensors")
    for key in trained:
        same = torch.equal(trained[key], initial[key])
        if key.startswith(("language_model.", "multi_modal_projector.")):
            assert same, key
    assert not all(torch.equal(trained[k], initial[k]) for k in trained if k.startswith("vision_tower."))


@pytest.mark.slow
def test_bad_lines_are_skipped_and_training_continues(workspace, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(workspace / "data", data)
    jsonl = data / "images.jsonl"
    lines = jsonl.read_text().splitlines()
    lines[1] = "{broken"
    jsonl.write_text("\n".join(lines) + "\n")
    meta = json.loads((data / "meta.json").read_text())
    meta["images"]["root"] = str(workspace / "images")
    (data / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="vitp"):
        run(workspace, tmp_path / "run", meta_path=str(data / "meta.json"), max_steps=8, save_steps=100)
    assert caplog.text.count("images.jsonl:2 (invalid JSON)") == 1


@pytest.mark.slow
def test_cli_with_a_yaml_config_and_upstream_boolean_spelling(workspace, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"meta_path: {workspace / 'data' / 'meta.json'}\nmodel_preset: internvl-tiny\ntokenizer: {workspace / 'tok'}\n"
        "force_image_size: 56\nmax_dynamic_patch: 2\nmax_steps: 50\nper_device_train_batch_size: 2\n"
        "save_steps: 100\nreport_to: none\ndataloader_num_workers: 0\n"
    )
    code = main(["pretrain", "--config", str(recipe), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
                 "--bf16", "False", "--grad_checkpoint", "True"])
    assert code == 0
    history = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    assert history["global_step"] == 2  # the command line's --max_steps beat the file's 50


@pytest.mark.slow
def test_export_vit_is_bit_exact_and_loads_everywhere(workspace, tmp_path):
    output = run(workspace, tmp_path / "run", max_steps=2, save_steps=100)
    files = export_vit(output, tmp_path / "vit")
    assert [f.name for f in files] == ["vit.safetensors", "vit.json", "model.safetensors", "config.json"]
    model, _ = load_vlm(output)
    expected = model.vision_model.state_dict()
    for exported in (load_vit(tmp_path / "vit" / "vit.safetensors"), load_vit(tmp_path / "vit" / "hf")):
        assert all(torch.equal(exported.state_dict()[k], expected[k]) for k in expected)
    assert InternVLVisionModel.from_pretrained(tmp_path / "vit" / "hf").config.hidden_size == 64
    assert "vision_model.embeddings.class_embedding" in load_file(tmp_path / "vit" / "vit.safetensors")


@pytest.mark.slow
def test_two_process_torchrun_runs_and_ends_cleanly(workspace, tmp_path):
    output = tmp_path / "ddp"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
        "-m", "vitp.cli", "pretrain", "--meta_path", str(workspace / "data" / "meta.json"),
        "--output_dir", str(output), "--model_preset", "internvl-tiny", "--tokenizer", str(workspace / "tok"),
        "--force_image_size", "56", "--max_dynamic_patch", "2", "--max_steps", "3", "--save_steps", "3",
        "--per_device_train_batch_size", "2", "--report_to", "none", "--dataloader_num_workers", "0",
        "--logging_steps", "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "destroy_process_group" not in result.stderr
    assert (output / "model.safetensors").is_file() and (output / "checkpoint-3" / "optimizer.pt").is_file()
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
def test_sharding_flags_without_a_gpu_are_refused_not_ignored(workspace, tmp_path, capsys):
    """accelerate would run --fsdp as plain DDP on CPUs: one full model per process, no sharding."""
    base = ["pretrain", "--meta_path", str(workspace / "data" / "meta.json"), "--output_dir", str(tmp_path / "out"),
            "--model_preset", "internvl-tiny", "--tokenizer", str(workspace / "tok")]
    assert main(base + ["--fsdp", "full_shard auto_wrap", "--fsdp_config", str(CONFIGS / "fsdp.json")]) == 2
    assert "fsdp shards the model over GPUs, and no CUDA GPU is visible" in capsys.readouterr().err
    assert main(base + ["--fsdp", "full_shard", "--fsdp_config", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any model was built or anything written


def test_config_file_values_are_typed_like_the_flags(tmp_path):
    from vitp.cli.train import load_config_file
    from vitp.errors import ConfigError

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text('freeze_backbone: "false"\nlearning_rate: 2e-5\nmax_steps: "10"\nfsdp_config: null\n')
    values = load_config_file(str(recipe))  # PyYAML reads 2e-5 as a string; "false" is not truthy here
    assert values == {"freeze_backbone": False, "learning_rate": 2e-5, "max_steps": 10, "fsdp_config": None}
    recipe.write_text("per_device_train_batch_size: 2.5\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml: per_device_train_batch_size: expected int, got 2\.5"):
        load_config_file(str(recipe))
    recipe.write_text("max_steps: [unclosed\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml: not valid YAML"):
        load_config_file(str(recipe))


@pytest.mark.parametrize("flags, message", [
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be at least 1"),
    (["--TMAug_prob", "1.5"], "must be in [0, 1]"),
    (["--tmaug_mode", "bogus"], "invalid choice: 'bogus'"),
    (["--loss_normalization", "mean"], "--loss_normalization/--loss-normalization: invalid choice: 'mean'"),
    (["--lr_scheduler_type", "bogus"], "--lr_scheduler_type/--lr-scheduler-type: invalid choice: 'bogus'"),
    (["--min_dynamic_patch", "3", "--max_dynamic_patch", "2"], "max_dynamic_patch 2 is below min_dynamic_patch 3"),
    (["--freeze_llm", "--freeze_backbone", "--freeze_mlp"], "leave nothing to train"),
    (["--vision_select_layer", "99"], "vision_select_layer: select_layer=99 is out of range"),
    (["--warmup_ratio", "1.5"], "warmup_ratio: must be in [0, 1)"),
    (["--eval_strategy", "steps"], "no evaluation set"),
    (["--evaluation_strategy", "epoch"], "no evaluation set"),
    (["--do_train", "False"], "vitp pretrain only trains"),
    (["--ps_version", "v1"], "implement 'v2' only"),
    (["--use_CoT", "True"], "assert False"),
    (["--use_packed_ds", "True"], "use_packed_ds needs max_steps"),
    (["--use_liger", "True"], "pip install 'vitp[liger]'"),
    (["--down_sample_ratio", "0.25"], "down_sample_ratio 0.25 differs from the model's 0.5"),
    (["--use_classifier", "True", "--conv_style", "Hermes-2"], "internvl2_5 template only"),
    (["--unfreeze_vit_layers", "5"], "the ViT has 2 layers"),
    (["--max_stesp", "3"], "unrecognized arguments: --max_stesp (did you mean --max_steps?)"),
])
def test_bad_settings_are_refused_with_the_flag_named(workspace, tmp_path, capsys, flags, message):
    base = ["pretrain", "--meta_path", str(workspace / "data" / "meta.json"), "--output_dir", str(tmp_path / "out"),
            "--model_preset", "internvl-tiny", "--tokenizer", str(workspace / "tok"), "--force_image_size", "56"]
    code = main(base + flags)
    err = capsys.readouterr().err
    assert code == 2 and message in err, err[-2000:]
    assert "Traceback" not in err
    assert not list(tmp_path.glob("out/checkpoint-*"))


def test_output_dir_that_is_a_file_is_refused(workspace, tmp_path):
    from vitp.errors import ConfigError

    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        run(workspace, tmp_path / "out")


@pytest.mark.slow
def test_resume_skips_a_half_written_checkpoint_and_a_finished_run_stays_finished(workspace, tmp_path, caplog):
    output = tmp_path / "run"
    run(workspace, output, max_steps=4, save_steps=2, logging_steps=1)
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # a second run of the finished command: nothing trained, no checkpoint past max_steps
    with caplog.at_level("WARNING", logger="vitp"):
        run(workspace, output, max_steps=4, save_steps=2)
    assert "already reached max_steps 4" in caplog.text
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # a kill while checkpoint-4 was written (truncated weights) and before the final save
    weights = output / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    (output / "model.safetensors").unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="vitp"):
        run(workspace, output, max_steps=4, save_steps=2)
    assert "not resuming from" in caplog.text and "checkpoint-4: model.safetensors is truncated" in caplog.text
    assert json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    assert (output / "model.safetensors").is_file()
    # --overwrite_output_dir starts afresh: the old run's checkpoints must not be resumed later
    run(workspace, output, max_steps=1, save_steps=1, overwrite_output_dir=True)
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1"]


@pytest.mark.slow
def test_export_from_a_run_stopped_before_its_final_save(workspace, tmp_path):
    from vitp.errors import ConfigError

    output = run(workspace, tmp_path / "run", max_steps=2, save_steps=1)
    for name in ("model.safetensors", "config.json"):
        (output / name).unlink()
    export_vit(output, tmp_path / "vit")
    expected = load_vlm(output / "checkpoint-2")[0].vision_model.state_dict()
    exported = load_vit(tmp_path / "vit" / "vit.safetensors").state_dict()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="the output is a file"):
        export_vit(output, tmp_path / "afile")


def test_a_meta_with_no_samples_is_refused_before_training(workspace, tmp_path):
    from vitp.errors import VitpError

    (tmp_path / "empty.jsonl").write_text("")
    meta = {"empty": {"root": str(workspace / "images"), "annotation": str(tmp_path / "empty.jsonl"), "repeat_time": 1}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(VitpError, match="no samples per epoch.*'empty'"):
        run(workspace, tmp_path / "run", meta_path=str(tmp_path / "meta.json"))
    assert not list((tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.slow
def test_choice_questions_train_with_upstreams_classifier_loss(workspace, tmp_path):
    """--use_classifier at a batch of 4 (upstream: 1 only): the choice loss is part of the loss."""
    images = sorted((workspace / "images").rglob("*.png"))[:8]
    lines = [{"image": str(path.relative_to(workspace / "images")), "conversations": [
        {"from": "human", "value": "<image>\n<cls>Which land cover is it? Options: water|forest|sand. One word."},
        {"from": "gpt", "value": path.parent.name}]} for path in images]
    (tmp_path / "cls.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    meta = {"cls": {"root": str(workspace / "images"), "annotation": str(tmp_path / "cls.jsonl"), "repeat_time": 1}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    common = dict(meta_path=str(tmp_path / "meta.json"), max_steps=2, save_steps=2, learning_rate=0.0)
    with_choice = run(workspace, tmp_path / "cls", use_classifier=True, **common)
    without = run(workspace, tmp_path / "plain", **common)
    loss = lambda output: json.loads((output / "trainer_state.json").read_text())["log_history"][0]["loss"]  # noqa: E731
    assert loss(with_choice) > loss(without) + 0.05  # the same model and batch, plus about ln(3) / 1 per sample
