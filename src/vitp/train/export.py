"""Take the ViT out of a pretrained checkpoint (upstream's tools/extract_vit.py), in the forms its users read."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vitp.errors import ConfigError
from vitp.model.vision import InternViT, VisionConfig
from vitp.model.vit_checkpoint import load_vit, save_vit
from vitp.tensor_io import PICKLE_SUFFIXES

logger = logging.getLogger("vitp")

# What each export form writes under the output directory: (save format, place).
EXPORT_FORMATS: dict[str, tuple[tuple[str, str], ...]] = {
    "vitp+hf": (("vitp", "vit.safetensors"), ("hf", "hf")),  # ViTP's release form, and transformers'
    "vitp": (("vitp", "vit.safetensors"),),
    "hf": (("hf", "."),),  # an InternVLVisionModel directory
    "internvit": (("internvit", "."),),  # an InternVisionModel directory, as upstream's extract_vit.py writes
}


def export_vit(
    checkpoint: str | Path,
    output: str | Path,
    *,
    form: str = "vitp+hf",
    key_prefix: str = "vision_model.",
    dtype: torch.dtype | None = None,
    config: VisionConfig | None = None,
) -> list[Path]:
    """Write the checkpoint's ViT (in its stored precision unless ``dtype``) as ``form`` (a key of
    :data:`EXPORT_FORMATS`) under the directory ``output``; every form loads with ``vitp.load_vit`` and
    ``vitp features``. An ``output`` that names a weights file (``vit.safetensors``; the seed guide's
    ``vitp_vit.pth``) gets one ViTP-release safetensors (+ JSON config) there instead: vitp writes no pickles.

    ``checkpoint`` is any checkpoint vitp reads (directory or a ``.safetensors``/``.bin``/``.pth`` file),
    or a run's output directory that holds only ``checkpoint-N`` folders (a run stopped before its final
    save): the newest complete one is used. ``config`` is for weights files saved without one."""
    if form not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export form {form!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    output = Path(output)
    model = load_vit(newest_checkpoint(Path(checkpoint)), config=config, dtype=dtype)
    if output.suffix in (".safetensors", *PICKLE_SUFFIXES):
        return _export_file(model, output, key_prefix)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output}: the output is a file; give a directory, or a .safetensors file name")
    files: list[Path] = []
    for save_format, place in EXPORT_FORMATS[form]:
        files += save_vit(model, output / place, to=save_format, key_prefix=key_prefix)
    return files


def _export_file(model: InternViT, output: Path, key_prefix: str) -> list[Path]:
    weights = output.with_suffix(".safetensors")
    if weights != output:
        logger.warning("%s: vitp writes weights as safetensors, never as pickles: writing %s", output, weights)
    return save_vit(model, weights, to="vitp", key_prefix=key_prefix)


def newest_checkpoint(path: Path) -> Path:
    """``path`` itself, unless it is a run directory with checkpoints but no final model."""
    from vitp.train.pretrain import checkpoint_problem, checkpoints

    if not path.is_dir() or (path / "config.json").is_file():
        return path
    for candidate in checkpoints(path):
        if checkpoint_problem(candidate) is None:
            logger.warning("%s has no final model: exporting the ViT of %s", path, candidate)
            return candidate
    return path
