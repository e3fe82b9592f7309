"""The vocabulary of checkpoint key tables: how one of our tensors is named and shaped in another layout.

A format is a list of rules, tried in order; the first whose ``ours`` template names one of our tensors
decides how that tensor is stored. Templates are key names with placeholders: ``{i}`` a layer index,
``{kind}`` ``weight`` or ``bias``, ``{rest}`` anything (for layouts that keep a model's own names).

* :class:`Rename`  one tensor, another name;
* :class:`Fuse`    one of ours is several of theirs concatenated along dim 0 (transformers' InternViT
  splits the fused qkv in three);
* :class:`GroupedQKV`  three of ours (q, k, v) are one of theirs, laid out per key/value head: for each
  key/value head, its ``q_per_kv`` query heads, then its key head, then its value head (InternLM2's
  ``wqkv``, as InternLM's ``tools/convert2llama.py`` documents).

A :class:`KeyMap` applies such a table in both directions; it never reads files (see ``vitp.model.weights``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Mapping, Sequence

import torch

_PLACEHOLDERS = {"i": r"\d+", "kind": r"weight|bias", "rest": r".+"}


def _pattern(template: str) -> re.Pattern:
    regex = re.escape(template)
    for name, body in _PLACEHOLDERS.items():
        regex = regex.replace(re.escape("{" + name + "}"), f"(?P<{name}>{body})")
    return re.compile(regex)


@dataclass(frozen=True)
class Rule:
    """Our tensors ``ours`` are stored as ``theirs`` (templates sharing the same placeholders)."""

    ours: tuple[str, ...]
    theirs: tuple[str, ...]

    def to_theirs(self, tensors: list[torch.Tensor], params: Mapping[str, int]) -> list[torch.Tensor]:
        raise NotImplementedError

    def to_ours(self, tensors: list[torch.Tensor], params: Mapping[str, int]) -> list[torch.Tensor]:
        raise NotImplementedError

    @cached_property
    def _our_patterns(self) -> list[re.Pattern]:
        return [_pattern(t) for t in self.ours]

    @cached_property
    def _their_patterns(self) -> list[re.Pattern]:
        return [_pattern(t) for t in self.theirs]

    def prefixed(self, ours: str, theirs: str) -> "Rule":
        """The same rule for a model nested under prefixes (``vision_model.`` -> ``vision_tower.``)."""
        raise NotImplementedError


class Rename(Rule):
    def __init__(self, ours: str, theirs: str):
        super().__init__((ours,), (theirs,))

    def prefixed(self, ours: str, theirs: str) -> "Rename":
        return Rename(ours + self.ours[0], theirs + self.theirs[0])

    def to_theirs(self, tensors, params):
        return tensors

    def to_ours(self, tensors, params):
        return tensors


class Fuse(Rule):
    """One of ours = several of theirs, concatenated along dim 0 in equal parts."""

    def __init__(self, ours: str, theirs: Sequence[str]):
        super().__init__((ours,), tuple(theirs))

    def prefixed(self, ours: str, theirs: str) -> "Fuse":
        return Fuse(ours + self.ours[0], [theirs + t for t in self.theirs])

    def to_theirs(self, tensors, params):
        # copies: safetensors refuses tensors that share storage
        return [part.clone() for part in tensors[0].chunk(len(self.theirs), dim=0)]

    def to_ours(self, tensors, params):
        return [torch.cat(tensors, dim=0)]


class GroupedQKV(Rule):
    """q, k, v of ours = one fused tensor of theirs, grouped per key/value head (needs the parameter
    ``num_key_value_heads``); works for weights and biases alike."""

    def __init__(self, ours: Sequence[str], theirs: str):
        super().__init__(tuple(ours), (theirs,))

    def prefixed(self, ours: str, theirs: str) -> "GroupedQKV":
        return GroupedQKV([ours + t for t in self.ours], theirs + self.theirs[0])

    def to_theirs(self, tensors, params):
        q, k, v = tensors
        groups = params["num_key_value_heads"]
        head_dim = k.shape[0] // groups
        per_group = [t.reshape(groups, -1, head_dim, *t.shape[1:]) for t in (q, k, v)]
        return [torch.cat(per_group, dim=1).reshape(-1, *q.shape[1:])]

    def to_ours(self, tensors, params):
        (fused,) = tensors
        groups, heads = params["num_key_value_heads"], params["num_attention_heads"]
        q_per_kv = heads // groups
        grouped = fused.reshape(groups, q_per_kv + 2, -1, *fused.shape[1:])
        head_dim = grouped.shape[2]
        q = grouped[:, :q_per_kv].reshape(heads * head_dim, *fused.shape[1:])
        k = grouped[:, q_per_kv].reshape(groups * head_dim, *fused.shape[1:])
        v = grouped[:, q_per_kv + 1].reshape(groups * head_dim, *fused.shape[1:])
        return [q.contiguous(), k.contiguous(), v.contiguous()]


@dataclass(frozen=True)
class Group:
    """One application of a rule: our tensors and the names they have in the other layout."""

    rule: Rule
    ours: tuple[str, ...]
    theirs: tuple[str, ...]


class KeyMap:
    """A table of rules (first match wins), with the parameters its rules need."""

    def __init__(self, rules: Iterable[Rule], params: Mapping[str, int] | None = None):
        self.rules = list(rules)
        self.params = dict(params or {})

    def prefixed(self, ours: str, theirs: str) -> "KeyMap":
        return KeyMap([rule.prefixed(ours, theirs) for rule in self.rules], self.params)

    def __add__(self, other: "KeyMap") -> "KeyMap":
        return KeyMap(self.rules + other.rules, {**self.params, **other.params})

    def groups(self, our_keys: Iterable[str]) -> list[Group]:
        """Our keys gathered into rule applications. KeyError for a key no rule names, or for a rule
        application that lacks some of its tensors (e.g. only q of a fused q/k/v)."""
        keys = list(our_keys)
        present = set(keys)
        seen: dict[tuple[str, ...], Group] = {}
        for key in keys:
            group = self._group_of(key)
            missing = [k for k in group.ours if k not in present]
            if missing:
                raise KeyError(f"{key!r} is stored together with {missing}, which the model does not have")
            seen.setdefault(group.ours, group)
        return list(seen.values())

    def _group_of(self, key: str) -> Group:
        for rule in self.rules:
            for pattern in rule._our_patterns:
                match = pattern.fullmatch(key)
                if match:
                    values = match.groupdict()
                    return Group(rule, _fill(rule.ours, values), _fill(rule.theirs, values))
        raise KeyError(f"{key!r}: no rule of this format names it")

    def our_names(self, their_key: str) -> tuple[str, ...]:
        """Our tensor(s) that a stored tensor holds (part of); empty if no rule names it."""
        for rule in self.rules:
            for pattern in rule._their_patterns:
                match = pattern.fullmatch(their_key)
                if match:
                    return _fill(rule.ours, match.groupdict())
        return ()

    def to_theirs(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our state dict under this layout's names (fused or split as the rules say)."""
        out: dict[str, torch.Tensor] = {}
        for group in self.groups(state):
            tensors = group.rule.to_theirs([state[k] for k in group.ours], self.params)
            out.update(zip(group.theirs, tensors))
        return out

    def to_ours(self, group: Group, stored: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors = group.rule.to_ours([stored[name] for name in group.theirs], self.params)
        return dict(zip(group.ours, tensors))

    def their_shapes(self, group: Group, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The shapes the stored tensors of ``group`` must have, for our tensors of ``shapes``."""
        with torch.device("meta"):
            tensors = [torch.empty(shapes[k]) for k in group.ours]
        return {name: tuple(t.shape) for name, t in zip(group.theirs, group.rule.to_theirs(tensors, self.params))}


def _fill(templates: tuple[str, ...], values: Mapping[str, str]) -> tuple[str, ...]:
    out = []
    for template in templates:
        for name, value in values.items():
            template = template.replace("{" + name + "}", value)
        out.append(template)
    return tuple(out)
