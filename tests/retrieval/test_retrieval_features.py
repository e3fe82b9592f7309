"""`extract_features`: batched extraction, bad files skipped and reported, resuming after a kill."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import vitp
from vitp.data.images import build_transform, load_image
from vitp.errors import ConfigError, RetrievalError
from vitp.cli import main
from vitp.retrieval.extract import embed_files, extract_features, load_feature_model
from vitp.retrieval.extract import embedder as embedder_module
from vitp.retrieval.feature_file import load_features
from vitp_testing import parser_refusal

FAST = dict(num_workers=0, progress_bar=False, device="cpu", dtype="fp32")


def test_features_match_the_model_and_carry_labels_and_settings(image_tree, vit_file, tmp_path):
    result = extract_features(image_tree, tmp_path / "g.npz", vit_file, batch_size=5, **FAST)
    loaded = load_features(tmp_path / "g.npz")
    assert loaded.features.shape == (12, 64) and loaded.features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(loaded.features, axis=1), 1.0, rtol=1e-5)
    assert sorted(set(loaded.labels)) == ["disk", "square", "stripes"]
    assert all(path.endswith(".png") and f"/{label}/" in path for path, label in zip(loaded.image_paths, loaded.labels))
    settings = loaded.settings
    assert settings["layer"] == 2 and settings["select_layer"] == -1 and settings["pool"] == "mean"
    assert settings["image_size"] == 112 and settings["model_fingerprint"].startswith("sha256:")
    assert result.skipped == [] and result.skipped_report is None

    # The same numbers as running the model by hand: mean over patch tokens (CLS excluded), L2-normalised.
    model = vitp.load_vit(vit_file)
    pixels = build_transform(112)(load_image(loaded.image_paths[0])).unsqueeze(0)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model(pixels)[:, 1:].mean(1), dim=-1)
    np.testing.assert_allclose(loaded.features[0], expected[0].numpy(), atol=1e-5)


def test_cls_pooling_layer_choice_and_batch_size_independence(image_tree, vit_file, tmp_path):
    mean = extract_features(image_tree, tmp_path / "a.npz", vit_file, batch_size=1, **FAST).feature_set
    batched = extract_features(image_tree, tmp_path / "b.npz", vit_file, batch_size=7, **FAST).feature_set
    np.testing.assert_allclose(mean.features, batched.features, atol=1e-5)
    cls = extract_features(image_tree, tmp_path / "c.npz", vit_file, pool="cls", select_layer=1, **FAST).feature_set
    assert cls.settings["layer"] == 1 and cls.settings["pool"] == "cls"
    assert not np.allclose(cls.features, mean.features, atol=1e-3)
    with pytest.raises(ConfigError, match="select_layer=7 is out of range"):
        extract_features(image_tree, tmp_path / "d.npz", vit_file, select_layer=7, **FAST)


def test_each_kind_of_bad_file_is_skipped_and_reported(image_tree, vit_file, tmp_path):
    good = sorted((image_tree / "disk").glob("*.png"))[0]
    (image_tree / "disk" / "empty.png").write_bytes(b"")
    (image_tree / "disk" / "text.jpg").write_text("this is not an image")
    data = good.read_bytes()
    (image_tree / "square" / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (200, 150)).save(image_tree / "stripes" / "huge.png")  # over the limit set below
    (image_tree / "stripes" / "gone.png").symlink_to(image_tree / "stripes" / "deleted-target.png")

    result = extract_features(
        image_tree, tmp_path / "g.npz", vit_file, max_pixels=20_000, num_workers=2, progress_bar=False, device="cpu"
    )
    reasons = {path.rsplit("/", 1)[-1]: reason for path, reason in result.skipped}
    assert set(reasons) == {"empty.png", "text.jpg", "truncated.png", "huge.png", "gone.png"}
    assert reasons["empty.png"] == "empty file"
    assert reasons["gone.png"].startswith("cannot read (No such file")  # a dangling link is reported, not lost
    assert reasons["text.jpg"].startswith("not an image")
    assert reasons["truncated.png"].startswith("corrupt or truncated")
    assert reasons["huge.png"].startswith("too large")
    assert result.feature_set.features.shape[0] == 12
    report = (tmp_path / "g.skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0].rsplit("/", 1)[-1] for line in report) == sorted(reasons)
    # A later clean run removes the stale report.
    for name in ("disk/empty.png", "disk/text.jpg", "square/truncated.png", "stripes/huge.png", "stripes/gone.png"):
        (image_tree / name).unlink()
    extract_features(image_tree, tmp_path / "g.npz", vit_file, **FAST)
    assert not (tmp_path / "g.skipped.txt").exists()


def test_a_folder_of_only_bad_files_is_an_error(tmp_path, vit_file):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"")
    with pytest.raises(RetrievalError, match="none of the 1 image files could be read"):
        extract_features(tmp_path / "bad", tmp_path / "x.npz", vit_file, **FAST)
    (tmp_path / "none").mkdir()
    with pytest.raises(RetrievalError, match="no images found"):
        extract_features(tmp_path / "none", tmp_path / "x.npz", vit_file, **FAST)


KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from vitp.retrieval.extract import embedder, extract_features

    real_embed, calls = embedder.embed_batch, [0]

    def embed_then_die(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:  # the 4th batch: three batches are already in shards
            os.kill(os.getpid(), signal.SIGKILL)
        return real_embed(*args, **kwargs)

    embedder.embed_batch = embed_then_die
    extract_features(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=2, shard_size=2,
                              num_workers=0, progress_bar=False, device="cpu", dtype="fp32")
    """
)


def test_a_killed_run_resumes_to_an_identical_file(image_tree, vit_file, tmp_path):
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(image_tree), str(tmp_path / "resumed.npz"), str(vit_file)],
        capture_output=True, text=True,
    )
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "resumed.npz").exists()  # no half-written output
    assert len(list((tmp_path / "resumed.npz.partial").glob("shard-*.npz"))) == 3

    options = dict(batch_size=2, shard_size=2, **FAST)
    resumed = extract_features(image_tree, tmp_path / "resumed.npz", vit_file, **options)
    assert resumed.num_reused == 6
    assert not (tmp_path / "resumed.npz.partial").exists()
    extract_features(image_tree, tmp_path / "straight.npz", vit_file, **options)
    assert (tmp_path / "resumed.npz").read_bytes() == (tmp_path / "straight.npz").read_bytes()


def test_interrupt_keeps_finished_batches_and_other_settings_are_refused(image_tree, vit_file, tmp_path, monkeypatch,
                                                                          capsys):
    real_embed, calls = embedder_module.embed_batch, [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real_embed(*args, **kwargs)

    monkeypatch.setattr(embedder_module, "embed_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_features(image_tree, tmp_path / "g.npz", vit_file, batch_size=3, shard_size=100, **FAST)
    monkeypatch.setattr(embedder_module, "embed_batch", real_embed)
    assert len(list((tmp_path / "g.npz.partial").glob("shard-*.npz"))) == 1  # flushed on the way out

    with pytest.raises(RetrievalError, match="different settings:\n  pool: 'mean' before, 'cls' now"):
        extract_features(image_tree, tmp_path / "g.npz", vit_file, pool="cls", batch_size=3, **FAST)
    # The command line names its way out in the same message.
    assert main(["features", "--image_dir", str(image_tree), "--output", str(tmp_path / "g.npz"), "--vit_checkpoint",
                 str(vit_file), "--pool", "cls", "--num_workers", "0", "--device", "cpu", "--no_progress"]) == 2
    assert capsys.readouterr().err.strip().endswith("or restart the extraction to discard it with --restart")
    # A changed image is computed again, the others are reused.
    changed = sorted((image_tree / "disk").glob("*.png"))[0]
    Image.new("RGB", (30, 30), (255, 255, 0)).save(changed)
    result = extract_features(image_tree, tmp_path / "g.npz", vit_file, batch_size=3, **FAST)
    assert result.num_reused == 5
    fresh = extract_features(image_tree, tmp_path / "fresh.npz", vit_file, batch_size=3, **FAST)
    np.testing.assert_allclose(result.feature_set.features, fresh.feature_set.features, atol=1e-6)
    # --restart discards a partial run instead of refusing it.
    (tmp_path / "g.npz.partial").mkdir()
    (tmp_path / "g.npz.partial" / "manifest.json").write_text('{"settings": {"pool": "cls"}}')
    assert extract_features(image_tree, tmp_path / "g.npz", vit_file, restart=True, **FAST).num_reused == 0


def test_fingerprint_ignores_storage_format_and_precision(vit_file, tmp_path):
    model = vitp.load_vit(vit_file)
    vitp.save_vit(model, tmp_path / "hf", to="hf")
    first = load_feature_model(vit_file, device="cpu", dtype="fp32")
    second = load_feature_model(tmp_path / "hf", device="cpu", dtype="bf16")
    assert first.fingerprint == second.fingerprint and second.dtype == "bf16"
    other = vitp.build_vit("internvit-tiny")
    vitp.save_vit(other, tmp_path / "other.safetensors")
    assert load_feature_model(tmp_path / "other.safetensors", device="cpu").fingerprint != first.fingerprint


def test_symlinked_images_keep_the_class_of_their_own_folder(image_tree, vit_file, tmp_path):
    (image_tree / "linked").mkdir()
    (image_tree / "linked" / "alias.png").symlink_to(sorted((image_tree / "disk").glob("*.png"))[0])
    loaded = extract_features(image_tree, tmp_path / "g.npz", vit_file, **FAST).feature_set
    row = [i for i, path in enumerate(loaded.image_paths) if path.endswith("alias.png")]
    assert len(row) == 1 and loaded.labels[row[0]] == "linked"
    assert loaded.image_paths[row[0]] == str(image_tree / "linked" / "alias.png")


def test_images_directly_in_the_image_dir_are_warned_about(image_tree, vit_file, tmp_path, caplog):
    Image.new("RGB", (30, 30), (9, 9, 9)).save(image_tree / "loose_1.png")
    Image.new("RGB", (30, 30), (9, 9, 99)).save(image_tree / "loose_2.png")
    with caplog.at_level("WARNING", logger="vitp"):
        result = extract_features(image_tree, tmp_path / "g.npz", vit_file, **FAST)
    assert "2 of the 14 images are directly in image_dir" in caplog.text
    assert "the root folder's name 'images'" in caplog.text
    assert sorted(set(result.feature_set.labels)) == ["disk", "images", "square", "stripes"]


def test_any_error_mid_run_keeps_finished_batches_and_the_rerun_gives_an_identical_file(
    image_tree, vit_file, tmp_path, monkeypatch
):
    real_embed, calls = embedder_module.embed_batch, [0]

    def fails_on_the_third_batch(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_embed(*args, **kwargs)

    options = dict(batch_size=2, shard_size=100, **FAST)  # shards would only be written at the end
    monkeypatch.setattr(embedder_module, "embed_batch", fails_on_the_third_batch)
    with pytest.raises(RuntimeError, match="simulated"):
        extract_features(image_tree, tmp_path / "resumed.npz", vit_file, **options)
    monkeypatch.setattr(embedder_module, "embed_batch", real_embed)

    resumed = extract_features(image_tree, tmp_path / "resumed.npz", vit_file, **options)
    assert resumed.num_reused == 4  # the two batches finished before the error
    extract_features(image_tree, tmp_path / "straight.npz", vit_file, **options)
    assert (tmp_path / "resumed.npz").read_bytes() == (tmp_path / "straight.npz").read_bytes()


def test_a_negative_number_of_workers_is_refused(image_tree, vit_file, tmp_path):
    options = {**FAST, "num_workers": -1}
    with pytest.raises(ValueError, match="num_workers -1: must be >= 0"):
        extract_features(image_tree, tmp_path / "g.npz", vit_file, **options)
    feature_model = load_feature_model(vit_file, device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match="num_workers -1"):
        embed_files(feature_model, sorted(image_tree.rglob("*.png")), -1, "mean", num_workers=-1)


@pytest.mark.parametrize("max_pixels", [0, -1])
def test_a_pixel_limit_below_one_is_refused_not_taken_as_the_default(image_tree, vit_file, tmp_path, capsys, max_pixels):
    with pytest.raises(ValueError, match=f"max_pixels must be >= 1, got {max_pixels}"):
        extract_features(image_tree, tmp_path / "g.npz", vit_file, max_pixels=max_pixels, **FAST)
    assert "argument --max_pixels" in parser_refusal(
        ["features", "--image_dir", str(image_tree), "--output", str(tmp_path / "g.npz"), "--vit_checkpoint",
         str(vit_file), "--max_pixels", str(max_pixels), "--no_progress", "--num_workers", "0"], capsys)
    assert not (tmp_path / "g.npz").exists()
