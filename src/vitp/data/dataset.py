"""Training samples: meta + JSONL + images -> token ids, labels and image tiles; and the collator.

Every sample goes through the same checks as ``vitp data check``. A bad line or image never stops
training: the dataset draws another line at random and hands the reason along with the sample it
returns, so the trainer can count drops and report each bad line once. (For packed training, where a
stand-in of another length would not fit its pack, the bad line is only reported: see ``replace_bad``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from vitp.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    count_tiles,
    dynamic_preprocess,
    jpeg_reencode,
    load_image,
)
from vitp.data.meta import (
    DatasetSpec,
    JsonlIndex,
    Sample,
    SampleError,
    epoch_indices,
    image_path,
    with_image_placeholder,
)
from vitp.errors import DataError
from vitp.data.templates import (
    IGNORE_INDEX,
    ConversationTokenizer,
    TemplateError,
    TokenizedConversation,
    truncate,
    truncation_problem,
)

# A bad line is replaced by a randomly drawn one. When this many draws in a row are all bad, most of
# the data is (with 10 % bad lines the chance of that is 1e-64): stop with the reasons.
MAX_REPLACEMENT_DRAWS = 64
# upstream's --normalize_type: (mean, std) of each vision tower's pretraining
NORMALIZATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "clip": ((0.4814546, 0.4578275, 0.40821073), (0.2686295, 0.2613025, 0.2757711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
LOSS_REDUCTIONS = ("token", "sample", "square")


@dataclass(frozen=True)
class DataSettings:
    """How samples are built, resolved from upstream's data flags (their defaults live in
    ``vitp.train.arguments.DataTrainingArguments``) and the model (tile size, tokens per tile)."""

    force_image_size: int
    num_image_token: int  # tokens per tile: (image_size / patch)^2 * down_sample_ratio^2
    min_dynamic_patch: int
    max_dynamic_patch: int
    use_thumbnail: bool
    dynamic_image_size: bool
    max_seq_length: int
    conv_style: str
    normalize_type: str
    pad2square: bool
    use_classifier: bool
    system_message: str | None  # None: the template's default system message
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # not a flag: the decompression-bomb limit


SETTING_NAMES = ("min_dynamic_patch", "max_dynamic_patch", "use_thumbnail", "dynamic_image_size", "max_seq_length",
                 "conv_style", "normalize_type", "pad2square", "use_classifier", "system_message")


def data_settings(flags: Any, force_image_size: int, num_image_token: int) -> DataSettings:
    """DataSettings from anything holding upstream's data flags as attributes (DataTrainingArguments);
    the tile size and its token count come from the model."""
    return DataSettings(force_image_size=force_image_size, num_image_token=num_image_token,
                        **{name: getattr(flags, name) for name in SETTING_NAMES})


def tile_transform(image_size: int, normalize_type: str = "imagenet", pad2square: bool = False) -> transforms.Compose:
    """Upstream's tile transform: (pad to a square with the mean colour,) resize bicubic, to tensor,
    normalise with the vision tower's mean and std."""
    mean, std = NORMALIZATIONS[normalize_type]
    steps = [
        transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ]
    if pad2square:
        steps.insert(0, transforms.Lambda(partial(expand_to_square, fill=tuple(int(v * 255) for v in mean))))
    return transforms.Compose(steps)


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """The image centred on a square canvas of ``fill`` colour (upstream's --pad2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def open_sample_image(spec: DatasetSpec, relative: str, where: str, max_pixels: int) -> Image.Image:
    """Decode one image of a sample, or SampleError saying whether it is missing or unreadable."""
    path = image_path(spec, relative, where)
    if not path.is_file():
        raise SampleError(where, f"image {relative!r} not found at {path}", "missing image")
    try:
        return load_image(path, max_pixels)
    except ImageError as err:
        raise SampleError(where, f"image {relative!r}: {err.reason}", "unreadable image") from None


def image_size_of(spec: DatasetSpec, relative: str, where: str) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding its pixels."""
    path = image_path(spec, relative, where)
    if not path.is_file():
        raise SampleError(where, f"image {relative!r} not found at {path}", "missing image")
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as err:  # noqa: BLE001 - any header the decoders refuse is the file's fault
        raise SampleError(where, f"image {relative!r}: not an image Pillow can read ({err})", "unreadable image") from None


def tile_budget(settings: DataSettings, spec: DatasetSpec, num_images: int) -> int:
    """Maximum tiles per image: the dataset's own max_dynamic_patch if set, shared among its images."""
    max_patch = spec.max_dynamic_patch or settings.max_dynamic_patch
    return max(1, max_patch // num_images) if num_images > 1 else max_patch


class InstructionDataset(Dataset):
    """All datasets of a meta file as one indexable dataset (``repeat_time`` applied).

    ``replace_bad``: a bad line is replaced by a randomly drawn good one (padded batches); if False
    (packed batches, planned from each line's length) the item is only the report of why it failed."""

    def __init__(self, specs: list[DatasetSpec], tokenizer, settings: DataSettings, train: bool = True,
                 replace_bad: bool = True):
        self.specs = specs
        self.settings = settings
        self.train = train
        self.replace_bad = replace_bad
        self.tokenizer = tokenizer
        self.conversation_tokenizer = ConversationTokenizer(tokenizer, settings.conv_style)
        self.indexes = [JsonlIndex(spec.annotation) for spec in specs]
        parts = [
            np.stack([np.full(len(lines), dataset), lines], axis=1)
            for dataset, lines in enumerate(epoch_indices(spec, len(index)) for spec, index in zip(specs, self.indexes))
        ]
        self.entries = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.entries)

    def dataset_sizes(self) -> list[int]:
        """Entries each dataset contributes to an epoch (after repeat_time), in meta order."""
        return np.bincount(self.entries[:, 0], minlength=len(self.specs)).tolist() if len(self.entries) else []

    def __getitem__(self, index: int) -> dict[str, Any]:
        dropped: list[tuple[str, str, str]] = []
        position = index
        for draw in range(MAX_REPLACEMENT_DRAWS + 1):
            try:
                item = self.build(position)
            except (SampleError, TemplateError) as err:
                where = getattr(err, "where", self.where(position))
                dropped.append((where, getattr(err, "kind", "template"), getattr(err, "reason", str(err))))
                if not self.replace_bad:
                    return {"dropped": dropped}
                position = self.replacement(index, draw)
                continue
            item["dropped"] = dropped
            return item
        reasons = "; ".join(f"{where}: {reason}" for where, _, reason in dropped[:3])
        raise DataError(
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

    def sample(self, position: int) -> tuple[DatasetSpec, Sample]:
        dataset, line = (int(v) for v in self.entries[position])
        return self.specs[dataset], self.indexes[dataset].sample(line)

    def build(self, position: int) -> dict[str, Any]:
        """One sample, or SampleError/TemplateError saying why this line cannot be used."""
        spec, sample = self.sample(position)
        pixel_values, tiles_per_image = self.image_tiles(sample, spec)
        tokenized = self.tokenize(sample, tiles_per_image)
        return {
            "input_ids": torch.tensor(tokenized.input_ids, dtype=torch.long),
            "labels": torch.tensor(tokenized.labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "num_tiles": int(pixel_values.shape[0]),
            "classify": tokenized.classify,
            "where": sample.where,
        }

    def measure(self, position: int) -> tuple[int, int]:
        """(tokens, tiles) the sample at ``position`` will have, from the image headers alone (no
        pixels decoded): what packing plans with. SampleError/TemplateError for a line that cannot
        be used."""
        spec, sample = self.sample(position)
        budget = tile_budget(self.settings, spec, len(sample.images))
        tiles = []
        for relative in sample.images:
            if self.settings.dynamic_image_size:
                width, height = image_size_of(spec, relative, sample.where)
                tiles.append(count_tiles(width, height, self.settings.min_dynamic_patch, budget,
                                         self.settings.force_image_size, self.settings.use_thumbnail))
            else:
                image_size_of(spec, relative, sample.where)  # the file must exist and be an image
                tiles.append(1)
        return len(self.tokenize(sample, tiles).input_ids), sum(tiles)

    def tokenize(self, sample: Sample, tiles_per_image: list[int]) -> TokenizedConversation:
        """The sample's tokens and labels, truncated to max_seq_length, or SampleError (a template
        problem, or a truncation that would cut an image or leave no answer)."""
        counts = [self.settings.num_image_token * tiles for tiles in tiles_per_image]
        system = sample.system if sample.system is not None else self.settings.system_message
        try:
            tokenized = self.conversation_tokenizer(with_image_placeholder(sample), system, counts,
                                                    classify=self.settings.use_classifier)
        except TemplateError as err:
            raise SampleError(sample.where, str(err), "template") from None
        problem = truncation_problem(tokenized, self.settings.max_seq_length)
        if problem:
            raise SampleError(sample.where, problem, "too long")
        return truncate(tokenized, self.settings.max_seq_length)

    def image_tiles(self, sample: Sample, spec: DatasetSpec) -> tuple[torch.Tensor, list[int]]:
        """All tiles of the sample's images, (tiles, 3, size, size), and the tile count of each image."""
        size = self.settings.force_image_size
        budget = tile_budget(self.settings, spec, len(sample.images))
        augment = spec.data_augment and self.train
        # upstream: --pad2square applies to the transform without augmentation only
        transform = tile_transform(size, self.settings.normalize_type, self.settings.pad2square and not augment)
        tensors, counts = [], []
        for relative in sample.images:
            image = open_sample_image(spec, relative, sample.where, self.settings.max_image_pixels)
            if self.settings.dynamic_image_size:
                tiles = dynamic_preprocess(image, self.settings.min_dynamic_patch, budget, size, self.settings.use_thumbnail)
            else:
                tiles = [image]
            if augment:  # upstream: a random JPEG quality 75-100 per tile
                tiles = [jpeg_reencode(tile, int(torch.randint(75, 101, ()))) for tile in tiles]
            tensors += [transform(tile) for tile in tiles]
            counts.append(len(tiles))
        if not tensors:
            return torch.zeros(0, 3, size, size), counts
        return torch.stack(tensors), counts


def sample_loss_weight(labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-token loss weights of one sample (0 where the label is ignored): upstream's len2weight of
    its n supervised tokens, 1 ('token'), 1/n ('sample') or 1/sqrt(n) ('square')."""
    supervised = labels != IGNORE_INDEX
    count = int(supervised.sum())
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    weight = {"token": 1.0, "sample": 1.0 / max(count, 1), "square": 1.0 / max(count, 1) ** 0.5}[reduction]
    return supervised.float() * weight


class Collator:
    """Pads a batch to its longest sample and gathers every tile of the batch.

    Returns ``input_ids``/``labels``/``attention_mask``/``loss_weight`` (batch, longest),
    ``pixel_values`` (tiles, 3, H, W), ``num_tiles`` (batch,), ``classify`` ((row, ClassifyTarget) of
    the choice questions), plus ``dropped``: (file:line, kind, reason) of lines skipped while building
    the batch. ``loss_weight`` is 1 on every supervised token with ``loss_reduction`` 'token' (upstream's
    token mean of padded batches), else each sample's weight (see :func:`sample_loss_weight`).
    """

    def __init__(self, pad_token_id: int, loss_reduction: str = "token"):
        self.pad_token_id = pad_token_id
        self.loss_reduction = loss_reduction

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        dropped = [drop for sample in samples for drop in sample.get("dropped", [])]
        samples = [sample for sample in samples if "input_ids" in sample]
        longest = max(len(sample["input_ids"]) for sample in samples)
        batch = len(samples)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        loss_weight = torch.zeros((batch, longest), dtype=torch.float32)
        for row, sample in enumerate(samples):
            length = len(sample["input_ids"])
            input_ids[row, :length] = sample["input_ids"]
            labels[row, :length] = sample["labels"]
            attention_mask[row, :length] = 1
            loss_weight[row, :length] = sample_loss_weight(sample["labels"], self.loss_reduction)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "loss_weight": loss_weight,
            "pixel_values": torch.cat([sample["pixel_values"] for sample in samples]),
            "num_tiles": torch.tensor([sample["num_tiles"] for sample in samples], dtype=torch.long),
            "classify": [(row, sample["classify"]) for row, sample in enumerate(samples) if sample.get("classify")],
            "dropped": dropped,
        }
