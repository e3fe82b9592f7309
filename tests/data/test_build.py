"""`vitp data build` and `vitp tokenizer train`: class folders -> instruction JSONL that passes the checks."""

import json
from collections import Counter

import pytest

from vitp.cli import main
from vitp.data.build import BuildError, build_instructions, format_value
from vitp.data.check import check_data
from vitp.data.dataset import DataSettings
from vitp.data.tokenizer import load_tokenizer

from conftest import save_image

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
    settings = DataSettings(force_image_size=28, num_image_token=4, max_dynamic_patch=4, system_message="s")
    report = check_data(tmp_path / "out" / "meta.json", settings, tokenizer, progress=False)
    assert report.ok and not report.warnings and report.datasets[0].usable == 40


def test_layout_errors(tmp_path):
    save_image(tmp_path / "flat" / "a.png", 10, 10)
    with pytest.raises(BuildError, match="not inside a class folder"):
        build_instructions(tmp_path / "flat", tmp_path / "out", progress=False)
    save_image(tmp_path / "one" / "only" / "a.png", 10, 10)
    with pytest.raises(BuildError, match="at least 2 classes"):
        build_instructions(tmp_path / "one", tmp_path / "out", progress=False)


def test_value_wording():
    assert format_value("water_fraction", 0.372) == "37%"
    assert format_value("tree_count", 12.0) == "12"
    assert format_value("ndvi_mean", 0.4567) == "0.457"
    assert format_value("season", "winter") == "winter"
