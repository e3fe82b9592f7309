"""The demo's settings (a light module: the command line reads its defaults for its help)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class DemoSettings:
    """What a demo run is: the data set, the model's training and the seed."""

    tile_size: int = 32  # pixels at 10 m: 320 m tiles
    block_tiles: int = 8  # checkerboard blocks of 8 x 8 tiles (2.56 km)
    pretrain_stride: int = 16  # extra pretraining tiles overlapping by half, inside gallery blocks only
    largest_class_ratio: float = 2.0  # cap on the largest class (water), relative to the second largest
    max_steps: int = 1000  # measured: see README "What `make demo` does" (retrieval mAP against steps)
    batch_size: int = 16
    learning_rate: float = 5e-4
    warmup_ratio: float = 0.05
    tmaug_prob: float | None = 0.75  # upstream's TMAug_prob: 25 % of samples lose 75 % of their image tokens; None: off
    drop_path_rate: float = 0.1
    vocab_size: int = 400
    seed: int = 0  # data split and the first (or only) pretraining

    def data_key(self) -> dict:
        return {k: getattr(self, k) for k in ("tile_size", "block_tiles", "pretrain_stride", "largest_class_ratio", "seed")}


DEFAULT = DemoSettings()
QUICK = dataclasses.replace(DEFAULT, pretrain_stride=32, max_steps=150)
