"""`vitp data build`: instruction data from a class-folder image set (folder name = class).

Each image becomes one multi-turn conversation mixing several kinds of questions, each with several
phrasings chosen by a seeded random generator:

* name the scene ("What kind of scene is this?" -> "Farmland."),
* multiple choice among the classes ("... A. forest B. farmland ..." -> "B. farmland"),
* yes/no about a class, balanced over the data set (half the questions are about another class),
* a free-form request with a templated answer ("Describe this image briefly." -> "An image of ..."),
* one question per attribute of optional per-image metadata (fractions, counts, ...).

Writes ``<name>.jsonl`` and ``meta.json`` (and, with a held-out split, ``<name>_holdout.jsonl`` and
``meta_holdout.json``), in the upstream formats that ``vitp pretrain`` and ``vitp data check`` read.
Split files of an earlier build in the same folder that this build does not rewrite are removed, so
that an old held-out split is never read beside a training split that now contains its images.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any

from vitp.progress import progress as progress_counter

from vitp.data.images import ImageError, iter_image_files, load_image
from vitp.data.meta import IMAGE_PLACEHOLDER, load_meta_json
from vitp.errors import DataError
from vitp.files import write_json, write_text

NAME_QUESTIONS = (
    "What kind of scene is shown in this image?",
    "Which category does this image belong to?",
    "Name the scene category of this image.",
    "Classify this image into one scene category.",
    "What is the main content of this image? Answer with a category name.",
)
NAME_ANSWERS = ("{Class}.", "This image shows {a_class}.", "It is {a_class}.", "The category is {class}.")
CHOICE_QUESTIONS = (
    "Which of the following best describes this image?\n{options}\nAnswer with the option's letter and name.",
    "Choose the category of this image.\n{options}",
    "{options}\nWhich option matches the image?",
)
YES_NO_QUESTIONS = (
    "Is this an image of {a_class}?",
    "Does this image show {a_class}?",
    "Would you classify this image as {class}? Answer yes or no.",
)
YES_ANSWERS = ("Yes.", "Yes, it shows {a_class}.", "Yes, this is {a_class}.")
NO_ANSWERS = ("No.", "No, it shows {a_true}.", "No, this is {a_true}, not {a_class}.")
DESCRIBE_QUESTIONS = (
    "Describe this image briefly.",
    "Give a one-sentence description of this image.",
    "Write a short caption for this image.",
)
DESCRIBE_ANSWERS = ("An image of {class}{details}.", "This image shows {a_class}{details}.", "A view of {class}{details}.")
ATTRIBUTE_QUESTIONS = (
    "What is the {attribute} in this image?",
    "Estimate the {attribute} of this image.",
    "How much is the {attribute} here?",
)
ATTRIBUTE_ANSWERS = ("{value}.", "The {attribute} is {value}.", "About {value}.")
SPLITS = ("", "_holdout")  # file name suffixes: <name><split>.jsonl and meta<split>.json


@dataclass
class BuildResult:
    files: list[Path]
    classes: dict[str, int]
    train: int
    holdout: int
    skipped: list[str] = field(default_factory=list)  # "path: reason"
    unmatched_metadata: int = 0
    holdout_per_class: dict[str, int] = field(default_factory=dict)
    dropped_classes: list[str] = field(default_factory=list)  # folders none of whose images could be read
    without_metadata: int = 0  # images that no metadata row names (only counted with metadata)
    missing_metadata_values: int = 0  # blank, NaN or null values: no question is asked about them
    removed: list[Path] = field(default_factory=list)  # split files of an earlier build, no longer written
    notes: list[str] = field(default_factory=list)  # lines for the summary, beyond the counts above


def class_phrase(folder: str) -> str:
    """Folder name -> words: "dense_vegetation" -> "dense vegetation"."""
    return " ".join(folder.replace("_", " ").replace("-", " ").split())


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


# Attributes whose name contains one of these words are fractions in [0, 1], worded as percentages.
SHARE_WORDS = ("fraction", "ratio", "share", "cover")


def is_share(attribute: str) -> bool:
    return any(word in attribute.lower() for word in SHARE_WORDS)


def format_value(attribute: str, value: Any) -> str:
    """Human wording of a metadata value: fractions as percentages, counts as integers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if is_share(attribute) and 0.0 <= value <= 1.0:
        return f"{round(100 * value)}%"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.3g}"


@dataclass
class Metadata:
    attributes: dict[str, dict[str, Any]]  # image path relative to the image folder (POSIX) -> attributes
    missing_values: int = 0  # blank, NaN or null values left out


@dataclass
class _Entry:
    """One metadata row (CSV) or object (JSON), before its values are checked."""

    where: str  # "file:line" (CSV) or "file:line: image 'x'" (JSON), to start each problem with
    image: str
    values: dict[str, Any]
    field_word: str  # "column" or "key"


_MISSING = object()  # a blank or "nan" CSV cell
MAX_PROBLEMS_SHOWN = 10


def read_metadata(path: Path) -> Metadata:
    """Per-image attributes from a CSV (an ``image`` column and one column per attribute) or a JSON file (a
    list of objects with ``image``, or an object mapping image path -> attributes).

    Malformed input is an error naming the file, line and column, never a value quietly dropped or
    written into the training text: a metadata file is small and quick to fix, and a wrong number
    taught to a model is not quick to find. All problems are listed at once. Only missing values
    (blank, NaN, null) are skipped, and counted: real measurements have gaps, and a gap simply
    means no question about that attribute."""
    if path.suffix.lower() not in (".csv", ".json"):
        raise DataError(f"{path}: metadata must be a .csv or a .json file")
    text = _read_text(path)
    problems: list[str] = []
    read_entries = _csv_entries if path.suffix.lower() == ".csv" else _json_entries
    entries = read_entries(path, text, problems)
    metadata = _checked_metadata(entries, problems)
    if problems:
        shown = "\n  ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        raise DataError(f"{path}: {len(problems)} problem(s) in the metadata, nothing written:\n  {shown}{more}")
    return metadata


def _read_text(path: Path) -> str:
    """UTF-8 text, with or without the byte-order mark that Excel's "CSV UTF-8" starts with."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: metadata file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the metadata file ({err.strerror or err})") from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save the file as UTF-8 (Excel: 'CSV UTF-8')"
        ) from None


def _csv_entries(path: Path, text: str, problems: list[str]) -> list[_Entry]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader, [])]
        _check_header(path, header)
        entries = []
        for row in reader:
            if not any(cell.strip() for cell in row):  # blank lines, and the ",,," rows spreadsheets leave
                continue
            where = f"{path}:{reader.line_num}"
            if len(row) != len(header):
                problems.append(f"{where}: {len(row)} field(s) but the header has {len(header)} column(s) "
                                "(a value containing a comma must be quoted)")
                continue
            cells = dict(zip(header, row))
            image = cells.pop("image")
            entries.append(_Entry(where, image, {name: _csv_value(cell) for name, cell in cells.items()}, "column"))
        return entries
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: not readable as CSV ({err})") from None


def _check_header(path: Path, header: list[str]) -> None:
    if "image" not in header:
        raise DataError(f"{path}:1: the CSV header needs an 'image' column (found {header})")
    for number, name in enumerate(header, start=1):
        if not name:
            raise DataError(f"{path}:1: column {number} of the header has no name")
        if header.index(name) != number - 1:
            raise DataError(f"{path}:1: column '{name}' appears twice in the header")


def _csv_value(text: str) -> Any:
    text = text.strip()
    if text == "" or text.lower() == "nan":
        return _MISSING
    return _number(text)


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _json_entries(path: Path, text: str, problems: list[str]) -> list[_Entry]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list):
        pairs = _json_list_pairs(path, value, problems)
    else:
        raise DataError(f"{path}: expected a list of objects with 'image', or an object {{image: attributes}}; "
                         f"found {_json_type(value)}")
    entries = []
    for image, attributes in pairs:
        where = f"{_json_where(path, text, image)}: image '{image}'"
        if not isinstance(attributes, dict):
            problems.append(f"{where}: expected an object of attributes, found {_json_type(attributes)} "
                            f"{json.dumps(attributes)[:40]}")
            continue
        values = {name: value for name, value in attributes.items() if name != "image"}
        entries.append(_Entry(where, image, values, "key"))
    return entries


def _json_list_pairs(path: Path, items: list, problems: list[str]) -> list[tuple[str, Any]]:
    pairs = []
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            problems.append(f"{path}: list item {number}: expected an object with an 'image' path, "
                            f"found {json.dumps(item)[:60]}")
            continue
        pairs.append((item["image"], item))
    return pairs


def _json_where(path: Path, text: str, image: str) -> str:
    """``file:line`` of the image's first mention (JSON parsers keep no positions), or ``file``."""
    for token in (json.dumps(image, ensure_ascii=False), json.dumps(image)):
        position = text.find(token)
        if position >= 0:
            return f"{path}:{text.count(chr(10), 0, position) + 1}"
    return str(path)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _checked_metadata(entries: list[_Entry], problems: list[str]) -> Metadata:
    metadata = Metadata({})
    first_seen: dict[str, str] = {}
    numeric = _numeric_attributes(entries)
    for entry in entries:
        if not entry.image.strip():
            problems.append(f"{entry.where}: no image path")
            continue
        image = PurePosixPath(entry.image.strip()).as_posix()  # "./a/1.png" -> "a/1.png"
        if image in first_seen:
            problems.append(f"{entry.where}: image '{image}' is listed again (first at {first_seen[image]})")
            continue
        first_seen[image] = entry.where
        kept = {}
        for name, value in entry.values.items():
            if _is_missing(value):
                metadata.missing_values += 1
            elif problem := _value_problem(name, value, name in numeric):
                problems.append(f"{entry.where}: {entry.field_word} '{name}': {problem}")
            else:
                kept[name] = value
        metadata.attributes[image] = kept
    return metadata


def _is_missing(value: Any) -> bool:
    return value is _MISSING or value is None or (isinstance(value, float) and math.isnan(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numeric_attributes(entries: list[_Entry]) -> set[str]:
    return {name for entry in entries for name, value in entry.values.items()
            if _is_number(value) and not _is_missing(value)}


def _value_problem(name: str, value: Any, numeric: bool) -> str | None:
    """Why a single value cannot become training text, or None."""
    if isinstance(value, (dict, list)):
        return f"a nested value ({json.dumps(value)[:40]}); values must be numbers or text"
    if isinstance(value, str) and numeric:  # a typo or a unit ('12 m'), not a value to teach
        return f"{value!r} is not a number, but other values of this attribute are"
    if _is_number(value) and not math.isfinite(value):
        return f"{value} is not a finite number"
    if _is_number(value) and is_share(name) and not 0 <= value <= 1:
        return (f"{value} is not a fraction between 0 and 1 (attributes named with {', '.join(SHARE_WORDS)} "
                "are worded as percentages; divide percentages by 100)")
    return None


def collect_classes(image_dir: Path) -> dict[str, list[Path]]:
    """Images per class folder (the first path component below ``image_dir``)."""
    classes: dict[str, list[Path]] = {}
    loose = []
    for path in iter_image_files(image_dir):
        relative = path.relative_to(image_dir)
        if len(relative.parts) < 2:
            loose.append(relative.as_posix())
            continue
        classes.setdefault(relative.parts[0], []).append(path)
    if loose:
        raise DataError(
            f"{image_dir}: {len(loose)} image(s) are not inside a class folder (e.g. {loose[0]}); "
            f"expected {image_dir}/<class>/<image>"
        )
    require_two_classes(image_dir, classes)
    return dict(sorted(classes.items()))


def require_two_classes(image_dir: Path, classes: dict[str, list[Path]], dropped: Sequence[str] = ()) -> None:
    if len(classes) >= 2:
        return
    why = f" ({', '.join(dropped)} dropped: none of their images could be read)" if dropped else ""
    raise DataError(f"{image_dir}: found {len(classes)} class folder(s) with usable images{why}; "
                     "instruction data needs at least 2 classes")


def drop_unreadable_images(classes: dict[str, list[Path]], progress: bool) -> tuple[list[str], list[str]]:
    """Keep the images that decode; a class left without any is dropped, since it would still be offered
    as an answer in multiple-choice and yes/no questions. Returns (skipped "path: reason", dropped classes)."""
    skipped: list[str] = []
    for label, paths in list(classes.items()):
        usable = []
        for path in progress_counter(paths, desc=f"checking {label}", show=progress):
            try:
                load_image(path)
                usable.append(path)
            except ImageError as err:
                skipped.append(f"{path}: {err.reason}")
        classes[label] = usable
    dropped = [label for label, paths in classes.items() if not paths]
    for label in dropped:
        del classes[label]
    return skipped, dropped


def holdout_count(size: int, fraction: float) -> int:
    """Images of a class to hold out: the fraction of ``size`` rounded down. As the fraction is below 1,
    that leaves every class at least one training image."""
    return math.floor(_share(size, fraction))


def _share(size: int, fraction: float) -> Decimal:
    """``fraction`` of ``size``, exactly: Decimal, so that 0.29 of 100 is 29, not 28.99..."""
    return Decimal(str(float(fraction))) * size


Items = list[tuple[Path, str]]  # (image path, class folder)


def split_holdout(
    classes: dict[str, list[Path]], fraction: float, rng: random.Random
) -> tuple[Items, Items, dict[str, int]]:
    """Stratified split: (train, holdout, held-out count per class); the same fraction of every class."""
    train, holdout, per_class = [], [], {}
    for label, paths in classes.items():
        order = paths[:]
        rng.shuffle(order)
        count = per_class[label] = holdout_count(len(order), fraction)
        holdout += [(path, label) for path in order[:count]]
        train += [(path, label) for path in order[count:]]
    return train, holdout, per_class


def holdout_note(classes: dict[str, list[Path]], per_class: dict[str, int], fraction: float) -> list[str]:
    """The held-out counts, when rounding down (small classes) made them differ from the fraction asked for."""
    exact = all(_share(len(classes[label]), fraction) == count for label, count in per_class.items())
    if exact:  # also with fraction 0: nothing held out, as asked
        return []
    counts = ", ".join(f"{label} {count} of {len(classes[label])}" for label, count in per_class.items())
    return [f"held out per class: {counts} (holdout_fraction {fraction} rounded down; "
            "every class keeps at least one training image)"]


def previous_split_files(output_dir: Path, name: str) -> set[Path]:
    """Files of vitp's naming an earlier build may have left here: each split's meta JSON, this name's
    annotations, and the annotation each of those meta JSONs names when it has vitp's shape."""
    found = set()
    for split in SPLITS:
        meta_path = output_dir / f"meta{split}.json"
        found |= {meta_path, output_dir / f"{name}{split}.jsonl"}
        found |= _vitp_annotations(meta_path, split)
    return {path for path in found if path.is_file()}


def _vitp_annotations(meta_path: Path, split: str) -> set[Path]:
    try:
        meta = load_meta_json(meta_path)  # a JSON object with at least one entry
    except DataError:
        return set()
    if len(meta) != 1:
        return set()
    (key, entry), = meta.items()
    built_here = isinstance(entry, dict) and entry.get("annotation") == f"{key}.jsonl" and "/" not in key
    if not built_here or (split and not key.endswith(split)) or (not split and key.endswith(SPLITS[1])):
        return set()
    return {meta_path.parent / f"{key}.jsonl"}


def remove_stale_splits(previous: set[Path], written: list[Path]) -> list[Path]:
    """A held-out split left from an earlier build would be read beside a training split that now holds
    its images; so split files this build did not rewrite go."""
    stale = sorted(previous - set(written))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class ConversationWriter:
    """Builds the conversation of one image; all randomness from one seeded generator."""

    def __init__(self, classes: list[str], rng: random.Random):
        self.classes = classes
        self.rng = rng

    def conversation(self, label: str, attributes: dict[str, Any], answer_yes: bool) -> list[dict[str, str]]:
        kinds = [self.name_turn, self.choice_turn, lambda l, a: self.yes_no_turn(l, answer_yes), self.describe_turn]
        self.rng.shuffle(kinds)
        pairs = [kind(label, attributes) for kind in kinds]
        pairs += [self.attribute_turn(name, value) for name, value in sorted(attributes.items())]
        turns = []
        for index, (question, answer) in enumerate(pairs):
            if index == 0:
                question = f"{IMAGE_PLACEHOLDER}\n{question}"
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        return turns

    def _words(self, label: str) -> dict[str, str]:
        phrase = class_phrase(label)
        return {"class": phrase, "Class": phrase[:1].upper() + phrase[1:], "a_class": _article(phrase)}

    def name_turn(self, label: str, attributes: dict[str, Any]) -> tuple[str, str]:
        return self.rng.choice(NAME_QUESTIONS), self.rng.choice(NAME_ANSWERS).format(**self._words(label))

    def choice_turn(self, label: str, attributes: dict[str, Any]) -> tuple[str, str]:
        others = [c for c in self.classes if c != label]
        options = self.rng.sample(others, min(3, len(others))) + [label]
        self.rng.shuffle(options)
        letters = "ABCD"
        lines = "\n".join(f"{letters[i]}. {class_phrase(option)}" for i, option in enumerate(options))
        correct = options.index(label)
        question = self.rng.choice(CHOICE_QUESTIONS).format(options=lines)
        return question, f"{letters[correct]}. {class_phrase(label)}"

    def yes_no_turn(self, label: str, answer_yes: bool) -> tuple[str, str]:
        asked = label if answer_yes else self.rng.choice([c for c in self.classes if c != label])
        words = self._words(asked)
        question = self.rng.choice(YES_NO_QUESTIONS).format(**words)
        answers = YES_ANSWERS if answer_yes else NO_ANSWERS
        return question, self.rng.choice(answers).format(**words, a_true=_article(class_phrase(label)))

    def describe_turn(self, label: str, attributes: dict[str, Any]) -> tuple[str, str]:
        details = ""
        if attributes:
            name, value = self.rng.choice(sorted(attributes.items()))
            details = f", {class_phrase(name)} {format_value(name, value)}"
        answer = self.rng.choice(DESCRIBE_ANSWERS).format(**self._words(label), details=details)
        return self.rng.choice(DESCRIBE_QUESTIONS), answer

    def attribute_turn(self, name: str, value: Any) -> tuple[str, str]:
        attribute = class_phrase(name)
        question = self.rng.choice(ATTRIBUTE_QUESTIONS).format(attribute=attribute)
        answer = self.rng.choice(ATTRIBUTE_ANSWERS).format(attribute=attribute, value=format_value(name, value))
        return question, answer


def build_instructions(
    image_dir: str | Path,
    output_dir: str | Path,
    name: str | None = None,
    metadata: str | Path | None = None,
    holdout_fraction: float = 0.0,
    seed: int = 0,
    check_images: bool = True,
    data_augment: bool = False,
    progress: bool = True,
) -> BuildResult:
    image_dir, output_dir = Path(image_dir).resolve(), Path(output_dir)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: not a directory")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    name = name or image_dir.name
    classes = collect_classes(image_dir)
    read = read_metadata(Path(metadata)) if metadata else Metadata({})
    skipped, dropped = drop_unreadable_images(classes, progress) if check_images else ([], [])
    require_two_classes(image_dir, classes, dropped)
    rng = random.Random(seed)
    train, holdout, holdout_per_class = split_holdout(classes, holdout_fraction, rng)

    previous = previous_split_files(output_dir, name)
    writer = ConversationWriter(list(classes), rng)
    files = []
    for split, items in (("", train), ("_holdout", holdout)):
        if items:
            files += write_split(items, split, writer, read.attributes, image_dir, output_dir, name, data_augment)
    images = {path.relative_to(image_dir).as_posix() for path, _ in train + holdout}
    unmatched = read.attributes.keys() - images  # metadata entries that name no image
    without = images - read.attributes.keys() if metadata else set()  # images that no entry names
    result = BuildResult(
        files=files,
        classes={label: len(paths) for label, paths in classes.items()},
        train=len(train),
        holdout=len(holdout),
        skipped=skipped,
        unmatched_metadata=len(unmatched),
        holdout_per_class=holdout_per_class,
        dropped_classes=dropped,
        without_metadata=len(without),
        missing_metadata_values=read.missing_values,
        removed=remove_stale_splits(previous, files),
    )
    result.notes = summary_notes(result, classes, holdout_fraction, images, unmatched, without)
    return result


def write_split(items, split, writer, attributes, image_dir, output_dir, name, data_augment) -> list[Path]:
    """``<name><split>.jsonl`` and ``meta<split>.json`` for (path, label) items; returns both paths."""
    items.sort(key=lambda item: item[0])
    yes_flags = [i % 2 == 0 for i in range(len(items))]  # yes/no balanced over the split
    writer.rng.shuffle(yes_flags)
    lines = []
    for (path, label), yes in zip(items, yes_flags):
        relative = path.relative_to(image_dir).as_posix()
        record = {"image": relative, "conversations": writer.conversation(label, attributes.get(relative, {}), yes)}
        lines.append(json.dumps(record, ensure_ascii=False))
    annotation = output_dir / f"{name}{split}.jsonl"
    write_text("\n".join(lines) + "\n", annotation)
    meta_path = output_dir / f"meta{split}.json"
    root = os.path.relpath(image_dir, output_dir.resolve())
    write_json(
        {f"{name}{split}": {"root": root, "annotation": annotation.name, "data_augment": data_augment,
                            "repeat_time": 1, "length": len(lines)}},
        meta_path,
    )
    return [annotation, meta_path]


def summary_notes(
    result: BuildResult, classes: dict[str, list[Path]], holdout_fraction: float,
    images: set[str], unmatched: set[str], without: set[str],
) -> list[str]:
    """What a user should know beyond the counts: anything left out or adjusted, with an example.
    ``images``: the images written; ``unmatched``: metadata entries naming none; ``without``: images
    no metadata entry names."""
    notes = holdout_note(classes, result.holdout_per_class, holdout_fraction)
    if result.dropped_classes:
        notes.append(f"dropped class folder(s) without a readable image: {', '.join(result.dropped_classes)}")
    if result.without_metadata:
        example = min(without)
        notes.append(f"{result.without_metadata} image(s) have no metadata row (e.g. {example}), "
                     "so no attribute questions")
    if result.unmatched_metadata:
        example = min(unmatched)
        notes.append(f"e.g. metadata entry {example} matched no image (entries name images relative to the "
                     f"image folder, like {min(images)})")
    if result.missing_metadata_values:
        notes.append(f"{result.missing_metadata_values} blank, NaN or null metadata value(s) left out")
    if result.removed:
        notes.append(f"removed {', '.join(p.name for p in result.removed)}, left by an earlier build and not "
                     "rewritten by this one")
    return notes
