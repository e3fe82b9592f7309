"""InternViT-6B (RMSNorm, whole-width QK-norm, no qkv bias) against transformers' InternVLVisionModel with
``use_qk_norm=True, norm_type="rms_norm", attention_bias=False``, in every format vitp reads and writes.
(Both directions of the transformers round trip run for 300M and 6B shapes in test_vit_checkpoint.py.)"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import InternVLVisionConfig, InternVLVisionModel

from vitp import PRESETS, build_vit, inspect_checkpoint, load_vit, save_vit
from vitp.cli import main
from vitp.model.vision import count_parameters
from vitp_testing import TINY_6B_HF, draw_shape, hf_to_remote_code, internvit_remote_config, layer_differences, randomize_
TOLERANCE = 1e-5


def random_6b_hf_model(seed=0):
    return randomize_(InternVLVisionModel(InternVLVisionConfig(**TINY_6B_HF)), seed=seed).eval()


def test_presets_have_internvit_6b_shapes():
    parameters = {}
    for name, layers, image in (("internvit-6b-448", 45, 448), ("internvit-6b-224", 48, 224)):
        config = PRESETS[name]
        assert (config.hidden_size, config.num_heads, config.intermediate_size, config.num_layers) == (3200, 25, 12800, layers)
        assert (config.qkv_bias, config.norm_type, config.qk_norm, config.image_size) == (False, "rms_norm", True, image)
        with torch.device("meta"):
            ours = build_vit(name)
            theirs = InternVLVisionModel(InternVLVisionConfig(
                hidden_size=3200, num_hidden_layers=layers, num_attention_heads=25, intermediate_size=12800,
                image_size=image, patch_size=14, attention_bias=False, use_qk_norm=True, norm_type="rms_norm",
            ))
        assert count_parameters(ours) == count_parameters(theirs)
        parameters[name] = count_parameters(ours)
    assert round(parameters["internvit-6b-448"] / 1e9, 2) == 5.54  # InternViT-6B-448px-V2_5: 5.5B
    assert round(parameters["internvit-6b-224"] / 1e9, 1) == 5.9  # InternViT-6B-224px: 5.9B


def test_qk_norm_is_over_the_whole_width_not_per_head(tmp_path, pixels):
    """A per-head norm (timm's qk_norm) gives other numbers: the comparison above can tell them apart."""
    theirs = random_6b_hf_model()
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_vit(tmp_path / "hf")
    attention = ours.blocks[0].attn
    assert attention.q_norm.weight.shape == (100,) and attention.k_norm.weight.shape == (100,)
    with torch.no_grad():
        theirs.encoder.layer[0].attention.q_norm.weight[:20].mul_(3.0)  # one head's channels only
    differences = layer_differences(ours, theirs, pixels)
    assert differences[0] <= TOLERANCE and differences[1] > 1e-3


def write_remote_code_6b(directory, hf_model, as_internvl=True):
    """An InternVL remote-code checkpoint with an InternViT-6B (or, ``as_internvl=False``, an
    InternVisionModel directory as upstream's extract_vit.py saves it)."""
    directory.mkdir(parents=True, exist_ok=True)
    prefix = "vision_model." if as_internvl else ""
    tensors = hf_to_remote_code(hf_model.state_dict(), depth=2, prefix=prefix)
    assert f"{prefix}encoder.layers.0.attn.q_norm.weight" in tensors
    assert f"{prefix}encoder.layers.0.attn.qkv.bias" not in tensors and f"{prefix}encoder.layers.0.norm1.bias" not in tensors
    vision_config = internvit_remote_config(hf_model.config)
    if as_internvl:
        tensors.update({"mlp1.0.weight": torch.ones(400), "language_model.model.embed_tokens.weight": torch.ones(8, 16)})
        config = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "vision_config": vision_config,
                  "llm_config": {"model_type": "internlm2", "hidden_size": 16}}
    else:
        config = vision_config
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("as_internvl", [True, False], ids=["InternVL-26B-style", "InternViT-6B-448px-V2_5-style"])
def test_remote_code_checkpoints(tmp_path, pixels, as_internvl):
    theirs = random_6b_hf_model(seed=2)
    write_remote_code_6b(tmp_path / "ckpt", theirs, as_internvl)
    ours = load_vit(tmp_path / "ckpt")
    assert ours.config == PRESETS["internvit-6b-tiny"]
    assert max(layer_differences(ours, theirs, pixels)) <= TOLERANCE


def test_vitp_release_file_without_a_config_is_recognised_by_its_shapes(tmp_path, pixels):
    ours = randomize_(build_vit("internvit-6b-tiny"), seed=4).eval()
    save_vit(ours, tmp_path / "vit.safetensors", to="vitp")
    save_file(load_file(tmp_path / "vit.safetensors"), tmp_path / "bare.safetensors")  # no config anywhere
    checkpoint = inspect_checkpoint(tmp_path / "bare.safetensors")
    assert checkpoint.config is None
    loaded = load_vit(checkpoint)
    assert loaded.config == ours.config
    with torch.no_grad():
        assert torch.equal(loaded(pixels), ours(pixels))


def test_drop_path_and_gradient_checkpointing(pixels):
    plain = randomize_(build_vit("internvit-6b-tiny", num_layers=4, drop_path_rate=0.3), std=0.05).train()
    assert plain.drop_path_rates() == pytest.approx([0.0, 0.1, 0.2, 0.3])
    checkpointed = build_vit("internvit-6b-tiny", num_layers=4, drop_path_rate=0.3).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_grad_checkpointing(True)
    torch.manual_seed(0)
    out_plain = plain(pixels)
    torch.manual_seed(0)
    out_checkpointed = checkpointed(pixels)
    assert torch.allclose(out_plain, out_checkpointed, atol=1e-6)
    out_plain.square().mean().backward()
    out_checkpointed.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert a.grad is not None and torch.allclose(a.grad, b.grad, atol=1e-6), name
    torch.manual_seed(1)
    assert not torch.equal(plain(pixels), plain(pixels))  # DropPath active in training


def test_features_command_equals_transformers(tmp_path):
    theirs = random_6b_hf_model(seed=6)
    theirs.save_pretrained(tmp_path / "vit")
    rng = np.random.default_rng(0)
    for k, (kind, colour) in enumerate([("ellipse", (200, 30, 30)), ("cross", (30, 200, 30)), ("stripes", (30, 30, 200))]):
        (tmp_path / "images" / kind).mkdir(parents=True)
        draw_shape(kind, colour, rng).save(tmp_path / "images" / kind / f"{k}.png")
    code = main(["features", "--image_dir", str(tmp_path / "images"), "--output", str(tmp_path / "f.npz"),
                 "--vit_checkpoint", str(tmp_path / "vit"), "--device", "cpu", "--dtype", "fp32",
                 "--num_workers", "0", "--no_progress"])
    assert code == 0
    saved = np.load(tmp_path / "f.npz", allow_pickle=False)
    from vitp.data.images import build_transform, load_image

    for path, feature in zip(saved["image_paths"], saved["features"]):
        pixels = build_transform(112)(load_image(str(path))).unsqueeze(0)
        with torch.no_grad():
            tokens = theirs(pixels).last_hidden_state[:, 1:]  # transformers' numbers, patch tokens
        expected = torch.nn.functional.normalize(tokens.mean(1), dim=-1)[0].numpy()
        np.testing.assert_allclose(feature, expected, atol=1e-5)


@pytest.mark.parametrize("to", ["hf", "internvit", "vitp"])
def test_convert_vit_writes_each_format_and_reads_it_back(tmp_path, to):
    theirs = random_6b_hf_model(seed=7)
    theirs.save_pretrained(tmp_path / "hf")
    destination = tmp_path / ("out.safetensors" if to == "vitp" else "out")
    assert main(["convert-vit", str(tmp_path / "hf"), str(destination), "--to", to]) == 0
    back = load_vit(destination)
    assert back.config == PRESETS["internvit-6b-tiny"]
    pixels = torch.randn(1, 3, 112, 112)
    assert max(layer_differences(back, theirs, pixels)) <= TOLERANCE
