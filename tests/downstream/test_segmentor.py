"""Segmentor and ChangeSegmentor: logits at the input size, mmseg's losses, open-cd's Siamese encoding,
the one-image overfit, and (when the other half of the stack is there) the real ViT encoder."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from standin_encoder import StandInEncoder, fill_batchnorm_statistics_
from vitp.downstream.heads import FeatureFusion, UPerHead
from vitp.downstream.segmentor import (
    ChangeSegmentor,
    Segmentor,
    build_upernet_change_detector,
    build_upernet_segmentor,
    segmentation_loss,
)
from vitp_testing import randomize_

NUM_CLASSES = 16


def generator(seed):
    return torch.Generator().manual_seed(seed)


def random_labels(batch, height, width, num_classes=NUM_CLASSES, ignored=0.2, seed=0):
    labels = torch.randint(0, num_classes, (batch, height, width), generator=generator(seed))
    labels[torch.rand(batch, height, width, generator=generator(seed + 1)) < ignored] = 255
    return labels


def segmentor(num_classes=NUM_CLASSES, batch_norm=True, auxiliary_head=None, **kwargs):
    encoder = StandInEncoder(batch_norm=batch_norm)
    head = UPerHead(encoder.out_channels, num_classes, channels=16)
    model = Segmentor(encoder, head, auxiliary_head=auxiliary_head, **kwargs)
    return fill_batchnorm_statistics_(randomize_(model, std=0.2))


@pytest.mark.parametrize("batch, height, width", [(1, 37, 53), (3, 64, 90)])
def test_forward_gives_logits_at_the_input_size(batch, height, width):
    model = segmentor().eval()
    pixels = torch.randn(batch, 3, height, width, generator=generator(0))
    with torch.no_grad():
        logits = model(pixels)
        # mmseg's encode_decode: the head's 1/4-resolution logits, resized (bilinear) to the image.
        expected = F.interpolate(model.decode_head(model.encoder(pixels)), size=(height, width), mode="bilinear",
                                 align_corners=False)
    assert logits.shape == (batch, NUM_CLASSES, height, width)
    assert torch.equal(logits, expected)


def test_loss_is_mmseg_cross_entropy_over_all_pixels():
    """mmseg's CrossEntropyLoss (avg_non_ignore=False, as ViTP's configs): the head's logits resized to the
    label size, the per-pixel losses of labelled pixels summed and divided by every pixel."""
    model = segmentor().train()
    pixels = torch.randn(2, 3, 45, 61, generator=generator(2))
    labels = random_labels(2, 45, 61, seed=3)
    torch.manual_seed(0)
    losses = model.loss(pixels, labels)
    torch.manual_seed(0)  # the same dropout mask and batch statistics
    head_logits = model.decode_head(model.encoder(pixels))
    upsampled = F.interpolate(head_logits, size=(45, 61), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(upsampled, labels, ignore_index=255, reduction="sum") / labels.numel()
    assert set(losses) == {"decode", "total"}
    torch.testing.assert_close(losses["decode"], expected)
    torch.testing.assert_close(losses["total"], expected)
    losses["total"].backward()
    assert model.encoder.stages[0][0][0].weight.grad.abs().sum() > 0


def test_loss_averaged_over_labelled_pixels_is_pytorch_mean():
    logits = torch.randn(2, NUM_CLASSES, 12, 15, generator=generator(4))
    labels = random_labels(2, 48, 60, seed=5)  # labels 4x the logits' size: resized straight to it
    ours = segmentation_loss(logits, labels, average_non_ignored=True)
    upsampled = F.interpolate(logits, size=(48, 60), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, F.cross_entropy(upsampled, labels, ignore_index=255))
    # [B, 1, H, W] label maps (mmseg's layout) and uint8 labels read from PNGs give the same loss.
    torch.testing.assert_close(segmentation_loss(logits, labels[:, None].to(torch.uint8), average_non_ignored=True),
                               ours)


def test_all_ignored_labels_give_zero_loss_not_nan():
    logits = torch.randn(1, 3, 8, 8, requires_grad=True)
    labels = torch.full((1, 8, 8), 255)
    for average_non_ignored in (False, True):
        loss = segmentation_loss(logits, labels, average_non_ignored=average_non_ignored)
        assert loss.item() == 0.0
        loss.backward()


def test_auxiliary_head_loss_is_weighted_and_added():
    encoder_channels = StandInEncoder().out_channels
    auxiliary = UPerHead(encoder_channels, NUM_CLASSES, channels=8, dropout=0.0)
    model = segmentor(auxiliary_head=randomize_(auxiliary, seed=7), auxiliary_weight=0.4).eval()
    pixels = torch.randn(1, 3, 33, 41, generator=generator(6))
    labels = random_labels(1, 33, 41, seed=7)
    losses = model.loss(pixels, labels)
    features = model.encoder(pixels)
    decode = segmentation_loss(model.decode_head(features), labels)
    aux = segmentation_loss(model.auxiliary_head(features), labels)
    torch.testing.assert_close(losses["decode"], decode)
    torch.testing.assert_close(losses["aux"], 0.4 * aux)
    torch.testing.assert_close(losses["total"], decode + 0.4 * aux)
    # Inference uses the decode head alone.
    with torch.no_grad():
        expected = F.interpolate(model.decode_head(features), size=(33, 41), mode="bilinear", align_corners=False)
        assert torch.equal(model(pixels), expected)


def test_out_of_range_labels_are_named():
    logits = torch.randn(1, 7, 8, 8)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 0, :3] = torch.tensor([7, 255, 9])  # LoveDA's 7 classes: 7 and 9 are not classes, 255 is ignored
    with pytest.raises(ValueError, match=r"in \[0, 7\) or the ignore index 255; found \[7, 9\]"):
        segmentation_loss(logits, labels)
    with pytest.raises(ValueError, match="integer tensor"):
        segmentation_loss(logits, labels.float())
    with pytest.raises(ValueError, match=r"\[B, H, W\] map of class indices with B = 1"):
        segmentation_loss(logits, labels.expand(2, 8, 8))


def test_align_corners_must_agree_with_the_head():
    encoder = StandInEncoder()
    head = UPerHead(encoder.out_channels, 3, channels=8, align_corners=True)
    with pytest.raises(ValueError, match="align_corners"):
        Segmentor(encoder, head, align_corners=False)


def test_builders_take_the_encoders_channels():
    encoder = StandInEncoder((8, 12, 16, 24))
    model = build_upernet_segmentor(encoder, 16)
    assert model.num_classes == 16 and model.decode_head.channels == 512
    assert [conv.conv.in_channels for conv in model.decode_head.lateral_convs] == [8, 12, 16]
    detector = build_upernet_change_detector(encoder, channels=64)
    assert detector.num_classes == 2 and detector.fusion.policy == "concat"
    assert [conv.conv.in_channels for conv in detector.decode_head.lateral_convs] == [16, 24, 32]
    assert detector.decode_head.psp_modules[0][1].conv.in_channels == 48
    assert build_upernet_change_detector(encoder, policy="abs_diff").decode_head.lateral_convs[0].conv.in_channels == 8


def change_segmentor(batch_norm, encode_dates_together=False, policy="concat"):
    encoder = StandInEncoder(batch_norm=batch_norm)
    fusion = FeatureFusion(policy)
    head = UPerHead(fusion.out_channels(encoder.out_channels), 2, channels=16)
    model = ChangeSegmentor(encoder, fusion, head, encode_dates_together=encode_dates_together)
    return fill_batchnorm_statistics_(randomize_(model, std=0.2))


@pytest.mark.parametrize("policy", ["concat", "abs_diff"])
def test_change_segmentor_is_open_cds_siamese_encoder_decoder(policy):
    """Restated from open-cd's SiamEncoderDecoder: split the 6 channels into the two dates, one backbone on
    each, the neck fuses level by level, the head classifies, logits resized to the input."""
    model = change_segmentor(batch_norm=True, policy=policy).eval()
    pair = torch.randn(2, 6, 37, 51, generator=generator(8))
    with torch.no_grad():
        logits = model(pair)
        date_a, date_b = pair[:, :3], pair[:, 3:]
        features = FeatureFusion(policy)(model.encoder(date_a), model.encoder(date_b))
        expected = F.interpolate(model.decode_head(features), size=(37, 51), mode="bilinear", align_corners=False)
    assert logits.shape == (2, 2, 37, 51)
    assert torch.equal(logits, expected)
    # Swapping the dates changes the input of the head (concat order): the model is not symmetric.
    if policy == "concat":
        with torch.no_grad():
            assert not torch.allclose(model(torch.cat([date_b, date_a], dim=1)), logits)


def test_encoding_both_dates_in_one_batch_is_equivalent_when_nothing_uses_batch_statistics():
    pair = torch.randn(2, 6, 40, 40, generator=generator(9))
    labels = random_labels(2, 40, 40, num_classes=2, seed=10)
    # A ViT-like encoder (no BatchNorm), in training: same losses and same gradients.
    separate = change_segmentor(batch_norm=False).train()
    together = change_segmentor(batch_norm=False, encode_dates_together=True).train()
    together.load_state_dict(separate.state_dict())
    torch.manual_seed(0)
    loss_separate = separate.loss(pair, labels)["total"]
    torch.manual_seed(0)
    loss_together = together.loss(pair, labels)["total"]
    torch.testing.assert_close(loss_together, loss_separate)
    loss_separate.backward()
    loss_together.backward()
    torch.testing.assert_close(together.encoder.stages[1][0].weight.grad, separate.encoder.stages[1][0].weight.grad)
    # With BatchNorm in the encoder: equal in eval mode (running statistics)...
    separate, together = change_segmentor(batch_norm=True).eval(), change_segmentor(True, True).eval()
    together.load_state_dict(separate.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(together(pair), separate(pair))
    # ...not in training, where the batch statistics would mix the dates: why it is not the default.
    separate.train(), together.train()
    separate.decode_head.dropout.p = together.decode_head.dropout.p = 0.0
    with torch.no_grad():
        assert not torch.allclose(together(pair), separate(pair), atol=1e-4)


def test_change_segmentor_rejects_a_single_image():
    model = change_segmentor(batch_norm=False)
    with pytest.raises(ValueError, match=r"pixels: expected \[B, 6, H, W\], got \[1, 3, 32, 32\]"):
        model(torch.randn(1, 3, 32, 32))


def blocky_scene(height, width, num_classes, cell=16, seed=0):
    """A synthetic image of square cells, each class its own colour (a corner of the RGB cube, plus noise),
    and its label map. The
    2x2 pixels at each cell corner are ignored (as VOC's void borders): the head predicts at 1/4 of the
    resolution and bilinear upsampling cannot place the corner where three or four classes meet exactly."""
    assert num_classes <= 8, "one corner of the RGB cube per class"
    g = generator(seed)
    cells = torch.randint(0, num_classes, (-(-height // cell), -(-width // cell)), generator=g)
    classes = cells.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[:height, :width]
    palette = torch.tensor([[(c >> bit) & 1 for bit in range(3)] for c in range(num_classes)]) * 2.0 - 1
    pixels = palette[classes].permute(2, 0, 1)[None] + 0.1 * torch.randn(1, 3, height, width, generator=g)
    labels = classes.clone()

    def on_boundary(n):
        return (torch.arange(n) % cell == cell - 1) | (torch.arange(n) % cell == 0)

    labels[on_boundary(height)[:, None] & on_boundary(width)[None, :]] = 255
    labels[13:17, :] = 255  # and a band of no-data pixels
    return pixels, labels[None]


def mean_iou(prediction, labels, num_classes, ignore_index=255):
    """Per-class intersection over union on labelled pixels, averaged over the classes present."""
    valid = labels != ignore_index
    ious = []
    for c in range(num_classes):
        predicted, actual = (prediction == c) & valid, (labels == c) & valid
        union = (predicted | actual).sum().item()
        if union:
            ious.append((predicted & actual).sum().item() / union)
    return sum(ious) / len(ious)


def test_one_image_overfits_to_miou_one():
    """The training wiring end to end (encoder with BatchNorm, UPerHead with its dropout, ignored pixels,
    the loss's resize): one image of 5 classes, batch 1, is learnt exactly; checked in eval mode."""
    torch.manual_seed(0)
    num_classes = 5
    pixels, labels = blocky_scene(48, 64, num_classes)
    encoder = StandInEncoder((16, 16, 24, 32), batch_norm=True)
    model = build_upernet_segmentor(encoder, num_classes, channels=32)
    steps = 250  # seed 0 learns it in about 60; other seeds took 60-150
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    valid = labels != 255
    for step in range(1, steps + 1):
        model.train()
        loss = model.loss(pixels, labels)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 10 == 0:
            model.eval()
            with torch.no_grad():
                prediction = model(pixels).argmax(dim=1)
            if torch.equal(prediction[valid], labels[valid]):
                break
    assert torch.equal(prediction[valid], labels[valid]), f"{(prediction[valid] != labels[valid]).sum()} pixels wrong"
    assert mean_iou(prediction, labels, num_classes) == 1.0
    assert step < steps, "learnt only at the last step: too close to the bound to be a reliable test"


def test_with_the_real_encoder(tiny_vit):
    """The stack as users build it: vitp's dense ViT encoder under these heads. Written against the
    encoder's stated interface (``build_encoder`` from a vitp ViT; ``forward(pixels)`` -> 4 maps at 1/4,
    1/8, 1/16, 1/32; ``out_channels``); skipped, with the reason, where that is not (yet) there."""
    try:
        from vitp.downstream.backbone import build_encoder
    except ImportError as error:
        pytest.skip(f"vitp.downstream.backbone.build_encoder is not importable yet ({error})")
    try:
        encoder = build_encoder(tiny_vit)
    except TypeError as error:
        pytest.skip(f"build_encoder(vit) is not the encoder's signature ({error}): adapt this test to it")
    from vitp.downstream.inference import slide_inference, whole_inference

    pixels = torch.randn(2, 3, 64, 64, generator=generator(11))
    features = encoder.eval()(pixels)
    assert [tuple(f.shape) for f in features] == [
        (2, c, 64 // s, 64 // s) for c, s in zip(encoder.out_channels, (4, 8, 16, 32))
    ]
    model = build_upernet_segmentor(encoder, NUM_CLASSES, channels=16)
    labels = random_labels(2, 64, 64, seed=12)
    model.train().loss(pixels, labels)["total"].backward()
    gradients = [p.grad for p in encoder.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in gradients), "no gradient reached the encoder"
    model.eval()
    whole = whole_inference(model, pixels)
    assert whole.shape == (2, NUM_CLASSES, 64, 64)
    assert torch.equal(slide_inference(model, pixels, crop=64, stride=32), whole)
