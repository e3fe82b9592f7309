"""`vitp data check`: every problem of a meta file and its JSONL/images, without training.

The checks are the ones the training dataset applies to each sample (parsing, roles, placeholders,
paths, image decoding, truncation); here they run over every line and are reported as
``file:line: what is wrong``, followed by per-dataset counts. Dataset-level problems (unknown meta
keys, datasets that add no sample to an epoch) are reported as ``meta: dataset 'name': ...``.

:func:`validate_data_settings` refuses impossible data settings up front; the trainer calls it too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from vitp.progress import progress as progress_counter

from vitp.data.dataset import DataSettings, open_sample_image, tile_budget
from vitp.data.images import count_tiles
from vitp.data.meta import (
    DatasetSpec,
    JsonlIndex,
    SampleError,
    dataset_spec,
    epoch_indices,
    load_meta_json,
    parse_sample,
    unknown_key_problems,
    why_no_samples,
    with_image_placeholder,
)
from vitp.data.templates import ConversationTokenizer, TemplateError, truncation_problem
from vitp.errors import ConfigError, DataError


def validate_image_geometry(force_image_size: int, patch_size: int | None = None,
                            down_sample_ratio: float | None = None) -> None:
    """The tile size must be positive and a whole number of ViT patches, and a tile must become at
    least one image token; ConfigError otherwise. Checked before the token count is computed."""
    if force_image_size < 1:
        raise ConfigError(f"force_image_size must be a positive number of pixels, got {force_image_size}")
    if patch_size is None:
        return
    if patch_size < 1:
        raise ConfigError(f"patch_size must be a positive number of pixels, got {patch_size}")
    if force_image_size % patch_size:
        below, above = (force_image_size // patch_size) * patch_size, (force_image_size // patch_size + 1) * patch_size
        nearest = f"{below} or {above}" if below else str(above)
        raise ConfigError(
            f"force_image_size {force_image_size} is not a multiple of the patch size {patch_size} (try {nearest})"
        )
    if down_sample_ratio is not None and not 0 < down_sample_ratio <= 1:
        raise ConfigError(f"down_sample_ratio must be in (0, 1], got {down_sample_ratio}")


def validate_data_settings(settings: DataSettings, patch_size: int | None = None,
                           specs: Iterable[DatasetSpec] = ()) -> None:
    """Refuse settings with which no sample can be built, with a message naming the flag;
    ``patch_size`` (the ViT's, when known) and ``specs`` (their per-dataset max_dynamic_patch) add checks."""
    validate_image_geometry(settings.force_image_size, patch_size)
    if settings.num_image_token < 1:
        raise ConfigError(f"a {settings.force_image_size}px tile would become {settings.num_image_token} image "
                          "tokens; use a larger force_image_size or down_sample_ratio")
    if settings.min_dynamic_patch < 1:
        raise ConfigError(f"min_dynamic_patch must be at least 1, got {settings.min_dynamic_patch}")
    if settings.max_dynamic_patch < settings.min_dynamic_patch:
        raise ConfigError(f"max_dynamic_patch {settings.max_dynamic_patch} is below "
                          f"min_dynamic_patch {settings.min_dynamic_patch}")
    if settings.max_seq_length < 1:
        raise ConfigError(f"max_seq_length must be at least 1, got {settings.max_seq_length}")
    for spec in specs:
        problem = dataset_patch_problem(spec, settings)
        if problem:
            raise ConfigError(problem)


def dataset_patch_problem(spec: DatasetSpec, settings: DataSettings) -> str | None:
    """A dataset's own max_dynamic_patch below the global min_dynamic_patch leaves no tile grid."""
    own = spec.max_dynamic_patch
    if own is not None and settings.dynamic_image_size and own < settings.min_dynamic_patch:
        return (f"dataset {spec.name!r}: its max_dynamic_patch {own} is below "
                f"min_dynamic_patch {settings.min_dynamic_patch}")
    return None


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
    problems: list[str] = field(default_factory=list)  # dropped samples, unusable datasets, unknown meta keys
    warnings: list[str] = field(default_factory=list)  # truncated samples, a 'length' that differs from the file
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

    validate_data_settings(settings)
    conversation_tokenizer = ConversationTokenizer(tokenizer, settings.conv_style) if tokenizer is not None else None
    for name, entry in load_meta_json(meta_path).items():
        report.datasets.append(
            _check_entry(meta_path, name, entry, settings, conversation_tokenizer, problem, warning, progress)
        )
    if sum(counts.per_epoch for counts in report.datasets) == 0:
        problem(f"{meta_path}: no dataset contributes a usable sample per epoch: training has nothing to train on")
    return report


def _check_entry(
    meta_path: Path, name: str, entry, settings: DataSettings, conversation_tokenizer, problem, warning, progress
) -> DatasetCounts:
    """One dataset of the meta file: its keys, then every line, then its totals."""
    for message in unknown_key_problems(meta_path, name, entry):
        problem(message)
    try:
        spec = dataset_spec(meta_path, name, entry)
    except DataError as err:
        problem(str(err))
        return DatasetCounts(name)
    patch_problem = dataset_patch_problem(spec, settings)
    if patch_problem:
        problem(f"{meta_path}: {patch_problem}")
        return DatasetCounts(name)
    counts = _check_dataset(spec, settings, conversation_tokenizer, problem, warning, progress)
    _check_dataset_totals(f"{meta_path}: dataset {name!r}", spec, counts, problem, warning)
    return counts


def _check_dataset_totals(where: str, spec: DatasetSpec, counts: DatasetCounts, problem, warning) -> None:
    """Dataset-level findings: a stale 'length' (a warning: only the real lines count, as upstream)
    and a dataset that adds nothing to an epoch (an error: its data is silently unused)."""
    if spec.length is not None and spec.length != counts.lines:
        warning(f"{where}: 'length' is {spec.length} but the annotation has {counts.lines} non-empty line(s) "
                "(repeat_time applies to the real lines; 'length' is not used)")
    if counts.per_epoch:
        return
    reason = why_no_samples(spec, counts.lines) or "none of the lines an epoch uses is usable (see the problems above)"
    problem(f"{where}: 0 samples per epoch: {reason}")


def _check_dataset(
    spec: DatasetSpec, settings: DataSettings, conversation_tokenizer, problem, warning, progress
) -> DatasetCounts:
    counts = DatasetCounts(spec.name, tokens=0 if conversation_tokenizer else None)
    index = JsonlIndex(spec.annotation)
    counts.lines = len(index)
    usable_lines = set()
    for line, (where, raw) in enumerate(progress_counter(index, total=len(index), desc=f"checking {spec.name}", show=progress)):
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
