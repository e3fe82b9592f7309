"""What a short run logs: the first and last step always, the loss curve only when written, and a
batch larger than the data set named with the samples a step really holds."""

import json

import pytest

from vitp.cli import main

from train_testing import logged_losses, run


def pretrain_command(workspace, output, *flags):
    """`vitp pretrain` of the tiny preset on the workspace data, upstream's logging_steps (10) unless given."""
    return main(["pretrain", "--meta_path", str(workspace / "data" / "meta.json"), "--output_dir", str(output),
                 "--model_preset", "internvl-tiny", "--tokenizer", str(workspace / "tok"), "--force_image_size", "56",
                 "--per_device_train_batch_size", "2", "--dataloader_num_workers", "0", "--report_to", "none",
                 "--grad_checkpoint", "False", *flags])


def test_a_five_step_run_logs_its_losses_and_draws_the_curve(workspace, tmp_path, capsys):
    """logging_steps stays upstream's default (10): the first and the last of 5 steps are still logged."""
    output = tmp_path / "run"
    code = pretrain_command(workspace, output, "--max_steps", "5", "--save_steps", "5")
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert sorted(logged_losses(output / "checkpoint-5")) == [1, 5]
    assert (output / "loss.png").stat().st_size > 1000
    assert f"loss curve {output / 'loss.png'}" in captured.out
    # captured output (pytest's streams are not terminals): log lines, no redrawn bar
    assert "\r" not in captured.out + captured.err
    assert "'loss':" in captured.out


def test_no_logged_loss_means_no_curve_and_no_claim(workspace, tmp_path, capsys):
    output = tmp_path / "run"
    code = pretrain_command(workspace, output, "--max_steps", "1", "--logging_strategy", "no")
    out = capsys.readouterr().out
    assert code == 0
    assert not (output / "loss.png").exists()
    assert "loss curve" not in out and "no loss was logged" in out


def test_a_batch_larger_than_the_data_set_is_named_with_the_real_step_size(workspace, small_meta, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="vitp"):
        output = run(workspace, tmp_path / "run", meta_path=str(small_meta), per_device_train_batch_size=16,
                     max_steps=2, save_steps=2)
    assert "larger than the data set's 6 samples" in caplog.text
    assert "a step trains on 6 samples, not 16" in caplog.text
    metrics = json.loads((output / "train_results.json").read_text())
    # 2 steps of 6 samples each, not 2 x 16
    assert metrics["train_samples_per_second"] * metrics["train_runtime"] == pytest.approx(12, rel=0.05)


def test_a_refused_run_leaves_no_empty_output_folder(workspace, tmp_path, capsys):
    output = tmp_path / "fresh" / "out"
    code = pretrain_command(workspace, output, "--down_sample_ratio", "0.25")
    assert code == 2 and "down_sample_ratio" in capsys.readouterr().err
    assert not output.exists()


def test_model_preset_choices_are_the_presets():
    from vitp.model.vlm import VLM_PRESETS
    from vitp.train.arguments import MODEL_PRESETS

    assert MODEL_PRESETS == tuple(sorted(VLM_PRESETS))
