"""The demo's pixel task: labels follow the documented priority, the data set keeps val crops away
from gallery blocks and loads as mmseg's layout, the RGB baseline is a real classifier keyed by the
data set's names, and the report's verdicts follow the paired intervals."""

import numpy as np
import pytest
import torch
from PIL import Image

from vitp.demo import pixels
from vitp.demo.scene import Scene, classify_pixels
from vitp.downstream.data import ClassTable, SegmentationDataset
from vitp.downstream.metrics import SEGMENTATION, DenseEvaluation, ImageAreas, image_areas, paired_comparison

# (blue, green, red, nir, swir) reflectances of each kind of pixel, against scene.classify_pixels' rules,
# and the class index the module's table gives it.
KINDS = {
    "water": ((0.07, 0.08, 0.03, 0.01, 0.005), 0),  # MNDWI 0.88
    "vegetation": ((0.03, 0.08, 0.04, 0.40, 0.20), 1),  # NDVI 0.82
    "wetland": ((0.09, 0.10, 0.08, 0.10, 0.04), 2),  # MNDWI 0.43, NDVI 0.11
    "sand": ((0.20, 0.22, 0.25, 0.28, 0.30), 3),  # bright, B11 0.3, NDVI 0.06
    "bare_soil": ((0.07, 0.09, 0.12, 0.18, 0.14), 4),  # NDVI 0.2, MNDWI < 0, B11 below sand's 0.15
    "mixed": ((0.06, 0.08, 0.10, 0.233, 0.20), 255),  # NDVI 0.4: no rule holds
    "wet_sand": ((0.25, 0.30, 0.28, 0.30, 0.16), 3),  # sand and wetland (MNDWI 0.30): sand wins
    "floating_vegetation": ((0.05, 0.20, 0.02, 0.20, 0.01), 0),  # water and vegetation: water wins
}
NAMES = list(KINDS)


def scene_of(kinds: np.ndarray, noise: float = 0.0, seed: int = 0) -> Scene:
    """A scene whose pixel (y, x) has the bands of kind ``NAMES[kinds[y, x]]``."""
    bands = np.array([KINDS[name][0] for name in NAMES], dtype=np.float32)[kinds]  # H x W x 5
    bands = bands + np.random.default_rng(seed).normal(0, noise, bands.shape).astype(np.float32)
    scene = Scene(*(bands[..., i] for i in range(5)))
    classify_pixels(scene)
    return scene


def expected_labels(kinds: np.ndarray) -> np.ndarray:
    return np.array([KINDS[name][1] for name in NAMES], dtype=np.uint8)[kinds]


def test_every_pixel_gets_the_class_of_the_first_matching_rule_and_255_where_none_holds():
    kinds = np.arange(len(NAMES))[None, :]
    scene = scene_of(kinds)
    masks = scene.masks
    # the overlaps the priority resolves really occur in these pixels
    wet_sand, floating = NAMES.index("wet_sand"), NAMES.index("floating_vegetation")
    assert masks["sand"][0, wet_sand] and masks["wetland"][0, wet_sand]
    assert masks["water"][0, floating] and masks["vegetation"][0, floating]
    assert not any(mask[0, NAMES.index("mixed")] for mask in masks.values())

    labels = pixels.pixel_labels(scene)
    assert labels.dtype == np.uint8 and labels.shape == (1, len(NAMES))
    assert labels[0].tolist() == [0, 1, 2, 3, 4, 255, 3, 0]

    scene.masks = {}
    with pytest.raises(ValueError, match="classify_pixels"):
        pixels.pixel_labels(scene)


# Geometry of the layout test: blocks of 4 tiles of 8 px = 32 px, 8 px crops, a margin of one tile.
TILE, BLOCK_TILES, CROP = 8, 4, 8
BLOCK = TILE * BLOCK_TILES
HEIGHT, WIDTH = 3 * BLOCK + 20, 4 * BLOCK + 2  # a row of blocks cut to 20 px, a column cut to 2 px


def layout_kinds(seed: int = 0) -> np.ndarray:
    """Random classes in 4 x 4 cells, an overlap here and there, and the first (gallery) block all
    mixed pixels, so that its crops are skipped."""
    rng = np.random.default_rng(seed)
    choices = [NAMES.index(n) for n in ("water", "vegetation", "wetland", "sand", "bare_soil", "wet_sand")]
    cells = rng.choice(choices, size=(HEIGHT // 4 + 1, WIDTH // 4 + 1))
    kinds = np.repeat(np.repeat(cells, 4, axis=0), 4, axis=1)[:HEIGHT, :WIDTH]
    kinds[:BLOCK, :BLOCK] = NAMES.index("mixed")
    return kinds


def position(name: str) -> tuple[int, int]:
    top, left = name.removesuffix(".png").split("_")
    return int(top[1:]), int(left[1:])


def test_the_data_set_keeps_val_crops_off_gallery_blocks_and_loads_as_mmseg_layout(tmp_path):
    kinds = layout_kinds()
    scene = scene_of(kinds)
    root = tmp_path / "pixel données"
    summary = pixels.write_pixel_dataset(scene, root, crop=CROP, tile_size=TILE, block_tiles=BLOCK_TILES)

    classes = ClassTable.read(root / "classes.txt")
    assert classes.names == pixels.PIXEL_CLASSES and classes.palette == pixels.PIXEL_PALETTE
    train = SegmentationDataset.from_root(root, "train", classes)
    val = SegmentationDataset.from_root(root, "val", classes)
    assert not train.skipped and not val.skipped
    # By hand: 6 whole gallery blocks of 4 x 4 crops and 2 cut ones of 2 x 4, less the 16 of the mixed
    # block; 6 whole query blocks of 2 x 2 crops (32 - 2 x 8 = 16 px) and 2 cut ones of 1 x 2 (20 - 8 px).
    assert (len(train), len(val)) == (6 * 16 + 2 * 8 - 16, 6 * 4 + 2 * 2)
    assert summary["splits"]["train"]["crops"] == len(train) and summary["splits"]["val"]["crops"] == len(val)
    assert sorted(summary["splits"]["train"]["skipped_names"]) == sorted(
        f"y{y:04d}_x{x:04d}.png" for y in range(0, BLOCK, CROP) for x in range(0, BLOCK, CROP))
    assert summary["splits"]["val"]["skipped_mostly_ignored"] == 0

    # Block colours per pixel, computed here: (row of blocks + column of blocks) is even for gallery.
    rows, columns = np.indices((HEIGHT, WIDTH))
    gallery = (rows // BLOCK + columns // BLOCK) % 2 == 0
    rgb, labels = scene.rgb(), expected_labels(kinds)
    counts = {split: np.zeros(256, dtype=np.int64) for split in ("train", "val")}
    for split, dataset in (("train", train), ("val", val)):
        for name in dataset.names:
            top, left = position(name)
            window = (slice(top, top + CROP), slice(left, left + CROP))
            if split == "train":
                assert gallery[window].all(), name
            else:  # no gallery pixel within one tile of the crop
                near = (slice(max(0, top - TILE), top + CROP + TILE), slice(max(0, left - TILE), left + CROP + TILE))
                assert not gallery[near].any(), name
            image = np.asarray(Image.open(root / "img_dir" / split / name))
            label_file = Image.open(root / "ann_dir" / split / name)
            assert label_file.mode == "L"
            np.testing.assert_array_equal(image, rgb[window])
            np.testing.assert_array_equal(np.asarray(label_file), labels[window])
            counts[split] += np.bincount(labels[window].ravel(), minlength=256)
    assert max(position(n)[0] for n in train.names) == 3 * BLOCK + CROP  # the cut row of blocks is used
    for split in ("train", "val"):
        assert summary["splits"][split]["labelled_pixels"] == {c: int(counts[split][i])
                                                              for i, c in enumerate(pixels.PIXEL_CLASSES)}
        assert summary["splits"][split]["ignored_fraction"] == pytest.approx(counts[split][255] / counts[split].sum())
    assert (root / "pixel_dataset.json").is_file()
    np.testing.assert_array_equal(np.asarray(Image.open(root / "scene_labels.png")), labels)

    # Written again with larger crops: the split folders hold the new crops only.
    again = pixels.write_pixel_dataset(scene, root, crop=16, tile_size=TILE, block_tiles=BLOCK_TILES)
    assert len(list((root / "img_dir" / "train").iterdir())) == again["splits"]["train"]["crops"]
    assert all(position(p.name)[0] % 16 == 0 for p in (root / "ann_dir" / "train").iterdir())
    with pytest.raises(ValueError, match="margin"):
        pixels.write_pixel_dataset(scene, root, crop=20, tile_size=TILE, block_tiles=BLOCK_TILES)


def test_the_rgb_baseline_learns_colour_separable_classes_and_keys_images_by_the_data_sets_names(tmp_path):
    scene = scene_of(layout_kinds(seed=1), noise=0.002)
    root = tmp_path / "pixels"
    pixels.write_pixel_dataset(scene, root, crop=CROP, tile_size=TILE, block_tiles=BLOCK_TILES)
    before, threads = torch.random.get_rng_state(), torch.get_num_threads()
    evaluation = pixels.rgb_pixel_baseline(root, seed=3, steps=300, prediction_dir=tmp_path / "predicted")
    # the caller's generator did not move, and its thread count is back
    assert torch.equal(torch.random.get_rng_state(), before) and torch.get_num_threads() == threads

    val = SegmentationDataset.from_root(root, "val", pixels.PIXEL_CLASS_TABLE)
    assert evaluation.task == SEGMENTATION and list(evaluation.areas.names) == val.names
    assert evaluation.metrics["mIoU"] > 0.95
    # the predictions written are the ones scored
    for row, name in enumerate(val.names):
        predicted = np.asarray(Image.open(tmp_path / "predicted" / name))
        label = np.asarray(Image.open(root / "ann_dir" / "val" / name))
        scored = evaluation.areas.select(np.array([row]))
        np.testing.assert_array_equal(image_areas(predicted, label, len(pixels.PIXEL_CLASSES)),
                                      np.concatenate([scored.intersection, scored.predicted, scored.labelled]))
    again = pixels.rgb_pixel_baseline(root, seed=3, steps=300)
    np.testing.assert_array_equal(again.areas.stacked, evaluation.areas.stacked)


def test_the_rgb_baseline_takes_any_class_table_odd_sizes_and_unicode_paths(tmp_path):
    colours = [(r, g, b) for r in (30, 130, 230) for g in (30, 230) for b in (30, 230)][:12]
    classes = ClassTable.from_names([f"klasse_{i}" for i in range(12)], colours)
    root = tmp_path / "données ñ"
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 3)):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        for i in range(count):
            height, width = 23 + 6 * i, 37 - 4 * i
            label = rng.integers(0, 12, (height, width)).astype(np.uint8)
            label[0] = 255  # an ignored row
            image = np.asarray(colours)[np.minimum(label, 11)] + rng.normal(0, 4, (height, width, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "img_dir" / split / f"bild_{i}.png")
            Image.fromarray(label).save(root / "ann_dir" / split / f"bild_{i}.png")
    evaluation = pixels.rgb_pixel_baseline(root, classes, seed=0, steps=400)
    assert evaluation.areas.class_names == classes.names
    assert list(evaluation.areas.names) == ["bild_0.png", "bild_1.png", "bild_2.png"]
    assert evaluation.metrics["mIoU"] > 0.95


# ------------------------------------------------------------------------------------------------
# Report

CLASS_NAMES = pixels.PIXEL_CLASSES
TITLES = {"vitp": "fine-tuned ViTP", "rgb": "RGB MLP", "twin": "twin run"}


def areas_with_accuracy(accuracy: np.ndarray, labelled: int = 200) -> ImageAreas:
    """Images whose every class has ``labelled`` pixels, of which ``accuracy[image, class]`` are hit;
    the misses of class c are predicted as class c + 1."""
    n, classes = accuracy.shape
    labelled_areas = np.full((n, classes), labelled)
    hits = np.round(accuracy * labelled).astype(np.int64)
    predicted = hits + np.roll(labelled_areas - hits, 1, axis=1)
    return ImageAreas([f"y{i:04d}_x0000.png" for i in range(n)], hits, predicted, labelled_areas, CLASS_NAMES)


def evaluation_of(accuracy: np.ndarray) -> DenseEvaluation:
    evaluation = DenseEvaluation(SEGMENTATION, areas_with_accuracy(accuracy))
    evaluation.add_intervals(300, seed=0)
    return evaluation


def test_report_lines_give_intervals_and_name_a_method_only_where_the_difference_excludes_zero():
    n = 40
    vitp_accuracy = np.full((n, len(CLASS_NAMES)), 0.9)
    vitp_accuracy[::2] = 0.8
    rgb_accuracy = np.full((n, len(CLASS_NAMES)), 0.5)
    # Accurate on wetland and sand: wetland's misses (predicted as sand) no longer spoil sand, where the
    # baseline's IoU is higher on every image.
    rgb_accuracy[:, [CLASS_NAMES.index("wetland"), CLASS_NAMES.index("sand")]] = 0.97
    twin_accuracy = vitp_accuracy.copy()  # better on the first half of the images, worse on the second
    twin_accuracy[: n // 2] += 0.05
    twin_accuracy[n // 2 :] -= 0.05
    evaluations = {name: evaluation_of(a) for name, a in
                   (("vitp", vitp_accuracy), ("rgb", rgb_accuracy), ("twin", twin_accuracy))}
    comparisons = {
        "vitp-rgb": paired_comparison(evaluations["vitp"], evaluations["rgb"], 300, name_a="vitp", name_b="rgb"),
        "vitp-twin": paired_comparison(evaluations["vitp"], evaluations["twin"], 300, name_a="vitp", name_b="twin"),
    }
    lines = pixels.pixel_report_lines(evaluations, comparisons, TITLES)
    text = "\n".join(lines)

    def shown(interval, sign=""):
        return f"{100 * interval.value:{sign}.2f} [{100 * interval.low:{sign}.2f}, {100 * interval.high:{sign}.2f}]"

    for name, evaluation in evaluations.items():
        row = next(line for line in lines if line.startswith(f"| {TITLES[name]} |"))
        for metric in ("mIoU", "aAcc", "mAcc"):
            assert shown(evaluation.intervals.metrics[metric]) in row
    sand_row = next(line for line in lines if line.startswith("| sand |"))
    assert sand_row.count("[") == 3 and shown(evaluations["rgb"].intervals.per_class["sand"]["IoU"]) in sand_row
    assert shown(comparisons["vitp-rgb"].differences["mIoU"], "+") in text

    assert ("Against the RGB MLP: fine-tuned ViTP ahead on mIoU, aAcc, mAcc. Classes where the RGB MLP has a "
            "higher IoU than the fine-tuned ViTP: sand (measurably).") in text
    assert "Against the twin run: no measurable difference on mIoU, aAcc, mAcc." in text
    twin = comparisons["vitp-twin"].differences["mIoU"]
    assert twin.low < 0 < twin.high  # the construction does straddle zero

    console = pixels.pixel_console_lines(evaluations, comparisons, TITLES)
    assert any(line.strip().startswith("fine-tuned ViTP") and shown(evaluations["vitp"].intervals.metrics["mIoU"])
               in line for line in console)
    assert "  Against the RGB MLP: fine-tuned ViTP ahead on mIoU, aAcc, mAcc." in console


def test_report_lines_without_intervals_give_the_values_alone():
    evaluation = DenseEvaluation(SEGMENTATION, areas_with_accuracy(np.full((4, len(CLASS_NAMES)), 0.75)))
    lines = pixels.pixel_report_lines({"rgb": evaluation}, {}, TITLES)
    row = next(line for line in lines if line.startswith("| RGB MLP |"))
    assert "[" not in row and f"{100 * evaluation.metrics['mIoU']:.2f}" in row
    assert not any(line.startswith("Against") for line in lines)
