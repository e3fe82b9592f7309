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
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vitp.data.images import ImageError, iter_image_files, load_image
from vitp.data.meta import IMAGE_PLACEHOLDER
from vitp.errors import VitpError
from vitp.tensor_io import write_json, write_text

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


class BuildError(VitpError):
    pass


@dataclass
class BuildResult:
    files: list[Path]
    classes: dict[str, int]
    train: int
    holdout: int
    skipped: list[str] = field(default_factory=list)  # "path: reason"
    unmatched_metadata: int = 0


def class_phrase(folder: str) -> str:
    """Folder name -> words: "dense_vegetation" -> "dense vegetation"."""
    return " ".join(folder.replace("_", " ").replace("-", " ").split())


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def format_value(attribute: str, value: Any) -> str:
    """Human wording of a metadata value: fractions as percentages, counts as integers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    is_share = any(word in attribute.lower() for word in ("fraction", "ratio", "share", "cover"))
    if is_share and 0.0 <= value <= 1.0:
        return f"{round(100 * value)}%"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.3g}"


def read_metadata(path: Path) -> dict[str, dict[str, Any]]:
    """Per-image attributes keyed by the image's path relative to the image folder (POSIX form).

    CSV: a header with an ``image`` column and one column per attribute. JSON: a list of objects with
    ``image``, or an object mapping image path -> attributes."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or "image" not in reader.fieldnames:
                raise BuildError(f"{path}: the CSV header needs an 'image' column (found {reader.fieldnames})")
            return {row["image"]: {k: _number(v) for k, v in row.items() if k != "image" and v != ""} for row in reader}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BuildError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if isinstance(value, dict):
        return {str(k): dict(v) for k, v in value.items()}
    if isinstance(value, list) and all(isinstance(v, dict) and "image" in v for v in value):
        return {v["image"]: {k: x for k, x in v.items() if k != "image"} for v in value}
    raise BuildError(f"{path}: expected a list of objects with 'image', or an object {{image: attributes}}")


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


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
        raise BuildError(
            f"{image_dir}: {len(loose)} image(s) are not inside a class folder (e.g. {loose[0]}); "
            f"expected {image_dir}/<class>/<image>"
        )
    if len(classes) < 2:
        raise BuildError(f"{image_dir}: found {len(classes)} class folder(s); instruction data needs at least 2 classes")
    return dict(sorted(classes.items()))


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
        raise BuildError(f"{image_dir}: not a directory")
    if not 0.0 <= holdout_fraction < 1.0:
        raise BuildError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    name = name or image_dir.name
    classes = collect_classes(image_dir)
    attributes = read_metadata(Path(metadata)) if metadata else {}
    rng = random.Random(seed)

    skipped: list[str] = []
    if check_images:
        for label, paths in classes.items():
            usable = []
            for path in tqdm(paths, desc=f"checking {label}", disable=not progress):
                try:
                    load_image(path)
                    usable.append(path)
                except ImageError as err:
                    skipped.append(f"{path}: {err.reason}")
            classes[label] = usable

    train, holdout = [], []
    for label, paths in classes.items():  # stratified: the same fraction of every class is held out
        order = paths[:]
        rng.shuffle(order)
        count = round(len(order) * holdout_fraction) if len(order) > 1 else 0
        holdout += [(path, label) for path in order[:count]]
        train += [(path, label) for path in order[count:]]

    writer = ConversationWriter(list(classes), rng)
    used_metadata: set[str] = set()
    files = []
    for split, items in (("", train), ("_holdout", holdout)):
        if not items:
            continue
        items.sort(key=lambda item: item[0])
        yes_flags = [i % 2 == 0 for i in range(len(items))]  # yes/no balanced over the split
        rng.shuffle(yes_flags)
        lines = []
        for (path, label), yes in zip(items, yes_flags):
            relative = path.relative_to(image_dir).as_posix()
            image_attributes = attributes.get(relative, {})
            if image_attributes:
                used_metadata.add(relative)
            record = {"image": relative, "conversations": writer.conversation(label, image_attributes, yes)}
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
        files += [annotation, meta_path]
    return BuildResult(
        files=files,
        classes={label: len(paths) for label, paths in classes.items()},
        train=len(train),
        holdout=len(holdout),
        skipped=skipped,
        unmatched_metadata=len(set(attributes) - used_metadata),
    )
