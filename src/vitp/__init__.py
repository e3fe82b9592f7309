"""vitp: Visual Instruction Pretraining (ViTP) for InternVL-style models, and retrieval with its ViT."""

from vitp.errors import ConfigError, VitpError, WeightFormatError
from vitp.model.vit_checkpoint import convert_vit, inspect_checkpoint, load_vit, save_vit
from vitp.model.vision import PRESETS, InternViT, VisionConfig, build_vit, vision_config

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "ConfigError",
    "InternViT",
    "VisionConfig",
    "VitpError",
    "WeightFormatError",
    "build_vit",
    "convert_vit",
    "inspect_checkpoint",
    "load_vit",
    "save_vit",
    "vision_config",
]
