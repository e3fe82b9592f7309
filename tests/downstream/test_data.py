"""Downstream data: class files, mmseg's and LEVIR-CD's layouts, the checks at opening (every bad pair
named and skipped, the rest loads), labels as mmseg/opencd encode them, and the augmentations."""

import colorsys
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from downstream_testing import (
    SIXTEEN_CLASSES,
    corrupt,
    palette,
    unicode_names,
    write_change_dataset,
    write_class_file,
    write_segmentation_dataset,
)
from vitp.data.images import IMAGENET_MEAN, IMAGENET_STD
from vitp.downstream.data import (
    PRESETS,
    ChangeDataset,
    ClassTable,
    SegmentationDataset,
    collate,
    default_palette,
)
from vitp.downstream.transforms import (
    Normalize,
    Pad,
    PhotoMetricDistortion,
    RandomCrop,
    RandomResize,
    Sample,
    change_train_pipeline,
    hsv_to_rgb,
    rgb_to_hsv,
    train_pipeline,
)
from vitp.errors import DataError

CLASSES = ClassTable.from_names(SIXTEEN_CLASSES, palette(16))


# ------------------------------------------------------------------------------------------------
# class files


def test_class_file_forms_read_the_same_table(tmp_path):
    colours = palette(16)
    text = ClassTable.read(write_class_file(tmp_path / "classes.txt", SIXTEEN_CLASSES, colours))
    as_json = ClassTable.read(write_class_file(tmp_path / "classes.json", SIXTEEN_CLASSES, colours, form="json"))
    mmseg = tmp_path / "mmseg.json"
    mmseg.write_text(json.dumps({"CLASSES": list(SIXTEEN_CLASSES), "PALETTE": [list(c) for c in colours]}), "utf-8")
    assert text == as_json == ClassTable.read(mmseg)
    assert text.names == SIXTEEN_CLASSES  # file order, not sorted ("class 10" stays after "ship")
    assert text.palette[6] == colours[6] and text.names[6] == "建筑物"
    CLASSES.write(tmp_path / "written.txt")
    assert ClassTable.read(tmp_path / "written.txt") == CLASSES


def test_class_file_of_names_only_gets_distinct_colours(tmp_path):
    table = ClassTable.read(write_class_file(tmp_path / "names.txt", SIXTEEN_CLASSES))
    assert table.names == SIXTEEN_CLASSES
    assert len(set(table.palette)) == 16
    assert table.palette == tuple(default_palette(16))


@pytest.mark.parametrize("content, expected", [
    ("road 1 2 3\nroad 4 5 6\n", "unique"),
    ("road 1 2 3\nwater\n", "'water' has no colour"),
    ("road 1 2 300\n", "0-255"),
    ('{"classes": ["a", "b"], "palette": [[1, 2, 3]]}', "1 colours for 2 classes"),
    ('{"classes": "a"}', "'classes' must be a list"),
    ("{broken", "invalid JSON at line 1"),
])
def test_bad_class_file_is_named(tmp_path, content, expected):
    path = tmp_path / "类别.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=expected) as caught:
        ClassTable.read(path)
    assert str(path) in str(caught.value)


def test_presets_follow_upstream_configs():
    loveda, isaid, levir = PRESETS["loveda"], PRESETS["isaid"], PRESETS["levir-cd"]
    assert len(loveda.classes) == 7 and loveda.reduce_zero_label and loveda.crop_size == (512, 512)
    assert len(isaid.classes) == 16 and not isaid.reduce_zero_label and isaid.ratio_range is None
    assert levir.classes.names == ("unchanged", "changed") and levir.crop_size == (256, 256)


# ------------------------------------------------------------------------------------------------
# segmentation: mmseg's layout


def test_segmentation_loads_sixteen_classes_at_odd_sizes_with_unicode_names(tmp_path):
    names = unicode_names(3)
    written = write_segmentation_dataset(tmp_path / "数据", "val", names=names, num_classes=16, size=(333, 250))
    dataset = SegmentationDataset.from_root(tmp_path / "数据", "val", CLASSES)
    assert dataset.names == sorted(written) and not dataset.skipped
    for index, name in enumerate(dataset.names):
        item = dataset[index]
        assert item["name"] == name and item["original_size"] == (250, 333)
        assert item["image"].shape == (3, 250, 333) and item["image"].dtype == torch.float32
        file_label = np.array(Image.open(tmp_path / "数据" / "ann_dir" / "val" / name))
        assert torch.equal(item["label"], torch.from_numpy(file_label).long())
        pixels = np.array(Image.open(tmp_path / "数据" / "img_dir" / "val" / name))
        expected = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(pixels))  # torchvision as the oracle
        assert torch.allclose(item["image"], expected, atol=1e-5)


def test_every_bad_pair_is_named_and_skipped_while_the_rest_loads(tmp_path, caplog):
    names = ["good 1", "good 2", "坏图", "wrong size", "out of range", "no label", "good 10"]
    write_segmentation_dataset(tmp_path, "train", names=names, num_classes=16, size=(333, 250))
    images, labels = tmp_path / "img_dir" / "train", tmp_path / "ann_dir" / "train"
    corrupt(images / "坏图.png")
    Image.fromarray(np.zeros((250, 300), np.uint8)).save(labels / "wrong size.png")
    bad_values = np.zeros((250, 333), np.uint8)
    bad_values[5, 5], bad_values[6, 6] = 16, 200
    Image.fromarray(bad_values).save(labels / "out of range.png")
    (labels / "no label.png").unlink()
    Image.fromarray(np.zeros((250, 333), np.uint8)).save(labels / "orphan.png")

    with caplog.at_level(logging.WARNING, logger="vitp"):
        dataset = SegmentationDataset(images, labels, CLASSES)
    assert dataset.names == ["good 1.png", "good 10.png", "good 2.png"]
    reasons = {s.path: s.reason for s in dataset.skipped}
    assert set(reasons) == {str(images / "坏图.png"), str(labels / "wrong size.png"), str(labels / "out of range.png"),
                            str(images / "no label.png"), str(labels / "orphan.png")}
    assert "corrupt or truncated" in reasons[str(images / "坏图.png")]
    assert "300x250 pixels; expected 333x250" in reasons[str(labels / "wrong size.png")]
    assert "label values 16, 200 found; expected 0-15 (the 16 classes) or 255" in reasons[str(labels / "out of range.png")]
    assert "label map no label.png" in reasons[str(images / "no label.png")]
    assert "label map without an image" in reasons[str(labels / "orphan.png")]
    assert "skipped 5 file(s), 3 pairs kept" in caplog.text and "坏图.png" in caplog.text
    assert dataset.report_lines()[0].endswith("3 image/label pairs kept, 5 file(s) skipped")
    assert all(dataset[i]["label"].shape == (250, 333) for i in range(3))


def test_header_scan_defers_decoding_and_loading_skips_what_fails(tmp_path):
    write_segmentation_dataset(tmp_path, "train", names=["a", "b", "c"], size=(64, 48))
    images = tmp_path / "img_dir" / "train"
    corrupt(images / "b.png", keep_bytes=200)  # the header reads, the pixels do not
    dataset = SegmentationDataset.from_root(tmp_path, "train", CLASSES, scan="headers")
    assert len(dataset) == 3 and not dataset.skipped
    (images / "c.png").unlink()  # gone after the data set was opened, as during a long run
    batch = collate([dataset[i] for i in range(3)])
    assert batch.names == ["a.png"] and batch.image.shape == (1, 3, 48, 64)
    skipped = dict(batch.skipped)
    assert str(images / "b.png") in skipped["b.png"] and "corrupt" in skipped["b.png"]
    assert str(images / "c.png") in skipped["c.png"] and "cannot read" in skipped["c.png"]
    assert SegmentationDataset.from_root(tmp_path, "train", CLASSES).names == ["a.png"]  # the full scan finds both


def test_no_usable_pair_and_missing_folders_are_errors(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        SegmentationDataset.from_root(tmp_path, "train", CLASSES)
    write_segmentation_dataset(tmp_path, "train", names=["only"], size=(40, 30))
    corrupt(tmp_path / "img_dir" / "train" / "only.png")
    with pytest.raises(DataError, match=r"no usable image/label pairs \(1 skipped; first: .*only.png: corrupt"):
        SegmentationDataset.from_root(tmp_path, "train", CLASSES)


def test_reduce_zero_label_as_mmseg(tmp_path):
    write_segmentation_dataset(tmp_path, "train", names=["x"], num_classes=7, size=(50, 40), reduce_zero_label=True)
    raw = np.asarray(Image.open(tmp_path / "ann_dir" / "train" / "x.png")).copy()
    raw[0, :3] = (0, 7, 255)
    Image.fromarray(raw).save(tmp_path / "ann_dir" / "train" / "x.png")
    dataset = SegmentationDataset.from_root(tmp_path, "train", PRESETS["loveda"].classes, reduce_zero_label=True)
    label = dataset[0]["label"].numpy()
    expected = np.where((raw == 0) | (raw == 255), 255, raw.astype(int) - 1)  # 0 -> 255, v -> v - 1, 255 stays
    assert np.array_equal(label, expected) and label[0, 1] == 6
    raw[1, 1] = 8  # one past the 7 classes
    Image.fromarray(raw).save(tmp_path / "ann_dir" / "train" / "x.png")
    with pytest.raises(DataError, match=r"values 8 found; expected 0 \(no data\), 1-7"):
        SegmentationDataset.from_root(tmp_path, "train", PRESETS["loveda"].classes, reduce_zero_label=True)


def test_palette_masks_give_indices_and_colour_masks_are_refused(tmp_path):
    write_segmentation_dataset(tmp_path, "train", names=["p", "rgb"], size=(40, 30), label_mode="P")
    labels = tmp_path / "ann_dir" / "train"
    indices = np.asarray(Image.open(labels / "p.png"))
    Image.open(labels / "rgb.png").convert("RGB").save(labels / "rgb.png")  # the palette's colours
    dataset = SegmentationDataset.from_root(tmp_path, "train", CLASSES)
    assert dataset.names == ["p.png"]
    assert np.array_equal(dataset[0]["label"].numpy(), indices)
    assert "a colour (RGB) label map" in dataset.skipped[0].reason


def test_names_file_and_suffixes(tmp_path):
    write_segmentation_dataset(tmp_path, "train", names=["a", "b"], size=(20, 20), image_suffix=".jpg")
    (tmp_path / "list.txt").write_text("b\nmissing\n", encoding="utf-8")
    dataset = SegmentationDataset.from_root(tmp_path, "train", CLASSES, names_file=tmp_path / "list.txt")
    assert dataset.names == ["b.jpg"]
    assert [s.path for s in dataset.skipped] == ["missing"] and "listed, but no file" in dataset.skipped[0].reason


# ------------------------------------------------------------------------------------------------
# change detection: LEVIR-CD's layout


def test_change_pairs_stack_before_and_after_and_map_255_to_change(tmp_path):
    names = unicode_names(3, "变化")
    write_change_dataset(tmp_path / "LEVIR", "test", names=names, size=(97, 61))
    dataset = ChangeDataset.from_root(tmp_path / "LEVIR", "test")
    item = dataset[0]
    base = tmp_path / "LEVIR" / "test"
    to_tensor = lambda p: T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(Image.open(p)))  # noqa: E731
    assert item["image"].shape == (6, 61, 97)
    assert torch.allclose(item["image"][:3], to_tensor(base / "A" / item["name"]), atol=1e-5)
    assert torch.allclose(item["image"][3:], to_tensor(base / "B" / item["name"]), atol=1e-5)
    raw = np.asarray(Image.open(base / "label" / item["name"]))
    assert set(np.unique(raw)) == {0, 255}
    assert torch.equal(item["label"], torch.from_numpy(raw == 255).long())


def test_missing_after_image_and_bad_change_labels_are_skipped(tmp_path):
    write_change_dataset(tmp_path, None, names=["a", "b", "c", "d", "e"], size=(40, 32))
    (tmp_path / "B" / "b.png").unlink()
    Image.fromarray(np.full((32, 40), 128, np.uint8)).save(tmp_path / "label" / "c.png")
    write_change_dataset(tmp_path / "01", None, names=["d"], size=(40, 32), label_values=(0, 1))
    (tmp_path / "01" / "label" / "d.png").replace(tmp_path / "label" / "d.png")
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "B" / "e.png")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "test.txt").write_text("a\nb\nc\nd\ne\n")
    dataset = ChangeDataset.from_root(tmp_path, names_file=tmp_path / "list" / "test.txt")
    assert dataset.names == ["a.png", "d.png"]
    reasons = {s.path: s.reason for s in dataset.skipped}
    assert "after image in" in reasons[str(tmp_path / "A" / "b.png")]
    assert "values 128 found; expected 0 (unchanged) and 255 (changed), or 0 and 1" in reasons[str(tmp_path / "label" / "c.png")]
    assert "40x30 pixels; expected 40x32" in reasons[str(tmp_path / "B" / "e.png")]
    assert set(dataset[1]["label"].unique().tolist()) == {0, 1}  # a 0/1 file is read as it is


def test_change_folders_can_be_renamed(tmp_path):
    write_change_dataset(tmp_path, "train", names=["x"], folders=("Image1", "Image2", "OUT"))
    dataset = ChangeDataset.from_root(tmp_path, "train", folders=("Image1", "Image2", "OUT"))
    assert dataset.names == ["x.png"]


# ------------------------------------------------------------------------------------------------
# augmentations


def test_random_resize_follows_mmcv_rescale():
    image = np.zeros((250, 333, 3), np.uint8)
    for seed in range(5):
        out = RandomResize((512, 512), (0.5, 2.0))(Sample([image], np.zeros((250, 333), np.uint8)), np.random.default_rng(seed))
        ratio = np.random.default_rng(seed).random() * 1.5 + 0.5
        bound = int(512 * ratio)  # scale (512, 512) times the ratio; the long edge 333 bounds
        factor = min(bound / 333, bound / 250)
        assert out.size == (int(250 * factor + 0.5), int(333 * factor + 0.5))
        assert out.label.shape == out.size


class CountingGenerator:
    def __init__(self, seed):
        self.rng, self.integer_draws = np.random.default_rng(seed), 0

    def integers(self, *args, **kwargs):
        self.integer_draws += 1
        return self.rng.integers(*args, **kwargs)


def test_random_crop_redraws_while_one_class_dominates():
    label = np.zeros((100, 100), np.uint8)
    label[:, 60:] = 1
    label[:5] = 255  # ignored pixels are not a class
    position = np.arange(100 * 100, dtype=np.int64).reshape(100, 100)
    image = np.stack([position // 256 % 256, position % 256, np.zeros_like(position)], axis=2).astype(np.uint8)
    crop = RandomCrop((40, 40), cat_max_ratio=0.75)

    def balanced(window):
        values, counts = np.unique(window[window != 255], return_counts=True)
        return len(values) > 1 and counts.max() / counts.sum() < 0.75

    redrawn = 0
    for seed in range(20):
        out = crop(Sample([image], label), np.random.default_rng(seed))
        replay = np.random.default_rng(seed)  # upstream's loop: a draw, then up to 10 checks and redraws
        for attempt in range(11):
            top, left = int(replay.integers(0, 61)), int(replay.integers(0, 61))
            if attempt == 10 or balanced(label[top : top + 40, left : left + 40]):
                break
        redrawn += attempt > 0
        corner = int(out.images[0][0, 0, 0]) * 256 + int(out.images[0][0, 0, 1])
        assert (corner // 100, corner % 100) == (top, left) and out.size == (40, 40)
        assert np.array_equal(out.label, label[top : top + 40, left : left + 40])
    assert redrawn > 5
    uniform = CountingGenerator(0)  # one class everywhere: no crop can pass; 1 + 10 draws, then give up
    out = crop(Sample([image], np.zeros((100, 100), np.uint8)), uniform)
    assert out.size == (40, 40) and uniform.integer_draws == 2 * 11


def test_geometric_draws_are_shared_by_both_dates_and_the_label():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (70, 90, 3)).astype(np.uint8)
    label = (image[..., 0] > 127).astype(np.uint8)
    no_photometric = change_train_pipeline((48, 48), cat_max_ratio=1.0, rotate_prob=0.0, photometric=None,
                                           mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))
    rotating = change_train_pipeline((48, 48), rotate_prob=1.0, photometric=None)
    for seed in range(6):
        out = no_photometric(Sample([image, image.copy()], label), np.random.default_rng(seed))
        assert np.array_equal(out.images[0], out.images[1])
        assert np.array_equal(out.label, (out.images[0][..., 0] > 127).astype(np.uint8))  # still aligned
        turned = rotating(Sample([image, image.copy()], label), np.random.default_rng(seed))
        assert np.array_equal(turned.images[0], turned.images[1]) and turned.label.shape == (48, 48)


def test_photometric_distortion_draws_for_each_date():
    image = np.random.default_rng(0).integers(0, 256, (20, 20, 3)).astype(np.uint8)
    distort = PhotoMetricDistortion(10, (0.8, 1.2), (0.8, 1.2), 10)
    outs = [distort(Sample([image, image.copy()], None), np.random.default_rng(seed)) for seed in range(8)]
    assert any(not np.array_equal(o.images[0], o.images[1]) for o in outs)  # opencd: independent per image


def test_hsv_is_opencv_8_bit_hsv():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 30, 3)).astype(np.uint8)
    hsv = rgb_to_hsv(image)
    for (r, g, b), (h, s, v) in zip(image.reshape(-1, 3)[:200], hsv.reshape(-1, 3)[:200]):
        eh, es, ev = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)  # the standard library as the oracle
        assert v == max(r, g, b) and abs(int(s) - round(es * 255)) <= 1
        assert min(abs(int(h) - round(eh * 180) % 180), 180 - abs(int(h) - round(eh * 180) % 180)) <= 1
    back = hsv_to_rgb(hsv)
    for (h, s, v), rgb in zip(hsv.reshape(-1, 3)[:200], back.reshape(-1, 3)[:200]):
        expected = colorsys.hsv_to_rgb(int(h) * 2 / 360, int(s) / 255, int(v) / 255)
        assert np.abs(rgb.astype(int) - np.round(np.array(expected) * 255)).max() <= 1
    # a round trip loses at most half a hue step (1 degree): V * 1/60 of a sector, 255/60 < 5 levels
    assert np.abs(back.astype(int) - image).max() <= 5


def test_normalize_then_pad_fill_zero_and_ignore():
    image = np.full((10, 12, 3), 200, np.uint8)
    out = Pad((16, 16))(Normalize()(Sample([image], np.ones((10, 12), np.uint8)), None), None)
    assert out.size == (16, 16)
    assert np.allclose(out.images[0][:10, :12], (200 / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), atol=1e-5)
    assert (out.images[0][10:] == 0).all() and (out.label[10:] == 255).all() and (out.label[:, 12:] == 255).all()


def test_training_samples_are_a_function_of_seed_epoch_and_index(tmp_path):
    write_segmentation_dataset(tmp_path, "train", names=["a", "b", "c"], size=(333, 250))
    pipeline = train_pipeline(crop_size=128, scale=256)
    dataset = SegmentationDataset.from_root(tmp_path, "train", CLASSES, pipeline, seed=7)
    first = [dataset[i] for i in range(3)]
    again = [dataset[i] for i in reversed(range(3))][::-1]  # another order, as other workers would
    for x, y in zip(first, again):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        assert x["image"].shape == (3, 128, 128) and x["label"].shape == (128, 128)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["image"], first[0]["image"])
    other_seed = SegmentationDataset.from_root(tmp_path, "train", CLASSES, pipeline, seed=8)
    assert not torch.equal(other_seed[0]["image"], first[0]["image"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate)
    dataset.set_epoch(0)
    batch = next(iter(loader))
    assert torch.equal(batch.image[0], first[0]["image"]) and batch.names == ["a.png", "b.png"]


def test_collate_pads_to_the_largest_with_zero_and_ignore(tmp_path):
    write_segmentation_dataset(tmp_path, "val", names=["small", "wide"], sizes=[(20, 30), (50, 10)])
    dataset = SegmentationDataset.from_root(tmp_path, "val", CLASSES)
    batch = collate([dataset[0], dataset[1]])
    assert batch.image.shape == (2, 3, 30, 50) and batch.label.shape == (2, 30, 50)
    assert batch.image_sizes == [(30, 20), (10, 50)]
    assert (batch.image[0, :, :, 20:] == 0).all() and (batch.label[0, :, 20:] == 255).all()
    assert (batch.label[1, 10:] == 255).all()
    assert torch.equal(batch.label[1, :10], dataset[1]["label"])
