"""UPerHead against transformers' UperNetHead (an independent port of mmseg's), its mmseg parameter names,
batch-1 training, SyncBatchNorm conversion, and open-cd's feature fusion policies."""

import pytest
import torch
import torch.nn as nn
from transformers import UperNetConfig
from transformers.models.upernet.modeling_upernet import UperNetHead

from standin_encoder import StandInEncoder, fill_batchnorm_statistics_
from vitp.downstream.heads import ConvBNReLU, FeatureFusion, UPerHead
from vitp.downstream.segmentor import ChangeSegmentor, Segmentor
from vitp_testing import randomize_

IN_CHANNELS = [8, 12, 16, 24]
NUM_CLASSES = 16  # iSAID's


def features_for(batch, height, width, channels=IN_CHANNELS, seed=0):
    """Maps at 1/4 .. 1/32 of an odd-sized image (sizes rounded up, as strided convs give)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [(-(-height // s), -(-width // s)) for s in (4, 8, 16, 32)]
    return [torch.randn(batch, c, h, w, generator=generator) for c, (h, w) in zip(channels, sizes)]


def transformers_twin(head: UPerHead) -> UperNetHead:
    """transformers' UperNetHead with our head's weights (their names: batch_norm, classifier)."""
    config = UperNetConfig(hidden_size=head.channels, pool_scales=[1, 2, 3, 6], num_labels=head.num_classes)
    twin = UperNetHead(config, in_channels=head.in_channels)
    state = {
        key.replace(".bn.", ".batch_norm.").replace("conv_seg.", "classifier."): value
        for key, value in head.state_dict().items()
    }
    twin.load_state_dict(state, strict=True)
    return twin


def random_head(dropout=0.1, channels=32):
    head = UPerHead(IN_CHANNELS, NUM_CLASSES, channels=channels, dropout=dropout)
    return fill_batchnorm_statistics_(randomize_(head, std=0.2))


@pytest.mark.parametrize("batch, height, width", [(1, 37, 53), (3, 64, 96)])
def test_uper_head_eval_matches_transformers(batch, height, width):
    head = random_head().eval()
    twin = transformers_twin(head).eval()
    features = features_for(batch, height, width)
    with torch.no_grad():
        ours, theirs = head(features), twin(features)
    # Logits at the finest level's resolution, one channel per class.
    assert ours.shape == (batch, NUM_CLASSES, *features[0].shape[2:])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_uper_head_train_mode_matches_transformers_and_updates_the_same_statistics():
    # Batch 2: every BatchNorm (the 1x1 pooled branch too) has batch statistics. No dropout in theirs.
    head = random_head(dropout=0.0).train()
    twin = transformers_twin(head).train()
    features = features_for(2, 45, 61, seed=3)
    torch.testing.assert_close(head(features), twin(features), atol=1e-5, rtol=1e-5)
    ours_state = head.state_dict()
    for key, value in twin.state_dict().items():
        ours_key = key.replace(".batch_norm.", ".bn.").replace("classifier.", "conv_seg.")
        torch.testing.assert_close(ours_state[ours_key], value, atol=1e-6, rtol=1e-6)


def test_batch_of_one_trains_with_running_statistics_in_the_one_by_one_pooled_branch():
    """PyTorch (and so mmseg, with BN on one process) cannot take batch statistics from the single value
    per channel that the 1x1 pooled branch gives a batch of 1. That branch normalises with its running
    statistics, and leaves them alone; every other BatchNorm uses the batch as usual."""
    head = random_head(dropout=0.0).train()
    twin = transformers_twin(head).train()
    pooled_1x1_norm = twin.psp_modules.blocks[0].layers[1].batch_norm
    pooled_1x1_norm.eval()  # the rule, restated on transformers' head
    features = features_for(1, 37, 53, seed=4)
    before = head.psp_modules[0][1].bn.running_mean.clone()
    before_2x2 = head.psp_modules[1][1].bn.running_mean.clone()

    logits = head(features)
    torch.testing.assert_close(logits, twin(features), atol=1e-5, rtol=1e-5)
    logits.sum().backward()  # trains: gradients reach the branch's conv
    assert head.psp_modules[0][1].conv.weight.grad.abs().sum() > 0
    assert torch.equal(head.psp_modules[0][1].bn.running_mean, before)
    # The 2x2 branch has 4 values per channel: batch statistics, running statistics updated.
    assert not torch.equal(head.psp_modules[1][1].bn.running_mean, before_2x2)


def test_plain_batchnorm_with_one_value_per_channel_would_fail():
    """Why the rule above exists: the failure it avoids (if PyTorch ever accepts this, revisit it)."""
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        nn.BatchNorm2d(4).train()(torch.randn(1, 4, 1, 1))


def test_tiny_image_in_training_does_not_crash():
    # A 24x24 crop, batch 1: the 1/32 level is 1x1, so the PPM bottleneck also sees one value per channel.
    head = UPerHead(IN_CHANNELS, NUM_CLASSES, channels=16).train()
    logits = head(features_for(1, 24, 24))
    assert logits.shape == (1, NUM_CLASSES, 6, 6) and torch.isfinite(logits).all()


def test_parameter_names_are_mmseg_uper_heads():
    """mmseg's UPerHead names (ConvModule's conv/bn, PPM as Sequential(pool, ConvModule), conv_seg), so a
    released checkpoint's ``decode_head.*`` tensors fit without renaming. Written out from mmseg's modules."""
    head = UPerHead([4, 6, 8], 3, channels=5, pool_scales=(1, 2))
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]

    def conv_module(prefix):
        return [f"{prefix}.conv.weight"] + [f"{prefix}.bn.{name}" for name in bn]

    expected = (
        conv_module("psp_modules.0.1") + conv_module("psp_modules.1.1") + conv_module("bottleneck")
        + conv_module("lateral_convs.0") + conv_module("lateral_convs.1")
        + conv_module("fpn_convs.0") + conv_module("fpn_convs.1") + conv_module("fpn_bottleneck")
        + ["conv_seg.weight", "conv_seg.bias"]
    )
    assert sorted(head.state_dict()) == sorted(expected)
    shapes = {key: tuple(value.shape) for key, value in head.state_dict().items()}
    assert shapes["bottleneck.conv.weight"] == (5, 8 + 2 * 5, 3, 3)
    assert shapes["lateral_convs.1.conv.weight"] == (5, 6, 1, 1)
    assert shapes["fpn_bottleneck.conv.weight"] == (5, 3 * 5, 3, 3)
    assert shapes["conv_seg.weight"] == (3, 5, 1, 1)


def test_initialisation_is_mmseg():
    head = UPerHead([64] * 4, NUM_CLASSES, channels=512)
    assert 0.008 < head.conv_seg.weight.std().item() < 0.012  # normal, std 0.01
    assert torch.all(head.conv_seg.bias == 0)
    # Kaiming normal, fan-out, for ReLU: std = sqrt(2 / (out_channels * k * k)).
    std = head.fpn_bottleneck.conv.weight.std().item()
    assert abs(std - (2 / (512 * 9)) ** 0.5) / std < 0.05
    assert head.fpn_bottleneck.conv.bias is None
    assert torch.all(head.fpn_bottleneck.bn.weight == 1) and torch.all(head.fpn_bottleneck.bn.bias == 0)


def test_dropout_is_channel_dropout_before_the_classifier_and_only_in_training():
    head = UPerHead(IN_CHANNELS, NUM_CLASSES, channels=16, dropout=0.1)
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.1
    features = features_for(2, 40, 40)
    head.eval()
    with torch.no_grad():
        assert torch.equal(head(features), head(features))


def test_sync_batchnorm_conversion_covers_every_batchnorm():
    """The trainer converts with torch's own function under DDP: nothing may be left as a plain BN."""
    encoder = StandInEncoder(batch_norm=True)
    model = Segmentor(encoder, UPerHead(encoder.out_channels, NUM_CLASSES, channels=16))
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(batch_norms) == 5 + 4 + 1 + 3 + 3 + 1  # encoder, PPM, bottleneck, laterals, FPN convs, FPN bottleneck

    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    norms = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == len(batch_norms)
    assert all(type(m) is nn.SyncBatchNorm for m in norms)
    # Without a process group SyncBatchNorm acts as BatchNorm: a batch of 1 still trains on the CPU.
    logits = converted.train()(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, NUM_CLASSES, 64, 64)


def test_sync_batch_norm_option_and_bad_arguments():
    head = UPerHead(IN_CHANNELS, 4, channels=8, norm="sync_batch")
    assert all(type(m.bn) is nn.SyncBatchNorm for m in head.modules() if isinstance(m, ConvBNReLU))
    with pytest.raises(ValueError, match="norm"):
        UPerHead(IN_CHANNELS, 4, norm="group")
    with pytest.raises(ValueError, match="num_classes"):
        UPerHead(IN_CHANNELS, 0)
    head = UPerHead(IN_CHANNELS, 4, channels=8)
    with pytest.raises(ValueError, match=r"features\[2\]: expected \[B, 16, H, W\]"):
        head(features_for(1, 64, 64, channels=[8, 12, 17, 24]))
    with pytest.raises(ValueError, match="expected 4 maps, got 3"):
        head(features_for(1, 64, 64)[:3])


@pytest.mark.parametrize(
    "policy, expected",
    [
        # open-cd's FeatureFusionNeck.fusion, restated
        ("concat", lambda a, b: torch.cat([a, b], dim=1)),
        ("sum", lambda a, b: a + b),
        ("diff", lambda a, b: b - a),
        ("abs_diff", lambda a, b: torch.abs(a - b)),
    ],
)
def test_feature_fusion_policies(policy, expected):
    fusion = FeatureFusion(policy)
    features_a, features_b = features_for(2, 33, 47, seed=1), features_for(2, 33, 47, seed=2)
    fused = fusion(features_a, features_b)
    assert len(fused) == 4
    for out, a, b in zip(fused, features_a, features_b):
        assert torch.equal(out, expected(a, b))
    assert fusion.out_channels(IN_CHANNELS) == [out.shape[1] for out in fused]


def test_feature_fusion_rejects_unknown_policy_and_unequal_levels():
    with pytest.raises(ValueError, match="policy must be one of"):
        FeatureFusion("product")
    with pytest.raises(ValueError, match="4 levels against 3"):
        FeatureFusion()(features_for(1, 32, 32), features_for(1, 32, 32)[:3])


def test_change_segmentor_sync_conversion_includes_the_head_over_fused_features():
    encoder = StandInEncoder(batch_norm=True)
    fusion = FeatureFusion("concat")
    model = ChangeSegmentor(encoder, fusion, UPerHead(fusion.out_channels(encoder.out_channels), 2, channels=8))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert not [m for m in converted.modules() if type(m) is nn.BatchNorm2d]
    assert converted.decode_head.lateral_convs[0].conv.in_channels == 2 * encoder.out_channels[0]
