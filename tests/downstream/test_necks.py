"""The two necks: ViT-Adapter as ViTP configures it, ViTDet's SimpleFPN, and the geometry they share."""

import pytest
import torch

from vitp import VisionConfig
from vitp.downstream.backbone import build_encoder
from vitp.downstream.necks import (
    SimpleFPN,
    ViTAdapter,
    check_interaction_indexes,
    reference_points,
    scale_interaction_indexes,
    to_stride16,
)


def upstream_reference_points(shapes):
    """Upstream's get_reference_points (adapter_modules.py), re-stated: pixel centres of each level,
    normalised by that level's size, (x, y)."""
    points = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h) / h, torch.linspace(0.5, w - 0.5, w) / w, indexing="ij")
        points.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
    return torch.cat(points)[None, :, None]


def test_reference_points_are_upstreams_for_a_512_input():
    # injector: ViT tokens (32x32) attend to the SPM's levels; extractor: the SPM's 64/32/16 grids attend to the ViT
    torch.testing.assert_close(reference_points([(32, 32)], [16], (512, 512), "cpu"), upstream_reference_points([(32, 32)]))
    levels = [(64, 64), (32, 32), (16, 16)]
    torch.testing.assert_close(
        reference_points(levels, [8, 16, 32], (512, 512), "cpu"), upstream_reference_points(levels)
    )


def test_a_patch_14_map_is_resampled_to_stride_16_on_its_pixels():
    """A map whose value is each token's centre x in pixels, (j + 0.5) * 14, becomes (j + 0.5) * 16 on the
    stride-16 grid: bilinear reproduces a linear function, so any shift or stretch would show."""
    tokens = 32  # 448 px / 14
    ramp = ((torch.arange(tokens) + 0.5) * 14).view(1, 1, 1, tokens).expand(1, 1, tokens, tokens)
    resampled = to_stride16(ramp, 14, (28, 28))
    assert resampled.shape == (1, 1, 28, 28)
    expected = (torch.arange(28) + 0.5) * 16
    # the last column would need a token past the image's last one (the map's edge is clamped there)
    torch.testing.assert_close(resampled[0, 0, 0, :27], expected[:27])
    same = torch.randn(1, 3, 8, 8)
    assert to_stride16(same, 16, (8, 8)) is same


@pytest.mark.parametrize("depth, expected", [
    (24, [[0, 7], [8, 11], [12, 15], [16, 23]]),
    (12, [[0, 3], [4, 5], [6, 7], [8, 11]]),
    (45, [[0, 14], [15, 22], [23, 29], [30, 44]]),
    (48, [[0, 15], [16, 23], [24, 31], [32, 47]]),
    (5, [[0, 1], [2, 2], [3, 3], [4, 4]]),
    (3, [[0, 0], [1, 1], [2, 2]]),
])
def test_interaction_ranges_scale_with_depth(depth, expected):
    assert scale_interaction_indexes(depth) == expected


def test_scaled_ranges_always_cover_every_block_once():
    for depth in range(1, 80):
        ranges = scale_interaction_indexes(depth)
        assert check_interaction_indexes(ranges, depth) == ranges
        assert len(ranges) == min(4, depth)


@pytest.mark.parametrize("ranges", [[[0, 0], [2, 3]], [[1, 3]], [[0, 2], [2, 3]], [[0, 4]], []])
def test_ranges_that_skip_or_repeat_blocks_are_refused(ranges):
    with pytest.raises(ValueError, match="interaction_indexes"):
        check_interaction_indexes(ranges, 4)


def test_adapter_is_built_as_vitp_configures_it():
    dim = 64
    adapter = ViTAdapter(dim, depth=24)
    assert adapter.interaction_indexes == [[0, 7], [8, 11], [12, 15], [16, 23]]
    assert adapter.level_embed.shape == (3, dim)
    for index, interaction in enumerate(adapter.interactions):
        injector, extractor = interaction.injector, interaction.extractor
        assert (injector.attn.num_levels, injector.attn.num_heads, injector.attn.num_points) == (3, 16, 4)
        assert (extractor.attn.num_levels, extractor.attn.num_heads, extractor.attn.num_points) == (1, 16, 4)
        assert injector.attn.value_proj.out_features == dim // 4  # deform_ratio 0.25
        assert extractor.ffn.fc1.out_features == dim // 4  # cffn_ratio 0.25
        torch.testing.assert_close(injector.gamma, torch.full((dim,), 0.1))  # init_values 0.1
        assert (interaction.extra_extractors is not None) == (index == 3)
    assert len(adapter.interactions[3].extra_extractors) == 2
    # the SPM's widths: 64, 128, 256, 256 channels, each projected to the ViT's
    assert [adapter.spm.fc1.in_channels, adapter.spm.fc2.in_channels, adapter.spm.fc3.in_channels,
            adapter.spm.fc4.in_channels] == [64, 128, 256, 256]
    assert adapter.out_channels == [dim] * 4


def test_simple_fpn_is_vitdets_pyramid():
    neck = SimpleFPN(64, depth=2)
    widths = [neck.scale4[-1].out_channels, neck.scale8.out_channels]
    assert widths == [16, 32]  # dim/4 at stride 4, dim/2 at stride 8, dim at 16 and 32
    assert [conv[0].in_channels for conv in neck.output_convs.lateral] == [16, 32, 64, 64]
    assert all(conv[0].bias is None for conv in neck.output_convs.lateral)  # a LayerNorm follows
    assert neck.out_channels == [256] * 4


def test_simple_fpn_sees_only_the_last_layer():
    """Tokens are taken after the last block only: what the ViT's last layer gives decides every level."""
    config = VisionConfig(image_size=64, patch_size=16, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    encoder = build_encoder(config, neck="simple_fpn", image_size=64, out_channels=8).eval()
    pixels = torch.randn(1, 3, 64, 64)
    seen = []
    encoder.vit.blocks[-1].register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        maps = encoder(pixels)
        last = seen[0].transpose(1, 2).reshape(1, 32, 4, 4)
        neck = encoder.neck
        expected = neck.output_convs([neck.scale4(last), neck.scale8(last), last, neck.scale32(last)])
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want)


def test_adapter_output_convs_and_widths():
    adapter = ViTAdapter(64, depth=4, out_channels=32, num_levels=5)
    assert adapter.out_channels == [32] * 5
    with pytest.raises(ValueError, match="deform_num_heads"):
        ViTAdapter(100, depth=4)  # 25 value channels, 16 heads
    ViTAdapter(100, depth=4, deform_num_heads=5)
