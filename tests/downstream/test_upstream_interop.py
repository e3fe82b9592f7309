"""What `vitp export-vit` writes loads into upstream's downstream backbone (ViTP's mmseg / mmrotate / opencd
``InternViT``) by upstream's own rule, with no ViT tensor missing.

Both sides are re-stated here from upstream's code (zcablii/ViTP, ``*/models/backbones/intern_vit.py``):
the rule from ``InternViT.init_weights(pretrained_type='full')``, the parameter names from the modules
``InternVisionEmbeddings`` and ``InternVisionEncoderLayer``. Upstream loads with ``strict=False`` and only
logs what did not match, so a missing tensor would silently stay random there: this test is the check
upstream does not make.
"""

import pytest
import torch
from safetensors import safe_open

from vitp import VisionConfig, build_vit, save_vit
from vitp.cli import main
from vitp_testing import randomize_

# InternViT-300M's layout and pretraining grid (448 px / patch 14) at a width tests can afford, and
# InternViT-6B's (RMSNorm, QK-norm, no qkv bias).
VIT_300M_SHAPED = VisionConfig(image_size=448, patch_size=14, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64)
VIT_6B_SHAPED = "internvit-6b-tiny"


def upstream_full_rule(path):
    """init_weights(pretrained, pretrained_type='full'): read the safetensors file, keep the keys that
    start with vision_model / encoder / embeddings, drop 'vision_model.' and 'encoder.', and turn
    'embedding.proj.' into 'embedding.'."""
    with safe_open(str(path), framework="pt") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}
    checkpoint = {}
    for key, tensor in state.items():
        if key.startswith("vision_model") or key.startswith("encoder") or key.startswith("embeddings"):
            new_key = key.replace("vision_model.", "").replace("encoder.", "")
            new_key = new_key.replace("embedding.proj.", "embedding.")
            checkpoint[new_key] = tensor
    return checkpoint


def upstream_vit_parameters(depth, qkv_bias, norm_type, qk_normalization):
    """The ViT parameters of upstream's InternViT / InternViTAdapter. Its InternVisionEmbeddings has a
    patch_embedding Conv2d and a position_embedding, and no class_embedding (commented out upstream).
    Each layer: attn.qkv (bias if qkv_bias), attn.proj, q_norm/k_norm (InternRMSNorm, weight only) with
    qk_normalization, mlp.fc1/fc2, norm1/norm2 (nn.LayerNorm: weight and bias; InternRMSNorm: weight),
    ls1, ls2."""
    names = {"embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias", "embeddings.position_embedding"}
    for i in range(depth):
        layer = f"layers.{i}."
        names |= {layer + n for n in ("ls1", "ls2", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
                                      "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
                                      "norm1.weight", "norm2.weight")}
        if qkv_bias:
            names.add(layer + "attn.qkv.bias")
        if norm_type == "layer_norm":
            names |= {layer + "norm1.bias", layer + "norm2.bias"}
        if qk_normalization:
            names |= {layer + "attn.q_norm.weight", layer + "attn.k_norm.weight"}
    return names


@pytest.fixture(params=["300m-shaped", "6b-shaped"])
def exported(request, tmp_path):
    """A ViT saved as upstream's extract_vit.py writes it, and the directory `vitp export-vit` makes of it."""
    config = VIT_300M_SHAPED if request.param == "300m-shaped" else VIT_6B_SHAPED
    vit = randomize_(build_vit(config))
    save_vit(vit, tmp_path / "InternViT-pretrained", to="internvit")
    return vit, tmp_path


def export(source, output, *flags):
    assert main(["export-vit", str(source), str(output), *flags]) == 0


def check_loads_into_upstream(path, vit):
    config = vit.config
    checkpoint = upstream_full_rule(path)
    expected = upstream_vit_parameters(config.num_layers, config.qkv_bias, config.norm_type, config.qk_norm)
    assert expected - set(checkpoint) == set(), "ViT tensors upstream's backbone would leave random"
    # the class token is the one tensor upstream's backbone has no place for (it logs it and goes on)
    assert set(checkpoint) - expected == {"embeddings.class_embedding"}

    # the shapes upstream's resizing assumes: a (pretrain_size // 14)^2 grid plus the class position, 14x14 kernel
    grid = config.image_size // 14
    assert checkpoint["embeddings.position_embedding"].shape == (1, grid * grid + 1, config.hidden_size)
    assert checkpoint["embeddings.patch_embedding.weight"].shape == (config.hidden_size, 3, 14, 14)
    # and the tensors are the ViT's own
    last = config.num_layers - 1
    pairs = {
        "embeddings.position_embedding": vit.pos_embed,
        "embeddings.patch_embedding.weight": vit.patch_embed.proj.weight,
        f"layers.{last}.attn.qkv.weight": vit.blocks[last].attn.qkv.weight,
        f"layers.{last}.ls1": vit.blocks[last].ls1.gamma,
        f"layers.{last}.ls2": vit.blocks[last].ls2.gamma,
        f"layers.{last}.norm2.weight": vit.blocks[last].norm2.weight,
        f"layers.{last}.mlp.fc2.bias": vit.blocks[last].mlp.fc2.bias,
    }
    if config.qk_norm:
        pairs[f"layers.{last}.attn.k_norm.weight"] = vit.blocks[last].attn.k_norm.weight
    for name, tensor in pairs.items():
        torch.testing.assert_close(checkpoint[name].float(), tensor.detach().float(), rtol=0, atol=0, msg=name)


def test_release_file_of_the_default_export(exported):
    vit, tmp_path = exported
    export(tmp_path / "InternViT-pretrained", tmp_path / "out")
    check_loads_into_upstream(tmp_path / "out" / "vit.safetensors", vit)


def test_release_file_without_the_vision_model_prefix(exported):
    vit, tmp_path = exported
    export(tmp_path / "InternViT-pretrained", tmp_path / "out", "--format", "vitp", "--key_prefix", "")
    check_loads_into_upstream(tmp_path / "out" / "vit.safetensors", vit)


def test_intern_vision_model_directory(exported):
    vit, tmp_path = exported
    export(tmp_path / "InternViT-pretrained", tmp_path / "out", "--format", "internvit", "--dtype", "bf16")
    check_loads_into_upstream(tmp_path / "out" / "model.safetensors", vit.to(torch.bfloat16))


def test_transformers_form_is_not_for_upstream(exported):
    """The check can fail: transformers' key names (encoder.layer.N.attention.q_proj, ...) leave every
    upstream ViT layer tensor missing."""
    vit, tmp_path = exported
    export(tmp_path / "InternViT-pretrained", tmp_path / "out", "--format", "hf")
    checkpoint = upstream_full_rule(tmp_path / "out" / "model.safetensors")
    expected = upstream_vit_parameters(vit.config.num_layers, vit.config.qkv_bias, vit.config.norm_type, vit.config.qk_norm)
    assert "layers.0.attn.qkv.weight" in expected - set(checkpoint)
