"""`vitp data check`: every bad-input kind is reported with its file and line; counts per dataset."""

import json

import pytest

from vitp.cli import main
from vitp.data.check import check_data, validate_data_settings
from vitp.data.meta import read_meta
from vitp.data.tokenizer import save_tokenizer
from vitp.errors import ConfigError

from data_testing import conversation, save_image, settings, write_dataset

SETTINGS = settings(num_image_token=4, max_dynamic_patch=6, max_seq_length=4096,
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
    custom = settings(num_image_token=16, max_dynamic_patch=6, max_seq_length=60,
                            system_message="s")
    report = check_data(meta_path, custom, bpe_tokenizer, progress=False)
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


def test_unknown_meta_key_is_a_problem_naming_dataset_key_and_closest_key(tmp_path, capsys):
    meta_path = write_dataset(tmp_path, [{"conversations": conversation("hi", "ho")}], repeat_times=3)
    report = check_data(meta_path, SETTINGS, progress=False)
    assert report.problems == [
        f"{meta_path}: dataset 'ds': unknown key 'repeat_times' is ignored (did you mean 'repeat_time'?)"
    ]
    assert main(["data", "check", str(meta_path)]) == 1
    assert "no problems found" not in capsys.readouterr().out


def test_length_that_differs_from_the_annotation_is_a_warning(tmp_path):
    meta_path = write_dataset(tmp_path, [{"conversations": conversation("hi", "ho")}] * 3, length=12000)
    report = check_data(meta_path, SETTINGS, progress=False)
    assert report.ok  # upstream never uses 'length': the real lines are what an epoch draws from
    (warning,) = report.warnings
    assert "dataset 'ds': 'length' is 12000 but the annotation has 3 non-empty line(s)" in warning
    assert report.datasets[0].per_epoch == 3


def test_meta_value_errors_are_problems_not_tracebacks(tmp_path):
    meta_path = write_dataset(tmp_path, [{"conversations": conversation("hi", "ho")}], data_augment="false")
    report = check_data(meta_path, SETTINGS, progress=False)
    assert "dataset 'ds': 'data_augment' must be true or false" in report.problems[0]


@pytest.mark.parametrize(
    "lines, repeat_time, reason",
    [
        ([], 1, "has no non-empty lines"),
        ([{"conversations": conversation("hi", "ho")}] * 5, 0.1, "repeat_time 0.1 of 5 line(s) keeps int(5 x 0.1) = 0"),
        (["{broken"], 1, "none of the lines an epoch uses is usable"),
    ],
)
def test_dataset_without_samples_per_epoch_is_a_problem(tmp_path, capsys, lines, repeat_time, reason):
    meta_path = write_dataset(tmp_path, lines, repeat_time=repeat_time)
    report = check_data(meta_path, SETTINGS, progress=False)
    assert any("dataset 'ds': 0 samples per epoch: " in problem and reason in problem for problem in report.problems)
    assert "no dataset contributes a usable sample per epoch" in report.problems[-1]
    assert main(["data", "check", str(meta_path)]) == 1
    assert "no problems found" not in capsys.readouterr().out


def test_one_empty_dataset_is_a_problem_even_when_others_have_samples(tmp_path):
    meta_path = write_dataset(tmp_path, [{"conversations": conversation("hi", "ho")}] * 5)
    meta = json.loads(meta_path.read_text())
    meta["tiny"] = {**meta["ds"], "repeat_time": 0.1}
    meta_path.write_text(json.dumps(meta))
    report = check_data(meta_path, SETTINGS, progress=False)
    (problem,) = report.problems
    assert "dataset 'tiny': 0 samples per epoch" in problem


def test_lone_surrogate_is_a_dropped_line_not_a_tokenizer_crash(tmp_path, bpe_tokenizer):
    lines = [r'{"conversations": [{"from": "human", "value": "A \ud800"}, {"from": "gpt", "value": "a"}]}',
             {"conversations": conversation("hi", "ho")}]
    report = check_data(write_dataset(tmp_path, lines), SETTINGS, bpe_tokenizer, progress=False)
    (problem,) = report.problems
    assert "ds.jsonl:1: turn 1: lone surrogate" in problem
    assert report.datasets[0].dropped == {"invalid text": 1} and report.datasets[0].usable == 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_dynamic_patch", "0"], "max_dynamic_patch 0 is below min_dynamic_patch 1"),
        (["--min_dynamic_patch", "3", "--max_dynamic_patch", "2"], "max_dynamic_patch 2 is below min_dynamic_patch 3"),
        (["--min_dynamic_patch", "0"], "min_dynamic_patch must be at least 1"),
        (["--force_image_size", "0"], "force_image_size must be a positive number of pixels"),
        (["--force_image_size", "450"], "force_image_size 450 is not a multiple of the patch size 14 (try 448 or 462)"),
        (["--patch_size", "0"], "patch_size must be a positive number of pixels"),
        (["--force_image_size", "14"], "would become 0 image tokens"),
        (["--max_seq_length", "0"], "max_seq_length must be at least 1"),
    ],
)
def test_impossible_data_settings_are_refused_before_reading_data(tmp_path, capsys, flags, message):
    meta_path = write_dataset(tmp_path, [{"conversations": conversation("hi", "ho")}])
    assert main(["data", "check", str(meta_path), *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err
    assert "dataset  lines" not in captured.out


def test_dataset_max_dynamic_patch_below_the_global_minimum(tmp_path):
    meta_path = write_dataset(tmp_path, [{"conversations": conversation("hi", "ho")}], max_dynamic_patch=2)
    custom = settings(num_image_token=4, min_dynamic_patch=3, max_dynamic_patch=6)
    report = check_data(meta_path, custom, progress=False)
    assert "dataset 'ds': its max_dynamic_patch 2 is below min_dynamic_patch 3" in report.problems[0]
    with pytest.raises(ConfigError, match="max_dynamic_patch 2 is below"):
        validate_data_settings(custom, patch_size=14, specs=read_meta(meta_path))
    validate_data_settings(SETTINGS, patch_size=14, specs=read_meta(meta_path))  # fine: no error
