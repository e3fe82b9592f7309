"""LoRA on the ViT and the LLM (``--use_backbone_lora R``, ``--use_llm_lora R``), as upstream does it.

peft wraps the module (rank R, alpha 2R, dropout 0.05; upstream's target modules), which freezes
everything in it but the adapters. A checkpoint is still a plain transformers InternVL directory:
its weights have the adapters merged in (W + B A alpha/R), so it loads anywhere without peft. Beside
it, for peft users, each adapter in peft's own format (``llm_lora/``, ``vit_lora/``), and for
resuming exactly, every trainable tensor as it was (``trainable.safetensors``): a resumed run
rebuilds the model from the same base checkpoint and puts those back.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from vitp.errors import ConfigError, WeightFormatError
from vitp.model.vlm import VisionLanguageModel
from vitp.tensor_io import save_safetensors

LORA_DROPOUT = 0.05
VIT_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
# upstream's target modules by LLM architecture (InternLM2 and Phi-3 fuse their projections)
LLM_TARGETS = {
    "InternLM2ForCausalLM": ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"],
    "Phi3ForCausalLM": ["mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj"],
    "Qwen2ForCausalLM": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"],
}
LLM_TARGETS["LlamaForCausalLM"] = LLM_TARGETS["Qwen2ForCausalLM"]
ADAPTER_DIRECTORIES = {"language_model": "llm_lora", "vision_model": "vit_lora"}
TRAINABLE_FILE = "trainable.safetensors"


def wrap_backbone_lora(model: VisionLanguageModel, rank: int) -> None:
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=LORA_DROPOUT, target_modules=VIT_TARGETS)
    model.vision_model = _peft_wrapped(model.vision_model, config)


def wrap_llm_lora(model: VisionLanguageModel, rank: int) -> None:
    architecture = type(model.language_model).__name__
    if architecture not in LLM_TARGETS:
        raise ConfigError(f"LoRA on a {architecture} LLM: no target modules known (known: {', '.join(LLM_TARGETS)})")
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=LORA_DROPOUT, target_modules=LLM_TARGETS[architecture],
                        task_type="CAUSAL_LM")
    model.language_model = _peft_wrapped(model.language_model, config)


def _peft_wrapped(module: torch.nn.Module, config: LoraConfig) -> PeftModel:
    # peft reads transformers' deprecated `is_gradient_checkpointing` alias, which warns on every LoRA
    # run; the warning is about peft's code, not the user's, so keep it out of their log.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(module, config)


def uses_lora(model: VisionLanguageModel) -> bool:
    return any(isinstance(getattr(model, name), PeftModel) for name in ADAPTER_DIRECTORIES)


def plain_name(name: str) -> str:
    """A parameter's name in the model without peft: no wrapper prefix, no ``base_layer``."""
    return name.replace("base_model.model.", "", 1).replace(".base_layer.", ".")


def merged_state_dict(model: VisionLanguageModel, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under their names without peft, each adapter merged into its layer's weight."""
    state = model.state_dict() if state is None else state
    scaling = {name: module.scaling["default"] for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    merged = {}
    for key, tensor in state.items():
        if ".lora_" in key:
            continue
        layer, _, kind = key.rpartition(".base_layer.")
        if layer in scaling and kind == "weight":
            down, up = state[f"{layer}.lora_A.default.weight"], state[f"{layer}.lora_B.default.weight"]
            tensor = (tensor.float() + (up.float() @ down.float()) * scaling[layer]).to(tensor.dtype)
        merged[plain_name(key)] = tensor
    return merged


@contextlib.contextmanager
def without_peft_wrappers(model: VisionLanguageModel) -> Iterator[VisionLanguageModel]:
    """The model with its peft-wrapped parts shown as the modules they wrap (for code that reads their
    class or config), restored afterwards."""
    wrapped = {name: getattr(model, name) for name in ADAPTER_DIRECTORIES if isinstance(getattr(model, name), PeftModel)}
    try:
        for name, module in wrapped.items():
            setattr(model, name, module.get_base_model())
        yield model
    finally:
        for name, module in wrapped.items():
            setattr(model, name, module)


def save_adapters(model: VisionLanguageModel, directory: Path) -> list[Path]:
    """Each adapter in peft's format, and every trainable tensor for an exact resume."""
    written = []
    for name, folder in ADAPTER_DIRECTORIES.items():
        module = getattr(model, name)
        if isinstance(module, PeftModel):
            module.save_pretrained(directory / folder)
            written.append(directory / folder)
    trainable = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_safetensors(trainable, directory / TRAINABLE_FILE)
    return written + [directory / TRAINABLE_FILE]


def load_trainable(model: VisionLanguageModel, directory: Path) -> None:
    """Put back the trainable tensors of a LoRA checkpoint (the frozen ones come from the base model)."""
    path = Path(directory) / TRAINABLE_FILE
    if not path.is_file():
        raise WeightFormatError(f"{directory}: no {TRAINABLE_FILE}; it was not saved by a LoRA run of vitp")
    saved = load_file(path)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(trainable):
        missing, unknown = sorted(set(trainable) - set(saved)), sorted(set(saved) - set(trainable))
        raise WeightFormatError(f"{path}: the trainable tensors differ from this run's (missing {missing[:3]}, "
                                f"unexpected {unknown[:3]}); resume with the same LoRA and freezing settings")
    with torch.no_grad():
        for name, parameter in trainable.items():
            if saved[name].shape != parameter.shape:
                raise WeightFormatError(f"{path}: {name} has shape {tuple(saved[name].shape)}, the model "
                                        f"{tuple(parameter.shape)}")
            parameter.copy_(saved[name])
