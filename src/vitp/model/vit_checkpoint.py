"""ViT checkpoints: recognise any file or directory that holds an InternViT, load it strictly, write it.

What vitp reads (format auto-detected, key tables in ``vitp.model.formats.vit``): InternVL remote-code and
transformers InternVL directories, InternViT (``InternVisionModel``) and ``InternVLVisionModel``
directories, ViTP release files, timm state dicts; InternViT-300M and -6B alike. What it writes:

* ``vitp``      one safetensors with InternViT keys (ViTP's release form) + a JSON config beside it;
* ``hf``        a directory that ``transformers.InternVLVisionModel.from_pretrained`` loads;
* ``internvit`` a directory as upstream's ``tools/extract_vit.py`` writes it (``InternVisionModel``
  config and keys ``embeddings.*``, ``encoder.layers.N.*``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitp.errors import ConfigError, WeightFormatError
from vitp.model.formats.vit import (
    KEYMAPS,
    LAYOUT_NAMES,
    SIGNATURES,
    config_from_hf,
    config_from_internvit,
    config_from_vitp,
    config_to_hf,
    config_to_internvit,
    nested_config,
)
from vitp.files import write_json
from vitp.model.vision import PRESETS, InternViT, VisionConfig
from vitp.model.weights import dominant_dtype, read_state
from vitp.tensor_io import TensorSource, find_directory_weights, open_tensor_source, read_json, save_safetensors

logger = logging.getLogger("vitp")

SAVE_FORMATS = ("vitp", "hf", "internvit")


@dataclass(frozen=True)
class Checkpoint:
    """What a path holds: where its ViT tensors are, how they are named, and its config if it has one."""

    path: Path
    kind: str  # a phrase for messages: "InternVL remote-code checkpoint directory", ...
    source: TensorSource
    layout: str
    prefix: str
    config: VisionConfig | None
    config_origin: str | None

    def describe(self) -> str:
        under = f" under {self.prefix!r}" if self.prefix else ""
        return f"{self.kind} ({LAYOUT_NAMES[self.layout]}{under})"


# --------------------------------------------------------------------------------------------------
# Detection


def detect_layout(keys: list[str], where: str) -> tuple[str, str]:
    """(layout, prefix) of the ViT tensors among ``keys``."""
    found: set[tuple[str, str]] = set()
    for key in keys:
        for layout, signature in SIGNATURES:
            if key == signature or key.endswith("." + signature):
                found.add((layout, key[: len(key) - len(signature)]))
                break
    if len(found) == 1:
        return found.pop()
    if not found:
        sample = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
        raise WeightFormatError(
            f"{where}: unknown weight format: no ViT found among {len(keys)} tensors ({sample}). Expected "
            f"InternViT keys (embeddings.class_embedding, encoder.layers.N...), transformers InternVL keys "
            f"(embeddings.cls_token, encoder.layer.N...) or timm keys (cls_token, blocks.N...), with any prefix"
        )
    listed = ", ".join(f"{layout} under {prefix!r}" for layout, prefix in sorted(found))
    raise WeightFormatError(f"{where}: ambiguous: several ViTs found ({listed})")


def inspect_checkpoint(path: str | Path) -> Checkpoint:
    """Recognise a checkpoint directory or weights file without loading its tensors."""
    path = Path(path)
    if not path.exists():
        raise WeightFormatError(f"{path}: no such file or directory")
    if path.is_dir():
        return _inspect_directory(path)
    return _inspect_file(path)


def _inspect_directory(directory: Path) -> Checkpoint:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise WeightFormatError(
            f"{directory}: not a checkpoint directory (no config.json). Give an InternVL / transformers "
            f"checkpoint directory, or the path of a weights file (.safetensors, .bin, .pth)"
        )
    config = read_json(config_path)
    where = str(config_path)
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if "vision_config" in config and ("llm_config" in config or model_type == "internvl_chat"):
        kind, layout = "InternVL remote-code checkpoint directory", "internvit"
        vit_config = config_from_internvit(nested_config(config, "vision_config", where), f"{where}: vision_config")
    elif model_type == "internvl" or ("vision_config" in config and "text_config" in config):
        kind, layout = "transformers InternVL checkpoint directory", "hf"
        vit_config = config_from_hf(nested_config(config, "vision_config", where), f"{where}: vision_config")
    elif model_type == "internvl_vision":
        kind, layout = "transformers InternVLVisionModel directory", "hf"
        vit_config = config_from_hf(config, where)
    elif model_type == "intern_vit_6b" or "InternVisionModel" in architectures:
        kind, layout = "InternViT checkpoint directory", "internvit"
        vit_config = config_from_internvit(config, where)
    else:
        raise WeightFormatError(
            f"{where}: unknown model_type {model_type!r}; expected an InternVL remote-code checkpoint "
            f"(model_type 'internvl_chat'), a transformers InternVL one ('internvl' or 'internvl_vision') "
            f"or an InternViT one ('intern_vit_6b')"
        )
    source = open_tensor_source(find_directory_weights(directory))
    found_layout, prefix = detect_layout(source.keys(), str(source.path))
    if found_layout != layout:
        raise WeightFormatError(
            f"{source.path}: config.json describes a {kind} ({LAYOUT_NAMES[layout]}) but the weights hold "
            f"{LAYOUT_NAMES[found_layout]}"
        )
    return Checkpoint(directory, kind, source, layout, prefix, vit_config, where)


def _inspect_file(path: Path) -> Checkpoint:
    source = open_tensor_source(path)
    layout, prefix = detect_layout(source.keys(), str(path))
    kind = {"internvit": "InternViT weights file (ViTP release)", "hf": "transformers InternVL weights file",
            "timm": "timm state dict"}[layout]
    config, origin = _file_config(path, source)
    return Checkpoint(path, kind, source, layout, prefix, config, origin)


def sidecar_path(weights_path: Path) -> Path:
    """``ViT.safetensors`` -> ``ViT.json``: where vitp writes (and looks for) a weights file's config."""
    return weights_path.with_suffix(".json")


def _file_config(path: Path, source: TensorSource) -> tuple[VisionConfig | None, str | None]:
    """The config saved with a weights file by vitp: the JSON beside it, else the safetensors metadata."""
    sidecar = sidecar_path(path)
    if sidecar.is_file() and not sidecar.name.endswith(".index.json"):
        values = read_json(sidecar)
        if "vision_config" in values:
            return config_from_vitp(values["vision_config"], str(sidecar)), str(sidecar)
        logger.info("%s has no 'vision_config'; not used as the config of %s", sidecar, path.name)
    embedded = source.metadata.get("vitp_vision_config")
    if embedded:
        where = f"{path} (safetensors metadata)"
        try:
            values = json.loads(embedded)
        except json.JSONDecodeError as err:
            raise WeightFormatError(f"{where}: invalid vitp_vision_config JSON ({err.msg})") from None
        return config_from_vitp(values, where), where
    return None, None


def infer_config(checkpoint: Checkpoint) -> VisionConfig:
    """Read the shape of the network off the tensors, for weights saved without a config.

    Everything but the number of heads is visible in the shapes; the heads are taken from the preset
    of the same shape, and a network that matches no preset needs an explicit config.
    """
    where = checkpoint.describe() + f" at {checkpoint.path}"
    keymap = KEYMAPS[checkpoint.layout]
    stored: dict[str, str] = {}  # our name -> a stored key holding (part of) it
    for key in checkpoint.source.keys():
        if key.startswith(checkpoint.prefix):
            for name in keymap.our_names(key[len(checkpoint.prefix) :]):
                stored.setdefault(name, key)
    needed = ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"]
    absent = [name for name in needed if name not in stored]
    if absent:
        raise WeightFormatError(f"{where}: cannot infer the ViT's shape: tensors for {absent} are missing")
    shapes = checkpoint.source.shapes(stored[name] for name in needed)
    hidden = shapes[stored["cls_token"]][-1]
    patch = shapes[stored["patch_embed.proj.weight"]][-1]
    positions = shapes[stored["pos_embed"]][1] - 1
    grid = int(round(positions**0.5))
    depth = 1 + max(int(m.group(1)) for name in stored if (m := re.match(r"blocks\.(\d+)\.", name)))
    shape = dict(
        image_size=grid * patch,
        patch_size=patch,
        hidden_size=hidden,
        num_layers=depth,
        intermediate_size=shapes[stored["blocks.0.mlp.fc1.weight"]][0],
        qkv_bias="blocks.0.attn.qkv.bias" in stored,
        norm_type="layer_norm" if "blocks.0.norm1.bias" in stored else "rms_norm",
        qk_norm="blocks.0.attn.q_norm.weight" in stored,
    )
    for name, preset in PRESETS.items():
        if all(getattr(preset, field) == value for field, value in shape.items()):
            logger.info("%s: no config saved with the weights; shapes match preset %r", where, name)
            return preset
    raise WeightFormatError(
        f"{where}: no config saved with the weights, and its shapes ({shape}) match no preset, so the number "
        f"of attention heads is unknown. Pass a config (vit_config JSON or preset name with num_heads)"
    )


# --------------------------------------------------------------------------------------------------
# Loading


def load_vit(
    path: str | Path | Checkpoint,
    *,
    config: VisionConfig | None = None,
    image_size: int | None = None,
    drop_path_rate: float | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> InternViT:
    """Load an InternViT from any supported checkpoint, strictly; returned in eval mode.

    ``config`` overrides the checkpoint's own; ``image_size`` builds the model for another native
    resolution (the position embedding is resampled); ``dtype=None`` keeps the stored precision.
    ``path`` may be a Checkpoint already inspected, so that its files are opened once.
    """
    checkpoint = path if isinstance(path, Checkpoint) else inspect_checkpoint(path)
    config, origin = checkpoint_config(checkpoint, config)
    changes = {k: v for k, v in (("image_size", image_size), ("drop_path_rate", drop_path_rate)) if v is not None}
    with torch.device("meta"):  # no time or memory spent on random weights that are overwritten next
        model = InternViT(config.replace(**changes))
    state = read_vit_state(checkpoint, model, dtype, origin)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def checkpoint_config(checkpoint: Checkpoint, config: VisionConfig | None = None) -> tuple[VisionConfig, str]:
    """(config, where it came from): the one given, else the checkpoint's own, else read off the shapes."""
    if config is not None:
        return config, "the config given"
    if checkpoint.config is not None:
        return checkpoint.config, checkpoint.config_origin or str(checkpoint.path)
    return infer_config(checkpoint), "inferred from the tensor shapes"


def read_vit_state(
    checkpoint: Checkpoint, model: InternViT, dtype: torch.dtype | None, config_origin: str, our_prefix: str = ""
) -> dict[str, torch.Tensor]:
    """The checkpoint's ViT tensors under the model's names (each prefixed with ``our_prefix``), after
    checking names and shapes."""
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    prefix = checkpoint.prefix
    on_disk = {key[len(prefix) :]: key for key in checkpoint.source.keys() if key.startswith(prefix)}
    config = model.config
    header = [
        f"cannot load the ViT from {checkpoint.path}",
        f"  detected format: {checkpoint.describe()}",
        f"  expected: InternViT with {config.num_layers} layers, hidden {config.hidden_size}, "
        f"MLP {config.intermediate_size}, patch {config.patch_size}, image {config.image_size}, "
        f"qkv bias {config.qkv_bias}, {config.norm_type}{', QK-norm' if config.qk_norm else ''} "
        f"(config: {config_origin})",
    ]
    state = read_state(
        checkpoint.source, KEYMAPS[checkpoint.layout], expected, header,
        on_disk=on_disk, shown_prefix=prefix, pos_embed_key="pos_embed", where=checkpoint.path,
    )
    target = dtype or dominant_dtype(state)
    return {our_prefix + key: tensor.to(target) for key, tensor in state.items()}


# --------------------------------------------------------------------------------------------------
# Saving


def save_vit(model: InternViT, destination: str | Path, to: str = "vitp", key_prefix: str = "vision_model.") -> list[Path]:
    """Write a ViT in one of :data:`SAVE_FORMATS`: ``vitp`` (``destination`` a ``.safetensors`` file, keys
    under ``key_prefix``, a JSON config beside it), ``hf`` or ``internvit`` (``destination`` a directory).
    Returns the files written."""
    destination = Path(destination)
    state = {key: tensor.detach() for key, tensor in model.state_dict().items()}
    config = model.config
    dtype = dominant_dtype(state)
    if to == "vitp":
        if destination.suffix != ".safetensors":
            raise WeightFormatError(f"{destination}: a vitp ViT file must end in .safetensors")
        config_json = {
            "format": "vitp-vit",
            "key_layout": "internvit",
            "key_prefix": key_prefix,
            "vision_config": config.to_dict(),
        }
        metadata = {"vitp_format": "internvit", "vitp_vision_config": json.dumps(config.to_dict(), sort_keys=True)}
        tensors = KEYMAPS["internvit"].prefixed("", key_prefix).to_theirs(state)
        save_safetensors(tensors, destination, metadata)
        write_json(config_json, sidecar_path(destination))
        return [destination, sidecar_path(destination)]
    if to not in SAVE_FORMATS:
        raise WeightFormatError(f"unknown ViT save format {to!r}; expected one of {', '.join(SAVE_FORMATS)}")
    if destination.exists() and not destination.is_dir():
        raise WeightFormatError(f"{destination}: exists and is not a directory")
    config_json = config_to_hf(config, dtype) if to == "hf" else config_to_internvit(config, dtype)
    save_safetensors(KEYMAPS[to].to_theirs(state), destination / "model.safetensors")
    write_json(config_json, destination / "config.json")
    return [destination / "model.safetensors", destination / "config.json"]


def convert_vit(
    source: str | Path,
    destination: str | Path,
    to: str,
    *,
    config: VisionConfig | None = None,
    key_prefix: str = "vision_model.",
    dtype: torch.dtype | None = None,
) -> tuple[Checkpoint, InternViT, list[Path]]:
    """Load a ViT from any supported checkpoint and write it in one of the save formats."""
    checkpoint = inspect_checkpoint(source)
    model = load_vit(checkpoint, config=config, dtype=dtype)
    return checkpoint, model, save_vit(model, destination, to=to, key_prefix=key_prefix)


def config_from_argument(value: str, **overrides: Any) -> VisionConfig:
    """A config named by the user: a preset name, or a JSON file of VisionConfig fields (optionally under
    "vision_config", as in the JSON vitp writes beside a weights file)."""
    if value in PRESETS:
        return PRESETS[value].replace(**overrides)
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{value!r} is neither a vision preset ({', '.join(sorted(PRESETS))}) nor a JSON file")
    values = read_json(path)
    return config_from_vitp(values.get("vision_config", values), str(path)).replace(**overrides)
