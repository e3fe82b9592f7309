"""Meta JSON and JSONL reading: indexing, validation messages naming file and line."""

import json
import logging

import pytest

from vitp.data.meta import (
    JsonlIndex,
    SampleError,
    epoch_indices,
    parse_sample,
    read_meta,
    require_samples_per_epoch,
    samples_per_epoch,
)
from vitp.errors import DataError

from data_testing import conversation, write_dataset


def test_jsonl_index_gives_random_access_with_real_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"n": 1}\n\n{"n": 2}\n   \n{"n": 3}\n')
    index = JsonlIndex(path)
    assert len(index) == 3
    assert json.loads(index.raw(2)) == {"n": 3} and index.where(2) == f"{path}:5"
    assert [where for where, _ in index] == [f"{path}:1", f"{path}:3", f"{path}:5"]


def test_meta_fields_and_relative_paths(tmp_path):
    meta_path = write_dataset(tmp_path, [{"conversations": conversation("hi", "ho")}], repeat_time=0.5, max_dynamic_patch=6)
    (spec,) = read_meta(meta_path)
    assert spec.name == "ds" and spec.root == (tmp_path / "images").resolve()
    assert spec.repeat_time == 0.5 and spec.max_dynamic_patch == 6


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"annotation": "ds.jsonl"}, "missing key 'root'"),
        ({"root": "images", "annotation": "nope.jsonl"}, "annotation 'nope.jsonl' not found"),
        ({"root": "images", "annotation": "ds.jsonl", "repeat_time": 2.5}, "whole number of repeats"),
        ({"root": "images", "annotation": "ds.jsonl", "repeat_time": 0}, "positive number"),
        ({"root": "images", "annotation": "ds.jsonl", "max_dynamic_patch": 0}, "positive integer"),
        # bool("false") is True: a string must not switch augmentation on
        ({"root": "images", "annotation": "ds.jsonl", "data_augment": "false"}, "'data_augment' must be true or false"),
        ({"root": "images", "annotation": "ds.jsonl", "length": "abc"}, "'length' must be an integer >= 0"),
        ({"root": "images", "annotation": "ds.jsonl", "length": -1}, "'length' must be an integer >= 0"),
        ({"root": "images", "annotation": "ds.jsonl", "repeat_time": float("inf")}, "finite positive number"),
        ({"root": "images", "annotation": "ds.jsonl", "repeat_time": float("nan")}, "finite positive number"),
        ({"root": "images", "annotation": "ds.jsonl", "repeat_time": 10**400}, "finite positive number"),
    ],
)
def test_meta_errors_name_the_dataset_and_key(tmp_path, entry, message):
    write_dataset(tmp_path, [{"conversations": conversation("hi", "ho")}])
    meta_path = tmp_path / "bad_meta.json"
    meta_path.write_text(json.dumps({"broken": entry}))
    with pytest.raises(DataError, match=message) as err:
        read_meta(meta_path)
    assert "dataset 'broken'" in str(err.value)


def test_repeat_time_written_as_1e400_is_refused(tmp_path):
    write_dataset(tmp_path, [{"conversations": conversation("hi", "ho")}])
    (tmp_path / "meta.json").write_text('{"big": {"root": "images", "annotation": "ds.jsonl", "repeat_time": 1e400}}')
    with pytest.raises(DataError, match="dataset 'big': 'repeat_time' must be a finite positive number"):
        read_meta(tmp_path / "meta.json")


def test_meta_with_a_byte_order_mark_is_read(tmp_path):
    meta_path = write_dataset(tmp_path, [{"conversations": conversation("hi", "ho")}])
    meta_path.write_text(meta_path.read_text(), encoding="utf-8-sig")
    assert meta_path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert [spec.name for spec in read_meta(meta_path)] == ["ds"]


def test_unknown_meta_keys_are_warned_about_with_the_closest_known_key(tmp_path, caplog):
    meta_path = write_dataset(tmp_path, [{"conversations": conversation("hi", "ho")}], repeat_times=3, data_augmnet=True)
    with caplog.at_level(logging.WARNING, logger="vitp"):
        (spec,) = read_meta(meta_path)
    assert spec.repeat_time == 1 and spec.data_augment is False  # ignored, as upstream does
    assert "dataset 'ds': unknown key 'repeat_times' is ignored (did you mean 'repeat_time'?)" in caplog.text
    assert "unknown key 'data_augmnet' is ignored (did you mean 'data_augment'?)" in caplog.text


def test_invalid_meta_json_names_the_line(tmp_path):
    (tmp_path / "meta.json").write_text('{\n "a": {\n  "root": x\n }\n}')
    with pytest.raises(DataError, match="invalid JSON at line 3"):
        read_meta(tmp_path / "meta.json")


def test_repeat_time_fraction_keeps_the_first_lines_and_whole_numbers_repeat(tmp_path):
    meta_path = write_dataset(tmp_path, [{"conversations": conversation("hi", "ho")}] * 10, repeat_time=0.3)
    (spec,) = read_meta(meta_path)
    assert list(epoch_indices(spec, 10)) == [0, 1, 2]
    assert list(epoch_indices(spec.__class__(**{**spec.__dict__, "repeat_time": 2.0}), 3)) == [0, 1, 2, 0, 1, 2]


def test_samples_per_epoch_matches_the_indices_an_epoch_uses(tmp_path):
    (spec,) = read_meta(write_dataset(tmp_path, [{"conversations": conversation("hi", "ho")}]))
    for repeat_time in (0.01, 0.3, 0.5, 1.0, 3.0):
        changed = spec.__class__(**{**spec.__dict__, "repeat_time": repeat_time})
        for lines in (0, 1, 7, 10):
            assert samples_per_epoch(changed, lines) == len(epoch_indices(changed, lines))


def test_no_samples_per_epoch_is_a_data_error_naming_each_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "empty.jsonl").write_text("\n\n")
    meta_path = write_dataset(tmp_path, [{"conversations": conversation("hi", "ho")}] * 5, repeat_time=0.1)
    meta = json.loads(meta_path.read_text())
    meta["empty"] = {"root": "images", "annotation": "empty/empty.jsonl"}
    meta_path.write_text(json.dumps(meta))
    specs = read_meta(meta_path)
    with pytest.raises(DataError) as err:
        require_samples_per_epoch(specs)
    message = str(err.value)
    assert "no samples per epoch" in message
    assert "dataset 'ds': repeat_time 0.1 of 5 line(s) keeps int(5 x 0.1) = 0" in message
    assert "dataset 'empty': annotation" in message and "has no non-empty lines" in message


def test_one_empty_dataset_among_others_is_only_a_warning(tmp_path, caplog):
    meta_path = write_dataset(tmp_path, [{"conversations": conversation("hi", "ho")}] * 5, repeat_time=2)
    meta = json.loads(meta_path.read_text())
    meta["tiny"] = {**meta["ds"], "repeat_time": 0.1}
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="vitp"):
        assert require_samples_per_epoch(read_meta(meta_path)) == 10
    assert "dataset 'tiny' contributes no samples per epoch" in caplog.text
    assert require_samples_per_epoch(read_meta(meta_path), line_counts=[3, 40]) == 3 * 2 + 4


BAD_LINES = [
    ('{"image": "a.jpg", "conversations": [', "invalid JSON", "invalid JSON"),
    ('["not", "an", "object"]', "expected a JSON object", "missing keys"),
    ('{"image": "a.jpg"}', "missing key 'conversations'", "missing keys"),
    ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]}',
     "turn 3: expected 'human', found 'gpt'", "wrong roles or order"),
    ('{"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "a"}]}',
     "turn 1: expected 'human', found 'gpt'", "wrong roles or order"),
    ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}, {"from": "system", "value": "s"}]}',
     "a system turn is only allowed first", "wrong roles or order"),
    ('{"conversations": [{"from": "human", "value": "hi"}]}', "the last turn is from 'human'", "wrong roles or order"),
    ('{"conversations": [{"from": "user", "value": "hi"}, {"from": "gpt", "value": "a"}]}', "turn 1: expected", "wrong roles or order"),
    ('{"image": ["a.jpg", "b.jpg"], "conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "a"}]}',
     "1 <image> placeholder(s) for 2 image(s)", "image count"),
    ('{"conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "a"}]}',
     "placeholder(s) but no 'image'", "image count"),
    ('{"image": "a.jpg", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}]}',
     "assistant (gpt) turn", "image count"),
    ('{"image": "../outside.jpg", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}]}',
     "escapes the dataset root", "path escapes root"),
    ('{"image": "/etc/passwd", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}]}',
     "is absolute", "path escapes root"),
    # JSON accepts an unpaired surrogate escape; the tokenizer and UTF-8 writers do not
    (r'{"conversations": [{"from": "human", "value": "A \ud800"}, {"from": "gpt", "value": "a"}]}',
     "turn 1: lone surrogate '\\ud800'", "invalid text"),
    (r'{"image": "a\udc80.jpg", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}]}',
     "image path: lone surrogate", "invalid text"),
    ('{"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\\nWhat?"}, {"from": "gpt", "value": "a"}]}',
     "video samples are not supported", "video"),
]


@pytest.mark.parametrize("line, message, kind", BAD_LINES)
def test_bad_lines_are_reported_with_file_and_line(line, message, kind):
    with pytest.raises(SampleError) as err:
        parse_sample(line, "data/x.jsonl:7")
    assert str(err.value).startswith("data/x.jsonl:7: ") and message in str(err.value)
    assert err.value.kind == kind


def test_valid_lines():
    text_only = parse_sample(json.dumps({"conversations": conversation("hi", "ho")}), "f:1")
    assert text_only.images == () and text_only.system is None
    with_system = parse_sample(
        json.dumps({"image": "a.jpg", "conversations": [{"from": "system", "value": "S"}] + conversation("no tag", "x")}),
        "f:2",
    )
    assert with_system.system == "S" and with_system.images == ("a.jpg",)
    multi = parse_sample(
        json.dumps({"image": ["a.jpg", "b.jpg"], "conversations": conversation("<image><image> diff?", "x")}), "f:3"
    )
    assert multi.images == ("a.jpg", "b.jpg")
