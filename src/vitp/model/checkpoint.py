"""Vision-language model checkpoints: load InternVL remote-code or transformers directories, build a
model from scratch, and save as a transformers-native InternVL directory.

What is saved loads with ``transformers.InternVLForConditionalGeneration.from_pretrained`` (and can
``generate``); vitp loads it back strictly (``vitp.formats.read_vlm_state``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig

from vitp.data.template import IMG_CONTEXT, prepare_tokenizer
from vitp.data.tokenizer import load_tokenizer
from vitp.errors import ConfigError, WeightFormatError
from vitp.formats import config_from_hf, config_from_internvit, config_to_hf, read_vlm_state, vlm_to_hf_state
from vitp.model.tmaug import TMAugConfig
from vitp.model.vlm import VisionLanguageModel, VLMConfig, preset_config
from vitp.tensor_io import find_directory_weights, open_tensor_source, read_json, save_safetensors, write_json

logger = logging.getLogger("vitp")


def _text_config(values: dict[str, Any], where: str) -> dict[str, Any]:
    model_type = values.get("model_type")
    try:
        AutoConfig.for_model(**values)
    except (ValueError, KeyError) as err:
        raise ConfigError(
            f"{where}: the LLM's model_type {model_type!r} is not implemented by transformers ({err}); vitp trains "
            f"LLMs that transformers ships (Qwen2/2.5, Llama, ...)"
        ) from None
    # Upstream configs name the attention kernel and dtype of the machine they were saved on
    # ("flash_attention_2", bfloat16): vitp picks the kernel (PyTorch SDPA, which needs no extra package)
    # and the dtype (--bf16) itself, so that a checkpoint loads on any machine.
    dropped = ("auto_map", "attn_implementation", "torch_dtype", "dtype")
    return {k: v for k, v in values.items() if not k.startswith("_") and k not in dropped}


def read_vlm_config(directory: Path, image_token_id: int) -> tuple[VLMConfig, str, str]:
    """(config, weight layout, description) of an InternVL checkpoint directory."""
    where = str(directory / "config.json")
    values = read_json(directory / "config.json")
    if values.get("model_type") == "internvl_chat" or "llm_config" in values:
        vision = config_from_internvit(values.get("vision_config") or {}, f"{where}: vision_config")
        text = _text_config(values.get("llm_config") or {}, f"{where}: llm_config")
        config = VLMConfig(
            vision=vision, text=text, image_token_id=image_token_id,
            downsample_ratio=float(values.get("downsample_ratio", 0.5)),
            select_layer=int(values.get("select_layer", -1)),
            template=values.get("template", "internvl2_5"),
        )
        if values.get("ps_version", "v2") != "v2":
            raise ConfigError(f"{where}: ps_version {values.get('ps_version')!r}; vitp implements InternVL's pixel shuffle 'v2'")
        return config, "internvit", "InternVL remote-code checkpoint directory"
    if values.get("model_type") == "internvl":
        vision = config_from_hf(values.get("vision_config") or {}, f"{where}: vision_config")
        text = _text_config(values.get("text_config") or {}, f"{where}: text_config")
        saved_id = values.get("image_token_id")
        if saved_id is not None and saved_id != image_token_id:
            raise ConfigError(f"{where}: image_token_id {saved_id} but the tokenizer's {IMG_CONTEXT} is {image_token_id}")
        if values.get("vision_feature_select_strategy", "default") != "default":
            raise ConfigError(f"{where}: vision_feature_select_strategy must be 'default' (drop the CLS token)")
        config = VLMConfig(
            vision=vision, text=text, image_token_id=image_token_id,
            downsample_ratio=float(values.get("downsample_ratio", 0.5)),
            select_layer=int(values.get("vision_feature_layer", -1)),
        )
        return config, "hf", "transformers InternVL checkpoint directory"
    raise WeightFormatError(
        f"{where}: model_type {values.get('model_type')!r} is not an InternVL model ('internvl_chat' or 'internvl')"
    )


def load_vlm(
    directory: str | Path,
    tmaug: TMAugConfig | None = None,
    drop_path_rate: float | None = None,
    image_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    use_fast_tokenizer: bool = True,
):
    """(model, tokenizer) from an InternVL remote-code or transformers directory, strictly.

    ``image_size`` changes the tile size (upstream's --force_image_size): the position embedding is
    resampled to the new patch grid."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise WeightFormatError(f"{directory}: not a checkpoint directory (no config.json)")
    tokenizer = load_tokenizer(directory, use_fast=use_fast_tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    config, layout, kind = read_vlm_config(directory, image_token_id)
    vision_changes = {k: v for k, v in (("drop_path_rate", drop_path_rate), ("image_size", image_size)) if v is not None}
    config = dataclasses.replace(config, vision=config.vision.replace(**vision_changes))
    # Parameters on the meta device: no time or memory spent on random weights that the checkpoint
    # overwrites (14 s and 4 GB for InternVL2.5-1B); buffers such as the LLM's rotary frequencies are not
    # in checkpoints, so they are built for real.
    with init_empty_weights(include_buffers=False):
        model = VisionLanguageModel(config, tmaug)
    load_vlm_weights(model, directory, layout, kind)
    if len(tokenizer) > config.text.get("vocab_size", len(tokenizer)):
        grow_vocabulary(model, len(tokenizer))
    return model.to(dtype), tokenizer


def load_vlm_weights(model: VisionLanguageModel, directory: Path, layout: str = "hf", kind: str = "vitp checkpoint") -> None:
    """Fill ``model`` from a checkpoint directory; every tensor checked (see read_vlm_state)."""
    source = open_tensor_source(find_directory_weights(Path(directory)))
    tied = bool(model.language_model.config.tie_word_embeddings)
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    state = read_vlm_state(source, layout, expected, tied, str(directory), kind)
    if tied and "language_model.lm_head.weight" not in state:
        state["language_model.lm_head.weight"] = state[_input_embedding_key(model)]
    # A model built on the meta device takes the tensors read (assign; parameters keep requires_grad);
    # a real one (resuming a run) is copied into, so that it stays on its device and dtype.
    on_meta = any(parameter.is_meta for parameter in model.parameters())
    model.load_state_dict(state, strict=True, assign=on_meta)
    if tied:
        model.language_model.tie_weights()


def _input_embedding_key(model: VisionLanguageModel) -> str:
    embedding = model.get_submodule("language_model").get_input_embeddings().weight
    return next(name for name, parameter in model.named_parameters() if parameter is embedding)


def grow_vocabulary(model: VisionLanguageModel, size: int) -> None:
    """Add rows for tokens the tokenizer gained (e.g. InternVL's image tokens), initialised to the mean
    of the existing embeddings, as upstream does."""
    old = model.language_model.get_input_embeddings().weight.shape[0]
    model.language_model.resize_token_embeddings(size, mean_resizing=True)
    model.vlm_config.text["vocab_size"] = size
    logger.info("vocabulary grown from %d to %d tokens for the added special tokens", old, size)


def build_vlm(preset: str, tokenizer, tmaug: TMAugConfig | None = None, **vision_overrides: Any) -> VisionLanguageModel:
    """A model with fresh weights from a named preset, sized for ``tokenizer``."""
    prepare_tokenizer(tokenizer)
    config = preset_config(preset, len(tokenizer), tokenizer.convert_tokens_to_ids(IMG_CONTEXT), **vision_overrides)
    return VisionLanguageModel(config, tmaug)


def hf_config(model: VisionLanguageModel, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` of a transformers InternVLForConditionalGeneration."""
    config = model.vlm_config
    text = {**config.text, "architectures": [type(model.language_model).__name__]}
    text["vocab_size"] = model.language_model.get_input_embeddings().weight.shape[0]
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "vision_config": config_to_hf(config.vision, dtype),
        "text_config": text,
        "image_token_id": config.image_token_id,
        "image_seq_length": config.num_image_token,
        "downsample_ratio": config.downsample_ratio,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": config.select_layer,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": bool(text.get("tie_word_embeddings", False)),
        "dtype": str(dtype).removeprefix("torch."),
    }


def save_vlm(model: VisionLanguageModel, directory: str | Path, tokenizer=None, state_dict=None) -> list[Path]:
    """Write a transformers-native InternVL directory (config, safetensors, tokenizer)."""
    directory = Path(directory)
    state = state_dict if state_dict is not None else model.state_dict()
    state = {key: tensor.detach() for key, tensor in state.items()}
    tied = bool(model.language_model.config.tie_word_embeddings)
    dtype = state["mlp1.1.weight"].dtype
    config = hf_config(model, dtype)
    save_safetensors(vlm_to_hf_state(state, tied), directory / "model.safetensors")
    write_json(config, directory / "config.json")
    write_json({"format": "vitp-vlm", "template": model.vlm_config.template, "tmaug": model.tmaug.__dict__},
               directory / "vitp.json")
    files = [directory / "model.safetensors", directory / "config.json", directory / "vitp.json"]
    if tokenizer is not None:
        files += [Path(p) for p in tokenizer.save_pretrained(directory)]
    return files
