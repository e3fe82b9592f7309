"""InternViT's checkpoint layouts and configs: what vitp reads and writes for the vision encoder.

Three key layouts name the same tensors:

* ``timm``      ``blocks.N.attn.qkv.weight`` ... — our own parameter names (timm's InternViT);
* ``internvit`` ``encoder.layers.N.attn.qkv.weight`` ... — InternVL remote code, InternViT repositories
  (``InternVisionModel``) and ViTP's released ViT;
* ``hf``        ``encoder.layer.N.attention.{q,k,v}_proj.weight`` ... — transformers'
  ``InternVLVisionModel``, with the fused qkv projection split in three.

Each can sit under a prefix (``vision_model.`` in an InternVL remote-code checkpoint, ``vision_tower.``
in a transformers InternVL one). InternViT-6B adds ``attn.q_norm``/``attn.k_norm`` and has RMSNorms
(``norm1.weight`` without a bias) and no qkv bias; the same rows cover it.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from vitp.errors import ConfigError
from vitp.model.formats.keymap import Fuse, KeyMap, Rename
from vitp.model.vision import VisionConfig

LAYOUTS = ("timm", "internvit", "hf")

_INTERNVIT_RULES = [
    Rename("cls_token", "embeddings.class_embedding"),
    Rename("pos_embed", "embeddings.position_embedding"),
    Rename("patch_embed.proj.{kind}", "embeddings.patch_embedding.{kind}"),
    Rename("blocks.{i}.norm1.{kind}", "encoder.layers.{i}.norm1.{kind}"),
    Rename("blocks.{i}.attn.qkv.{kind}", "encoder.layers.{i}.attn.qkv.{kind}"),
    Rename("blocks.{i}.attn.q_norm.weight", "encoder.layers.{i}.attn.q_norm.weight"),
    Rename("blocks.{i}.attn.k_norm.weight", "encoder.layers.{i}.attn.k_norm.weight"),
    Rename("blocks.{i}.attn.proj.{kind}", "encoder.layers.{i}.attn.proj.{kind}"),
    Rename("blocks.{i}.ls1.gamma", "encoder.layers.{i}.ls1"),
    Rename("blocks.{i}.norm2.{kind}", "encoder.layers.{i}.norm2.{kind}"),
    Rename("blocks.{i}.mlp.fc1.{kind}", "encoder.layers.{i}.mlp.fc1.{kind}"),
    Rename("blocks.{i}.mlp.fc2.{kind}", "encoder.layers.{i}.mlp.fc2.{kind}"),
    Rename("blocks.{i}.ls2.gamma", "encoder.layers.{i}.ls2"),
]
_HF_RULES = [
    Rename("cls_token", "embeddings.cls_token"),
    Rename("pos_embed", "embeddings.position_embeddings"),
    Rename("patch_embed.proj.{kind}", "embeddings.patch_embeddings.projection.{kind}"),
    Rename("blocks.{i}.norm1.{kind}", "encoder.layer.{i}.layernorm_before.{kind}"),
    Fuse("blocks.{i}.attn.qkv.{kind}", [f"encoder.layer.{{i}}.attention.{p}_proj.{{kind}}" for p in "qkv"]),
    Rename("blocks.{i}.attn.q_norm.weight", "encoder.layer.{i}.attention.q_norm.weight"),
    Rename("blocks.{i}.attn.k_norm.weight", "encoder.layer.{i}.attention.k_norm.weight"),
    Rename("blocks.{i}.attn.proj.{kind}", "encoder.layer.{i}.attention.projection_layer.{kind}"),
    Rename("blocks.{i}.ls1.gamma", "encoder.layer.{i}.lambda_1"),
    Rename("blocks.{i}.norm2.{kind}", "encoder.layer.{i}.layernorm_after.{kind}"),
    Rename("blocks.{i}.mlp.fc1.{kind}", "encoder.layer.{i}.mlp.fc1.{kind}"),
    Rename("blocks.{i}.mlp.fc2.{kind}", "encoder.layer.{i}.mlp.fc2.{kind}"),
    Rename("blocks.{i}.ls2.gamma", "encoder.layer.{i}.lambda_2"),
]
KEYMAPS: dict[str, KeyMap] = {
    "timm": KeyMap([Rename("{rest}", "{rest}")]),
    "internvit": KeyMap(_INTERNVIT_RULES),
    "hf": KeyMap(_HF_RULES),
}

LAYOUT_NAMES = {
    "timm": "timm VisionTransformer keys",
    "internvit": "InternViT keys",
    "hf": "transformers InternVLVisionModel keys",
}
# A key that exists in every checkpoint of a layout, whatever its size.
SIGNATURES = (("internvit", "embeddings.class_embedding"), ("hf", "embeddings.cls_token"), ("timm", "cls_token"))

# transformers' InternVLVisionModel builds its QK-norm with this epsilon, whatever layer_norm_eps says.
HF_QK_NORM_EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# Configs


def config_from_internvit(values: Mapping[str, Any], where: str) -> VisionConfig:
    """VisionConfig from an InternVL remote-code ``vision_config`` (or an InternViT ``config.json``).
    Keys left out take the defaults of upstream's ``InternVisionConfig`` (which are InternViT-6B's)."""
    _refuse_unsupported(where, hidden_act=(values.get("hidden_act", "gelu"), "gelu"))
    return _make_config(
        where,
        image_size=_required(values, "image_size", where),
        patch_size=_required(values, "patch_size", where),
        hidden_size=_required(values, "hidden_size", where),
        num_layers=_required(values, "num_hidden_layers", where),
        num_heads=_required(values, "num_attention_heads", where),
        intermediate_size=_required(values, "intermediate_size", where),
        qkv_bias=bool(values.get("qkv_bias", False)),
        layer_norm_eps=float(values.get("layer_norm_eps", 1e-6)),
        layer_scale_init=float(values.get("initializer_factor", 0.1)),
        drop_path_rate=float(values.get("drop_path_rate", 0.0)),
        norm_type=values.get("norm_type", "rms_norm"),
        qk_norm=bool(values.get("qk_normalization", True)),
    )


def config_to_internvit(config: VisionConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """The ``config.json`` of an InternVisionModel directory, as upstream's ``tools/extract_vit.py`` writes it."""
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "num_channels": 3,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "qkv_bias": config.qkv_bias,
        "qk_normalization": config.qk_norm,
        "norm_type": config.norm_type,
        "layer_norm_eps": config.layer_norm_eps,
        "initializer_factor": config.layer_scale_init,
        "initializer_range": 0.02,
        "hidden_act": "gelu",
        "drop_path_rate": config.drop_path_rate,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "use_flash_attn": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def config_from_hf(values: Mapping[str, Any], where: str) -> VisionConfig:
    """VisionConfig from a transformers ``InternVLVisionConfig`` dict."""
    eps = float(values.get("layer_norm_eps", 1e-6))
    qk_norm = bool(values.get("use_qk_norm", False))
    _refuse_unsupported(
        where,
        hidden_act=(values.get("hidden_act", "gelu"), "gelu"),
        use_mean_pooling=(bool(values.get("use_mean_pooling", True)), True),
        use_absolute_position_embeddings=(bool(values.get("use_absolute_position_embeddings", True)), True),
    )
    if qk_norm and eps != HF_QK_NORM_EPS:
        raise ConfigError(
            f"{where}: layer_norm_eps={eps} with use_qk_norm: transformers normalises q and k with eps "
            f"{HF_QK_NORM_EPS} but its other norms with {eps}; vitp's InternViT uses one epsilon for all"
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
        layer_norm_eps=eps,
        layer_scale_init=float(values.get("layer_scale_init_value", 0.1)),
        drop_path_rate=float(values.get("drop_path_rate", 0.0)),
        norm_type=values.get("norm_type", "layer_norm"),
        qk_norm=qk_norm,
    )


def config_to_hf(config: VisionConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A ``config.json`` that ``transformers.InternVLVisionModel.from_pretrained`` reads."""
    if config.qk_norm and config.layer_norm_eps != HF_QK_NORM_EPS:
        raise ConfigError(
            f"a ViT with QK-norm and layer_norm_eps={config.layer_norm_eps} has no transformers equivalent "
            f"(InternVLVisionModel normalises q and k with eps {HF_QK_NORM_EPS})"
        )
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
        "use_qk_norm": config.qk_norm,
        "hidden_act": "gelu",
        "norm_type": config.norm_type,
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


def config_from_vitp(values: Any, where: str) -> VisionConfig:
    """VisionConfig from the ``vision_config`` vitp writes beside (and inside) a ViT weights file."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: 'vision_config' must be an object")
    try:
        return VisionConfig.from_dict(values)
    except (ConfigError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None


def nested_config(values: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    """A checkpoint config's sub-config (``vision_config``, ``llm_config``, ``text_config``), which must be an object."""
    value = values.get(key)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key!r} must be an object, found {type(value).__name__}")
    return value


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
                f"{where}: {key}={found!r} is not supported; vitp implements InternViT (300M and 6B: GELU, no "
                f"final norm, absolute position embeddings), which needs {key}={supported!r}"
            )


def _make_config(where: str, **values: Any) -> VisionConfig:
    try:
        return VisionConfig(**values)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
