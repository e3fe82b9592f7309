"""The demo's ablations: pretraining again with one setting changed, all else equal (data, steps,
seed), and retrieval compared against the variant without the regulariser.

* ``tmaug``: TMAug off, and upstream's ``TMAug_prob`` 0.5, 0.75 (the demo's default) and 0.9.
  ``TMAug_prob P`` augments a sample with probability 1 - P and then drops a fraction P of its
  image tokens (:mod:`vitp.model.tmaug`). The ViTP paper's ablation of this regulariser, at full
  scale (ViT-L, InternVL2.5-1B) and measured downstream as RSAR mAP: no dropping 52.8, 75 % dropped
  54.6, 90 % dropped 54.3; it does not report 50 %.
* ``droppath``: DropPath rate 0 against 0.1 (the demo's default, and ViTP's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ABLATIONS = ("tmaug", "droppath")

# The paper's RSAR mAP for each TMAug variant it reports (label -> mAP).
PAPER_TMAUG_RSAR_MAP = {"off": 52.8, "0.75": 54.6, "0.9": 54.3}


@dataclass(frozen=True)
class Variant:
    label: str  # "off", "0.5", ...
    description: str
    changes: dict[str, Any] = field(hash=False)  # DemoSettings fields that differ from the demo's settings
    x: float  # where it sits on the chart: drop ratio, or DropPath rate
    paper: float | None = None  # the paper's figure for this variant, where it gives one


def variants(ablation: str) -> list[Variant]:
    """The variants of an ablation; the first is the reference the others are compared with."""
    if ablation == "tmaug":
        return [Variant("off", "no token dropping", {"tmaug_prob": None}, 0.0, PAPER_TMAUG_RSAR_MAP["off"])] + [
            Variant(str(p), f"{1 - p:.0%} of samples lose {p:.0%} of their image tokens", {"tmaug_prob": p}, p,
                    PAPER_TMAUG_RSAR_MAP.get(str(p)))
            for p in (0.5, 0.75, 0.9)
        ]
    if ablation == "droppath":
        return [Variant(str(rate), f"DropPath rate {rate}", {"drop_path_rate": rate}, rate) for rate in (0.0, 0.1)]
    raise ValueError(f"ablation must be one of {', '.join(ABLATIONS)}, got {ablation!r}")


def axis_label(ablation: str) -> str:
    return {"tmaug": "fraction of image tokens dropped (upstream TMAug_prob)", "droppath": "DropPath rate"}[ablation]
