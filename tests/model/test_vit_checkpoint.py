"""Weight formats: transformers' InternVLVisionModel as the numerical oracle, every load path,
bit-exact round trips and a clear error for every way a checkpoint can be wrong."""

import json
import logging
import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    InternVLVisionModel,
)

from vitp_testing import TINY_6B_HF, TINY_VISION_HF, hf_to_remote_code, layer_differences, randomize_
from vitp import ConfigError, WeightFormatError, build_vit, inspect_checkpoint, load_vit, save_vit

TINY_HF = TINY_VISION_HF
TOLERANCE = 1e-5


def random_hf_vision_model(seed=0, shape=TINY_HF):
    return randomize_(InternVLVisionModel(InternVLVisionConfig(**shape)), seed=seed).eval()


def states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


REMOTE_VISION_CONFIG = {
    "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256, "image_size": 112,
    "patch_size": 14, "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6, "initializer_factor": 0.1, "drop_path_rate": 0.1, "hidden_act": "gelu",
    "use_flash_attn": True,
}


def write_remote_code_checkpoint(directory, hf_model, shards=1):
    """An InternVL remote-code checkpoint: config.json + vision_model / mlp1 / language_model tensors."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internvl2_5",
        "select_layer": -1, "downsample_ratio": 0.5, "ps_version": "v2", "force_image_size": 112,
        "vision_config": REMOTE_VISION_CONFIG,
        "llm_config": {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 1},
    }
    (directory / "config.json").write_text(json.dumps(config))
    tensors = hf_to_remote_code(hf_model.state_dict(), depth=2)
    tensors.update({
        "mlp1.0.weight": torch.ones(256), "mlp1.1.weight": torch.ones(32, 256),
        "language_model.model.embed_tokens.weight": torch.ones(10, 32),
    })
    if shards == 1:
        save_file(tensors, directory / "model.safetensors")
        return
    keys = sorted(tensors)
    weight_map = {}
    for shard in range(shards):
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[shard::shards]
        save_file({k: tensors[k] for k in part}, directory / name)
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# ------------------------------------------------------------------------------------------------
# The oracle: transformers' InternVLVisionModel


@pytest.mark.parametrize("preset", ["internvit-tiny", "internvit-6b-tiny"])
@pytest.mark.parametrize("size", [(112, 112), (84, 84), (168, 126)])
def test_ours_converted_to_transformers_gives_the_same_hidden_states(tmp_path, preset, size):
    ours = randomize_(build_vit(preset), seed=3).eval()
    save_vit(ours, tmp_path / "hf", to="hf")
    hf_model = InternVLVisionModel.from_pretrained(tmp_path / "hf").eval()
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    assert max(layer_differences(ours, hf_model, pixels)) <= TOLERANCE


@pytest.mark.parametrize("shape", [TINY_HF, TINY_6B_HF], ids=["300M-shaped", "6B-shaped"])
def test_transformers_converted_to_ours_gives_the_same_hidden_states(tmp_path, pixels, shape):
    hf_model = random_hf_vision_model(shape=shape)
    hf_model.save_pretrained(tmp_path / "hf")
    ours = load_vit(tmp_path / "hf")
    assert (ours.config.norm_type, ours.config.qk_norm) == (shape.get("norm_type", "layer_norm"), shape.get("use_qk_norm", False))
    assert max(layer_differences(ours, hf_model, pixels)) <= TOLERANCE


def test_the_oracle_comparison_detects_a_single_wrong_tensor(tmp_path, tiny_vit, pixels):
    save_vit(tiny_vit, tmp_path / "hf", to="hf")
    hf_model = InternVLVisionModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        hf_model.encoder.layer[1].attention.v_proj.bias.add_(0.1)  # (a k bias would cancel in softmax)
    differences = layer_differences(tiny_vit, hf_model, pixels)
    assert differences[1] <= TOLERANCE and differences[2] > 1e-3


# ------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("key_prefix", ["vision_model.", ""])
def test_vitp_file_round_trip_is_bit_exact(tmp_path, tiny_vit, key_prefix):
    files = save_vit(tiny_vit, tmp_path / "vit.safetensors", to="vitp", key_prefix=key_prefix)
    assert files == [tmp_path / "vit.safetensors", tmp_path / "vit.json"]
    keys = list(load_file(tmp_path / "vit.safetensors"))
    assert f"{key_prefix}encoder.layers.0.attn.qkv.weight" in keys
    assert f"{key_prefix}embeddings.class_embedding" in keys
    loaded = load_vit(tmp_path / "vit.safetensors")
    assert loaded.config == tiny_vit.config
    assert states_equal(loaded, tiny_vit)


def test_hf_directory_round_trip_is_bit_exact_through_transformers(tmp_path, tiny_vit):
    save_vit(tiny_vit, tmp_path / "ours", to="hf")
    InternVLVisionModel.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / "theirs")
    loaded = load_vit(tmp_path / "theirs")
    assert loaded.config == tiny_vit.config
    assert states_equal(loaded, tiny_vit)


def test_stored_precision_is_kept_when_asked(tmp_path, tiny_vit):
    save_vit(tiny_vit.to(torch.bfloat16), tmp_path / "vit.safetensors", to="vitp")
    assert load_vit(tmp_path / "vit.safetensors", dtype=None).pos_embed.dtype == torch.bfloat16
    assert load_vit(tmp_path / "vit.safetensors").pos_embed.dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# Load paths


@pytest.mark.parametrize("shards", [1, 3])
def test_internvl_remote_code_directory(tmp_path, pixels, shards):
    hf_model = random_hf_vision_model()
    write_remote_code_checkpoint(tmp_path / "InternVL-tiny", hf_model, shards=shards)
    checkpoint = inspect_checkpoint(tmp_path / "InternVL-tiny")
    assert checkpoint.kind == "InternVL remote-code checkpoint directory"
    assert (checkpoint.layout, checkpoint.prefix) == ("internvit", "vision_model.")
    ours = load_vit(tmp_path / "InternVL-tiny")
    assert ours.config.drop_path_rate == 0.1  # taken from vision_config
    assert max(layer_differences(ours, hf_model, pixels)) <= TOLERANCE


def test_transformers_internvl_directory(tmp_path, pixels):
    config = InternVLConfig(
        vision_config=TINY_HF,
        text_config=dict(model_type="qwen2", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, vocab_size=64),
        image_token_id=63,
    )
    full = randomize_(InternVLForConditionalGeneration(config)).eval()
    full.save_pretrained(tmp_path / "InternVL-tiny-hf")
    checkpoint = inspect_checkpoint(tmp_path / "InternVL-tiny-hf")
    assert checkpoint.layout == "hf" and checkpoint.prefix.endswith("vision_tower.")
    ours = load_vit(tmp_path / "InternVL-tiny-hf")
    assert max(layer_differences(ours, full.model.vision_tower, pixels)) <= TOLERANCE


def test_vitp_release_file_without_config_is_inferred_from_a_preset(tmp_path, tiny_vit):
    save_vit(tiny_vit, tmp_path / "ViTP_ViT_tiny.safetensors", to="vitp")
    (tmp_path / "ViTP_ViT_tiny.json").unlink()
    tensors = load_file(tmp_path / "ViTP_ViT_tiny.safetensors")
    save_file(tensors, tmp_path / "bare.safetensors")  # no sidecar, no metadata: a plain release file
    loaded = load_vit(tmp_path / "bare.safetensors")
    assert loaded.config == tiny_vit.config
    assert states_equal(loaded, tiny_vit)
    # the config embedded in the file's metadata is used when the JSON beside it is gone
    assert load_vit(tmp_path / "ViTP_ViT_tiny.safetensors").config == tiny_vit.config


def test_vitp_release_file_of_unknown_shape_needs_a_config(tmp_path):
    model = build_vit("internvit-tiny", num_layers=3)
    save_file(load_file_from(model, tmp_path), tmp_path / "odd.safetensors")
    with pytest.raises(WeightFormatError, match="number of attention heads is unknown"):
        load_vit(tmp_path / "odd.safetensors")
    assert states_equal(load_vit(tmp_path / "odd.safetensors", config=model.config), model)


def load_file_from(model, tmp_path):
    save_vit(model, tmp_path / "tmp.safetensors", to="vitp")
    return load_file(tmp_path / "tmp.safetensors")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict(tmp_path, suffix):
    reference = timm.create_model(
        "vit_intern300m_patch14_448", pretrained=False, num_classes=0,
        img_size=112, embed_dim=64, depth=2, num_heads=4,
    )
    randomize_(reference).eval()
    path = tmp_path / f"timm{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": reference.state_dict(), "epoch": 3}, path)
    else:
        save_file(reference.state_dict(), path)
    assert inspect_checkpoint(path).layout == "timm"
    ours = load_vit(path)
    pixels = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(ours(pixels), reference.forward_features(pixels), atol=TOLERANCE)


def test_bin_files_are_read_with_weights_only(tmp_path, tiny_vit):
    tensors = load_file_from(tiny_vit, tmp_path)
    torch.save({"module": tensors}, tmp_path / "pytorch_model.bin")  # DeepSpeed-style wrapper
    loaded = load_vit(tmp_path / "pytorch_model.bin", config=tiny_vit.config)
    assert states_equal(loaded, tiny_vit)


def test_position_embedding_for_another_grid_is_resampled_and_reported(tmp_path, tiny_vit, caplog):
    save_vit(tiny_vit, tmp_path / "vit.safetensors", to="vitp")
    with caplog.at_level(logging.WARNING, logger="vitp"):
        small = load_vit(tmp_path / "vit.safetensors", image_size=56)
    assert "resampled from a 8x8 to a 4x4 patch grid" in caplog.text
    assert small.pos_embed.shape == (1, 1 + 16, 64)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():  # same numbers as the original model interpolating at run time
        assert torch.allclose(small(pixels), tiny_vit(pixels), atol=TOLERANCE)


# ------------------------------------------------------------------------------------------------
# Errors


def saved_tensors(model, tmp_path):
    save_vit(model, tmp_path / "vit.safetensors", to="vitp")
    (tmp_path / "vit.json").unlink()
    return load_file(tmp_path / "vit.safetensors")


def write_with_config(tensors, tmp_path, config):
    path = tmp_path / "edited.safetensors"
    save_file(tensors, path)
    (tmp_path / "edited.json").write_text(json.dumps({"vision_config": config.to_dict()}))
    return path


def test_missing_key_names_format_key_and_expectation(tmp_path, tiny_vit):
    tensors = saved_tensors(tiny_vit, tmp_path)
    del tensors["vision_model.encoder.layers.1.ls2"]
    with pytest.raises(WeightFormatError) as err:
        load_vit(write_with_config(tensors, tmp_path, tiny_vit.config))
    message = str(err.value)
    assert "detected format: InternViT weights file (ViTP release) (InternViT keys under 'vision_model.')" in message
    assert "missing (1): vision_model.encoder.layers.1.ls2" in message
    assert "expected: InternViT with 2 layers, hidden 64" in message


def test_unexpected_key_is_refused(tmp_path, tiny_vit):
    tensors = saved_tensors(tiny_vit, tmp_path)
    tensors["vision_model.encoder.layers.2.ls1"] = torch.ones(64)  # a third layer the config lacks
    with pytest.raises(WeightFormatError, match=r"unexpected \(1\): vision_model.encoder.layers.2.ls1"):
        load_vit(write_with_config(tensors, tmp_path, tiny_vit.config))


def test_wrong_shape_is_refused_with_both_shapes(tmp_path, tiny_vit):
    tensors = saved_tensors(tiny_vit, tmp_path)
    tensors["vision_model.encoder.layers.0.mlp.fc1.weight"] = torch.ones(128, 64)
    with pytest.raises(WeightFormatError, match=r"wrong shape \(1\): .*mlp.fc1.weight is \[128, 64\], expected \[256, 64\]"):
        load_vit(write_with_config(tensors, tmp_path, tiny_vit.config))


def test_config_for_a_different_network_is_refused(tmp_path, tiny_vit):
    save_vit(tiny_vit, tmp_path / "vit.safetensors", to="vitp")
    with pytest.raises(WeightFormatError, match="missing"):
        load_vit(tmp_path / "vit.safetensors", config=tiny_vit.config.replace(num_layers=3))


def test_unknown_format(tmp_path):
    save_file({"encoder.conv1.weight": torch.ones(3, 3)}, tmp_path / "resnet.safetensors")
    with pytest.raises(WeightFormatError, match="unknown weight format: no ViT found among 1 tensors"):
        load_vit(tmp_path / "resnet.safetensors")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl_vision", **TINY_HF}))
    with pytest.raises(WeightFormatError, match="no weights found; expected one of model.safetensors"):
        load_vit(tmp_path)


def test_directory_without_config(tmp_path):
    with pytest.raises(WeightFormatError, match="not a checkpoint directory"):
        load_vit(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(WeightFormatError, match="no such file or directory"):
        load_vit(tmp_path / "nope.safetensors")


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(WeightFormatError, match="unknown model_type 'llava'"):
        load_vit(tmp_path)


def test_sub_config_that_is_not_an_object_names_the_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl", "vision_config": [1, 2]}))
    with pytest.raises(ConfigError, match=r"config.json: 'vision_config' must be an object, found list"):
        load_vit(tmp_path)


def test_invalid_config_json_names_the_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "model_type": "internvl_vision",\n  oops\n}')
    with pytest.raises(WeightFormatError, match=r"config.json: invalid JSON at line 3"):
        load_vit(tmp_path)


@pytest.mark.parametrize("name", ["corrupt.safetensors", "corrupt.pth", "corrupt.bin"])
def test_unreadable_files(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00\x01 this is not a checkpoint " * 10)
    with pytest.raises(WeightFormatError, match="not a readable"):
        load_vit(tmp_path / name)


def test_truncated_safetensors(tmp_path, tiny_vit):
    save_vit(tiny_vit, tmp_path / "vit.safetensors", to="vitp")
    data = (tmp_path / "vit.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFormatError, match="cut.safetensors"):
        load_vit(tmp_path / "cut.safetensors", config=tiny_vit.config)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_pickles_with_code_are_refused_and_not_executed(tmp_path):
    _Payload.marker = str(tmp_path / "executed")
    with open(tmp_path / "evil.pth", "wb") as handle:
        pickle.dump({"cls_token": _Payload()}, handle)
    with pytest.raises(WeightFormatError, match="refused to load"):
        load_vit(tmp_path / "evil.pth")
    assert not (tmp_path / "executed").exists()


def test_shard_index_with_missing_shard(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl_vision", **TINY_HF}))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"embeddings.cls_token": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(WeightFormatError, match="shard files listed in weight_map are missing"):
        load_vit(tmp_path)


def test_config_and_weights_of_different_layouts(tmp_path, tiny_vit):
    save_vit(tiny_vit, tmp_path / "hf", to="hf")
    save_vit(tiny_vit, tmp_path / "vit.safetensors", to="vitp")
    (tmp_path / "vit.safetensors").replace(tmp_path / "hf" / "model.safetensors")
    with pytest.raises(WeightFormatError, match="but the weights hold InternViT keys"):
        load_vit(tmp_path / "hf")
