"""Output paths that cannot be written are refused before the work, and never leave temporary files."""

import pytest

from vitp.cli import main
from vitp.errors import ConfigError
from vitp.files import atomic_path, write_text

from test_retrieval_cli import _random_gallery


def test_a_failed_final_rename_removes_the_temporary_file(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="taken: cannot write it \\(it is a directory\\)"):
        with atomic_path(tmp_path / "taken") as tmp:
            tmp.write_text("results")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot create its folder"):
        write_text("results", tmp_path / "file" / "out.txt")


def test_features_output_that_is_a_directory_is_refused_before_any_image(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "out.npz").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("not an embedding store")
    missing_model = tmp_path / "no_such_vit.safetensors"  # not loaded: the output is checked first
    common = ["features", "--image_dir", str(tmp_path / "images"), "--vit_checkpoint", str(missing_model), "--no_progress"]
    assert main([*common, "--output", str(tmp_path / "out.npz")]) == 2
    assert f"output {tmp_path / 'out.npz'}: is a directory" in capsys.readouterr().err
    # A name without .npz is an embedding store folder: an existing folder of other things is never replaced.
    assert main([*common, "--output", str(tmp_path / "notes")]) == 2
    assert "exists and is not an embedding store" in capsys.readouterr().err
    assert (tmp_path / "notes" / "keep.txt").exists()


def test_search_and_evaluate_outputs_are_checked_before_the_work(tmp_path, capsys):
    gallery = _random_gallery(tmp_path)
    assert main(["index", "build", "--features", str(gallery), "--output", str(tmp_path / "i"), "--no_progress"]) == 0
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir.json").mkdir()
    search = ["search", "--index", str(tmp_path / "i"), "--query_features", str(gallery)]
    assert main([*search, "--output", str(tmp_path / "a_dir.json")]) == 2
    assert "a_dir.json: is a directory" in capsys.readouterr().err
    assert main([*search, "--contact_sheet", str(tmp_path / "a_file" / "sheet.png")]) == 2
    assert f"{tmp_path / 'a_file'} is a file, not a folder" in capsys.readouterr().err
    evaluate = ["evaluate", "--gallery_features", str(gallery), "--leave_one_out", "--no_progress"]
    assert main([*evaluate, "--output", str(tmp_path / "a_dir.json")]) == 2
    err = capsys.readouterr()
    assert "a_dir.json: is a directory" in err.err and "Top-1" not in err.out
    assert main(["index", "build", "--features", str(gallery), "--output", str(tmp_path / "a_file"),
                 "--no_progress"]) == 2
    assert "exists and is not a vitp index" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*.tmp"))
