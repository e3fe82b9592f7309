"""Vision-language model checkpoints: load an InternVL (remote-code or transformers directory, any LLM
family), compose one from a ViT and an LLM, build one from scratch, and save it as a transformers-native
InternVL directory.

What is saved loads with ``transformers.InternVLForConditionalGeneration.from_pretrained`` (and can
``generate``); vitp loads it back strictly. Key tables live in ``vitp.model.formats``; this module opens
the files, applies them (``vitp.model.weights.read_state``) and builds the model.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights

from vitp.data.templates import IMG_CONTEXT, prepare_tokenizer
from vitp.data.tokenizer import load_tokenizer
from vitp.errors import ConfigError, WeightFormatError
from vitp.files import write_json
from vitp.model.formats.keymap import KeyMap
from vitp.model.formats.llm import llm_family
from vitp.model.formats.vit import config_from_hf, config_from_internvit, config_to_hf, nested_config
from vitp.model.formats.vlm import canonical_hf_key, llm_keymap, projector_keymap, vlm_keymap
from vitp.model.projector import build_projector
from vitp.model.tmaug import TMAugConfig
from vitp.model.vit_checkpoint import checkpoint_config, inspect_checkpoint, read_vit_state
from vitp.model.vlm import VisionLanguageModel, VLMConfig, preset_config
from vitp.model.weights import read_state
from vitp.tensor_io import find_directory_weights, open_tensor_source, read_json, save_safetensors

logger = logging.getLogger("vitp")

LM_HEAD = "language_model.lm_head.weight"


def read_vlm_config(directory: Path, image_token_id: int) -> tuple[VLMConfig, KeyMap, str]:
    """(config, key table, description) of an InternVL checkpoint directory."""
    where = str(directory / "config.json")
    values = read_json(directory / "config.json")
    if values.get("model_type") == "internvl_chat" or "llm_config" in values:
        vision = config_from_internvit(nested_config(values, "vision_config", where), f"{where}: vision_config")
        family, text = llm_family(nested_config(values, "llm_config", where), f"{where}: llm_config")
        if values.get("ps_version", "v2") != "v2":
            raise ConfigError(f"{where}: ps_version {values.get('ps_version')!r}; vitp implements InternVL's pixel shuffle 'v2'")
        config = VLMConfig(
            vision=vision, text=text, image_token_id=image_token_id,
            downsample_ratio=float(values.get("downsample_ratio", 0.5)),
            select_layer=int(values.get("select_layer", -1)),
            template=values.get("template", "internvl2_5"),
        )
        kind = f"InternVL remote-code checkpoint directory ({family.name} LLM)"
        return config, vlm_keymap("internvit", family.keymap_for(text)), kind
    if values.get("model_type") == "internvl":
        vision = config_from_hf(nested_config(values, "vision_config", where), f"{where}: vision_config")
        _, text = llm_family(nested_config(values, "text_config", where), f"{where}: text_config")
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
        return config, vlm_keymap("hf"), "transformers InternVL checkpoint directory"
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

    ``image_size`` changes the tile size (upstream's force_image_size): the position embedding is
    resampled to the new patch grid."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise WeightFormatError(f"{directory}: not a checkpoint directory (no config.json)")
    tokenizer = load_tokenizer(directory, use_fast=use_fast_tokenizer)
    config, keymap, kind = read_vlm_config(directory, tokenizer.convert_tokens_to_ids(IMG_CONTEXT))
    config = _with_vision_changes(config, drop_path_rate=drop_path_rate, image_size=image_size)
    model = _empty_model(config, tmaug)
    _read_whole_model(model, directory, keymap, kind)
    return _finish(model, tokenizer, dtype), tokenizer


def load_vlm_weights(model: VisionLanguageModel, directory: Path, layout: str = "hf", kind: str = "vitp checkpoint") -> None:
    """Fill ``model`` from a checkpoint directory in ``layout`` ("hf" or, for a Qwen2/Llama/Phi-3 LLM,
    "internvit"); every tensor checked."""
    _read_whole_model(model, Path(directory), vlm_keymap(layout), kind)


def _read_whole_model(model: VisionLanguageModel, directory: Path, keymap: KeyMap, kind: str) -> None:
    source = open_tensor_source(find_directory_weights(directory))
    # (no InternVL remote-code key starts with one of transformers' alternative spellings)
    on_disk = {canonical_hf_key(key): key for key in source.keys()}
    state = read_state(
        source, keymap, _expected(model), [f"cannot load the vision-language model from {directory}",
                                          f"  detected format: {kind}"],
        on_disk=on_disk, optional=_optional(model), pos_embed_key="vision_model.pos_embed", where=directory,
    )
    _assign(model, state)


def compose_vlm(
    vision_path: str | Path,
    llm_path: str | Path,
    mlp_path: str | Path | None = None,
    *,
    tmaug: TMAugConfig | None = None,
    drop_path_rate: float | None = None,
    image_size: int | None = None,
    downsample_ratio: float = 0.5,
    select_layer: int = -1,
    use_fast_tokenizer: bool = True,
    dtype: torch.dtype = torch.float32,
):
    """(model, tokenizer): an InternVL built from parts, as upstream's ``--vision_path --llm_path
    --mlp_path``. ``vision_path`` is any ViT vitp reads (an InternViT directory, a ViTP release file, an
    InternVL checkpoint...); ``llm_path`` a causal LM directory (Qwen2, Llama, Phi-3, or InternLM2 in its
    remote-code layout), whose tokenizer is taken and given InternVL's tokens; ``mlp_path`` an ``mlp1``
    state file (upstream's ``tools/extract_mlp.py`` writes ``mlp_projector.pth``), else ``mlp1`` starts
    fresh, sized from the ViT's width and the LLM's."""
    llm_path = Path(llm_path)
    if not (llm_path / "config.json").is_file():
        raise WeightFormatError(f"{llm_path}: not a causal LM directory (no config.json)")
    tokenizer = load_tokenizer(llm_path, use_fast=use_fast_tokenizer)
    family, text = llm_family(read_json(llm_path / "config.json"), str(llm_path / "config.json"))
    vit = inspect_checkpoint(vision_path)
    vision, origin = checkpoint_config(vit)
    config = VLMConfig(
        vision=vision, text=text, image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT),
        downsample_ratio=downsample_ratio, select_layer=select_layer,
    )
    config = _with_vision_changes(config, drop_path_rate=drop_path_rate, image_size=image_size)
    model = _empty_model(config, tmaug)
    model.vision_model.resolve_layer(select_layer)  # an out-of-range layer fails before any tensor is read
    expected = _expected(model)
    state = read_vit_state(vit, model.vision_model, None, origin, our_prefix="vision_model.")
    llm_source = open_tensor_source(find_directory_weights(llm_path))
    state.update(read_state(
        llm_source, llm_keymap(family, text), {k: s for k, s in expected.items() if k.startswith("language_model.")},
        [f"cannot load the LLM from {llm_path}", f"  detected format: {family.name} causal LM directory"],
        optional=_optional(model), where=llm_path,
    ))
    state.update(_projector_state(model, mlp_path, expected))
    _assign(model, state)
    logger.info("composed an InternVL from %s (ViT) and %s (%s LLM)%s", vision_path, llm_path, family.name,
                f" with mlp1 from {mlp_path}" if mlp_path else ", with a fresh mlp1")
    return _finish(model, tokenizer, dtype), tokenizer


def _projector_state(model: VisionLanguageModel, mlp_path: str | Path | None, expected: dict) -> dict[str, torch.Tensor]:
    """``mlp1``'s tensors from an mlp1 file, or freshly initialised as upstream builds it."""
    shapes = {k: s for k, s in expected.items() if k.startswith("mlp1.")}
    if mlp_path is None:
        config = model.vlm_config
        fresh = build_projector(config.vision.hidden_size, model.language_model.config.hidden_size, config.downsample_ratio)
        return {"mlp1." + key: tensor for key, tensor in fresh.state_dict().items()}
    source = open_tensor_source(Path(mlp_path))
    return read_state(
        source, projector_keymap(source.keys()), shapes,
        [f"cannot load the projector mlp1 from {mlp_path}", "  expected: the state dict of mlp1 "
         "(0.weight, 0.bias, 1.weight, 1.bias, 3.weight, 3.bias, as upstream's tools/extract_mlp.py writes it)"],
        where=mlp_path,
    )


def _with_vision_changes(config: VLMConfig, **changes: Any) -> VLMConfig:
    changes = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(config, vision=config.vision.replace(**changes))


def _empty_model(config: VLMConfig, tmaug: TMAugConfig | None) -> VisionLanguageModel:
    # Parameters on the meta device: no time or memory spent on random weights that the checkpoint
    # overwrites (14 s and 4 GB for InternVL2.5-1B); buffers such as the LLM's rotary frequencies are not
    # in checkpoints, so they are built for real.
    with init_empty_weights(include_buffers=False):
        return VisionLanguageModel(config, tmaug)


def _expected(model: VisionLanguageModel) -> dict[str, tuple[int, ...]]:
    return {key: tuple(t.shape) for key, t in model.state_dict().items()}


def _optional(model: VisionLanguageModel) -> frozenset[str]:
    """A tied LM head is stored once, as the input embeddings."""
    return frozenset({LM_HEAD}) if model.language_model.config.tie_word_embeddings else frozenset()


def _assign(model: VisionLanguageModel, state: dict[str, torch.Tensor]) -> None:
    tied = bool(model.language_model.config.tie_word_embeddings)
    if tied and LM_HEAD not in state:
        state[LM_HEAD] = state[_input_embedding_key(model)]
    # A model built on the meta device takes the tensors read (assign; parameters keep requires_grad);
    # a real one (resuming a run) is copied into, so that it stays on its device and dtype.
    on_meta = any(parameter.is_meta for parameter in model.parameters())
    model.load_state_dict(state, strict=True, assign=on_meta)
    if tied:
        model.language_model.tie_weights()


def _finish(model: VisionLanguageModel, tokenizer, dtype: torch.dtype) -> VisionLanguageModel:
    if len(tokenizer) > model.vlm_config.text.get("vocab_size", len(tokenizer)):
        grow_vocabulary(model, len(tokenizer))
    return model.to(dtype)


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
    if model.language_model.config.tie_word_embeddings:
        state.pop(LM_HEAD, None)  # written once, as the input embeddings
    dtype = state["mlp1.1.weight"].dtype
    config = hf_config(model, dtype)
    save_safetensors(vlm_keymap("hf").to_theirs(state), directory / "model.safetensors")
    write_json(config, directory / "config.json")
    write_json({"format": "vitp-vlm", "template": model.vlm_config.template, "tmaug": model.tmaug.__dict__},
               directory / "vitp.json")
    files = [directory / "model.safetensors", directory / "config.json", directory / "vitp.json"]
    if tokenizer is not None:
        files += [Path(p) for p in tokenizer.save_pretrained(directory)]
    return files
