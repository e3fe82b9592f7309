"""vitp: Visual Instruction Pretraining (ViTP) for InternVL-style models, and retrieval with its ViT.

The public names below are imported on first use (PEP 562), so that ``import vitp`` and every
``vitp`` command start without paying for torch, timm and transformers until they need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vitp.errors import ConfigError, DataError, RetrievalError, ServeError, VitpError, WeightFormatError

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "convert_vit": "vitp.model.vit_checkpoint",
    "inspect_checkpoint": "vitp.model.vit_checkpoint",
    "load_vit": "vitp.model.vit_checkpoint",
    "save_vit": "vitp.model.vit_checkpoint",
    "PRESETS": "vitp.model.vision",
    "InternViT": "vitp.model.vision",
    "VisionConfig": "vitp.model.vision",
    "build_vit": "vitp.model.vision",
    "vision_config": "vitp.model.vision",
}

__all__ = sorted(["ConfigError", "DataError", "RetrievalError", "ServeError", "VitpError", "WeightFormatError", *_LAZY])

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from vitp.model.vision import PRESETS, InternViT, VisionConfig, build_vit, vision_config
    from vitp.model.vit_checkpoint import convert_vit, inspect_checkpoint, load_vit, save_vit


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'vitp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
