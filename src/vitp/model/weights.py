"""The one strict loader behind every checkpoint format: a key table applied to stored tensors.

Every tensor the model expects must be stored (under the name the table gives it) with the right shape,
and nothing may be left over, or one :class:`~vitp.errors.WeightFormatError` lists the first offenders.
The one difference tolerated is a ViT position embedding for another patch grid: it is resampled, and
the resampling is logged.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Iterable, Mapping

import torch
from timm.layers import resample_abs_pos_embed

from vitp.errors import WeightFormatError
from vitp.model.formats.keymap import KeyMap
from vitp.tensor_io import TensorSource

logger = logging.getLogger("vitp")


def read_state(
    source: TensorSource,
    keymap: KeyMap,
    expected: Mapping[str, tuple[int, ...]],
    header: list[str],
    *,
    on_disk: Mapping[str, str] | None = None,
    optional: frozenset[str] = frozenset(),
    shown_prefix: str = "",
    pos_embed_key: str | None = None,
    where: object = "",
) -> dict[str, torch.Tensor]:
    """Our tensors (``expected``: name -> shape) from ``source``, named and shaped as ``keymap`` says.

    ``on_disk`` maps the names the table uses to the stored keys (by default the stored keys
    themselves); tensors in ``optional`` may be absent (a tied LM head). ``header`` opens the error
    message; ``shown_prefix`` is put before names in it."""
    on_disk = dict(on_disk) if on_disk is not None else {key: key for key in source.keys()}
    try:
        groups = keymap.groups(expected)
    except KeyError as err:
        raise WeightFormatError("\n".join(header + [f"  this format cannot hold the model's tensor {err}"])) from None
    present = [g for g in groups if all(name in on_disk for name in g.theirs)]
    missing = [
        shown_prefix + name
        for g in groups
        if g not in present and not set(g.ours) <= optional
        for name in g.theirs
        if name not in on_disk
    ]
    used = {name for g in present for name in g.theirs}
    unexpected = _natural_sorted(shown_prefix + name for name in set(on_disk) - used)
    stored_shapes = source.shapes(on_disk[name] for name in used)
    wrong = []
    for group in present:
        wanted = keymap.their_shapes(group, expected)
        for name, shape in wanted.items():
            found = stored_shapes[on_disk[name]]
            if found != shape and not (group.ours == (pos_embed_key,) and _is_other_grid(found, shape)):
                wrong.append(f"{shown_prefix}{name} is {list(found)}, expected {list(shape)}")
    if missing or unexpected or wrong:
        lines = list(header)
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                listed = "; ".join(items[:5]) + (f"; ... ({len(items) - 5} more)" if len(items) > 5 else "")
                lines.append(f"  {title} ({len(items)}): {listed}")
        raise WeightFormatError("\n".join(lines))
    loaded = source.load(on_disk[name] for name in used)
    state: dict[str, torch.Tensor] = {}
    for group in present:
        state.update(keymap.to_ours(group, {name: loaded[on_disk[name]] for name in group.theirs}))
    if pos_embed_key in state and tuple(state[pos_embed_key].shape) != tuple(expected[pos_embed_key]):
        state[pos_embed_key] = _resample_pos_embed(state[pos_embed_key], expected[pos_embed_key][1], where)
    return state


def dominant_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype most of the elements have (the checkpoint's storage precision)."""
    counts: Counter = Counter()
    for tensor in state.values():
        counts[tensor.dtype] += tensor.numel()
    return counts.most_common(1)[0][0]


def _is_other_grid(found: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """A (1, 1 + n*n, dim) position embedding that resampling can fit to ``expected``."""
    if len(found) != 3 or found[0] != 1 or found[2] != expected[2] or found[1] < 2:
        return False
    side = round((found[1] - 1) ** 0.5)
    return side * side == found[1] - 1


def _natural_sorted(keys: Iterable[str]) -> list[str]:
    """Sort so that layers.2 comes before layers.10."""
    return sorted(keys, key=lambda key: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)])


def _resample_pos_embed(tensor: torch.Tensor, target_tokens: int, where: object) -> torch.Tensor:
    """A position embedding for another patch grid, resampled like InternVL does (bicubic, no antialias)."""
    side = round((tensor.shape[1] - 1) ** 0.5)
    target = round((target_tokens - 1) ** 0.5)
    logger.warning("%s: position embedding resampled from a %dx%d to a %dx%d patch grid", where, side, side, target, target)
    resampled = resample_abs_pos_embed(
        tensor.float(), new_size=(target, target), old_size=(side, side), num_prefix_tokens=1, antialias=False
    )
    return resampled.to(tensor.dtype)
