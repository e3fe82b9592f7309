"""Token augmentations of ViTP on the LLM's input sequence, as pure functions: TMAug and TSAug.

Both act after the image embeddings are in place (the ViT still sees every patch), on each sample
on its own: a row of a padded batch, or each sample of a packed row (``segment_ids``).

TMAug (token-mask augmentation, "visual robustness learning" in the ViTP paper). A sample is
augmented with probability ``prob``; it loses ``int(ratio * n)`` of its ``n`` <IMG_CONTEXT> tokens,
chosen uniformly:

* ``drop`` (the paper and upstream code): the tokens are removed from the sequence; survivors keep
  their original position ids; ``<img>``/``</img>`` and all text stay. The batch is re-padded to its new
  longest row, so dropping really saves compute (upstream pads back to the old length and only
  works with one sample per device).
* ``zero`` (the seed guide's description): the embeddings are set to zero in place.

Upstream's flag ``--TMAug_prob P`` means: drop mode, fire with probability 1 - P, drop a fraction P.

TSAug (token-shuffle augmentation, upstream's ``--TSAug_prob``): with probability ``prob`` a sample's
<IMG_CONTEXT> positions are permuted among themselves: the slot of image token p receives the
embedding and the position id of image token sigma(p), so each embedding keeps its rotary position
and only the causal order of the image tokens changes; text is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("drop", "zero")
# What a per-token tensor is padded with when TMAug shortens rows.
PAD_VALUES = {"labels": -100, "segment_ids": -1}


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
    per_token: dict[str, torch.Tensor]  # every (B, L) tensor given, shortened alike
    kept: torch.Tensor  # (B, L) bool: which of the original positions are still there
    augmented_samples: int
    affected_tokens: int


def sample_image_positions(image_mask: torch.Tensor, segment_ids: torch.Tensor | None) -> list[tuple[int, torch.Tensor]]:
    """(row, positions of its image tokens) for every sample: a row, or each segment of a packed row."""
    units = []
    for row in range(image_mask.shape[0]):
        if segment_ids is None:
            units.append((row, image_mask[row].nonzero(as_tuple=True)[0]))
            continue
        for segment in torch.unique(segment_ids[row][segment_ids[row] >= 0]).tolist():
            units.append((row, (image_mask[row] & (segment_ids[row] == segment)).nonzero(as_tuple=True)[0]))
    return units


def choose_tokens(image_mask: torch.Tensor, config: TMAugConfig, generator: torch.Generator | None = None,
                  segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) bool: the image-context tokens to drop or zero, drawn independently per sample."""
    chosen = torch.zeros_like(image_mask)
    units = sample_image_positions(image_mask, segment_ids)
    draws = torch.rand(len(units), generator=generator)
    for (row, positions), draw in zip(units, draws.tolist()):
        if draw >= config.prob:
            continue
        count = int(config.ratio * len(positions))
        if count == 0:
            continue
        picked = torch.randperm(len(positions), generator=generator)[:count]
        chosen[row, positions[picked.to(positions.device)]] = True
    return chosen


def apply_tmaug(
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    image_mask: torch.Tensor,
    config: TMAugConfig,
    per_token: dict[str, torch.Tensor] | None = None,
    segment_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> TMAugBatch:
    """Augment a right-padded (or packed) batch; ``image_mask`` marks the <IMG_CONTEXT> positions and
    ``per_token`` holds the (B, L) tensors that must stay aligned with the sequence (position ids,
    labels, loss weights, segment ids)."""
    per_token = dict(per_token or {})
    chosen = choose_tokens(image_mask, config, generator, segment_ids)
    augmented = int(chosen.any(dim=1).sum()) if segment_ids is None else _augmented_units(chosen, segment_ids)
    affected = int(chosen.sum())
    if config.mode == "zero":
        inputs_embeds = inputs_embeds.masked_fill(chosen.unsqueeze(-1), 0.0)
        return TMAugBatch(inputs_embeds, attention_mask, per_token, torch.ones_like(chosen), augmented, affected)
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
    shortened = {}
    for name, tensor in per_token.items():
        new = torch.full((batch, longest), PAD_VALUES.get(name, 0), dtype=tensor.dtype, device=tensor.device)
        new[rows[keep], columns[keep]] = tensor[keep]
        shortened[name] = new
    return TMAugBatch(new_embeds, new_mask, shortened, keep, augmented, affected)


def _augmented_units(chosen: torch.Tensor, segment_ids: torch.Tensor) -> int:
    return sum(len(torch.unique(segment_ids[row][chosen[row]])) for row in range(chosen.shape[0]))


def apply_tsaug(
    inputs_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    image_mask: torch.Tensor,
    prob: float,
    segment_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Shuffle the image tokens of each sample with probability ``prob``: (embeds, position ids,
    number of samples shuffled). Inputs are not modified."""
    units = sample_image_positions(image_mask, segment_ids)
    draws = torch.rand(len(units), generator=generator)
    inputs_embeds, position_ids = inputs_embeds.clone(), position_ids.clone()
    shuffled = 0
    for (row, positions), draw in zip(units, draws.tolist()):
        if draw >= prob or len(positions) < 2:
            continue
        source = positions[torch.randperm(len(positions), generator=generator).to(positions.device)]
        inputs_embeds[row, positions] = inputs_embeds[row, source]
        position_ids[row, positions] = position_ids[row, source]
        shuffled += 1
    return inputs_embeds, position_ids, shuffled
