"""Whole-image and sliding-window inference against a re-statement of mmseg's slide rule."""


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from standin_encoder import StandInEncoder, fill_batchnorm_statistics_
from vitp.downstream.heads import FeatureFusion, UPerHead
from vitp.downstream.inference import slide_inference, sliding_windows, whole_inference
from vitp.downstream.segmentor import ChangeSegmentor, Segmentor
from vitp_testing import randomize_

NUM_CLASSES = 16


def mmseg_slide(model, img, crop, stride, num_classes):
    """mmseg 0.x ``EncoderDecoder.slide_inference`` (open-cd's is the same), re-stated: every window with
    the whole batch, its logits zero-padded to the image and added, then divided by the coverage count."""
    h_stride, w_stride = stride
    h_crop, w_crop = crop
    batch_size, _, h_img, w_img = img.size()
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((batch_size, num_classes, h_img, w_img))
    count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_seg_logit = model(img[:, :, y1:y2, x1:x2])
            preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat


def segmentor(num_classes=NUM_CLASSES):
    encoder = StandInEncoder(batch_norm=True)
    model = Segmentor(encoder, UPerHead(encoder.out_channels, num_classes, channels=16))
    return fill_batchnorm_statistics_(randomize_(model, std=0.2)).eval()


def pixels(batch, height, width, channels=3, seed=0):
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch, height, width", [(1, 48, 64), (2, 37, 53)])
def test_slide_equals_whole_when_the_crop_is_the_image(batch, height, width):
    model = segmentor()
    image = pixels(batch, height, width)
    whole = whole_inference(model, image)
    assert whole.shape == (batch, NUM_CLASSES, height, width)
    assert torch.equal(slide_inference(model, image, crop=(height, width), stride=(height, width)), whole)
    # A crop larger than the image is one window, the image itself (mmseg does not pad windows).
    assert torch.equal(slide_inference(model, image, crop=(height + 40, width + 7), stride=16), whole)


@pytest.mark.parametrize(
    "batch, height, width, crop, stride",
    [
        (1, 96, 128, (64, 64), (32, 32)),  # overlap, sizes multiples of the stride
        (2, 75, 101, (32, 40), (20, 24)),  # sizes not multiples of the stride: last windows shifted back
        (1, 20, 90, (32, 32), (16, 24)),  # smaller than the crop in height, larger in width
        (2, 50, 50, (32, 32), (32, 32)),  # no overlap but a remainder
    ],
)
def test_slide_matches_mmseg(batch, height, width, crop, stride):
    model = segmentor()
    image = pixels(batch, height, width, seed=1)
    with torch.no_grad():
        expected = mmseg_slide(model, image, crop, stride, NUM_CLASSES)
    # One window position per forward: the same additions in the same order, bit for bit.
    assert torch.equal(slide_inference(model, image, crop, stride, NUM_CLASSES, windows_per_forward=1), expected)
    # Several windows per forward (the default): the same up to float rounding (a batched conv may take
    # another kernel). The random model's logits reach ~100, so 2e-4 is a few float32 ulps.
    batched = slide_inference(model, image, crop, stride, NUM_CLASSES, windows_per_forward=5)
    torch.testing.assert_close(batched, expected, atol=2e-4, rtol=1e-5)
    # Overlap matters: the averaged logits are not the whole-image ones (the model sees other context).
    if height > crop[0] or width > crop[1]:
        assert not torch.allclose(batched, whole_inference(model, image), atol=1e-3)


def test_sliding_windows_are_mmseg_boxes():
    boxes = sliding_windows(75, 101, crop=(32, 40), stride=(20, 24))
    rows = sorted({(y1, y2) for y1, y2, _, _ in boxes})
    columns = sorted({(x1, x2) for _, _, x1, x2 in boxes})
    # ceil((75 - 32) / 20) + 1 = 4 rows, the last moved back to end at 75; ceil((101 - 40) / 24) + 1 = 4.
    assert rows == [(0, 32), (20, 52), (40, 72), (43, 75)]
    assert columns == [(0, 40), (24, 64), (48, 88), (61, 101)]
    assert len(boxes) == 16 and boxes[:2] == [(0, 32, 0, 40), (0, 32, 24, 64)]  # row by row
    assert sliding_windows(20, 90, (32, 32), (16, 24))[0] == (0, 20, 0, 32)


def test_change_segmentor_slides_over_stacked_pairs():
    encoder = StandInEncoder(batch_norm=True)
    fusion = FeatureFusion("concat")
    model = ChangeSegmentor(encoder, fusion, UPerHead(fusion.out_channels(encoder.out_channels), 2, channels=16))
    model = fill_batchnorm_statistics_(randomize_(model, std=0.2)).eval()
    pair = pixels(1, 70, 90, channels=6, seed=2)  # LEVIR-CD's rule, scaled down: crop 2x the stride
    with torch.no_grad():
        expected = mmseg_slide(model, pair, (32, 32), (16, 16), 2)
    torch.testing.assert_close(slide_inference(model, pair, crop=32, stride=16, num_classes=2), expected,
                               atol=2e-4, rtol=1e-5)


class Recorder(nn.Module):
    """Logits from a fixed 1x1 conv, remembering the batch of every call."""

    def __init__(self, num_classes=2):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.batches = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.conv(x)


def test_memory_is_bounded_by_the_windows_per_forward_on_a_large_image():
    """A 4000x4000 image with iSAID's crop and stride: 64 windows, never more than 4 through the model
    at once. The result is the model's per-pixel output (a 1x1 conv), which no windowing may change. (Its
    speed: benchmarks/downstream.py --parts evaluation.)"""
    model = Recorder().eval()
    image = pixels(1, 4000, 4000, seed=3)
    logits = slide_inference(model, image, crop=896, stride=448, windows_per_forward=4)
    assert len(sliding_windows(4000, 4000, (896, 896), (448, 448))) == 64
    assert max(model.batches) == 4 and sum(model.batches) == 64
    with torch.no_grad():
        torch.testing.assert_close(logits[:, :, ::97, ::89], model.conv(image[:, :, ::97, ::89]))


def test_a_module_in_training_mode_gets_one_window_position_per_forward():
    model = Recorder().train()
    slide_inference(model, pixels(2, 50, 70), crop=32, stride=16, windows_per_forward=8)
    assert set(model.batches) == {2}  # the batch of 2 images, one window position at a time
    model = Recorder().eval()
    slide_inference(model, pixels(2, 50, 70), crop=32, stride=16, windows_per_forward=8)
    assert max(model.batches) == 16


def test_padding_to_a_size_divisor_and_rescaling():
    model = segmentor()
    image = pixels(1, 37, 53, seed=4)
    seen = []

    def recording(x):
        seen.append(tuple(x.shape[2:]))
        return model(x)

    # open-cd's size_divisor=32: pad bottom/right with the pad value, run, cut the padding off.
    logits = whole_inference(recording, image, size_divisor=32, pad_value=0.0)
    with torch.no_grad():
        expected = model(F.pad(image, (0, 64 - 53, 0, 64 - 37)))[:, :, :37, :53]
    assert seen == [(64, 64)] and torch.equal(logits, expected)
    # The same padding before sliding; then mmseg's rescale to the original image size.
    slid = slide_inference(model, image, crop=32, stride=16, size_divisor=32, output_size=(74, 106))
    with torch.no_grad():
        padded = mmseg_slide(model, F.pad(image, (0, 11, 0, 27)), (32, 32), (16, 16), NUM_CLASSES)
    expected = F.interpolate(padded[:, :, :37, :53], size=(74, 106), mode="bilinear", align_corners=False)
    torch.testing.assert_close(slid, expected, atol=2e-4, rtol=1e-5)


def test_half_precision_logits_are_summed_in_float32():
    model = Recorder().eval()
    logits = slide_inference(lambda x: model(x).half(), pixels(1, 40, 40), crop=24, stride=8)
    assert logits.dtype == torch.float32


def test_bad_arguments_and_bad_models_are_named():
    model = Recorder().eval()
    image = pixels(1, 40, 40)
    with pytest.raises(ValueError, match=r"stride \(40, 16\) must not exceed crop \(32, 32\)"):
        slide_inference(model, image, crop=32, stride=(40, 16))
    with pytest.raises(ValueError, match="crop must be a positive int"):
        slide_inference(model, image, crop=(32, 0), stride=16)
    with pytest.raises(ValueError, match="num_classes=16 but the model returned 2 channels"):
        slide_inference(model, image, crop=32, stride=16, num_classes=16)
    with pytest.raises(ValueError, match=r"logits at the input's size"):
        whole_inference(lambda x: x[:, :, ::4, ::4], image)
    with pytest.raises(ValueError, match=r"pixels: expected a non-empty \[B, C, H, W\]"):
        whole_inference(model, image[0])
    with pytest.raises(ValueError, match="size_divisor"):
        whole_inference(model, image, size_divisor=0)
