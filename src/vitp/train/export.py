"""`vitp export-vit`: take the ViT out of a pretrained checkpoint (upstream's tools/extract_vit.py)."""

from __future__ import annotations

from pathlib import Path

from vitp.formats import load_vit, save_vit


def export_vit(checkpoint: str | Path, output_dir: str | Path, key_prefix: str = "vision_model.") -> list[Path]:
    """Write the checkpoint's ViT, in its stored precision, both as a ViTP-release safetensors with
    InternViT keys (``vit.safetensors`` + ``vit.json``) and as a transformers InternVLVisionModel
    directory (``hf/``). Both load with ``vitp.load_vit`` and ``vitp features``."""
    model = load_vit(checkpoint, dtype=None)
    output_dir = Path(output_dir)
    files = save_vit(model, output_dir / "vit.safetensors", to="vitp", key_prefix=key_prefix)
    files += save_vit(model, output_dir / "hf", to="hf")
    return files
