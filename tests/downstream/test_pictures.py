"""Pictures of predictions: palette PNGs that read back as indices, and the overlay contact sheet."""

import numpy as np
import pytest
from PIL import Image

from downstream_testing import SIXTEEN_CLASSES, corrupt, palette
from vitp.downstream.data import ClassTable, SegmentationDataset
from vitp.downstream.pictures import OverlayRow, blend, colour_mask, write_overlay_sheet, write_palette_png
from vitp.errors import RetrievalError

CLASSES = ClassTable.from_names(SIXTEEN_CLASSES, palette(16))


def test_palette_png_reads_back_as_indices_with_the_class_colours(tmp_path):
    mask = np.random.default_rng(0).integers(0, 16, (250, 333)).astype(np.uint8)
    mask[:3] = 255
    path = write_palette_png(mask, tmp_path / "预测" / "图 1.png", CLASSES)
    with Image.open(path) as image:
        assert image.mode == "P"
        assert np.array_equal(np.asarray(image), mask)
        rgb = np.asarray(image.convert("RGB"))
    assert np.array_equal(rgb, colour_mask(mask, CLASSES))
    assert tuple(rgb[10, 10]) == CLASSES.palette[mask[10, 10]] and tuple(rgb[0, 0]) == (0, 0, 0)
    # the data set reads a written prediction back as the same label map
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((250, 333, 3), np.uint8)).save(tmp_path / "img" / "图 1.png")
    assert np.array_equal(SegmentationDataset(tmp_path / "img", tmp_path / "预测", CLASSES)[0]["label"].numpy(), mask)


def test_palette_png_refuses_other_formats_and_values(tmp_path):
    with pytest.raises(ValueError, match="must end in .png"):
        write_palette_png(np.zeros((4, 4), np.uint8), tmp_path / "x.jpg", CLASSES)
    with pytest.raises(ValueError, match="outside 0-255"):
        write_palette_png(np.full((4, 4), 300), tmp_path / "x.png", CLASSES)
    with pytest.raises(ValueError, match="2-D map"):
        write_palette_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "x.png", CLASSES)


def test_blend_mixes_class_colours_and_leaves_ignored_pixels():
    image = np.full((2, 3, 3), 100, np.uint8)
    mask = np.array([[0, 1, 255], [2, 2, 2]], np.uint8)
    mixed = blend(image, mask, CLASSES, alpha=0.25)
    expected = np.round(0.75 * 100 + 0.25 * np.array(CLASSES.palette[1], float))
    assert np.array_equal(mixed[0, 1], expected) and np.array_equal(mixed[0, 2], image[0, 2])
    assert np.array_equal(blend(image, mask, CLASSES, alpha=1.0)[1, 0], CLASSES.palette[2])


def test_overlay_sheet_draws_rows_columns_errors_and_a_legend(tmp_path):
    rng = np.random.default_rng(1)
    label = rng.integers(0, 16, (250, 333)).astype(np.uint8)
    prediction = label.copy()
    prediction[:, :100] = (label[:, :100] + 1) % 16  # wrong on the left
    image_path = tmp_path / "图像 1.png"
    Image.fromarray(np.full((250, 333, 3), 90, np.uint8)).save(image_path)
    Image.fromarray(np.zeros((250, 333, 3), np.uint8)).save(tmp_path / "坏.png")
    broken = corrupt(tmp_path / "坏.png")
    rows = [
        OverlayRow("图像 1.png", [image_path], prediction, label, caption="IoU 61.2"),
        OverlayRow("坏.png", [broken], prediction, label),
    ]
    tile = 128
    path = write_overlay_sheet(rows, CLASSES, tmp_path / "sheets" / "overlay.png", tile=tile, alpha=1.0)
    sheet = np.asarray(Image.open(path).convert("RGB"))
    columns = 4  # image, label, prediction, errors
    assert sheet.shape[1] == 8 + columns * (tile + 8)
    top = 8 + 14  # margin, column title
    panel_h = round(250 * tile / 333)
    label_panel = sheet[top : top + panel_h, 8 + (tile + 8) : 8 + (tile + 8) + tile]
    small_label = np.asarray(Image.fromarray(label).resize((tile, panel_h), Image.NEAREST))
    assert np.array_equal(label_panel, colour_mask(small_label, CLASSES))  # alpha 1: the label's colours
    errors = sheet[top : top + panel_h, 8 + 3 * (tile + 8) : 8 + 3 * (tile + 8) + tile]
    red = (errors == (200, 50, 50)).all(axis=2)
    assert red[:, :30].mean() > 0.9 and red[:, 50:].mean() < 0.05
    second_top = top + panel_h + 28 + 14
    unreadable = sheet[second_top : second_top + panel_h, 8 : 8 + tile]
    assert (unreadable == 200).all()  # the corrupt image is a grey stand-in; its row is still drawn
    assert sheet.shape[0] > 8 + 2 * (14 + panel_h + 28)  # the legend is below the rows


def test_change_rows_show_both_dates_and_sizes_must_match(tmp_path):
    before = np.zeros((61, 97, 3), np.uint8)
    after = np.full((61, 97, 3), 255, np.uint8)
    change = np.zeros((61, 97), np.uint8)
    change[10:20, 10:30] = 1
    classes = ClassTable.from_names(["unchanged", "changed"], [[0, 0, 0], [255, 255, 255]])
    path = write_overlay_sheet([OverlayRow("x.png", [before, after], change, change)], classes, tmp_path / "cd.jpg", tile=64)
    assert Image.open(path).format == "JPEG" and Image.open(path).width == 8 + 5 * (64 + 8)
    with pytest.raises(ValueError, match="x.png: image 1 is 97x61 but the prediction is 96x61"):
        write_overlay_sheet([OverlayRow("x.png", [before], change[:, :96])], classes, tmp_path / "bad.png")
    with pytest.raises(RetrievalError, match="cannot write a picture named .txt"):
        write_overlay_sheet([OverlayRow("x.png", [before], change)], classes, tmp_path / "sheet.txt")
