"""The upstream data formats: a meta JSON naming datasets, and JSONL files of conversations.

Meta JSON (InternVL / ViTP, unchanged)::

    {"my_rs_data": {"root": "images/", "annotation": "my_rs_data.jsonl",
                    "data_augment": false, "repeat_time": 1, "length": 12000,
                    "max_dynamic_patch": 12}}

JSONL line::

    {"image": "a/b.jpg" | ["a.jpg", "b.jpg"], "conversations": [
        {"from": "system", "value": "..."},            # optional, first only
        {"from": "human", "value": "<image>\\nWhat is this?"},
        {"from": "gpt", "value": "A harbour."}, ...]}

A JSONL file is indexed by byte offsets (8 bytes per line), never loaded whole. Every problem is a
:class:`SampleError` that names the file and line.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from vitp.errors import DataError
from vitp.files import read_json

logger = logging.getLogger("vitp")

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "human", "gpt")
META_KEYS = ("root", "annotation", "data_augment", "repeat_time", "length", "max_dynamic_patch")


class SampleError(DataError):
    """One JSONL line is wrong: training skips it, ``vitp data check`` counts it. ``where`` is
    ``file:line``, ``kind`` a short category for summaries."""

    def __init__(self, where: str, reason: str, kind: str = "invalid sample"):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason
        self.kind = kind


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of the meta JSON."""

    name: str
    root: Path
    annotation: Path
    data_augment: bool = False
    repeat_time: float = 1.0
    length: int | None = None
    max_dynamic_patch: int | None = None


@dataclass(frozen=True)
class Turn:
    role: str  # "human" or "gpt"
    text: str


@dataclass(frozen=True)
class Sample:
    """A validated JSONL line."""

    where: str
    images: tuple[str, ...]  # relative to the dataset root
    system: str | None
    turns: tuple[Turn, ...]


def read_meta(meta_path: str | Path) -> list[DatasetSpec]:
    """Parse and check a meta JSON. Relative ``root``/``annotation`` paths are looked up beside the
    meta file first, then in the current directory (where upstream launch scripts resolve them).
    Unknown keys (typos such as ``repeat_times``) are logged as warnings: upstream ignores them too."""
    meta_path = Path(meta_path)
    specs = []
    for name, entry in load_meta_json(meta_path).items():
        for message in unknown_key_problems(meta_path, name, entry):
            logger.warning("%s", message)
        specs.append(dataset_spec(meta_path, name, entry))
    return specs


def load_meta_json(meta_path: Path) -> dict[str, Any]:
    meta = read_json(meta_path, DataError)
    if not isinstance(meta, dict) or not meta:
        raise DataError(f"{meta_path}: expected a non-empty object {{dataset name: {{root, annotation, ...}}}}")
    return meta


def unknown_key_problems(meta_path: Path, name: str, entry: Any) -> list[str]:
    """One message per key of a meta entry that vitp does not know, with the closest known key."""
    if not isinstance(entry, dict):
        return []
    messages = []
    for key in entry:
        if key in META_KEYS:
            continue
        close = difflib.get_close_matches(str(key), META_KEYS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(META_KEYS)}"
        messages.append(f"{meta_path}: dataset {name!r}: unknown key {key!r} is ignored ({hint})")
    return messages


def dataset_spec(meta_path: Path, name: str, entry: Any) -> DatasetSpec:
    """One meta entry, checked (keys, types, paths), or DataError naming the dataset and key."""
    where = f"{meta_path}: dataset {name!r}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object with 'root' and 'annotation', found {type(entry).__name__}")
    for key in ("root", "annotation"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise DataError(f"{where}: missing key {key!r} (a path string)")
    data_augment = entry.get("data_augment", False)
    if not isinstance(data_augment, bool):  # bool("false") is True: only a JSON true/false is unambiguous
        raise DataError(f"{where}: 'data_augment' must be true or false (a JSON boolean), found {data_augment!r}")
    repeat_time = _repeat_time(entry.get("repeat_time", 1), where)
    length = _optional_whole_number(entry, "length", where, minimum=0)
    max_patch = _optional_whole_number(entry, "max_dynamic_patch", where, minimum=1)
    annotation = _resolve(meta_path, entry["annotation"], where, "annotation")
    if not annotation.is_file():
        raise DataError(f"{where}: annotation {entry['annotation']!r} is not a file")
    root = _resolve(meta_path, entry["root"], where, "root")
    if not root.is_dir():
        raise DataError(f"{where}: root {entry['root']!r} is not a directory")
    return DatasetSpec(
        name=name,
        root=root,
        annotation=annotation,
        data_augment=data_augment,
        repeat_time=repeat_time,
        length=length,
        max_dynamic_patch=max_patch,
    )


def _repeat_time(value: Any, where: str) -> float:
    """A finite positive number; above 1 a whole number of repeats (as upstream asserts)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise DataError(f"{where}: 'repeat_time' must be a positive number, found {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        number = math.inf
    # json reads 1e400 as inf and accepts NaN: both would fail later, deep inside epoch_indices
    if not math.isfinite(number):
        raise DataError(f"{where}: 'repeat_time' must be a finite positive number, found {value!r}")
    if number <= 0:
        raise DataError(f"{where}: 'repeat_time' must be a positive number, found {value!r}")
    if number > 1 and not number.is_integer():
        raise DataError(f"{where}: 'repeat_time' above 1 must be a whole number of repeats, found {value}")
    return number


def _optional_whole_number(entry: dict, key: str, where: str, minimum: int) -> int | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise DataError(f"{where}: {key!r} must be {kind}, found {value!r}")
    return value


def _resolve(meta_path: Path, value: str, where: str, key: str) -> Path:
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    beside_meta, from_cwd = meta_path.parent / path, Path.cwd() / path
    for candidate in (beside_meta, from_cwd):
        if candidate.exists():
            return candidate.resolve()
    raise DataError(f"{where}: {key} {value!r} not found (looked in {meta_path.parent} and {Path.cwd()})")


class JsonlIndex:
    """Random access to the lines of a JSONL file through their byte offsets."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        offsets, numbers = [], []
        with open(self.path, "rb") as handle:
            offset, number = 0, 0
            for raw in handle:
                number += 1
                if raw.strip():
                    offsets.append(offset)
                    numbers.append(number)
                offset += len(raw)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.line_numbers = np.asarray(numbers, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def where(self, index: int) -> str:
        return f"{self.path}:{int(self.line_numbers[index])}"

    def raw(self, index: int) -> bytes:
        with open(self.path, "rb") as handle:
            handle.seek(int(self.offsets[index]))
            return handle.readline()

    def sample(self, index: int) -> Sample:
        return parse_sample(self.raw(index), self.where(index))

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        """(where, raw line) for every non-empty line, reading the file sequentially."""
        with open(self.path, "rb") as handle:
            for offset, number in zip(self.offsets, self.line_numbers):
                handle.seek(int(offset))
                yield f"{self.path}:{int(number)}", handle.readline()


def parse_sample(raw: bytes | str, where: str) -> Sample:
    """Validate one JSONL line: JSON, keys, roles and their order, <image> placeholders vs images."""
    try:
        item = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SampleError(where, f"invalid JSON ({getattr(err, 'msg', err)})", "invalid JSON") from None
    if not isinstance(item, dict):
        raise SampleError(where, f"expected a JSON object, found {type(item).__name__}", "missing keys")
    if item.get("video"):
        raise SampleError(where, "video samples are not supported (upstream samples their frames with decord); "
                          "give the frames as a list of images instead", "video")
    images = _images_of(item, where)
    conversations = item.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise SampleError(where, "missing key 'conversations' (a non-empty list of {from, value} turns)", "missing keys")
    system, turns = _turns_of(conversations, where)
    _check_placeholders(turns, images, where)
    return Sample(where=where, images=images, system=system, turns=turns)


def _images_of(item: dict, where: str) -> tuple[str, ...]:
    value = item.get("image")
    if value is None or value == "" or value == []:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise SampleError(where, "'image' must be a path string or a list of path strings", "missing keys")
    for path in values:
        _check_text(path, where, "image path")
        if PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute():
            raise SampleError(
                where, f"image path {path!r} is absolute; paths must be relative to the dataset root", "path escapes root"
            )
        if ".." in PurePosixPath(path.replace("\\", "/")).parts:
            raise SampleError(where, f"image path {path!r} escapes the dataset root ('..')", "path escapes root")
    return tuple(values)


def _turns_of(conversations: list, where: str) -> tuple[str | None, tuple[Turn, ...]]:
    parsed = []
    for number, turn in enumerate(conversations, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise SampleError(
                where,
                f"turn {number}: expected {{\"from\": one of {list(ROLES)}, \"value\": string}}, found {turn!r:.80}",
                "wrong roles or order",
            )
        _check_text(turn["value"], where, f"turn {number}")
        parsed.append(Turn(turn["from"], turn["value"]))
    system = None
    if parsed[0].role == "system":
        system = parsed.pop(0).text
    if not parsed:
        raise SampleError(where, "only a system turn; expected human/gpt turns after it", "wrong roles or order")
    for index, turn in enumerate(parsed):
        expected = "human" if index % 2 == 0 else "gpt"
        if turn.role != expected:
            position = index + 1 + (system is not None)
            detail = "a system turn is only allowed first" if turn.role == "system" else "human and gpt must alternate"
            raise SampleError(
                where, f"turn {position}: expected {expected!r}, found {turn.role!r} ({detail})", "wrong roles or order"
            )
    if parsed[-1].role != "gpt":
        raise SampleError(where, "the last turn is from 'human': there is no answer to learn from", "wrong roles or order")
    return system, tuple(parsed)


def _check_text(text: str, where: str, what: str) -> None:
    """Refuse a lone surrogate (JSON "\\ud800" without its pair): json accepts it, but it is not text,
    and the tokenizer and every UTF-8 writer fail on it later."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise SampleError(
            where, f"{what}: lone surrogate {ascii(text[err.start])} at character {err.start} is not valid Unicode text",
            "invalid text",
        ) from None


def _check_placeholders(turns: tuple[Turn, ...], images: tuple[str, ...], where: str) -> None:
    in_answers = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in turns if turn.role == "gpt")
    if in_answers:
        raise SampleError(
            where, f"{IMAGE_PLACEHOLDER} appears in an assistant (gpt) turn; it belongs in human turns", "image count"
        )
    count = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in turns)
    if not images and count:
        raise SampleError(where, f"{count} {IMAGE_PLACEHOLDER} placeholder(s) but no 'image'", "image count")
    # Upstream adds "<image>\n" in front of the first question of a one-image sample that has none.
    if len(images) == 1 and count == 0:
        return
    if images and count != len(images):
        raise SampleError(
            where, f"{count} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s); they must match", "image count"
        )


def with_image_placeholder(sample: Sample) -> tuple[Turn, ...]:
    """The turns, with upstream's "<image>\\n" prefix added to a one-image sample that lacks it."""
    turns = sample.turns
    if len(sample.images) == 1 and not any(IMAGE_PLACEHOLDER in turn.text for turn in turns):
        turns = (Turn(turns[0].role, IMAGE_PLACEHOLDER + "\n" + turns[0].text),) + turns[1:]
    return turns


def image_path(spec: DatasetSpec, relative: str, where: str) -> Path:
    """The file of an image entry; refuses paths that leave the dataset root (also through symlinks)."""
    path = (spec.root / relative).resolve()
    root = spec.root.resolve()
    if os.path.commonpath([root, path]) != str(root):
        raise SampleError(where, f"image path {relative!r} resolves outside the dataset root {root}", "path escapes root")
    return path


def epoch_indices(spec: DatasetSpec, num_lines: int) -> np.ndarray:
    """Line indices one pass over a dataset uses: ``repeat_time`` < 1 keeps the first fraction of the
    lines (as upstream), > 1 repeats them. Counted over the real lines; ``length`` plays no part (as upstream)."""
    if spec.repeat_time < 1:
        return np.arange(samples_per_epoch(spec, num_lines))
    return np.tile(np.arange(num_lines), int(spec.repeat_time))


def samples_per_epoch(spec: DatasetSpec, num_lines: int) -> int:
    """``len(epoch_indices(spec, num_lines))``, without building the indices."""
    if spec.repeat_time < 1:
        return int(num_lines * spec.repeat_time)
    return num_lines * int(spec.repeat_time)


def why_no_samples(spec: DatasetSpec, num_lines: int) -> str | None:
    """Why a dataset contributes no sample to an epoch, or None if it does."""
    if num_lines == 0:
        return f"annotation {spec.annotation} has no non-empty lines"
    if samples_per_epoch(spec, num_lines) == 0:
        return (f"repeat_time {spec.repeat_time:g} of {num_lines} line(s) keeps "
                f"int({num_lines} x {spec.repeat_time:g}) = 0 of them")
    return None


def require_samples_per_epoch(specs: Sequence[DatasetSpec], line_counts: Iterable[int] | None = None) -> int:
    """The number of samples one epoch draws from all datasets; DataError if it is 0 (a sampler over
    nothing fails deep inside the trainer). A single dataset that adds nothing is logged as a warning.
    ``line_counts``: the non-empty lines of each annotation, if already indexed (else they are counted)."""
    counts = list(line_counts) if line_counts is not None else [len(JsonlIndex(spec.annotation)) for spec in specs]
    empty = [(spec.name, why_no_samples(spec, num_lines)) for spec, num_lines in zip(specs, counts)]
    empty = [(name, reason) for name, reason in empty if reason]
    total = sum(samples_per_epoch(spec, num_lines) for spec, num_lines in zip(specs, counts))
    if total == 0:
        detail = "; ".join(f"dataset {name!r}: {reason}" for name, reason in empty) or "the meta file names no dataset"
        raise DataError(f"no samples per epoch, nothing to train on ({detail}); `vitp data check` shows each dataset's count")
    for name, reason in empty:
        logger.warning("dataset %r contributes no samples per epoch: %s", name, reason)
    return total


def json_list_to_jsonl(source: str | Path, destination: str | Path) -> int:
    """Upstream's ``tools/json2jsonl.py``: a JSON list of samples written as JSONL, each with ``id`` set
    to its index and non-ASCII text kept as is. Unlike upstream, a leading system turn is kept (vitp
    trains with it as the sample's system message). Returns the number of samples; DataError for a
    file that is not a JSON list of objects (naming the index of the first bad item)."""
    source, destination = Path(source), Path(destination)
    items = read_json(source, DataError)
    if not isinstance(items, list):
        raise DataError(f"{source}: expected a JSON list of samples, found {type(items).__name__}")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{source}: item {index} is a {type(item).__name__}, not a sample object")
    partial = destination.with_name(destination.name + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        for index, item in enumerate(items):
            handle.write(json.dumps({**item, "id": index}, ensure_ascii=False) + "\n")
    partial.replace(destination)  # a complete file or none: never half a conversion
    return len(items)
