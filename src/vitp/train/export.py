"""`vitp export-vit`: take the ViT out of a pretrained checkpoint (upstream's tools/extract_vit.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from vitp.errors import ConfigError
from vitp.model.vit_checkpoint import load_vit, save_vit

logger = logging.getLogger("vitp")


def export_vit(checkpoint: str | Path, output_dir: str | Path, key_prefix: str = "vision_model.") -> list[Path]:
    """Write the checkpoint's ViT, in its stored precision, both as a ViTP-release safetensors with
    InternViT keys (``vit.safetensors`` + ``vit.json``) and as a transformers InternVLVisionModel
    directory (``hf/``). Both load with ``vitp.load_vit`` and ``vitp features``.

    ``checkpoint`` may be a run's output directory that holds only ``checkpoint-N`` folders (a run
    stopped before its final save): the newest complete one is used."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"{output_dir}: the output is a file; give a directory (it gets vit.safetensors and hf/)")
    model = load_vit(newest_checkpoint(Path(checkpoint)), dtype=None)
    files = save_vit(model, output_dir / "vit.safetensors", to="vitp", key_prefix=key_prefix)
    files += save_vit(model, output_dir / "hf", to="hf")
    return files


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
