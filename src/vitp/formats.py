"""Every ViT weight layout vitp reads and writes, in one table; format detection; strict loading.

Three key layouts name the same tensors:

* ``timm``      ``blocks.N.attn.qkv.weight`` ... — our own parameter names (timm's InternViT);
* ``internvit`` ``encoder.layers.N.attn.qkv.weight`` ... — InternVL remote code, InternViT repositories
  and ViTP's released ViT;
* ``hf``        ``encoder.layer.N.attention.{q,k,v}_proj.weight`` ... — transformers'
  ``InternVLVisionModel``, with the fused qkv projection split in three.

Each can sit under a prefix: ``vision_model.`` in an InternVL remote-code checkpoint,
``model.vision_tower.`` or ``vision_tower.`` in a transformers ``InternVLForConditionalGeneration``.

Loading is strict: every expected tensor must be present with the right shape and nothing unknown may
be left over under the ViT's prefix, or a :class:`WeightFormatError` names the detected format, the
first offending keys and what was expected. The one tolerated difference is a position embedding for
another patch grid, which is resampled (and logged).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from timm.layers import resample_abs_pos_embed

from vitp.errors import ConfigError, WeightFormatError
from vitp.model.vision import PRESETS, InternViT, VisionConfig
from vitp.tensor_io import (
    TensorSource,
    find_directory_weights,
    open_tensor_source,
    read_json,
    save_safetensors,
    write_json,
)

logger = logging.getLogger("vitp")

LAYOUTS = ("timm", "internvit", "hf")
SAVE_FORMATS = ("vitp", "hf")

# One row per tensor: (timm name, InternViT name, transformers name(s)). "{i}" is the block index.
# A transformers entry with three names is timm's fused qkv tensor split along dim 0 into q, k, v.
_KEY_TABLE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("cls_token", "embeddings.class_embedding", ("embeddings.cls_token",)),
    ("pos_embed", "embeddings.position_embedding", ("embeddings.position_embeddings",)),
    ("patch_embed.proj.weight", "embeddings.patch_embedding.weight", ("embeddings.patch_embeddings.projection.weight",)),
    ("patch_embed.proj.bias", "embeddings.patch_embedding.bias", ("embeddings.patch_embeddings.projection.bias",)),
    ("blocks.{i}.norm1.weight", "encoder.layers.{i}.norm1.weight", ("encoder.layer.{i}.layernorm_before.weight",)),
    ("blocks.{i}.norm1.bias", "encoder.layers.{i}.norm1.bias", ("encoder.layer.{i}.layernorm_before.bias",)),
    (
        "blocks.{i}.attn.qkv.weight",
        "encoder.layers.{i}.attn.qkv.weight",
        tuple(f"encoder.layer.{{i}}.attention.{p}_proj.weight" for p in "qkv"),
    ),
    (
        "blocks.{i}.attn.qkv.bias",
        "encoder.layers.{i}.attn.qkv.bias",
        tuple(f"encoder.layer.{{i}}.attention.{p}_proj.bias" for p in "qkv"),
    ),
    ("blocks.{i}.attn.proj.weight", "encoder.layers.{i}.attn.proj.weight", ("encoder.layer.{i}.attention.projection_layer.weight",)),
    ("blocks.{i}.attn.proj.bias", "encoder.layers.{i}.attn.proj.bias", ("encoder.layer.{i}.attention.projection_layer.bias",)),
    ("blocks.{i}.ls1.gamma", "encoder.layers.{i}.ls1", ("encoder.layer.{i}.lambda_1",)),
    ("blocks.{i}.norm2.weight", "encoder.layers.{i}.norm2.weight", ("encoder.layer.{i}.layernorm_after.weight",)),
    ("blocks.{i}.norm2.bias", "encoder.layers.{i}.norm2.bias", ("encoder.layer.{i}.layernorm_after.bias",)),
    ("blocks.{i}.mlp.fc1.weight", "encoder.layers.{i}.mlp.fc1.weight", ("encoder.layer.{i}.mlp.fc1.weight",)),
    ("blocks.{i}.mlp.fc1.bias", "encoder.layers.{i}.mlp.fc1.bias", ("encoder.layer.{i}.mlp.fc1.bias",)),
    ("blocks.{i}.mlp.fc2.weight", "encoder.layers.{i}.mlp.fc2.weight", ("encoder.layer.{i}.mlp.fc2.weight",)),
    ("blocks.{i}.mlp.fc2.bias", "encoder.layers.{i}.mlp.fc2.bias", ("encoder.layer.{i}.mlp.fc2.bias",)),
    ("blocks.{i}.ls2.gamma", "encoder.layers.{i}.ls2", ("encoder.layer.{i}.lambda_2",)),
)


def _row_names(row: tuple[str, str, tuple[str, ...]], layout: str) -> tuple[str, ...]:
    timm_name, internvit_name, hf_names = row
    return {"timm": (timm_name,), "internvit": (internvit_name,), "hf": hf_names}[layout]


def _as_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


# timm name pattern -> row, for writing; (layout, foreign pattern) -> (timm template, part), for reading.
_FROM_TIMM = [(_as_regex(row[0]), row) for row in _KEY_TABLE]
_TO_TIMM = {
    layout: [
        (_as_regex(name), row[0], part, len(_row_names(row, layout)))
        for row in _KEY_TABLE
        for part, name in enumerate(_row_names(row, layout))
    ]
    for layout in LAYOUTS
}


def foreign_names(timm_key: str, layout: str) -> tuple[str, ...]:
    """The name(s) a timm-named ViT tensor has in another layout (three for transformers' split qkv)."""
    for pattern, row in _FROM_TIMM:
        match = pattern.fullmatch(timm_key)
        if match:
            index = match.groupdict().get("i")
            return tuple(name.replace("{i}", index) if index else name for name in _row_names(row, layout))
    raise KeyError(f"{timm_key!r} is not an InternViT parameter")


def timm_name(foreign_key: str, layout: str) -> tuple[str, int, int] | None:
    """(timm name, part index, number of parts) of a tensor named in ``layout``, or None if unknown."""
    for pattern, template, part, parts in _TO_TIMM[layout]:
        match = pattern.fullmatch(foreign_key)
        if match:
            index = match.groupdict().get("i")
            return (template.replace("{i}", index) if index else template), part, parts
    return None


def to_layout(state: Mapping[str, torch.Tensor], layout: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename a timm-named ViT state dict into ``layout`` (splitting qkv where needed)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        names = foreign_names(key, layout)
        if len(names) == 1:
            out[prefix + names[0]] = tensor
        else:  # separate copies: safetensors refuses tensors that share storage
            for name, part in zip(names, tensor.chunk(len(names), dim=0)):
                out[prefix + name] = part.clone()
    return out


# --------------------------------------------------------------------------------------------------
# Configs of the checkpoint families


def config_from_internvit(values: Mapping[str, Any], where: str) -> VisionConfig:
    """VisionConfig from an InternVL remote-code ``vision_config`` (or an InternViT ``config.json``)."""
    _refuse_unsupported(
        where,
        norm_type=(values.get("norm_type", "layer_norm"), "layer_norm"),
        qk_normalization=(bool(values.get("qk_normalization", False)), False),
        hidden_act=(values.get("hidden_act", "gelu"), "gelu"),
    )
    return _make_config(
        where,
        image_size=_required(values, "image_size", where),
        patch_size=_required(values, "patch_size", where),
        hidden_size=_required(values, "hidden_size", where),
        num_layers=_required(values, "num_hidden_layers", where),
        num_heads=_required(values, "num_attention_heads", where),
        intermediate_size=_required(values, "intermediate_size", where),
        qkv_bias=bool(values.get("qkv_bias", True)),
        layer_norm_eps=float(values.get("layer_norm_eps", 1e-6)),
        layer_scale_init=float(values.get("initializer_factor", 0.1)),
        drop_path_rate=float(values.get("drop_path_rate", 0.0)),
    )


def config_from_hf(values: Mapping[str, Any], where: str) -> VisionConfig:
    """VisionConfig from a transformers ``InternVLVisionConfig`` dict."""
    _refuse_unsupported(
        where,
        norm_type=(values.get("norm_type", "layer_norm"), "layer_norm"),
        use_qk_norm=(bool(values.get("use_qk_norm", False)), False),
        hidden_act=(values.get("hidden_act", "gelu"), "gelu"),
        use_mean_pooling=(bool(values.get("use_mean_pooling", True)), True),
        use_absolute_position_embeddings=(bool(values.get("use_absolute_position_embeddings", True)), True),
    )
    return _make_config(
        where,
        image_size=_square(_required(values, "image_size", where), "image_size", where),
        patch_size=_square(_required(values, "patch_size", where), "patch_size", where),
        hidden_size=_required(values, "hidden_size", where),
        num_layers=_required(values, "num_hidden_layers", where),
        num_heads=_required(values, "num_attention_heads", where),
        intermediate_size=_required(values, "intermediate_size", where),
        qkv_bias=bool(values.get("attention_bias", False)),
        layer_norm_eps=float(values.get("layer_norm_eps", 1e-6)),
        layer_scale_init=float(values.get("layer_scale_init_value", 0.1)),
        drop_path_rate=float(values.get("drop_path_rate", 0.0)),
    )


def config_to_hf(config: VisionConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A ``config.json`` that ``transformers.InternVLVisionModel.from_pretrained`` reads."""
    return {
        "architectures": ["InternVLVisionModel"],
        "model_type": "internvl_vision",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "image_size": [config.image_size, config.image_size],
        "patch_size": [config.patch_size, config.patch_size],
        "num_channels": 3,
        "attention_bias": config.qkv_bias,
        "use_qk_norm": False,
        "hidden_act": "gelu",
        "norm_type": "layer_norm",
        "layer_norm_eps": config.layer_norm_eps,
        "layer_scale_init_value": config.layer_scale_init,
        "use_mean_pooling": True,  # i.e. no final LayerNorm, as InternViT
        "use_absolute_position_embeddings": True,
        "use_mask_token": False,
        "hidden_dropout_prob": 0.0,
        "attention_dropout": 0.0,
        "projection_dropout": 0.0,
        "drop_path_rate": config.drop_path_rate,  # not used by transformers; kept for the round trip
        "dtype": str(dtype).removeprefix("torch."),
    }


def _required(values: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in values:
        raise ConfigError(f"{where}: missing key {key!r} in the vision config")
    return values[key]


def _square(value: Any, key: str, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{where}: {key}={list(value)} is not square; vitp's InternViT takes square sizes")
        return value[0]
    return value


def _refuse_unsupported(where: str, **checks: tuple[Any, Any]) -> None:
    for key, (found, supported) in checks.items():
        if found != supported:
            raise ConfigError(
                f"{where}: {key}={found!r} is not supported; vitp implements the InternViT of InternVL2.5/3 "
                f"(300M: LayerNorm, no QK-norm, GELU, no final norm), which needs {key}={supported!r}"
            )


def _make_config(where: str, **values: Any) -> VisionConfig:
    try:
        return VisionConfig(**values)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


# --------------------------------------------------------------------------------------------------
# Detection


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
        return f"{self.kind} ({_LAYOUT_NAMES[self.layout]}{under})"


_LAYOUT_NAMES = {
    "timm": "timm VisionTransformer keys",
    "internvit": "InternViT keys",
    "hf": "transformers InternVLVisionModel keys",
}

# A key that exists in every checkpoint of a layout, whatever its size.
_SIGNATURES = (("internvit", "embeddings.class_embedding"), ("hf", "embeddings.cls_token"), ("timm", "cls_token"))


def detect_layout(keys: list[str], where: str) -> tuple[str, str]:
    """(layout, prefix) of the ViT tensors among ``keys``."""
    found: set[tuple[str, str]] = set()
    for key in keys:
        for layout, signature in _SIGNATURES:
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
        vit_config = config_from_internvit(_sub(config, "vision_config", where), f"{where}: vision_config")
    elif model_type == "internvl" or ("vision_config" in config and "text_config" in config):
        kind, layout = "transformers InternVL checkpoint directory", "hf"
        vit_config = config_from_hf(_sub(config, "vision_config", where), f"{where}: vision_config")
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
            f"{source.path}: config.json describes a {kind} ({_LAYOUT_NAMES[layout]}) but the weights hold "
            f"{_LAYOUT_NAMES[found_layout]}"
        )
    return Checkpoint(directory, kind, source, layout, prefix, vit_config, where)


def _sub(config: dict, key: str, where: str) -> dict:
    value = config.get(key)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key!r} must be an object, found {type(value).__name__}")
    return value


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
            return _config_from_vitp(values["vision_config"], str(sidecar)), str(sidecar)
        logger.info("%s has no 'vision_config'; not used as the config of %s", sidecar, path.name)
    embedded = source.metadata.get("vitp_vision_config")
    if embedded:
        where = f"{path} (safetensors metadata)"
        try:
            values = json.loads(embedded)
        except json.JSONDecodeError as err:
            raise WeightFormatError(f"{where}: invalid vitp_vision_config JSON ({err.msg})") from None
        return _config_from_vitp(values, where), where
    return None, None


def _config_from_vitp(values: Any, where: str) -> VisionConfig:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: 'vision_config' must be an object")
    try:
        return VisionConfig.from_dict(values)
    except (ConfigError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None


def infer_config(checkpoint: Checkpoint) -> VisionConfig:
    """Read the shape of the network off the tensors, for weights saved without a config.

    Everything but the number of heads is visible in the shapes; the heads are taken from the preset
    of the same shape, and a network that matches no preset needs an explicit config.
    """
    where = checkpoint.describe() + f" at {checkpoint.path}"
    by_timm: dict[str, str] = {}
    for key in checkpoint.source.keys():
        if not key.startswith(checkpoint.prefix):
            continue
        named = timm_name(key[len(checkpoint.prefix) :], checkpoint.layout)
        if named and named[1] == 0:
            by_timm[named[0]] = key
    needed = ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"]
    absent = [name for name in needed if name not in by_timm]
    if absent:
        raise WeightFormatError(f"{where}: cannot infer the ViT's shape: tensors for {absent} are missing")
    shapes = checkpoint.source.shapes(by_timm[name] for name in needed)
    hidden = shapes[by_timm["cls_token"]][-1]
    patch = shapes[by_timm["patch_embed.proj.weight"]][-1]
    positions = shapes[by_timm["pos_embed"]][1] - 1
    grid = int(round(positions**0.5))
    depth = 1 + max(int(m.group(1)) for name in by_timm if (m := re.match(r"blocks\.(\d+)\.", name)))
    shape = dict(
        image_size=grid * patch,
        patch_size=patch,
        hidden_size=hidden,
        num_layers=depth,
        intermediate_size=shapes[by_timm["blocks.0.mlp.fc1.weight"]][0],
        qkv_bias="blocks.0.attn.qkv.bias" in by_timm,
    )
    for name, preset in PRESETS.items():
        if all(getattr(preset, field) == value for field, value in shape.items()):
            logger.info("%s: no config saved with the weights; shapes match preset %r", where, name)
            return preset
    raise WeightFormatError(
        f"{where}: no config saved with the weights, and its shapes ({shape}) match no preset, so the number "
        f"of attention heads is unknown. Pass a config (--vit_config JSON or preset name with --num_heads)"
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
    if config is not None:
        origin = "the config given"
    elif checkpoint.config is not None:
        config, origin = checkpoint.config, checkpoint.config_origin
    else:
        config, origin = infer_config(checkpoint), "inferred from the tensor shapes"
    changes = {k: v for k, v in (("image_size", image_size), ("drop_path_rate", drop_path_rate)) if v is not None}
    with torch.device("meta"):  # no time or memory spent on random weights that are overwritten next
        model = InternViT(config.replace(**changes))
    state = read_vit_state(checkpoint, model, dtype, origin)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def read_vit_state(
    checkpoint: Checkpoint, model: InternViT, dtype: torch.dtype | None, config_origin: str
) -> dict[str, torch.Tensor]:
    """The checkpoint's ViT tensors under the model's names, after checking names and shapes."""
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    prefix = checkpoint.prefix
    on_disk = {key[len(prefix) :]: key for key in checkpoint.source.keys() if key.startswith(prefix)}
    config = model.config
    header = [
        f"cannot load the ViT from {checkpoint.path}",
        f"  detected format: {checkpoint.describe()}",
        f"  expected: InternViT with {config.num_layers} layers, hidden {config.hidden_size}, "
        f"MLP {config.intermediate_size}, patch {config.patch_size}, image {config.image_size}, "
        f"qkv bias {config.qkv_bias} (config: {config_origin})",
    ]
    state = read_checked_state(
        checkpoint.source, on_disk, {key: foreign_names(key, checkpoint.layout) for key in expected}, expected,
        header, shown_prefix=prefix, pos_embed_key="pos_embed", where=checkpoint.path,
    )
    target = dtype or _dominant_dtype(state)
    return {key: tensor.to(target) for key, tensor in state.items()}


def read_checked_state(
    source: TensorSource,
    on_disk: Mapping[str, str],
    names: Mapping[str, tuple[str, ...]],
    expected: Mapping[str, tuple[int, ...]],
    header: list[str],
    *,
    optional: frozenset[str] = frozenset(),
    shown_prefix: str = "",
    pos_embed_key: str | None = None,
    where: object = "",
) -> dict[str, torch.Tensor]:
    """The one strict loader behind every format: ``names`` maps each of our tensors to its name(s) in
    the checkpoint (three for a split qkv), ``on_disk`` those names to the stored keys. Every expected
    tensor must be there with its shape (``optional`` ones may be absent) and nothing may be left over,
    or one WeightFormatError lists the first offenders under ``header``. A position embedding for another
    patch grid is the one difference tolerated: it is resampled, and the resampling is logged."""
    missing = [shown_prefix + n for key, ns in names.items() if key not in optional for n in ns if n not in on_disk]
    used = {n for ns in names.values() for n in ns if n in on_disk}
    unexpected = _natural_sorted(shown_prefix + n for n in set(on_disk) - used)
    shapes = source.shapes(on_disk[n] for n in used)
    wrong = []
    for key, ns in names.items():
        if not all(n in on_disk for n in ns):
            continue  # reported as missing (or optional)
        parts = [shapes[on_disk[n]] for n in ns]
        found = parts[0] if len(parts) == 1 else (sum(p[0] for p in parts), *parts[0][1:])
        if found != tuple(expected[key]) and not (key == pos_embed_key and _is_other_grid(found, tuple(expected[key]))):
            shown = " / ".join(shown_prefix + n for n in ns)
            wrong.append(f"{shown} is {' + '.join(str(list(p)) for p in parts)}, expected {list(expected[key])}")
    if missing or unexpected or wrong:
        lines = list(header)
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                listed = "; ".join(items[:5]) + (f"; ... ({len(items) - 5} more)" if len(items) > 5 else "")
                lines.append(f"  {title} ({len(items)}): {listed}")
        raise WeightFormatError("\n".join(lines))
    loaded = source.load(on_disk[n] for n in used)
    state = {}
    for key, ns in names.items():
        if all(n in on_disk for n in ns):
            parts = [loaded[on_disk[n]] for n in ns]
            state[key] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if pos_embed_key in state and tuple(state[pos_embed_key].shape) != tuple(expected[pos_embed_key]):
        state[pos_embed_key] = _resample_pos_embed(state[pos_embed_key], expected[pos_embed_key][1], where)
    return state


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


def _dominant_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    counts: Counter = Counter()
    for tensor in state.values():
        counts[tensor.dtype] += tensor.numel()
    return counts.most_common(1)[0][0]


# --------------------------------------------------------------------------------------------------
# Saving


def save_vit(model: InternViT, destination: str | Path, to: str = "vitp", key_prefix: str = "vision_model.") -> list[Path]:
    """Write a ViT as ``vitp`` (one safetensors with InternViT keys + a JSON config beside it) or as ``hf``
    (a directory that ``transformers.InternVLVisionModel.from_pretrained`` loads). Returns the files written.
    """
    destination = Path(destination)
    state = {key: tensor.detach() for key, tensor in model.state_dict().items()}
    config = model.config
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
        save_safetensors(to_layout(state, "internvit", key_prefix), destination, metadata)
        write_json(config_json, sidecar_path(destination))
        return [destination, sidecar_path(destination)]
    if to == "hf":
        if destination.exists() and not destination.is_dir():
            raise WeightFormatError(f"{destination}: exists and is not a directory")
        save_safetensors(to_layout(state, "hf"), destination / "model.safetensors")
        dtype = next(iter(state.values())).dtype
        write_json(config_to_hf(config, dtype), destination / "config.json")
        return [destination / "model.safetensors", destination / "config.json"]
    raise WeightFormatError(f"unknown ViT save format {to!r}; expected one of {', '.join(SAVE_FORMATS)}")


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
    """A config named on the command line: a preset name, or a JSON file of VisionConfig fields
    (optionally under "vision_config", as in the JSON vitp writes beside a weights file)."""
    if value in PRESETS:
        return PRESETS[value].replace(**overrides)
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"--vit_config {value!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a JSON file")
    values = read_json(path)
    return _config_from_vitp(values.get("vision_config", values), str(path)).replace(**overrides)


# --------------------------------------------------------------------------------------------------
# The whole vision-language model
#
# Our module: vision_model.<timm names>, mlp1.{0,1,3}, language_model.<the HF causal LM's names>.
# InternVL remote code: the same, with InternViT names under vision_model.
# transformers InternVL (as written on disk): vision_tower.<hf names>, multi_modal_projector.*,
# language_model.model.*, language_model.lm_head.* (older/hub files: model.vision_tower., lm_head., ...).

_VLM_RENAMES = {
    # our prefix: (InternVL remote-code prefix, transformers prefix)
    "mlp1.0.": ("mlp1.0.", "multi_modal_projector.layer_norm."),
    "mlp1.1.": ("mlp1.1.", "multi_modal_projector.linear_1."),
    "mlp1.3.": ("mlp1.3.", "multi_modal_projector.linear_2."),
    "language_model.": ("language_model.", "language_model."),
}
# Spellings transformers accepts for the same tensors, rewritten to the on-disk form above.
_HF_ALIASES = (
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
VISION_PREFIX = {"internvit": "vision_model.", "hf": "vision_tower."}


def canonical_hf_key(key: str) -> str:
    for alias, canonical in _HF_ALIASES:
        if key.startswith(alias):
            return canonical + key[len(alias) :]
    return key


def vlm_foreign_names(our_key: str, layout: str) -> tuple[str, ...]:
    """Name(s) of one of our VLM tensors in ``layout`` ("internvit" = remote code, "hf" = transformers)."""
    if our_key.startswith("vision_model."):
        return tuple(VISION_PREFIX[layout] + n for n in foreign_names(our_key[len("vision_model.") :], layout))
    for prefix, (remote, hf) in _VLM_RENAMES.items():
        if our_key.startswith(prefix):
            return ((remote if layout == "internvit" else hf) + our_key[len(prefix) :],)
    raise KeyError(f"{our_key!r} is not a parameter of the vision-language model")


def vlm_to_hf_state(state: Mapping[str, torch.Tensor], tied_lm_head: bool) -> dict[str, torch.Tensor]:
    """Our VLM state dict under transformers' names (a tied LM head is written once, as embeddings)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if tied_lm_head and key == "language_model.lm_head.weight":
            continue
        names = vlm_foreign_names(key, "hf")
        parts = tensor.chunk(len(names), dim=0) if len(names) > 1 else (tensor,)
        for name, part in zip(names, parts):
            out[name] = part.clone() if len(names) > 1 else part
    return out


def read_vlm_state(
    source: TensorSource, layout: str, expected: Mapping[str, tuple[int, ...]], tied_lm_head: bool, where: str,
    kind: str,
) -> dict[str, torch.Tensor]:
    """Our VLM's tensors from a checkpoint in ``layout``, strictly: every expected tensor present with
    its shape, nothing left over (a tied LM head may be absent)."""
    on_disk = {(canonical_hf_key(k) if layout == "hf" else k): k for k in source.keys()}
    return read_checked_state(
        source, on_disk, {key: vlm_foreign_names(key, layout) for key in expected}, expected,
        [f"cannot load the vision-language model from {where}", f"  detected format: {kind}"],
        optional=frozenset({"language_model.lm_head.weight"}) if tied_lm_head else frozenset(),
        pos_embed_key="vision_model.pos_embed", where=where,
    )
