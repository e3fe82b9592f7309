"""`vitp data build` and `vitp tokenizer train`: class folders -> instruction JSONL that passes the checks."""

import json
import re
from collections import Counter

import pytest

from vitp.cli import main
from vitp.data.build import build_instructions, format_value, holdout_count
from vitp.data.check import check_data
from vitp.data.tokenizer import load_tokenizer
from vitp.errors import DataError

from data_testing import save_image, settings

CLASSES = ("open_water", "dense_forest", "farmland", "marsh")


@pytest.fixture
def class_folders(tmp_path):
    root = tmp_path / "scenes"
    for c, label in enumerate(CLASSES):
        for i in range(10):
            save_image(root / label / f"{i}.png", 32 + i, 32, seed=c * 100 + i)
    (root / "farmland" / "corrupt.png").write_bytes(b"garbage")
    (tmp_path / "attrs.csv").write_text(
        "image,water_fraction,field_count\nopen_water/0.png,0.93,0\nfarmland/3.png,0.05,12\nnot/there.png,1,1\n"
    )
    return root


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_writes_varied_balanced_conversations(class_folders, tmp_path):
    result = build_instructions(class_folders, tmp_path / "out", metadata=tmp_path / "attrs.csv",
                                holdout_fraction=0.2, seed=3, progress=False)
    assert result.classes == {"dense_forest": 10, "farmland": 10, "marsh": 10, "open_water": 10}
    assert (result.train, result.holdout) == (32, 8)
    assert len(result.skipped) == 1 and "corrupt.png" in result.skipped[0]
    assert result.unmatched_metadata == 1
    lines = read_lines(tmp_path / "out" / "scenes.jsonl")
    holdout = read_lines(tmp_path / "out" / "scenes_holdout.jsonl")
    assert Counter(line["image"].split("/")[0] for line in holdout) == {label: 2 for label in CLASSES}
    assert not {l["image"] for l in lines} & {l["image"] for l in holdout}

    questions = [turn["value"] for line in lines for turn in line["conversations"] if turn["from"] == "human"]
    assert all(line["conversations"][0]["value"].startswith("<image>\n") for line in lines)
    assert sum("<image>" in q for q in questions) == len(lines)
    assert len({q.split("\n")[-1] for q in questions}) >= 10  # several phrasings of each kind
    answers = [turn["value"] for line in lines for turn in line["conversations"] if turn["from"] == "gpt"]
    yes = sum(a.startswith("Yes") for a in answers)
    no = sum(a.startswith("No") for a in answers)
    assert yes + no == len(lines) and abs(yes - no) <= 1
    assert sum(a[:3] in ("A. ", "B. ", "C. ", "D. ") for a in answers) == len(lines)  # one multiple choice each

    farmland_3 = next(l for l in lines + holdout if l["image"] == "farmland/3.png")
    text = json.dumps(farmland_3["conversations"])
    assert "water fraction" in text and "5%" in text and "12" in text

    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["scenes"]["length"] == 32 and meta["scenes"]["annotation"] == "scenes.jsonl"


def test_same_seed_same_data(class_folders, tmp_path):
    build_instructions(class_folders, tmp_path / "a", seed=7, progress=False)
    build_instructions(class_folders, tmp_path / "b", seed=7, progress=False)
    build_instructions(class_folders, tmp_path / "c", seed=8, progress=False)
    a, b, c = ((tmp_path / d / "scenes.jsonl").read_text() for d in "abc")
    assert a == b and a != c


def test_built_data_passes_the_checks_and_trains_a_tokenizer(class_folders, tmp_path, capsys):
    assert main(["data", "build", "--image_dir", str(class_folders), "--output_dir", str(tmp_path / "out"),
                 "--metadata", str(tmp_path / "attrs.csv")]) == 0
    assert "skipped" in capsys.readouterr().out
    assert main(["tokenizer", "train", "--meta_path", str(tmp_path / "out" / "meta.json"),
                 "--output_dir", str(tmp_path / "tok"), "--vocab_size", "320"]) == 0
    tokenizer = load_tokenizer(tmp_path / "tok")
    assert len(tokenizer) == 320
    for token in ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"):
        assert tokenizer.tokenize(f"a{token}b")[1] == token
    custom = settings(num_image_token=4, max_dynamic_patch=4, system_message="s")
    report = check_data(tmp_path / "out" / "meta.json", custom, tokenizer, progress=False)
    assert report.ok and not report.warnings and report.datasets[0].usable == 40


def test_layout_errors(tmp_path):
    save_image(tmp_path / "flat" / "a.png", 10, 10)
    with pytest.raises(DataError, match="not inside a class folder"):
        build_instructions(tmp_path / "flat", tmp_path / "out", progress=False)
    save_image(tmp_path / "one" / "only" / "a.png", 10, 10)
    with pytest.raises(DataError, match="at least 2 classes"):
        build_instructions(tmp_path / "one", tmp_path / "out", progress=False)


def test_value_wording():
    assert format_value("water_fraction", 0.372) == "37%"
    assert format_value("tree_count", 12.0) == "12"
    assert format_value("ndvi_mean", 0.4567) == "0.457"
    assert format_value("season", "winter") == "winter"


def small_set(tmp_path, classes=("a", "b"), per_class=3):
    root = tmp_path / "set"
    for c, label in enumerate(classes):
        for i in range(per_class):
            save_image(root / label / f"{i}.png", 8, 8, seed=c * 10 + i)
    return root


def test_rebuild_without_holdout_removes_the_old_split_but_no_other_file(tmp_path):
    root, out = small_set(tmp_path, per_class=4), tmp_path / "out"
    build_instructions(root, out, holdout_fraction=0.5, progress=False)
    assert (out / "set_holdout.jsonl").exists() and (out / "meta_holdout.json").exists()
    (out / "notes.txt").write_text("mine")
    (out / "other.jsonl").write_text("{}\n")

    result = build_instructions(root, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "notes.txt", "other.jsonl", "set.jsonl"]
    assert sorted(p.name for p in result.removed) == ["meta_holdout.json", "set_holdout.jsonl"]
    assert len(read_lines(out / "set.jsonl")) == 8


def test_rebuild_under_another_name_removes_the_old_names_files(tmp_path):
    root, out = small_set(tmp_path, per_class=4), tmp_path / "out"
    build_instructions(root, out, name="old", holdout_fraction=0.5, progress=False)
    build_instructions(root, out, name="new", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "new.jsonl"]


@pytest.mark.parametrize("size, fraction, held",
                         [(3, 0.9, 2), (3, 0.5, 1), (1, 0.99, 0), (100, 0.29, 29), (10, 0.2, 2)])
def test_holdout_count_rounds_down_and_keeps_a_training_image(size, fraction, held):
    assert holdout_count(size, fraction) == held


def test_large_holdout_fraction_still_trains_on_every_class(tmp_path):
    result = build_instructions(small_set(tmp_path), tmp_path / "out", holdout_fraction=0.9, progress=False)
    assert (result.train, result.holdout) == (2, 4) and result.holdout_per_class == {"a": 2, "b": 2}
    assert Counter(line["image"][0] for line in read_lines(tmp_path / "out" / "set.jsonl")) == {"a": 1, "b": 1}
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["set"]["length"] == 2
    assert any("a 2 of 3, b 2 of 3" in note for note in result.notes)


def test_exact_holdout_fraction_needs_no_note(tmp_path):
    result = build_instructions(small_set(tmp_path, per_class=4), tmp_path / "out", holdout_fraction=0.5,
                                progress=False)
    assert result.holdout_per_class == {"a": 2, "b": 2} and not result.notes


def test_class_whose_images_are_all_unreadable_is_dropped(tmp_path):
    root = small_set(tmp_path)
    (root / "broken").mkdir()
    (root / "broken" / "x.png").write_bytes(b"garbage")
    result = build_instructions(root, tmp_path / "out", progress=False)
    assert result.classes == {"a": 3, "b": 3} and result.dropped_classes == ["broken"]
    assert "broken" not in (tmp_path / "out" / "set.jsonl").read_text()
    assert any("broken" in note for note in result.notes)

    (root / "b").rename(tmp_path / "b_elsewhere")  # one real class left: not enough
    with pytest.raises(DataError, match=r"1 class folder\(s\) with usable images \(broken dropped.*at least 2"):
        build_instructions(root, tmp_path / "out", progress=False)


def write_metadata(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("name, content, message", [
    ("attrs.csv", "image,v,w\na/0.png,1\n", r"attrs.csv:2: 2 field\(s\) but the header has 3"),
    ("attrs.csv", "image,v\na/0.png,1,2\n", r"attrs.csv:2: 3 field\(s\) but the header has 2"),
    ("attrs.csv", "image,place\na/0.png,Br\xe9sil\n".encode("latin-1"), r"attrs.csv:2: not UTF-8 text \(byte 0xe9\)"),
    ("attrs.csv", "image,water_fraction\na/0.png,0.5\na/1.png,abc\n",
     r"attrs.csv:3: column 'water_fraction': 'abc' is not a number"),
    ("attrs.csv", "image,water_fraction\na/0.png,1.5\n",
     r"attrs.csv:2: column 'water_fraction': 1.5 is not a fraction"),
    ("attrs.csv", "image,height\na/0.png,inf\n", r"attrs.csv:2: column 'height': inf is not a finite number"),
    ("attrs.csv", "image,v\na/0.png,1\n./a/0.png,2\n",
     r"attrs.csv:3: image 'a/0.png' is listed again \(first at .*attrs.csv:2\)"),
    ("attrs.csv", "image,v,v\na/0.png,1,2\n", r"attrs.csv:1: column 'v' appears twice"),
    ("attrs.csv", "image,v\na/0.png,1\n ,2\n", r"attrs.csv:3: no image path"),
    ("attrs.json", '{"a/0.png": {"v": 1},\n "a/1.png": 5}', r"attrs.json:2: image 'a/1.png': expected an object"),
    ("attrs.json", '{"a/0.png": {"nested": {"x": [1, 2]}}}',
     r"attrs.json:1: image 'a/0.png': key 'nested': a nested value"),
    ("attrs.json", '[{"image": "a/0.png", "x": 1}, {"noimage": 1}]',
     r"attrs.json: list item 2: expected an object with an 'image'"),
    ("attrs.json", '"a/0.png"', r"attrs.json: expected a list of objects"),
])
def test_bad_metadata_is_an_error_naming_file_line_and_column(tmp_path, name, content, message):
    path = write_metadata(tmp_path, name, content)
    with pytest.raises(DataError, match=message):
        build_instructions(small_set(tmp_path), tmp_path / "out", metadata=path, progress=False)
    assert not (tmp_path / "out").exists()


def test_every_metadata_problem_is_listed_at_once(tmp_path):
    path = write_metadata(tmp_path, "attrs.csv", "image,water_fraction\na/0.png,abc\na/1.png,2\n")
    with pytest.raises(DataError, match=r"2 problem\(s\)(.|\n)*attrs.csv:2: (.|\n)*attrs.csv:3: "):
        build_instructions(small_set(tmp_path), tmp_path / "out", metadata=path, progress=False)


def test_missing_metadata_file_is_a_clean_command_line_error(tmp_path, capsys):
    code = main(["data", "build", "--image_dir", str(small_set(tmp_path)), "--output_dir", str(tmp_path / "out"),
                 "--metadata", str(tmp_path / "nope.csv")])
    assert code == 2 and "nope.csv: metadata file not found" in capsys.readouterr().err


def test_metadata_gaps_are_left_out_and_counted(tmp_path):
    path = write_metadata(tmp_path, "attrs.csv",
                          "\ufeffimage,water_fraction,season\na/0.png,0.25,NaN\na/1.png,,winter\nb/0.png,nan,\n")
    result = build_instructions(small_set(tmp_path), tmp_path / "out", metadata=path, progress=False)
    text = (tmp_path / "out" / "set.jsonl").read_text()
    assert "25%" in text and "winter" in text and not re.search(r"\bnan\b", text, re.IGNORECASE)
    assert result.missing_metadata_values == 4 and result.unmatched_metadata == 0
    assert result.without_metadata == 3  # a/2, b/1, b/2
    assert any("3 image(s) have no metadata row" in note for note in result.notes)


def test_json_nan_and_null_are_left_out(tmp_path):
    path = write_metadata(tmp_path, "attrs.json", '{"a/0.png": {"depth": NaN, "season": null, "count": 3}}')
    result = build_instructions(small_set(tmp_path), tmp_path / "out", metadata=path, progress=False)
    text = (tmp_path / "out" / "set.jsonl").read_text()
    assert "count" in text and "depth" not in text and "season" not in text
    assert result.missing_metadata_values == 2
