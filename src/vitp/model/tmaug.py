"""Token-mask augmentation (TMAug, "visual robustness learning" in the ViTP paper), as pure functions.

It acts on the LLM's input sequence after the image embeddings are in place (the ViT still sees every
patch). Each training sample is augmented with probability ``prob``; an augmented sample loses
``int(ratio * n)`` of its ``n`` <IMG_CONTEXT> tokens, chosen uniformly:

* ``drop`` (the paper and upstream code): the tokens are removed from the sequence; survivors keep
  their original position ids; ``<img>``/``</img>`` and all text stay. The batch is re-padded to its new
  longest sample, so dropping really saves compute (upstream pads back to the old length and only
  works with one sample per device).
* ``zero`` (the seed guide's description): the embeddings are set to zero in place.

Upstream's flag ``--TMAug_prob P`` means: drop mode, fire with probability 1 - P, drop a fraction P.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("drop", "zero")


@dataclass(frozen=True)
class TMAugConfig:
    prob: float = 0.0  # probability that a sample is augmented
    ratio: float = 0.0  # fraction of its image-context tokens affected
    mode: str = "drop"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"tmaug_mode must be one of {MODES}, got {self.mode!r}")
        if not (0.0 <= self.prob <= 1.0 and 0.0 <= self.ratio <= 1.0):
            raise ValueError(f"tmaug_prob and tmaug_ratio must be in [0, 1], got {self.prob} and {self.ratio}")

    @property
    def active(self) -> bool:
        return self.prob > 0 and self.ratio > 0

    @classmethod
    def from_upstream(cls, tmaug_prob: float) -> "TMAugConfig":
        """ViTP's ``--TMAug_prob P``: fires when uniform(0, 1) > P (probability 1 - P), drops a fraction P."""
        return cls(prob=1.0 - tmaug_prob, ratio=tmaug_prob, mode="drop")


@dataclass
class TMAugBatch:
    inputs_embeds: torch.Tensor  # (B, L', D)
    attention_mask: torch.Tensor  # (B, L')
    position_ids: torch.Tensor  # (B, L')
    labels: torch.Tensor | None  # (B, L')
    augmented_samples: int
    affected_tokens: int


def choose_tokens(image_mask: torch.Tensor, config: TMAugConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, L) bool: the image-context tokens to drop or zero, drawn independently per sample."""
    chosen = torch.zeros_like(image_mask)
    draws = torch.rand(image_mask.shape[0], generator=generator)
    for row in range(image_mask.shape[0]):
        if draws[row] >= config.prob:
            continue
        positions = image_mask[row].nonzero(as_tuple=True)[0]
        count = int(config.ratio * len(positions))
        if count == 0:
            continue
        picked = torch.randperm(len(positions), generator=generator)[:count]
        chosen[row, positions[picked.to(positions.device)]] = True
    return chosen


def apply_tmaug(
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    labels: torch.Tensor | None,
    image_mask: torch.Tensor,
    config: TMAugConfig,
    generator: torch.Generator | None = None,
) -> TMAugBatch:
    """Augment a right-padded batch; ``image_mask`` marks the <IMG_CONTEXT> positions."""
    chosen = choose_tokens(image_mask, config, generator)
    augmented = int(chosen.any(dim=1).sum())
    affected = int(chosen.sum())
    if config.mode == "zero":
        inputs_embeds = inputs_embeds.masked_fill(chosen.unsqueeze(-1), 0.0)
        return TMAugBatch(inputs_embeds, attention_mask, position_ids, labels, augmented, affected)
    keep = attention_mask.bool() & ~chosen
    lengths = keep.sum(dim=1)
    longest = int(lengths.max())
    batch, _, width = inputs_embeds.shape
    # Scatter the kept positions of every row to the front of a shorter, right-padded batch.
    columns = torch.cumsum(keep, dim=1) - 1
    rows = torch.arange(batch, device=keep.device).unsqueeze(1).expand_as(keep)
    new_embeds = inputs_embeds.new_zeros(batch, longest, width)
    new_embeds[rows[keep], columns[keep]] = inputs_embeds[keep]
    new_mask = (torch.arange(longest, device=keep.device).unsqueeze(0) < lengths.unsqueeze(1)).to(attention_mask.dtype)
    new_positions = torch.zeros(batch, longest, dtype=position_ids.dtype, device=position_ids.device)
    new_positions[rows[keep], columns[keep]] = position_ids[keep]
    new_labels = None
    if labels is not None:
        new_labels = torch.full((batch, longest), -100, dtype=labels.dtype, device=labels.device)
        new_labels[rows[keep], columns[keep]] = labels[keep]
    return TMAugBatch(new_embeds, new_mask, new_positions, new_labels, augmented, affected)
