"""`vitp data check`: every problem of a meta file and its JSONL/images, without training.

The checks are the ones the training dataset applies to each sample (parsing, roles, placeholders,
paths, image decoding, truncation); here they run over every line and are reported as
``file:line: what is wrong``, followed by per-dataset counts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from vitp.data.dataset import DataSettings, open_sample_image, tile_budget
from vitp.data.images import count_tiles
from vitp.data.meta import (
    DatasetSpec,
    JsonlIndex,
    MetaError,
    SampleError,
    dataset_spec,
    epoch_indices,
    load_meta_json,
    parse_sample,
    with_image_placeholder,
)
from vitp.data.template import ConversationTokenizer, TemplateError, truncation_problem


@dataclass
class DatasetCounts:
    name: str
    lines: int = 0
    usable: int = 0
    per_epoch: int = 0
    images: int = 0
    tiles: int = 0
    tokens: int | None = None
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)  # samples that would be dropped: errors
    warnings: list[str] = field(default_factory=list)  # samples that would lose text to truncation
    datasets: list[DatasetCounts] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        header = ("dataset", "lines", "usable", "per epoch", "images", "tiles", "tokens", "truncated", "dropped")
        rows = [header]
        for counts in self.datasets:
            dropped = ", ".join(f"{kind} {n}" for kind, n in counts.dropped.most_common()) or "0"
            tokens = "-" if counts.tokens is None else str(counts.tokens)
            rows.append((
                counts.name, counts.lines, counts.usable, counts.per_epoch, counts.images, counts.tiles, tokens,
                counts.truncated, dropped,
            ))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
        return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows)


def check_data(
    meta_path: str | Path,
    settings: DataSettings,
    tokenizer=None,
    report_problem: Callable[[str], None] = lambda message: None,
    progress: bool = True,
) -> CheckReport:
    """Check every dataset of a meta file; ``report_problem`` is called with each problem (and
    each warning, prefixed "warning: ") as it is found."""
    meta_path = Path(meta_path)
    report = CheckReport()

    def problem(message: str) -> None:
        report.problems.append(message)
        report_problem(message)

    def warning(message: str) -> None:
        report.warnings.append(message)
        report_problem(f"warning: {message}")

    conversation_tokenizer = ConversationTokenizer(tokenizer) if tokenizer is not None else None
    for name, entry in load_meta_json(meta_path).items():
        try:
            spec = dataset_spec(meta_path, name, entry)
        except MetaError as err:
            problem(str(err))
            report.datasets.append(DatasetCounts(name))
            continue
        report.datasets.append(_check_dataset(spec, settings, conversation_tokenizer, problem, warning, progress))
    return report


def _check_dataset(
    spec: DatasetSpec, settings: DataSettings, conversation_tokenizer, problem, warning, progress
) -> DatasetCounts:
    counts = DatasetCounts(spec.name, tokens=0 if conversation_tokenizer else None)
    index = JsonlIndex(spec.annotation)
    counts.lines = len(index)
    usable_lines = set()
    for line, (where, raw) in enumerate(tqdm(index, total=len(index), desc=f"checking {spec.name}", disable=not progress)):
        try:
            images, tiles, tokens = _check_line(spec, settings, conversation_tokenizer, where, raw)
        except SampleError as err:
            counts.dropped[err.kind] += 1
            problem(str(err))
            continue
        if tokens > settings.max_seq_length:
            counts.truncated += 1
            warning(f"{where}: {tokens} tokens, truncated to max_seq_length {settings.max_seq_length} (later answers lost)")
            tokens = settings.max_seq_length
        usable_lines.add(line)
        counts.usable += 1
        counts.images += images
        counts.tiles += tiles
        if counts.tokens is not None:
            counts.tokens += tokens
    counts.per_epoch = sum(1 for line in epoch_indices(spec, len(index)) if int(line) in usable_lines)
    return counts


def _check_line(
    spec: DatasetSpec, settings: DataSettings, conversation_tokenizer, where: str, raw: bytes
) -> tuple[int, int, int]:
    """(images, tiles, tokens before truncation) of a usable line, or SampleError."""
    sample = parse_sample(raw, where)
    budget = tile_budget(settings, spec, len(sample.images))
    tiles_per_image = []
    for relative in sample.images:
        image = open_sample_image(spec, relative, where, settings.max_image_pixels)
        if settings.dynamic_image_size:
            tiles = count_tiles(*image.size, settings.min_dynamic_patch, budget, settings.force_image_size, settings.use_thumbnail)
        else:
            tiles = 1
        tiles_per_image.append(tiles)
    if conversation_tokenizer is None:
        return len(sample.images), sum(tiles_per_image), 0
    system = sample.system if sample.system is not None else settings.system_message
    try:
        tokenized = conversation_tokenizer(
            with_image_placeholder(sample), system, [settings.num_image_token * t for t in tiles_per_image]
        )
    except TemplateError as err:
        raise SampleError(where, str(err), "template") from None
    problem = truncation_problem(tokenized, settings.max_seq_length)
    if problem:
        raise SampleError(where, problem, "too long")
    return len(sample.images), sum(tiles_per_image), len(tokenized.input_ids)
