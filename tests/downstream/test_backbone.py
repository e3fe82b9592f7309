"""The dense backbone: each of upstream's adaptations of the ViT on its own, strict loading, the
features' scales at users' sizes, and the layer-wise learning-rate rule."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file

from vitp import VisionConfig, WeightFormatError, build_vit, save_vit
from vitp.downstream.backbone import build_encoder, patch_tokens
from vitp_testing import randomize_

# A ViT with InternViT-300M's pretraining grid (448 px / patch 14 = 32x32) at a width tests can afford.
GRID32 = VisionConfig(image_size=448, patch_size=14, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def small(neck):
    """Neck options for GRID32: its 32 * 0.25 = 8 value channels take 2 deformable heads, not 16."""
    return {"deform_num_heads": 2} if neck == "adapter" else {}


def grid_of(pos_embed, side):
    """(1, 1 + side*side, C) -> the patch positions as an image (1, C, side, side)."""
    return pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)


def torch_bicubic(pos_embed, old, new):
    """What upstream does: F.interpolate of the float grid, bicubic, align_corners=False; CLS kept."""
    grid = F.interpolate(grid_of(pos_embed, old).float(), size=new, mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)], dim=1)


# --------------------------------------------------------------------------------------------------
# Upstream's adaptations, one at a time


@pytest.mark.parametrize("image_size", [256, 640])
def test_position_embedding_is_resized_bicubically_from_the_32x32_grid(image_size):
    vit = randomize_(build_vit(GRID32))
    original = vit.pos_embed.detach().clone()
    encoder = build_encoder(vit, neck="simple_fpn", image_size=image_size, patch_size=16)
    side = image_size // 16
    assert encoder.vit.pos_embed.shape == (1, 1 + side * side, 32)
    torch.testing.assert_close(encoder.vit.pos_embed, torch_bicubic(original, 32, (side, side)), rtol=0, atol=1e-6)


def test_position_embedding_at_the_pretraining_grid_is_kept_and_resampled_for_other_inputs():
    vit = randomize_(build_vit(GRID32))
    original = vit.pos_embed.detach().clone()
    encoder = build_encoder(vit, neck="simple_fpn", image_size=512, patch_size=16)  # 512/16 = 32: unchanged
    torch.testing.assert_close(encoder.vit.pos_embed, original, rtol=0, atol=0)
    # an input of another size (a 320x224 image) gets the 32x32 grid resampled to 20x14, bicubic
    pixels = torch.randn(1, 3, 320, 224)
    with torch.no_grad():
        tokens, grid = patch_tokens(encoder.vit, pixels)
        patches = encoder.vit.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
    assert grid == (20, 14)
    expected = patches + torch_bicubic(original, 32, (20, 14))[:, 1:]
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-5)


def test_without_an_image_size_the_pretraining_size_sets_the_grid():
    vit = randomize_(build_vit(GRID32))
    original = vit.pos_embed.detach().clone()
    encoder = build_encoder(vit, neck="simple_fpn", patch_size=16)  # 448 px / 16 = 28
    torch.testing.assert_close(encoder.vit.pos_embed, torch_bicubic(original, 32, (28, 28)), rtol=0, atol=1e-6)


def test_patch_kernel_is_resized_bicubically_from_14_to_16():
    vit = randomize_(build_vit(GRID32))
    kernel, bias = vit.patch_embed.proj.weight.detach().clone(), vit.patch_embed.proj.bias.detach().clone()
    encoder = build_encoder(vit, neck="simple_fpn", image_size=512, patch_size=16)
    proj = encoder.vit.patch_embed.proj
    assert proj.kernel_size == (16, 16) and proj.stride == (16, 16)
    expected = F.interpolate(kernel, size=(16, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(proj.weight, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(proj.bias, bias, rtol=0, atol=0)
    assert patch_tokens(encoder.vit, torch.randn(1, 3, 512, 512))[1] == (32, 32)


def test_patch_size_none_keeps_the_vits_patch_and_gives_a_32_grid_at_448():
    vit = randomize_(build_vit(GRID32))
    kernel = vit.patch_embed.proj.weight.detach().clone()
    encoder = build_encoder(vit, neck="simple_fpn", image_size=448)
    torch.testing.assert_close(encoder.vit.patch_embed.proj.weight, kernel, rtol=0, atol=0)
    assert patch_tokens(encoder.vit, torch.randn(1, 3, 448, 448))[1] == (32, 32)
    maps = encoder(torch.randn(1, 3, 448, 448))
    assert [tuple(m.shape[-2:]) for m in maps] == [(112, 112), (56, 56), (28, 28), (14, 14)]


def test_drop_path_rises_linearly_to_the_given_rate():
    depth = 6
    config = GRID32.replace(num_layers=depth)
    encoder = build_encoder(config, image_size=224, patch_size=16, drop_path_rate=0.1, deform_num_heads=2)
    assert encoder.vit.drop_path_rates() == pytest.approx(torch.linspace(0, 0.1, depth).tolist())
    # upstream gives the adapter's extractors the full rate
    extractor = encoder.neck.interactions[0].extractor
    assert extractor.drop_path.drop_prob == pytest.approx(0.1)
    assert build_encoder(config, image_size=224, drop_path_rate=0.0, deform_num_heads=2).vit.drop_path_rates() == [0.0] * depth


@pytest.mark.parametrize("neck, frozen", [("adapter", False), ("simple_fpn", False), ("adapter", True)])
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(neck, frozen, monkeypatch):
    """Also with a frozen ViT under the adapter: the injectors' gradients pass through its blocks, which
    are recomputed though the frozen ViT runs in eval mode."""
    torch.manual_seed(0)
    plain = build_encoder(GRID32, neck=neck, image_size=96, patch_size=16, drop_path_rate=0.1, freeze_vit=frozen,
                          **small(neck)).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, *a, **k: calls.append(fn) or original(fn, *a, **k))

    pixels = torch.randn(2, 3, 96, 128)
    results = []
    for encoder in (plain, checkpointed):
        torch.manual_seed(1)  # the same DropPath draws
        maps = encoder(pixels)
        sum(m.square().mean() for m in maps).backward()
        results.append((maps, {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}))
    (maps_a, grads_a), (maps_b, grads_b) = results
    for a, b in zip(maps_a, maps_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)
    blocks = [fn for fn in calls if fn in list(checkpointed.vit.blocks)]
    assert len(blocks) == 2  # each ViT block once, only in the checkpointed run
    if neck == "adapter":
        assert len(calls) > len(blocks)  # the SPM, injectors and extractors too


@pytest.mark.parametrize("neck", ["adapter", "simple_fpn"])
def test_freeze_vit_trains_only_the_neck(neck):
    encoder = build_encoder(GRID32, neck=neck, image_size=64, patch_size=16, freeze_vit=True, **small(neck))
    encoder.train()
    assert not encoder.vit.training and encoder.neck.training
    maps = encoder(torch.randn(2, 3, 64, 64))
    sum(m.mean() for m in maps).backward()
    assert all(not p.requires_grad and p.grad is None for p in encoder.vit.parameters())
    neck_grads = [p.grad for p in encoder.neck.parameters()]
    assert all(g is not None for g in neck_grads)
    if neck == "adapter":  # the injectors, before the frozen blocks, still learn
        assert encoder.neck.interactions[0].injector.gamma.grad.abs().sum() > 0


def test_loading_is_strict(tmp_path):
    vit = build_vit("internvit-tiny")
    path = tmp_path / "ViTP_ViT_tiny.safetensors"
    save_vit(vit, path)
    assert build_encoder(path, neck="simple_fpn", image_size=128, patch_size=16).vit.config.patch_size == 16

    tensors = load_file(path)
    missing = dict(tensors)
    del missing["vision_model.encoder.layers.1.mlp.fc2.weight"]
    save_file(missing, path)
    with pytest.raises(WeightFormatError, match=r"missing \(1\): vision_model\.encoder\.layers\.1\.mlp\.fc2\.weight"):
        build_encoder(path, image_size=128)

    unexpected = dict(tensors, **{"vision_model.encoder.layers.1.attn.extra.weight": torch.zeros(2)})
    save_file(unexpected, path)
    with pytest.raises(WeightFormatError, match=r"unexpected \(1\): vision_model\.encoder\.layers\.1\.attn\.extra\.weight"):
        build_encoder(path, image_size=128)


# --------------------------------------------------------------------------------------------------
# Features at users' sizes


def ceil_sizes(height, width, strides=(4, 8, 16, 32)):
    return [(-(-height // s), -(-width // s)) for s in strides]


@pytest.mark.parametrize("neck", ["adapter", "simple_fpn"])
@pytest.mark.parametrize("size", [(224, 224), (448, 448), (512, 512), (230, 300)])
def test_four_scales_at_users_sizes(neck, size):
    encoder = build_encoder("internvit-tiny", neck=neck, image_size=512, patch_size=16).eval()
    with torch.no_grad():
        maps = encoder(torch.randn(1, 3, *size))
    assert encoder.strides == [4, 8, 16, 32]
    assert [tuple(m.shape[-2:]) for m in maps] == ceil_sizes(*size)
    assert [m.shape[1] for m in maps] == encoder.out_channels == ([64] * 4 if neck == "adapter" else [256] * 4)
    assert all(torch.isfinite(m).all() for m in maps)


@pytest.mark.parametrize("neck", ["adapter", "simple_fpn"])
def test_a_6b_shaped_vit(neck):
    options = {"deform_num_heads": 5} if neck == "adapter" else {}  # 100 * 0.25 value channels
    encoder = build_encoder("internvit-6b-tiny", neck=neck, image_size=224, patch_size=16, **options).eval()
    assert encoder.vit.config.qk_norm and encoder.vit.config.norm_type == "rms_norm"
    with torch.no_grad():
        maps = encoder(torch.randn(2, 3, 230, 300))
    assert [tuple(m.shape) for m in maps] == [(2, c, *s) for c, s in zip(encoder.out_channels, ceil_sizes(230, 300))]


@pytest.mark.parametrize("neck", ["adapter", "simple_fpn"])
def test_odd_sizes_are_padded_not_resized(neck):
    """An image whose sides are not multiples of 32 gives the maps of its zero-padded version, cut to
    ceil(size / stride): every map cell stays on the pixels it describes."""
    encoder = build_encoder(GRID32, neck=neck, image_size=128, patch_size=16, **small(neck)).eval()
    pixels = torch.randn(1, 3, 70, 100)
    padded = F.pad(pixels, (0, 28, 0, 26))  # to 96 x 128
    with torch.no_grad():
        maps, reference = encoder(pixels), encoder(padded)
    for got, full, (h, w) in zip(maps, reference, ceil_sizes(70, 100)):
        torch.testing.assert_close(got, full[..., :h, :w], rtol=0, atol=1e-5)


def test_extra_levels_for_detection():
    """ViTP's detectors: 5 levels of 256 channels; the fifth takes every other pixel of the fourth."""
    for neck, options in (("simple_fpn", {}), ("adapter", {"out_channels": 256})):
        encoder = build_encoder("internvit-tiny", neck=neck, image_size=256, patch_size=16, num_levels=5, **options).eval()
        with torch.no_grad():
            maps = encoder(torch.randn(1, 3, 256, 320))
        assert encoder.strides == [4, 8, 16, 32, 64] and encoder.out_channels == [256] * 5
        assert [tuple(m.shape[1:]) for m in maps][-2:] == [(256, 8, 10), (256, 4, 5)]
        torch.testing.assert_close(maps[4], maps[3][..., ::2, ::2], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay


def test_layer_ids_of_a_24_layer_vit():
    config = VisionConfig(image_size=28, patch_size=14, hidden_size=16, num_layers=24, num_heads=1, intermediate_size=16)
    encoder = build_encoder(config, image_size=32, patch_size=16, deform_num_heads=4)
    assert encoder.num_layers == 26
    assert encoder.neck.interaction_indexes == [[0, 7], [8, 11], [12, 15], [16, 23]]
    expected = {
        "vit.pos_embed": 0,
        "vit.patch_embed.proj.weight": 0,
        "vit.patch_embed.proj.bias": 0,
        "neck.level_embed": 0,
        "vit.blocks.0.attn.qkv.weight": 1,
        "vit.blocks.7.ls1.gamma": 8,
        "vit.blocks.23.mlp.fc2.bias": 24,
        "vit.cls_token": 25,
        "neck.spm.stem.0.weight": 25,
        "neck.interactions.0.injector.gamma": 25,
        "neck.interactions.3.extra_extractors.1.attn.value_proj.weight": 25,
        "neck.up.weight": 25,
        "neck.norms.3.bias": 25,
    }
    assert {name: encoder.layer_id(name) for name in expected} == expected
    ids = {name: encoder.layer_id(name) for name, _ in encoder.named_parameters()}
    assert set(ids.values()) == set(range(26))
    with pytest.raises(ValueError, match="decode_head.conv_seg.weight"):
        encoder.layer_id("decode_head.conv_seg.weight")


@pytest.mark.parametrize("depth, indexes", [
    (2, [[0, 0], [1, 1]]),
    (4, [[0, 0], [1, 1], [2, 2], [3, 3]]),
    (12, [[0, 3], [4, 5], [6, 7], [8, 11]]),
])
def test_interactions_are_scaled_to_other_depths(depth, indexes):
    config = GRID32.replace(num_layers=depth)
    encoder = build_encoder(config, image_size=64, patch_size=16, deform_num_heads=2).eval()
    assert encoder.neck.interaction_indexes == indexes
    assert len(encoder.neck.interactions) == len(indexes)
    assert encoder.neck.interactions[-1].extra_extractors is not None
    assert all(i.extra_extractors is None for i in encoder.neck.interactions[:-1])
    with torch.no_grad():
        assert len(encoder(torch.randn(1, 3, 64, 64))) == 4
    assert {encoder.layer_id(f"vit.blocks.{depth - 1}.norm1.weight")} == {depth}


# --------------------------------------------------------------------------------------------------
# Building


def test_build_encoder_takes_a_vit_a_config_a_preset_or_a_path(tmp_path):
    vit = build_vit("internvit-tiny")
    save_vit(vit, tmp_path / "vit.safetensors")
    for source in (vit, vit.config, "internvit-tiny", tmp_path / "vit.safetensors", str(tmp_path / "vit.safetensors")):
        encoder = build_encoder(source, neck="simple_fpn", image_size=112)
        assert encoder.vit.config.hidden_size == 64
    loaded = build_encoder(tmp_path / "vit.safetensors", neck="simple_fpn", image_size=112, drop_path_rate=0.0)
    torch.testing.assert_close(loaded.vit.blocks[1].mlp.fc1.weight, vit.blocks[1].mlp.fc1.weight, rtol=0, atol=0)


@pytest.mark.parametrize("arguments, message", [
    (dict(neck="upernet"), "neck must be one of adapter, simple_fpn"),
    (dict(image_size=0), "image_size must be a positive integer or None"),
    (dict(patch_size=0), "patch_size must be a positive integer"),
    (dict(drop_path_rate=1.0), "drop_path_rate must be in"),
    (dict(num_levels=3), "num_levels must be an integer >= 4"),
    (dict(interaction_indexes=[[0, 0]]), r"must end at the ViT's last block 1, e.g. \[\[0, 0\], \[1, 1\]\]"),
])
def test_bad_arguments_are_named(arguments, message):
    arguments = dict(dict(neck="adapter", image_size=112), **arguments)
    with pytest.raises(ValueError, match=message):
        build_encoder("internvit-tiny", **arguments)


def test_bad_pixels_are_refused():
    encoder = build_encoder("internvit-tiny", neck="simple_fpn", image_size=112)
    with pytest.raises(ValueError, match=r"pixels must be \(batch, 3, height, width\), got \(3, 64, 64\)"):
        encoder(torch.randn(3, 64, 64))
