"""Packed training (``--use_packed_ds``): several samples in one sequence, none seeing another.

Upstream's packed dataset (InternVL ``dataset_packed.py``), re-planned so that it can be resumed
exactly: the packs are chosen in the main process from each sample's length alone (its image headers
and its tokens, no pixels), so a resumed run skips the packs it already trained without building them.

1. The sample stream: a dataset is chosen with probability proportional to its size (the square root
   with ``--use_data_resampling``) and gives its next entry, in a shuffled order. When a dataset runs
   out it restarts with a new shuffle (``--replacement``) or leaves the draw; when all have left, the
   next pass begins. The stream never ends: a packed run is as long as ``--max_steps`` says.
2. Buffers (upstream's algorithm): up to ``--max_buffer_size`` open packs, sorted by tile count.
   A sample joins the first pack with room for its tokens (``--max_packed_tokens``) and tiles
   (``--num_images_expected``), else opens one. A pack is finished when its tokens reach the limit
   exactly or its tiles do, and the fullest open pack is finished whenever there are too many.
3. The collator lays each pack into one row: positions restart at 0 for each sample, a segment id
   tells the model which sample a token belongs to (a block-diagonal causal mask on CPU, flash
   attention's varlen kernel on GPU), and the loss weights give each sample's tokens weight 1, 1/n or
   1/sqrt(n) (``--loss_reduction token|sample|square``). ``--strict_mode`` pads every row to
   ``--max_packed_tokens`` tokens and ``--num_images_expected`` tiles (blank tiles whose features are
   discarded), for shapes that never change.

Unlike upstream, a sample is never cut across two packs (``--allow_overflow``), so every sample fits:
the arguments require ``max_packed_tokens >= max_seq_length``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from vitp.data.dataset import MAX_REPLACEMENT_DRAWS, InstructionDataset, sample_loss_weight
from vitp.data.meta import SampleError
from vitp.data.templates import IGNORE_INDEX, TemplateError
from vitp.errors import DataError
from vitp.train.sampling import dataset_weights

logger = logging.getLogger("vitp")


def sample_stream(sizes: Sequence[int], weights: Sequence[float], replacement: bool,
                  rng: np.random.Generator) -> Iterator[int]:
    """One pass of upstream's sample stream over entries numbered dataset after dataset (endless with
    ``replacement``)."""
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    orders = [rng.permutation(n) for n in sizes]
    cursors = [0] * len(sizes)
    active = [d for d, n in enumerate(sizes) if n > 0]
    while active:
        chances = np.asarray([weights[d] for d in active], dtype=np.float64)
        dataset = active[int(rng.choice(len(active), p=chances / chances.sum()))]
        if cursors[dataset] == sizes[dataset]:
            if not replacement:
                active.remove(dataset)
                continue
            orders[dataset], cursors[dataset] = rng.permutation(sizes[dataset]), 0
        yield int(offsets[dataset] + orders[dataset][cursors[dataset]])
        cursors[dataset] += 1


@dataclass
class Pack:
    indices: list[int] = field(default_factory=list)
    tokens: int = 0
    tiles: int = 0


class PackPlanner:
    """Upstream's buffer list: ``add`` a sample's length, get the packs that it finished."""

    def __init__(self, max_tokens: int, max_tiles: int, max_buffers: int):
        self.max_tokens, self.max_tiles, self.max_buffers = max_tokens, max_tiles, max_buffers
        self.open: list[Pack] = []  # most tiles first

    def add(self, index: int, tokens: int, tiles: int) -> list[Pack]:
        pack = next((p for p in self.open if p.tiles + tiles <= self.max_tiles and p.tokens + tokens <= self.max_tokens),
                    None)
        if pack is None:
            pack = Pack()
        else:
            self.open.remove(pack)
        pack.indices.append(index)
        pack.tokens += tokens
        pack.tiles += tiles
        if pack.tokens >= self.max_tokens:
            finished = [pack]
        else:
            finished = []
            position = next((i for i, p in enumerate(self.open) if p.tiles < pack.tiles), len(self.open))
            self.open.insert(position, pack)
        while self.open and self.open[0].tiles == self.max_tiles:
            finished.append(self.open.pop(0))
        while len(self.open) > self.max_buffers:
            finished.append(self.open.pop(0))
        return finished

    def flush(self) -> list[Pack]:
        finished, self.open = self.open, []
        return finished


class PackedBatchSampler(Sampler[list]):
    """Batches of ``packs_per_batch`` packs, as keys (pack number, entry) of :class:`PackedItems`; a
    sample that cannot be used (or has more tiles than a pack holds) travels as ("dropped", where,
    kind, reason), so that the trainer reports it. Deterministic for a seed: every rank plans the
    same packs and takes its share, and a resumed run re-plans (from lengths only) the packs it skips.

    The stream is endless; it has no length (the Trainer then counts steps, not epochs)."""

    def __init__(self, dataset: InstructionDataset, packs_per_batch: int, max_tokens: int, max_tiles: int,
                 max_buffers: int, replacement: bool, resampling: bool, seed: int, log_every: int = 1000):
        self.dataset = dataset
        self.packs_per_batch = packs_per_batch
        self.max_tokens, self.max_tiles, self.max_buffers = max_tokens, max_tiles, max_buffers
        self.replacement = replacement
        self.sizes = dataset.dataset_sizes()
        self.weights = dataset_weights(self.sizes, resampling)
        self.seed = seed
        self.log_every = log_every
        self.lengths: dict[int, tuple[int, int] | tuple[str, str, str]] = {}

    def __len__(self) -> int:
        raise TypeError("a packed stream has no length: the number of packs depends on the order samples arrive in")

    def measure(self, index: int) -> tuple[int, int] | tuple[str, str, str]:
        """(tokens, tiles) of an entry, or (where, kind, reason) if it cannot be used; cached."""
        if index not in self.lengths:
            try:
                tokens, tiles = self.dataset.measure(index)
            except (SampleError, TemplateError) as err:
                where = getattr(err, "where", self.dataset.where(index))
                self.lengths[index] = (where, getattr(err, "kind", "template"), getattr(err, "reason", str(err)))
            else:
                if tiles > self.max_tiles:
                    self.lengths[index] = (self.dataset.where(index), "too many tiles",
                                           f"{tiles} tiles, more than a pack holds (num_images_expected {self.max_tiles})")
                else:
                    self.lengths[index] = (tokens, tiles)
        return self.lengths[index]

    def packs(self) -> Iterator[tuple[Pack, list[tuple]]]:
        """Finished packs, each with the drop reports gathered since the previous one. Stops with a
        DataError when so many samples in a row are unusable that most of the data must be bad."""
        rng = np.random.default_rng(self.seed)
        planner = PackPlanner(self.max_tokens, self.max_tiles, self.max_buffers)
        dropped: list[tuple] = []
        stats = {"packs": 0, "samples": 0, "tokens": 0, "tiles": 0}
        while True:
            for index in sample_stream(self.sizes, self.weights, self.replacement, rng):
                length = self.measure(index)
                if isinstance(length[0], str):
                    dropped.append(("dropped", *length))
                    if len(dropped) > MAX_REPLACEMENT_DRAWS:
                        reasons = "; ".join(f"{where}: {reason}" for _, where, _, reason in dropped[:3])
                        raise DataError(f"{len(dropped)} samples in a row were unusable: most of the data is bad, "
                                        f"e.g. {reasons}. `vitp data check META.json` lists every problem.")
                    continue
                for pack in planner.add(index, *length):
                    yield pack, dropped
                    dropped = []
                    self._log(stats, pack)
            if stats["packs"] == 0 and not planner.open:
                raise DataError("no sample of the data can be used: every line failed its checks "
                                "(`vitp data check META.json` lists every problem)")
            for pack in planner.flush():  # the pass is over: finish every open pack, as upstream does
                yield pack, dropped
                dropped = []
                self._log(stats, pack)

    def _log(self, stats: dict[str, int], pack: Pack) -> None:
        """upstream's --log_freq: a line about the packs every so many."""
        stats["packs"] += 1
        stats["samples"] += len(pack.indices)
        stats["tokens"] += pack.tokens
        stats["tiles"] += pack.tiles
        if stats["packs"] % self.log_every == 0:
            packs = stats["packs"]
            logger.info("packed %d samples into %d sequences: %.1f samples, %.0f%% of max_packed_tokens and "
                        "%.0f%% of num_images_expected per sequence", stats["samples"], packs, stats["samples"] / packs,
                        100 * stats["tokens"] / (packs * self.max_tokens), 100 * stats["tiles"] / (packs * self.max_tiles))

    def __iter__(self) -> Iterator[list[tuple]]:
        batch: list[tuple] = []
        number = 0
        for pack, dropped in self.packs():
            batch += dropped + [(number, index) for index in pack.indices]
            number += 1
            if number % self.packs_per_batch == 0:
                yield batch
                batch = []


class PackedItems(Dataset):
    """The dataset seen through the keys of :class:`PackedBatchSampler`: each item is tagged with its pack."""

    def __init__(self, dataset: InstructionDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple) -> dict[str, Any]:
        if key[0] == "dropped":
            return {"dropped": [tuple(key[1:])]}
        pack, index = key
        return {**self.dataset[index], "pack": pack}


class PackedCollator:
    """Lays each pack into one row (see the module docstring). Returns what the padded collator does,
    plus ``position_ids`` and ``segment_ids`` (-1 on padding) and ``image_flags`` (False for padding
    tiles); ``num_tiles`` counts each row's real tiles."""

    def __init__(self, pad_token_id: int, loss_reduction: str, strict_tokens: int | None = None,
                 strict_tiles: int | None = None, tile_size: int | None = None):
        self.pad_token_id = pad_token_id
        self.loss_reduction = loss_reduction
        self.strict_tokens, self.strict_tiles, self.tile_size = strict_tokens, strict_tiles, tile_size

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        dropped = [drop for item in items for drop in item.get("dropped", [])]
        packs: dict[int, list[dict[str, Any]]] = {}
        for item in items:
            if "input_ids" in item:
                packs.setdefault(item["pack"], []).append(item)
        rows = [self._row(samples) for samples in packs.values()] or [self._empty_row()]
        longest = self.strict_tokens or max(len(row["input_ids"]) for row in rows)
        batch = {
            "input_ids": _stack([row["input_ids"] for row in rows], longest, self.pad_token_id),
            "labels": _stack([row["labels"] for row in rows], longest, IGNORE_INDEX),
            "position_ids": _stack([row["position_ids"] for row in rows], longest, 0),
            "segment_ids": _stack([row["segment_ids"] for row in rows], longest, -1),
            "loss_weight": _stack([row["loss_weight"] for row in rows], longest, 0.0),
        }
        batch["attention_mask"] = (batch["segment_ids"] >= 0).long()
        tiles = [row["pixel_values"] for row in rows]
        flags = [torch.ones(len(t), dtype=torch.bool) for t in tiles]
        if self.strict_tiles:  # blank tiles up to num_images_expected per row, as upstream's pad_buffer
            blank = torch.zeros(1, 3, self.tile_size, self.tile_size)
            tiles = [torch.cat([t, blank.expand(self.strict_tiles - len(t), -1, -1, -1)]) for t in tiles]
            flags = [torch.cat([f, torch.zeros(self.strict_tiles - len(f), dtype=torch.bool)]) for f in flags]
        batch.update(
            pixel_values=torch.cat(tiles),
            image_flags=torch.cat(flags),
            num_tiles=torch.tensor([row["num_tiles"] for row in rows], dtype=torch.long),
            classify=[(r, target) for r, row in enumerate(rows) for target in row["classify"]],
            dropped=dropped,
        )
        return batch

    def _row(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        ids, labels, positions, segments, weights, classify = [], [], [], [], [], []
        start = 0
        for segment, sample in enumerate(samples):
            length = len(sample["input_ids"])
            sample_labels = sample["labels"].clone()
            sample_labels[0] = IGNORE_INDEX  # nothing before it in its own sample predicts it
            ids.append(sample["input_ids"])
            labels.append(sample_labels)
            positions.append(torch.arange(length))
            segments.append(torch.full((length,), segment))
            weights.append(sample_loss_weight(sample_labels, self.loss_reduction))
            if sample.get("classify"):
                classify.append(dataclasses.replace(sample["classify"], position=sample["classify"].position + start))
            start += length
        return {
            "input_ids": torch.cat(ids), "labels": torch.cat(labels), "position_ids": torch.cat(positions),
            "segment_ids": torch.cat(segments), "loss_weight": torch.cat(weights),
            "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
            "num_tiles": sum(s["num_tiles"] for s in samples), "classify": classify,
        }

    def _empty_row(self) -> dict[str, Any]:
        """A row without samples, for a batch whose every sample failed to build: nothing to learn."""
        size = self.tile_size or 1
        return {"input_ids": torch.tensor([self.pad_token_id]), "labels": torch.tensor([IGNORE_INDEX]),
                "position_ids": torch.tensor([0]), "segment_ids": torch.tensor([0]), "loss_weight": torch.tensor([0.0]),
                "pixel_values": torch.zeros(0, 3, size, size), "num_tiles": 0, "classify": []}


def _stack(tensors: list[torch.Tensor], length: int, value: float) -> torch.Tensor:
    out = torch.full((len(tensors), length), value, dtype=tensors[0].dtype)
    for row, tensor in enumerate(tensors):
        out[row, : len(tensor)] = tensor
    return out
