"""Meta JSON and JSONL reading: indexing, validation messages naming file and line."""

import json

import pytest

from vitp.data.meta import JsonlIndex, MetaError, SampleError, epoch_indices, parse_sample, read_meta

from conftest import conversation, write_dataset


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
    ],
)
def test_meta_errors_name_the_dataset_and_key(tmp_path, entry, message):
    write_dataset(tmp_path, [{"conversations": conversation("hi", "ho")}])
    meta_path = tmp_path / "bad_meta.json"
    meta_path.write_text(json.dumps({"broken": entry}))
    with pytest.raises(MetaError, match=message) as err:
        read_meta(meta_path)
    assert "dataset 'broken'" in str(err.value)


def test_invalid_meta_json_names_the_line(tmp_path):
    (tmp_path / "meta.json").write_text('{\n "a": {\n  "root": x\n }\n}')
    with pytest.raises(MetaError, match="invalid JSON at line 3"):
        read_meta(tmp_path / "meta.json")


def test_repeat_time_fraction_keeps_the_first_lines_and_whole_numbers_repeat(tmp_path):
    meta_path = write_dataset(tmp_path, [{"conversations": conversation("hi", "ho")}] * 10, repeat_time=0.3)
    (spec,) = read_meta(meta_path)
    assert list(epoch_indices(spec, 10)) == [0, 1, 2]
    assert list(epoch_indices(spec.__class__(**{**spec.__dict__, "repeat_time": 2.0}), 3)) == [0, 1, 2, 0, 1, 2]


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
