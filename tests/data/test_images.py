"""Image decoding safety, InternVL's transform and dynamic tiling (against a brute force of the rule)."""

import numpy as np
import pytest
import torch
from PIL import Image

from vitp.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    build_transform,
    candidate_grids,
    choose_grid,
    dynamic_preprocess,
    iter_image_files,
    jpeg_reencode,
    load_image,
    pixel_values,
)


def gradient_image(width, height):
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


# ------------------------------------------------------------------------------------------------
# Decoding


def test_png_and_jpeg_decode_to_rgb(tmp_path):
    gradient_image(40, 30).convert("L").save(tmp_path / "grey.png")
    gradient_image(40, 30).save(tmp_path / "colour.jpg")
    for name in ("grey.png", "colour.jpg"):
        image = load_image(tmp_path / name)
        assert image.mode == "RGB" and image.size == (40, 30)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    array = np.linspace(0, 4000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(array).save(tmp_path / "band.tif")
    image = np.asarray(load_image(tmp_path / "band.tif"))
    assert image.min() == 0 and image.max() == 255 and len(np.unique(image)) > 100


def test_float_images_with_nan_nodata_keep_their_contrast(tmp_path):
    array = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    array[:8] = np.nan  # a "no data" border
    Image.fromarray(array, mode="F").save(tmp_path / "band.tif")
    image = np.asarray(load_image(tmp_path / "band.tif"))[..., 0]
    assert (image[:8] == 0).all()
    assert image[8:].min() == 0 and image[8:].max() == 255 and len(np.unique(image[8:])) > 100


def test_a_float_image_of_only_nan_is_refused(tmp_path):
    Image.fromarray(np.full((16, 16), np.nan, np.float32), mode="F").save(tmp_path / "nodata.tif")
    with pytest.raises(ImageError, match="no valid pixels") as err:
        load_image(tmp_path / "nodata.tif")
    assert err.value.path.endswith("nodata.tif")


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"this is a text file, not an image", "not an image"),
    ],
)
def test_bad_files_raise_with_a_reason(tmp_path, content, reason):
    (tmp_path / "bad.jpg").write_bytes(content)
    with pytest.raises(ImageError, match=reason) as err:
        load_image(tmp_path / "bad.jpg")
    assert err.value.path.endswith("bad.jpg")


def test_truncated_image(tmp_path):
    gradient_image(200, 200).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(tmp_path / "cut.png")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    Image.new("L", (3000, 3000)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"too large: 3000x3000 = 9000000 pixels > limit 1000000"):
        load_image(tmp_path / "big.png", max_pixels=1_000_000)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "nope.png")


def test_image_files_are_found_recursively_in_a_stable_order(tmp_path):
    for name in ("b/2.PNG", "a/1.jpg", "a/deep/3.tiff", "a/notes.txt", ".hidden/4.jpg", "c/5.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in iter_image_files(tmp_path)]
    assert found == ["a/1.jpg", "a/deep/3.tiff", "b/2.PNG", "c/5.webp"]


# ------------------------------------------------------------------------------------------------
# Transform


def test_transform_is_bicubic_resize_then_imagenet_normalisation():
    image = gradient_image(50, 30)
    tensor = build_transform(28)(image)
    expected = np.asarray(image.resize((28, 28), Image.BICUBIC), dtype=np.float32) / 255.0
    expected = (expected - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert tensor.shape == (3, 28, 28)
    assert torch.allclose(tensor, torch.from_numpy(expected).permute(2, 0, 1).float(), atol=1e-5)


def test_jpeg_reencode_changes_pixels_but_not_size():
    image = gradient_image(64, 48)
    degraded = jpeg_reencode(image, quality=75)
    assert degraded.size == image.size
    assert not np.array_equal(np.asarray(degraded), np.asarray(image))


# ------------------------------------------------------------------------------------------------
# Dynamic tiling


def brute_force_grid(width, height, min_num, max_num, image_size):
    """The rule, stated independently: among grids in increasing tile count (upstream's order), keep
    the first with the smallest |aspect difference|, and let a later exact tie replace it only when
    the image has more than half the pixels of that grid."""
    aspect = width / height
    ordered = sorted(
        {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
         if min_num <= i * j <= max_num},
        key=lambda g: g[0] * g[1],
    )
    differences = [abs(aspect - c / r) for c, r in ordered]
    tied = [grid for grid, difference in zip(ordered, differences) if difference == min(differences)]
    best = tied[0]
    for columns, rows in tied[1:]:
        if width * height > 0.5 * image_size * image_size * columns * rows:
            best = (columns, rows)
    return best


SIZES = [(w, h) for w in (60, 224, 448, 500, 896, 1000, 1344, 2000, 3000) for h in (60, 224, 448, 600, 896, 1500)]


@pytest.mark.parametrize("min_num, max_num", [(1, 1), (1, 6), (1, 12), (2, 6), (4, 9)])
def test_grid_choice_matches_the_rule_on_a_grid_of_sizes(min_num, max_num):
    for width, height in SIZES:
        assert choose_grid(width, height, min_num, max_num, 448) == brute_force_grid(
            width, height, min_num, max_num, 448
        ), (width, height)


def test_tie_rule_prefers_the_larger_grid_only_for_large_images():
    # aspect 1 ties between (1,1), (2,2), (3,3): a small square image stays 1 tile, a large one grows
    assert choose_grid(448, 448, 1, 12, 448) == (1, 1)
    assert choose_grid(700, 700, 1, 12, 448) == (2, 2)
    assert choose_grid(1400, 1400, 1, 12, 448) == (3, 3)


def test_candidate_grids_are_ordered_by_tile_count():
    grids = candidate_grids(1, 6)
    assert [c * r for c, r in grids] == sorted(c * r for c, r in grids)
    assert len(grids) == len(set(grids)) == 14


def test_tiles_are_row_major_crops_of_the_resized_image_plus_thumbnail():
    image = gradient_image(900, 450)  # aspect 2 -> 2 columns x 1 row
    tiles = dynamic_preprocess(image, min_num=1, max_num=6, image_size=56, use_thumbnail=True)
    assert len(tiles) == 3 and all(t.size == (56, 56) for t in tiles)
    resized = np.asarray(image.resize((112, 56), Image.BICUBIC))
    assert np.array_equal(np.asarray(tiles[0]), resized[:, :56])
    assert np.array_equal(np.asarray(tiles[1]), resized[:, 56:])
    assert np.array_equal(np.asarray(tiles[2]), np.asarray(image.resize((56, 56), Image.BICUBIC)))
    tall = dynamic_preprocess(gradient_image(100, 300), min_num=1, max_num=6, image_size=28, use_thumbnail=False)  # 1 column x 3 rows
    assert len(tall) == 3
    assert np.asarray(tall[0]).mean(axis=(0, 1))[1] < np.asarray(tall[2]).mean(axis=(0, 1))[1]


def test_single_tile_has_no_thumbnail():
    assert len(dynamic_preprocess(gradient_image(100, 100), min_num=1, max_num=6, image_size=112, use_thumbnail=True)) == 1


def test_pixel_values_stack_tiles():
    tiles = dynamic_preprocess(gradient_image(300, 100), min_num=1, max_num=6, image_size=28, use_thumbnail=True)
    values = pixel_values(tiles, 28)
    assert values.shape == (len(tiles), 3, 28, 28)
