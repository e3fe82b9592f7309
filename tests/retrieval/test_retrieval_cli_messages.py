"""What a user reads when a retrieval command meets an edge: a checkpoint of another network, K beyond
the gallery, long class names, a folder without class folders."""

import numpy as np

from retrieval_testing import make_image_tree
from vitp import build_vit, save_vit
from vitp.cli import main
from vitp_testing import draw_shape

COMMON = ["--num_workers", "0", "--device", "cpu"]


def gallery_index(tmp_path, vit_file, capsys, image_dir=None):
    image_dir = image_dir or tmp_path / "gallery"
    if not image_dir.exists():
        make_image_tree(image_dir, per_class=3)
    assert main(["features", "--image_dir", str(image_dir), "--output", str(tmp_path / "g.npz"),
                 "--vit_checkpoint", str(vit_file), *COMMON]) == 0
    assert main(["index", "build", "--features", str(tmp_path / "g.npz"), "--output", str(tmp_path / "g.index")]) == 0
    capsys.readouterr()
    return tmp_path / "g.index"


def test_a_checkpoint_of_another_network_is_named_as_such(tmp_path, vit_file, capsys):
    index = gallery_index(tmp_path, vit_file, capsys)
    other = tmp_path / "small.safetensors"
    save_vit(build_vit("internvit-small").eval(), other)
    query = next((tmp_path / "gallery" / "disk").glob("*.png"))
    code = main(["search", "--index", str(index), "--image", str(query), "--vit_checkpoint", str(other), *COMMON])
    err = capsys.readouterr().err
    assert code == 2
    assert "this checkpoint is not the index's model" in err and str(vit_file) in err
    assert len(err.strip().splitlines()) <= 2 and "config given" not in err


def test_k_beyond_the_gallery_is_said_once_and_top_k_beyond_it_is_left_out(tmp_path, vit_file, capsys):
    index = gallery_index(tmp_path, vit_file, capsys)  # 9 images
    query = next((tmp_path / "gallery" / "disk").glob("*.png"))
    assert main(["search", "--index", str(index), "--image", str(query), "-k", "1000", *COMMON]) == 0
    out = capsys.readouterr().out
    assert "-k 1000: the gallery has 9 images, so each query got at most 9 results" in out

    assert main(["evaluate", "--gallery_features", str(tmp_path / "g.npz"), "--leave_one_out", "--top_k", "1", "1000"]) == 0
    captured = capsys.readouterr()
    assert "--top_k 1000: the gallery has 9 images (8 per query" in captured.err and "left out" in captured.err
    assert "Top-1 accuracy" in captured.out and "Top-1000" not in captured.out and "P@1000" not in captured.out
    assert main(["evaluate", "--gallery_features", str(tmp_path / "g.npz"), "--leave_one_out", "--top_k", "9"]) == 2
    assert "give K values up to 8" in capsys.readouterr().err


def test_the_result_table_stays_aligned_with_long_class_names(tmp_path, vit_file, capsys):
    rng = np.random.default_rng(0)
    for label, colour in (("a", (200, 30, 30)), ("a_very_long_class_name_of_salt_marsh", (30, 200, 30))):
        (tmp_path / "gallery" / label).mkdir(parents=True)
        for i in range(3):
            draw_shape("ellipse", colour, rng).save(tmp_path / "gallery" / label / f"{i}.png")
    index = gallery_index(tmp_path, vit_file, capsys)
    assert main(["search", "--index", str(index), "--image", str(tmp_path / "gallery"), "-k", "6", *COMMON]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(rows) == 36
    assert len({line.index(str(tmp_path)) for line in rows}) == 1  # every path starts in the same column


def test_features_without_class_folders_says_so_and_evaluate_says_what_to_do(tmp_path, vit_file, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        draw_shape("ellipse", (200, 30, 30), rng).save(flat / f"{i}.png")
    assert main(["features", "--image_dir", str(flat), "--output", str(tmp_path / "g.npz"),
                 "--vit_checkpoint", str(vit_file), *COMMON]) == 0
    assert "note: one class only ('flat'" in capsys.readouterr().out
    assert main(["evaluate", "--gallery_features", str(tmp_path / "g.npz"), "--leave_one_out", "--top_k", "1"]) == 2
    assert "run `vitp features` again" in capsys.readouterr().err
