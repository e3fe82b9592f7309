"""The retrieval commands as a user runs them: features -> index build -> search -> evaluate."""

import csv
import json

from PIL import Image

from retrieval_testing import make_image_tree
from vitp.cli import main


def test_features_index_search_evaluate(tmp_path, vit_file, capsys):
    make_image_tree(tmp_path / "gallery", per_class=5, seed=1)
    make_image_tree(tmp_path / "query", per_class=2, seed=2)
    (tmp_path / "gallery" / "disk" / "broken.png").write_bytes(b"\x89PNG\r\n")
    common = ["--vit_checkpoint", str(vit_file), "--num_workers", "0", "--no_progress", "--device", "cpu"]

    assert main(["features", "--image_dir", str(tmp_path / "gallery"), "--output", str(tmp_path / "g.npz"), *common]) == 0
    out = capsys.readouterr().out
    assert "找到 16 张图像" in out and "skipped 1 unreadable files" in out and "特征形状: (15, 64)" in out
    assert main(["features", "--image_dir", str(tmp_path / "query"), "--output", str(tmp_path / "q.npz"), *common]) == 0

    assert main(["index", "build", "--features", str(tmp_path / "g.npz"), "--output", str(tmp_path / "g.index"),
                 "--no_progress"]) == 0
    capsys.readouterr()

    query = sorted((tmp_path / "query" / "square").glob("*.png"))[0]
    assert main(["search", "--index", str(tmp_path / "g.index"), "--image", str(query), "-k", "3", "--no_progress",
                 "--num_workers", "0", "--output", str(tmp_path / "r.json"), "--output", str(tmp_path / "r.csv"),
                 "--contact_sheet", str(tmp_path / "sheet.png")]) == 0
    out = capsys.readouterr().out
    assert f"query {query}" in out
    results = json.loads((tmp_path / "r.json").read_text())["queries"]
    assert len(results) == 1 and [r["rank"] for r in results[0]["results"]] == [1, 2, 3]
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [row["path"] for row in rows] == [r["path"] for r in results[0]["results"]]
    assert Image.open(tmp_path / "sheet.png").size[0] > 4 * 128

    # A folder of queries, searched through their features, gives the same answer as through images.
    assert main(["search", "--index", str(tmp_path / "g.index"), "--image", str(tmp_path / "query"), "-k", "2",
                 "--no_progress", "--num_workers", "0", "--output", str(tmp_path / "images.json")]) == 0
    assert main(["search", "--index", str(tmp_path / "g.index"), "--query_features", str(tmp_path / "q.npz"), "-k", "2",
                 "--output", str(tmp_path / "features.json")]) == 0
    by_images = json.loads((tmp_path / "images.json").read_text())["queries"]
    by_features = json.loads((tmp_path / "features.json").read_text())["queries"]
    assert len(by_images) == 6
    assert [[r["path"] for r in q["results"]] for q in by_images] == [[r["path"] for r in q["results"]] for q in by_features]

    capsys.readouterr()
    assert main(["evaluate", "--query_features", str(tmp_path / "q.npz"), "--gallery_features", str(tmp_path / "g.npz"),
                 "--top_k", "1", "3", "5", "--output", str(tmp_path / "eval.json"), "--plot", str(tmp_path / "pc.png"),
                 "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "Top-1 准确率: " in out and "Top-5 accuracy: " in out and "mAP: " in out and "(full ranking" in out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["num_evaluated"] == 6 and len(report["per_class"]) == 3
    assert main(["evaluate", "--index", str(tmp_path / "g.index"), "--query_features", str(tmp_path / "q.npz"),
                 "--qe", "2", "--no_progress"]) == 0
    assert main(["evaluate", "--gallery_features", str(tmp_path / "g.npz"), "--leave_one_out", "--pca", "8",
                 "--whiten", "--dba", "2", "--qe", "2", "--qe_alpha", "3", "--no_progress"]) == 0


def test_features_of_another_layer_are_refused_with_a_message(tmp_path, vit_file, capsys):
    make_image_tree(tmp_path / "gallery", per_class=2)
    common = ["--image_dir", str(tmp_path / "gallery"), "--vit_checkpoint", str(vit_file), "--num_workers", "0",
              "--no_progress", "--device", "cpu"]
    assert main(["features", "--output", str(tmp_path / "g.npz"), *common]) == 0
    assert main(["features", "--output", str(tmp_path / "q.npz"), "--select_layer", "1", *common]) == 0
    assert main(["index", "build", "--features", str(tmp_path / "g.npz"), "--output", str(tmp_path / "idx"),
                 "--no_progress"]) == 0
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "idx"), "--query_features", str(tmp_path / "q.npz")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "layer: 1 in query features" in error and "2 in " in error
    assert main(["evaluate", "--query_features", str(tmp_path / "q.npz"), "--gallery_features",
                 str(tmp_path / "g.npz")]) == 2
    assert "different feature settings" in capsys.readouterr().err


def test_search_with_another_model_is_refused(tmp_path, vit_file, capsys):
    from vitp import build_vit, save_vit

    make_image_tree(tmp_path / "gallery", per_class=2)
    assert main(["features", "--image_dir", str(tmp_path / "gallery"), "--output", str(tmp_path / "g.npz"),
                 "--vit_checkpoint", str(vit_file), "--num_workers", "0", "--no_progress"]) == 0
    assert main(["index", "build", "--features", str(tmp_path / "g.npz"), "--output", str(tmp_path / "idx"),
                 "--no_progress"]) == 0
    save_vit(build_vit("internvit-tiny"), tmp_path / "other.safetensors")
    capsys.readouterr()
    query = sorted((tmp_path / "gallery" / "disk").glob("*.png"))[0]
    assert main(["search", "--index", str(tmp_path / "idx"), "--image", str(query), "--no_progress", "--num_workers", "0",
                 "--vit_checkpoint", str(tmp_path / "other.safetensors")]) == 2
    error = capsys.readouterr().err
    assert "model_fingerprint" in error and "other.safetensors" in error


def _random_gallery(tmp_path, count=40, classes=4):
    """A features file of random unit vectors in `classes` class folders (no ViT needed)."""
    import numpy as np

    from vitp.retrieval.feature_file import FeatureSet, save_features
    from vitp.retrieval.rerank import l2_normalise

    rng = np.random.default_rng(0)
    paths = np.array([f"/data/c{i % classes}/{i:03d}.png" for i in range(count)])
    settings = {"model_fingerprint": "sha256:x", "layer": 1, "pool": "mean", "image_size": 112}
    features = FeatureSet(l2_normalise(rng.normal(size=(count, 8)).astype(np.float32)), paths,
                          np.array([f"c{i % classes}" for i in range(count)]), settings)
    return save_features(features, tmp_path / "g.npz")


def test_search_printing_and_contact_sheet_follow_the_flags(tmp_path, capsys):
    gallery = _random_gallery(tmp_path)
    assert main(["index", "build", "--features", str(gallery), "--output", str(tmp_path / "i"), "--no_progress"]) == 0
    search = ["search", "--index", str(tmp_path / "i"), "--query_features", str(gallery), "-k", "2"]
    capsys.readouterr()

    assert main([*search, "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("query /data/") == 2 and "... 38 more queries (no output file holds them)" in out
    assert main([*search, "--show", "2", "--output", str(tmp_path / "r.csv")]) == 0
    assert "... 38 more queries (all of them are in the output files" in capsys.readouterr().out

    assert main([*search, "--show", "0", "--contact_sheet", str(tmp_path / "none.png")]) == 2
    assert "must be >= 1" in capsys.readouterr().err and not (tmp_path / "none.png").exists()
    assert main([*search, "--contact_sheet", str(tmp_path / "sheet.xyz")]) == 2
    assert "cannot write a picture named .xyz" in capsys.readouterr().err

    assert main([*search, "--show", "1", "--contact_sheet", str(tmp_path / "sheet.jpg")]) == 0
    with Image.open(tmp_path / "sheet.jpg") as sheet:
        assert sheet.format == "JPEG"
