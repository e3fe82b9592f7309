"""LoRA as upstream (peft, rank R, alpha 2R, upstream's target modules): checkpoints with the adapters
merged that transformers loads, the adapters beside them for peft, exact resume; unfreeze_lm_head and
unfreeze_vit_layers."""

import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import InternVLForConditionalGeneration

from vitp.model.checkpoint import load_vlm

from train_testing import logged_losses, run

FROZEN = dict(freeze_llm=True, freeze_backbone=True, freeze_mlp=True, max_steps=3, save_steps=3, learning_rate=5e-3)


def changed(before, after, prefix):
    return sorted(k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k]))


@pytest.mark.slow
def test_llm_and_backbone_lora_with_everything_else_frozen(workspace, tiny_qwen2_checkpoint, tmp_path):
    output = run(workspace, tmp_path / "lora", model_preset=None, tokenizer=None,
                 model_name_or_path=str(tiny_qwen2_checkpoint), use_llm_lora=4, use_backbone_lora=2, **FROZEN)
    checkpoint = output / "checkpoint-3"
    for directory in (output, checkpoint):
        assert (directory / "llm_lora" / "adapter_config.json").is_file()
        assert (directory / "vit_lora" / "adapter_model.safetensors").is_file()
        InternVLForConditionalGeneration.from_pretrained(directory)  # merged: a plain transformers checkpoint
    base, _ = load_vlm(tiny_qwen2_checkpoint, image_size=56)  # the runs' tile size
    trained, _ = load_vlm(output)
    before, after = base.state_dict(), trained.state_dict()
    assert changed(before, after, "mlp1.") == []
    llm = changed(before, after, "language_model.")
    assert llm and all(k.endswith("proj.weight") for k in llm)  # only the adapted projections moved
    assert {k.split(".")[-2] for k in llm} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    vit = changed(before, after, "vision_model.")
    assert vit and {k.split(".")[-2] for k in vit} == {"qkv", "proj", "fc1", "fc2"}
    # peft users: the adapter on the base LLM, merged, gives the checkpoint's LLM weights
    merged = PeftModel.from_pretrained(base.language_model, output / "llm_lora").merge_and_unload().state_dict()
    for key, value in merged.items():
        assert torch.allclose(value, after[f"language_model.{key}"], atol=1e-6), key


@pytest.mark.slow
def test_lora_run_resumes_exactly(workspace, tiny_qwen2_checkpoint, tmp_path):
    settings = dict(model_preset=None, tokenizer=None, model_name_or_path=str(tiny_qwen2_checkpoint), use_llm_lora=4,
                    freeze_llm=True, freeze_backbone=True, max_steps=4, save_steps=2, learning_rate=5e-3)
    full = tmp_path / "full"
    run(workspace, full, **settings)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    run(workspace, resumed, **settings)
    first, second = logged_losses(full / "checkpoint-4"), logged_losses(resumed / "checkpoint-4")
    assert second[3] == pytest.approx(first[3], abs=1e-6) and second[4] == pytest.approx(first[4], abs=1e-6)
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_unfreeze_lm_head_and_the_last_vit_layer(workspace, tiny_qwen2_checkpoint, tmp_path):
    output = run(workspace, tmp_path / "partial", model_preset=None, tokenizer=None,
                 model_name_or_path=str(tiny_qwen2_checkpoint), unfreeze_lm_head=True, unfreeze_vit_layers=-1,
                 **{**FROZEN, "max_steps": 1, "save_steps": 100})
    before, after = load_vlm(tiny_qwen2_checkpoint, image_size=56)[0].state_dict(), load_vlm(output)[0].state_dict()
    # the tiny Qwen2 ties its output layer to the token embeddings: both are one trained tensor
    assert changed(before, after, "language_model.") == ["language_model.lm_head.weight",
                                                         "language_model.model.embed_tokens.weight"]
    vit = changed(before, after, "vision_model.")
    assert vit and all(k.startswith("vision_model.blocks.1.") for k in vit)  # upstream's layers[-1:]
