"""Training samples: meta + JSONL + images -> token ids, labels and image tiles; and the collator.

Every sample goes through the same checks as ``vitp data check``. A bad line or image never stops
training: the dataset draws another line at random and hands the reason along with the sample it
returns, so the trainer can count drops and report each bad line once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vitp.data.images import DEFAULT_MAX_PIXELS, ImageError, build_transform, dynamic_preprocess, jpeg_reencode, load_image
from vitp.data.meta import DatasetSpec, JsonlIndex, MetaError, Sample, SampleError, epoch_indices, image_path, with_image_placeholder
from vitp.data.template import IGNORE_INDEX, ConversationTokenizer, TemplateError, truncate, truncation_problem

# A bad line is replaced by a randomly drawn one. When this many draws in a row are all bad, most of
# the data is (with 10 % bad lines the chance of that is 1e-64): stop with the reasons.
MAX_REPLACEMENT_DRAWS = 64


@dataclass(frozen=True)
class DataSettings:
    """How samples are built; the names follow upstream's training flags."""

    force_image_size: int = 448
    num_image_token: int = 256  # tokens per tile: (image_size / patch)^2 * down_sample_ratio^2
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    dynamic_image_size: bool = True
    max_seq_length: int = 4096
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    system_message: str | None = None  # None: the template's default system message


def data_settings(flags: Any, force_image_size: int, num_image_token: int) -> DataSettings:
    """DataSettings from anything holding upstream's data flags as attributes (parsed command-line
    arguments, a PretrainConfig); the tile size and its token count come from the model."""
    names = ("min_dynamic_patch", "max_dynamic_patch", "use_thumbnail", "dynamic_image_size", "max_seq_length",
             "system_message")
    return DataSettings(force_image_size=force_image_size, num_image_token=num_image_token,
                        **{name: getattr(flags, name) for name in names})


def open_sample_image(spec: DatasetSpec, relative: str, where: str, max_pixels: int) -> Image.Image:
    """Decode one image of a sample, or SampleError saying whether it is missing or unreadable."""
    path = image_path(spec, relative, where)
    if not path.is_file():
        raise SampleError(where, f"image {relative!r} not found at {path}", "missing image")
    try:
        return load_image(path, max_pixels)
    except ImageError as err:
        raise SampleError(where, f"image {relative!r}: {err.reason}", "unreadable image") from None


def tile_budget(settings: DataSettings, spec: DatasetSpec, num_images: int) -> int:
    """Maximum tiles per image: the dataset's own max_dynamic_patch if set, shared among its images."""
    max_patch = spec.max_dynamic_patch or settings.max_dynamic_patch
    return max(1, max_patch // num_images) if num_images > 1 else max_patch


class InstructionDataset(Dataset):
    """All datasets of a meta file as one indexable dataset (``repeat_time`` applied)."""

    def __init__(self, specs: list[DatasetSpec], tokenizer, settings: DataSettings, train: bool = True):
        self.specs = specs
        self.settings = settings
        self.train = train
        self.tokenizer = tokenizer
        self.conversation_tokenizer = ConversationTokenizer(tokenizer)
        self.transform = build_transform(settings.force_image_size)
        self.indexes = [JsonlIndex(spec.annotation) for spec in specs]
        parts = [
            np.stack([np.full(len(lines), dataset), lines], axis=1)
            for dataset, lines in enumerate(epoch_indices(spec, len(index)) for spec, index in zip(specs, self.indexes))
        ]
        self.entries = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        dropped: list[tuple[str, str, str]] = []
        position = index
        for draw in range(MAX_REPLACEMENT_DRAWS + 1):
            try:
                item = self.build(position)
            except (SampleError, TemplateError) as err:
                where = getattr(err, "where", self.where(position))
                dropped.append((where, getattr(err, "kind", "template"), getattr(err, "reason", str(err))))
                position = self.replacement(index, draw)
                continue
            item["dropped"] = dropped
            return item
        reasons = "; ".join(f"{where}: {reason}" for where, _, reason in dropped[:3])
        raise MetaError(
            f"{MAX_REPLACEMENT_DRAWS + 1} samples in a row were unusable (the line asked for and "
            f"{MAX_REPLACEMENT_DRAWS} drawn at random): most of the data is bad, e.g. {reasons}. "
            f"`vitp data check META.json` lists every problem."
        )

    def replacement(self, index: int, draw: int) -> int:
        """A uniformly drawn stand-in for a bad line. Not the next line: after a run of bad lines that
        one would be trained on as often as the whole run. Seeded by (index, draw), so that a resumed
        run builds the same batches."""
        return int(np.random.default_rng((index, draw)).integers(len(self.entries)))

    def where(self, position: int) -> str:
        dataset, line = self.entries[position]
        return self.indexes[dataset].where(int(line))

    def build(self, position: int) -> dict[str, Any]:
        """One sample, or SampleError/TemplateError saying why this line cannot be used."""
        dataset, line = (int(v) for v in self.entries[position])
        spec, index = self.specs[dataset], self.indexes[dataset]
        sample = index.sample(line)
        pixel_values, tiles_per_image = self.image_tiles(sample, spec)
        counts = [self.settings.num_image_token * tiles for tiles in tiles_per_image]
        system = sample.system if sample.system is not None else self.settings.system_message
        try:
            tokenized = self.conversation_tokenizer(with_image_placeholder(sample), system, counts)
        except TemplateError as err:
            raise SampleError(sample.where, str(err), "template") from None
        problem = truncation_problem(tokenized, self.settings.max_seq_length)
        if problem:
            raise SampleError(sample.where, problem, "too long")
        tokenized = truncate(tokenized, self.settings.max_seq_length)
        return {
            "input_ids": torch.tensor(tokenized.input_ids, dtype=torch.long),
            "labels": torch.tensor(tokenized.labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "num_tiles": int(pixel_values.shape[0]),
            "where": sample.where,
        }

    def image_tiles(self, sample: Sample, spec: DatasetSpec) -> tuple[torch.Tensor, list[int]]:
        """All tiles of the sample's images, (tiles, 3, size, size), and the tile count of each image."""
        size = self.settings.force_image_size
        budget = tile_budget(self.settings, spec, len(sample.images))
        tensors, counts = [], []
        for relative in sample.images:
            image = open_sample_image(spec, relative, sample.where, self.settings.max_image_pixels)
            if self.settings.dynamic_image_size:
                tiles = dynamic_preprocess(image, self.settings.min_dynamic_patch, budget, size, self.settings.use_thumbnail)
            else:
                tiles = [image]
            if spec.data_augment and self.train:  # upstream: a random JPEG quality 75-100 per tile
                tiles = [jpeg_reencode(tile, int(torch.randint(75, 101, ()))) for tile in tiles]
            tensors += [self.transform(tile) for tile in tiles]
            counts.append(len(tiles))
        if not tensors:
            return torch.zeros(0, 3, size, size), counts
        return torch.stack(tensors), counts


class Collator:
    """Pads a batch to its longest sample and gathers every tile of the batch.

    Returns ``input_ids``/``labels``/``attention_mask`` (batch, longest), ``pixel_values`` (tiles, 3, H, W),
    ``num_tiles`` (batch,) and ``tile_sample_index`` (tiles,): which sample each tile belongs to, plus
    ``where`` (file:line of each sample) and ``dropped``: (file:line, kind, reason) of lines skipped while
    building the batch.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(sample["input_ids"]) for sample in samples)
        batch = len(samples)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        for row, sample in enumerate(samples):
            length = len(sample["input_ids"])
            input_ids[row, :length] = sample["input_ids"]
            labels[row, :length] = sample["labels"]
            attention_mask[row, :length] = 1
        num_tiles = torch.tensor([sample["num_tiles"] for sample in samples], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "pixel_values": torch.cat([sample["pixel_values"] for sample in samples]),
            "num_tiles": num_tiles,
            "tile_sample_index": torch.repeat_interleave(torch.arange(batch), num_tiles),
            "where": [sample["where"] for sample in samples],
            "dropped": [drop for sample in samples for drop in sample.get("dropped", [])],
        }
