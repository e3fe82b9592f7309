"""`vitp export-vit` as users of upstream and of the seed guide run it."""

import json

import pytest
import torch
from safetensors.torch import load_file

from vitp import load_vit
from vitp.cli import main
from vitp_testing import write_internlm2_internvl_checkpoint


@pytest.fixture
def internvl(tmp_path):
    """A tiny InternVL2.5-2B-style remote-code checkpoint and the transformers ViT it holds."""
    info = write_internlm2_internvl_checkpoint(tmp_path / "InternVL2_5-2B-tiny")
    return tmp_path / "InternVL2_5-2B-tiny", info["vision_model"]


def same_as(model, reference):
    pixels = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model(pixels) - reference(pixels).last_hidden_state).abs().max().item() <= 1e-5


def test_seed_guide_spelling_with_a_bin_checkpoint_and_a_pth_output(internvl, tmp_path, capsys):
    directory, reference = internvl
    state = load_file(directory / "model.safetensors")
    (tmp_path / "checkpoint-8000").mkdir()
    torch.save(state, tmp_path / "checkpoint-8000" / "pytorch_model.bin")
    code = main(["export-vit", "--checkpoint", str(tmp_path / "checkpoint-8000" / "pytorch_model.bin"),
                 "--output", str(tmp_path / "vit_weights" / "vitp_vit.pth")])
    assert code == 0
    captured = capsys.readouterr()
    assert "never as pickles" in captured.err
    written = tmp_path / "vit_weights" / "vitp_vit.safetensors"
    assert f"wrote {written}" in captured.out and not (tmp_path / "vit_weights" / "vitp_vit.pth").exists()
    assert same_as(load_vit(written), reference)


def test_upstream_form_is_an_intern_vision_model_directory_that_vitp_reads_back(internvl, tmp_path):
    directory, reference = internvl
    assert main(["export-vit", str(directory), str(tmp_path / "InternViT-out"), "--format", "internvit"]) == 0
    config = json.loads((tmp_path / "InternViT-out" / "config.json").read_text())
    assert config["architectures"] == ["InternVisionModel"] and config["model_type"] == "intern_vit_6b"
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                  "patch_size", "qkv_bias", "qk_normalization", "norm_type", "layer_norm_eps", "initializer_factor"):
        assert field in config
    keys = set(load_file(tmp_path / "InternViT-out" / "model.safetensors"))
    assert "embeddings.class_embedding" in keys and "encoder.layers.1.attn.qkv.weight" in keys
    assert not any(key.startswith(("vision_model.", "mlp1.", "language_model.")) for key in keys)
    assert same_as(load_vit(tmp_path / "InternViT-out"), reference)


def test_default_form_writes_the_release_file_and_a_transformers_directory(internvl, tmp_path, capsys):
    directory, reference = internvl
    assert main(["export-vit", str(directory), "--output", str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    for path in (tmp_path / "out" / "vit.safetensors", tmp_path / "out" / "hf"):
        model = load_vit(path, dtype=None)
        assert model.pos_embed.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "argv, message",
    [([], "no checkpoint given"), (["a"], "no output given"), (["a", "b", "--checkpoint", "c"], "checkpoint given twice")],
)
def test_missing_or_doubled_paths_are_one_clear_error(argv, message, capsys):
    assert main(["export-vit", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_the_command_lines_formats_are_the_librarys():
    from vitp.cli.vit import EXPORT_FORMS, SAVE_FORMS
    from vitp.model.vit_checkpoint import SAVE_FORMATS
    from vitp.train.export import EXPORT_FORMATS

    assert SAVE_FORMS == SAVE_FORMATS
    assert EXPORT_FORMS == tuple(EXPORT_FORMATS)
