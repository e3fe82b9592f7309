"""`vitp data check`: every bad-input kind is reported with its file and line; counts per dataset."""

import json

import pytest

from vitp.cli import main
from vitp.data.check import check_data
from vitp.data.dataset import DataSettings
from vitp.data.tokenizer import save_tokenizer

from conftest import conversation, save_image, write_dataset

SETTINGS = DataSettings(force_image_size=28, num_image_token=4, max_dynamic_patch=6, max_seq_length=4096,
                        system_message="s")


@pytest.fixture
def messy_dataset(tmp_path):
    images = tmp_path / "images"
    save_image(images / "ok.png", 60, 30)
    (images / "broken.png").parent.mkdir(parents=True, exist_ok=True)
    (images / "broken.png").write_bytes(b"not a png")
    (tmp_path / "outside.png").write_bytes(b"x")
    lines = [
        {"image": "ok.png", "conversations": conversation()},                          # 1 fine
        "{not json",                                                                    # 2
        {"image": "ok.png"},                                                            # 3 missing key
        {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},  # 4 order
        {"image": ["ok.png", "ok.png"], "conversations": conversation("<image> one", "x")},  # 5 count
        {"image": "nowhere.png", "conversations": conversation()},                      # 6 missing image
        {"image": "broken.png", "conversations": conversation()},                       # 7 unreadable
        {"image": "../outside.png", "conversations": conversation()},                   # 8 escapes root
        {"conversations": conversation("text only", "fine")},                           # 9 fine
    ]
    return write_dataset(tmp_path, lines)


EXPECTED = {
    2: "invalid JSON", 3: "missing key 'conversations'", 4: "turn 1: expected 'human'",
    5: "1 <image> placeholder(s) for 2 image(s)", 6: "image 'nowhere.png' not found",
    7: "image 'broken.png': not an image", 8: "escapes the dataset root",
}


def test_every_problem_names_file_line_and_reason(messy_dataset):
    report = check_data(messy_dataset, SETTINGS, progress=False)
    assert len(report.problems) == len(EXPECTED)
    for problem, (line, reason) in zip(report.problems, sorted(EXPECTED.items())):
        assert f"ds.jsonl:{line}: " in problem and reason in problem, problem
    (counts,) = report.datasets
    assert (counts.lines, counts.usable, counts.images) == (9, 2, 1)
    assert counts.tiles == 3  # 60x30 -> 2x1 + thumbnail
    assert counts.dropped["missing image"] == 1 and counts.dropped["unreadable image"] == 1
    assert sum(counts.dropped.values()) == 7


def test_truncation_is_found_with_a_tokenizer(tmp_path, bpe_tokenizer):
    save_image(tmp_path / "images" / "wide.png", 300, 100)
    lines = [
        {"image": "wide.png", "conversations": conversation()},
        {"conversations": conversation("hi", "A harbour with many boats. " * 30)},
    ]
    meta_path = write_dataset(tmp_path, lines)
    settings = DataSettings(force_image_size=28, num_image_token=16, max_dynamic_patch=6, max_seq_length=60,
                            system_message="s")
    report = check_data(meta_path, settings, bpe_tokenizer, progress=False)
    (problem,) = report.problems
    assert "ds.jsonl:1: " in problem and "would cut image 1" in problem
    (warning,) = report.warnings
    assert "ds.jsonl:2: " in warning and "truncated to max_seq_length 60" in warning
    assert report.datasets[0].truncated == 1 and report.datasets[0].tokens == 60


def test_broken_meta_entry_is_reported_and_others_still_checked(tmp_path):
    meta_path = write_dataset(tmp_path, [{"conversations": conversation("hi", "ho")}])
    meta = json.loads(meta_path.read_text())
    meta["gone"] = {"root": "images", "annotation": "gone.jsonl"}
    meta_path.write_text(json.dumps(meta))
    report = check_data(meta_path, SETTINGS, progress=False)
    assert len(report.problems) == 1 and "dataset 'gone'" in report.problems[0]
    assert report.datasets[0].usable == 1


def test_cli_prints_problems_and_table_and_exits_non_zero(messy_dataset, tmp_path, bpe_tokenizer, capsys):
    save_tokenizer(bpe_tokenizer, tmp_path / "tok")
    code = main(["data", "check", str(messy_dataset), "--tokenizer", str(tmp_path / "tok"),
                 "--force_image_size", "28", "--max_dynamic_patch", "6"])
    captured = capsys.readouterr()
    assert code == 1
    assert "ds.jsonl:7: image 'broken.png': not an image" in captured.out
    assert "dataset  lines  usable" in captured.out and "7 problem(s) found" in captured.err


def test_cli_clean_data_exits_zero(tmp_path, capsys):
    save_image(tmp_path / "images" / "ok.png", 30, 30)
    meta_path = write_dataset(tmp_path, [{"image": "ok.png", "conversations": conversation()}])
    assert main(["data", "check", str(meta_path)]) == 0
    assert "no problems found" in capsys.readouterr().out
