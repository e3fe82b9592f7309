"""The LLM families of InternVL checkpoints, each onto a causal LM class that transformers ships.

| family     | InternVL checkpoints                              | stored as (remote code)            | built as |
|------------|---------------------------------------------------|------------------------------------|----------|
| Qwen2/2.5  | InternVL2-1B, InternVL2.5-1B/4B, InternVL3        | transformers' own names            | Qwen2ForCausalLM |
| InternLM2  | InternVL2-2B/8B/26B, InternVL2.5-2B/8B/26B        | ``tok_embeddings``, fused ``wqkv``, ``w1/w3/w2``, ``output`` | LlamaForCausalLM |
| Phi-3      | InternVL2-4B                                      | transformers' names (fused ``qkv_proj``, ``gate_up_proj``, which transformers' Phi3 keeps); LongRoPE config moved into ``rope_parameters`` | Phi3ForCausalLM |
| Llama      | InternVL2-40B (Nous-Hermes-2-Yi), InternVL2-76B (Hermes-2-Theta-Llama-3) | transformers' own names | LlamaForCausalLM |

A family is data: which stored ``model_type`` it covers, the key table from the native class's names to
the stored ones, and how its config becomes the native class's config. No remote code runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from vitp.errors import ConfigError
from vitp.model.formats.keymap import GroupedQKV, KeyMap, Rename

# Config keys that describe the machine a checkpoint was saved on, not the model: vitp picks the
# attention kernel (PyTorch SDPA, no extra package) and the dtype (--bf16) itself, so that a
# checkpoint loads anywhere; auto_map points at remote code vitp never runs.
_MACHINE_KEYS = ("auto_map", "attn_implementation", "torch_dtype", "dtype", "architectures")


@dataclass(frozen=True)
class LLMFamily:
    name: str
    keymap: KeyMap  # native transformers names -> stored names
    native_config: Callable[[Mapping[str, Any], str], dict[str, Any]]
    params: tuple[str, ...] = ()  # config values the key table needs (e.g. head counts to split wqkv)

    def keymap_for(self, text_config: Mapping[str, Any]) -> KeyMap:
        return KeyMap(self.keymap.rules, {name: int(text_config[name]) for name in self.params})


def _native(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A config transformers implements, minus the keys about the machine it was saved on."""
    return {k: v for k, v in values.items() if not k.startswith("_") and k not in _MACHINE_KEYS}


def _rope_scaling_type(scaling: Any) -> str | None:
    """A stored ``rope_scaling``'s kind: older configs spell the key ``type``, newer ones ``rope_type``."""
    return scaling.get("type", scaling.get("rope_type")) if isinstance(scaling, dict) else None


def _internlm2_as_llama(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """InternLM2's config as transformers' Llama config. Keys left out take the defaults of
    InternLM2's own ``InternLM2Config``; InternLM2 is Llama with fused q/k/v (bias set by ``bias``, on
    wqkv and wo only), so nothing else changes."""
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in values:
            raise ConfigError(f"{where}: missing key {key!r} in the InternLM2 config")
    heads = int(values["num_attention_heads"])
    kv_heads = int(values.get("num_key_value_heads") or heads)
    if heads % kv_heads or values["hidden_size"] % heads:
        raise ConfigError(
            f"{where}: {heads} attention heads cannot be grouped over {kv_heads} key/value heads of "
            f"hidden size {values['hidden_size']}"
        )
    rope = {"rope_type": "default", "rope_theta": float(values.get("rope_theta", 10000))}
    scaling = values.get("rope_scaling")
    if scaling:
        kind = _rope_scaling_type(scaling)
        if kind not in ("linear", "dynamic") or not isinstance(scaling.get("factor"), (int, float)):
            raise ConfigError(
                f"{where}: rope_scaling {scaling!r}: InternLM2 defines 'linear' and 'dynamic' with a 'factor'"
            )
        rope.update(rope_type=kind, factor=float(scaling["factor"]))
    return {
        "model_type": "llama",
        "vocab_size": values["vocab_size"],
        "hidden_size": values["hidden_size"],
        "intermediate_size": values["intermediate_size"],
        "num_hidden_layers": values["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": values["hidden_size"] // heads,
        "hidden_act": values.get("hidden_act", "silu"),
        "max_position_embeddings": values.get("max_position_embeddings", 2048),
        "rms_norm_eps": values.get("rms_norm_eps", 1e-6),
        "rope_parameters": rope,
        "attention_bias": bool(values.get("bias", True)),
        "mlp_bias": False,
        "tie_word_embeddings": bool(values.get("tie_word_embeddings", False)),
        "initializer_range": values.get("initializer_range", 0.02),
        "bos_token_id": values.get("bos_token_id", 1),
        "eos_token_id": values.get("eos_token_id", 2),
        "pad_token_id": values.get("pad_token_id", 0),
    }


def _phi3_longrope(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Phi-3's config with its rotary settings as transformers 5 reads them. Phi-3-128k (InternVL2-4B)
    stores LongRoPE as ``rope_scaling: {type: "su" | "longrope", short_factor, long_factor}`` beside a
    top-level ``original_max_position_embeddings``; transformers' Phi3Config wants all of it in
    ``rope_parameters`` (given the old spelling with both rope_theta and max_position_embeddings, it
    fails to find original_max_position_embeddings)."""
    native = _native(values, where)
    scaling = native.pop("rope_scaling", None)
    rope = {"rope_type": "default", "rope_theta": float(native.pop("rope_theta", 10000.0))}
    if scaling:
        kind = _rope_scaling_type(scaling)
        if kind not in ("su", "longrope") or not {"short_factor", "long_factor"} <= set(scaling):
            raise ConfigError(f"{where}: rope_scaling {scaling!r}: Phi-3 defines 'su'/'longrope' with short and long factors")
        rope.update(
            rope_type="longrope", short_factor=list(scaling["short_factor"]), long_factor=list(scaling["long_factor"]),
            original_max_position_embeddings=int(native.get("original_max_position_embeddings", 4096)),
        )
    return {**native, "rope_parameters": native.get("rope_parameters") or rope}


_INTERNLM2_RULES = [
    Rename("model.embed_tokens.weight", "model.tok_embeddings.weight"),
    GroupedQKV([f"model.layers.{{i}}.self_attn.{p}_proj.{{kind}}" for p in "qkv"], "model.layers.{i}.attention.wqkv.{kind}"),
    Rename("model.layers.{i}.self_attn.o_proj.{kind}", "model.layers.{i}.attention.wo.{kind}"),
    Rename("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.feed_forward.w1.weight"),
    Rename("model.layers.{i}.mlp.up_proj.weight", "model.layers.{i}.feed_forward.w3.weight"),
    Rename("model.layers.{i}.mlp.down_proj.weight", "model.layers.{i}.feed_forward.w2.weight"),
    Rename("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.attention_norm.weight"),
    Rename("model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.ffn_norm.weight"),
    Rename("model.norm.weight", "model.norm.weight"),
    Rename("lm_head.weight", "output.weight"),
]

NATIVE = LLMFamily("transformers-native", KeyMap([Rename("{rest}", "{rest}")]), _native)
INTERNLM2 = LLMFamily(
    "InternLM2", KeyMap(_INTERNLM2_RULES), _internlm2_as_llama, params=("num_attention_heads", "num_key_value_heads")
)
PHI3 = LLMFamily("Phi-3", NATIVE.keymap, _phi3_longrope)  # transformers' Phi3 keeps qkv_proj/gate_up_proj fused
# Stored model_type -> family; any other model_type transformers implements is NATIVE (Qwen2, Llama).
FAMILIES: dict[str, LLMFamily] = {"internlm2": INTERNLM2, "phi3": PHI3}
# The LLM classes InternVL's remote code knows, by the architecture name its configs store.
ARCHITECTURES = {"InternLM2ForCausalLM": "internlm2", "Phi3ForCausalLM": "phi3", "LlamaForCausalLM": "llama",
                 "Qwen2ForCausalLM": "qwen2"}


def llm_family(values: Mapping[str, Any], where: str) -> tuple[LLMFamily, dict[str, Any]]:
    """(family, config of the native transformers class) of a stored LLM config (an InternVL
    ``llm_config``, a transformers ``text_config``, or a causal LM's ``config.json``)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected the LLM's config as an object, found {type(values).__name__}")
    # InternVL's remote code picks the LLM's config class by architectures[0], not by model_type.
    architectures = values.get("architectures") or [None]
    model_type = ARCHITECTURES.get(architectures[0], values.get("model_type"))
    family = FAMILIES.get(model_type, NATIVE)
    native = family.native_config({**values, "model_type": model_type}, where)
    if native.get("model_type") not in CONFIG_MAPPING:  # one line, not transformers' list of every model type
        known = ", ".join(["qwen2", "llama", *FAMILIES])
        raise ConfigError(
            f"{where}: the LLM's model_type {model_type!r} is not one vitp can build; vitp builds LLMs that "
            f"transformers ships (e.g. {known})"
        )
    try:
        AutoConfig.for_model(**native)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{where}: the LLM's {model_type} config cannot be built: {err}") from None
    return family, native
