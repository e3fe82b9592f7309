"""Every LLM family of InternVL checkpoints (InternLM2, Phi-3, Llama), from tiny remote-code checkpoints
written by hand: the LLM equals the family's reference, the ViT and mlp1 are the stored ones, one training
step works, and the saved directory gives transformers' InternVLForConditionalGeneration the same logits.

The references: InternLM2's published arithmetic rebuilt in ``vitp_testing.internlm2_logits`` (over its
own fused ``wqkv`` layout); transformers' ``Phi3ForCausalLM`` and ``LlamaForCausalLM`` for Phi-3
(InternVL2-4B) and Llama (InternVL2-76B), whose remote-code key names transformers' classes share."""

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, InternVLForConditionalGeneration, LlamaForCausalLM, Phi3ForCausalLM

from vitp.model.checkpoint import load_vlm, save_vlm
from vitp_testing import (
    internlm2_logits,
    internlm2_token_ids,
    randomize_,
    write_internlm2_internvl_checkpoint,
    write_internvl_remote_checkpoint,
)

LOGIT_TOLERANCE = 1e-4
VISION_TOLERANCE = 1e-5
MACHINE = {"attn_implementation": "flash_attention_2", "torch_dtype": "bfloat16"}  # as upstream saves them


def phi3_llm_config(vocab_size):
    """InternVL2-4B's llm_config (Phi-3-mini-128k: LongRoPE 'su' scaling, sliding window) at test size."""
    return {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
        "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config", "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"},
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "max_position_embeddings": 128, "original_max_position_embeddings": 16, "rope_theta": 10000.0,
        "rope_scaling": {"type": "su", "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0, 2.5],
                         "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]},
        "sliding_window": 2047, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False, **MACHINE,
    }


def llama_llm_config(vocab_size):
    """InternVL2-76B's llm_config (Hermes-2-Theta-Llama-3-70B: GQA, rope_theta 500000) at test size."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "rope_theta": 500000.0,
        "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, **MACHINE,
    }


def native_reference(model_class, llm_config, seed):
    values = {k: v for k, v in llm_config.items() if k not in ("auto_map", "architectures", *MACHINE)}
    scaling = values.pop("rope_scaling", None)
    if scaling:  # Phi-3's LongRoPE as transformers 5 spells it
        values["rope_parameters"] = {
            "rope_type": "longrope", "rope_theta": values.pop("rope_theta"), "short_factor": scaling["short_factor"],
            "long_factor": scaling["long_factor"], "original_max_position_embeddings": values["original_max_position_embeddings"],
        }
    return randomize_(model_class(AutoConfig.for_model(**values)), std=0.2, seed=seed).eval()


@pytest.fixture(params=["internlm2", "phi3", "llama"])
def family(request, tmp_path, bpe_tokenizer):
    """(name, checkpoint directory, reference LLM logits function, checkpoint info)."""
    directory = tmp_path / f"InternVL-{request.param}-tiny"
    if request.param == "internlm2":
        # max_position_embeddings 16: the 40-token sequences below switch on the dynamic-NTK rotary scaling
        info = write_internlm2_internvl_checkpoint(directory, max_position_embeddings=16, bias=True)
        return request.param, directory, lambda ids: internlm2_logits(info["llm_weights"], info["llm_config"], ids), info
    classes = {"phi3": (phi3_llm_config, Phi3ForCausalLM), "llama": (llama_llm_config, LlamaForCausalLM)}
    make_config, model_class = classes[request.param]
    llm_config = make_config(len(bpe_tokenizer))
    reference = native_reference(model_class, llm_config, seed=3)
    weights = reference.state_dict()
    if request.param == "phi3":  # stored fused, as Phi-3's own code stores them; transformers keeps them fused
        assert "model.layers.0.self_attn.qkv_proj.weight" in weights and "model.layers.0.mlp.gate_up_proj.weight" in weights
    vision_model, mlp1 = write_internvl_remote_checkpoint(directory, llm_config, weights, seed=3)
    bpe_tokenizer.save_pretrained(directory)

    def reference_logits(ids):
        with torch.no_grad():
            return reference(ids).logits

    return request.param, directory, reference_logits, {"vision_model": vision_model, "mlp1": mlp1}


def image_batch(model, tokenizer):
    """One sample: text, one tile's <img><IMG_CONTEXT>...</img>, text; labels on the last tokens."""
    text = tokenizer("Describe the scene.", add_special_tokens=False)["input_ids"]
    image = tokenizer.convert_tokens_to_ids(["<img>"]) + [model.vlm_config.image_token_id] * model.vlm_config.num_image_token
    image += tokenizer.convert_tokens_to_ids(["</img>"])
    answer = tokenizer("A harbour with many boats.", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([text + image + answer])
    labels = torch.full_like(ids, -100)
    labels[0, -len(answer):] = ids[0, -len(answer):]
    pixels = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(9))
    return ids, torch.ones_like(ids), pixels, torch.tensor([1]), labels


def test_loads_strictly_onto_a_native_class_with_the_reference_numbers(family):
    name, directory, reference_logits, info = family
    model, tokenizer = load_vlm(directory)
    expected_class = {"internlm2": "LlamaForCausalLM", "phi3": "Phi3ForCausalLM", "llama": "LlamaForCausalLM"}[name]
    assert type(model.language_model).__name__ == expected_class
    model.eval()
    for length in (12, 40):  # 40 > the 16 positions of rotary scaling (dynamic NTK, LongRoPE's long factors)
        ids = torch.randint(3, 300, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            ours = model.language_model(ids).logits
        reference = reference_logits(ids)
        assert (ours[..., : reference.shape[-1]] - reference).abs().max() <= LOGIT_TOLERANCE
        assert reference.abs().max() > 1.0  # not a comparison of near-zero numbers
    pixels = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        vision = (model.vision_model.hidden_states(pixels)[-1] - info["vision_model"](pixels).last_hidden_state).abs().max()
    assert vision <= VISION_TOLERANCE
    assert all(torch.equal(model.state_dict()[key], tensor) for key, tensor in info["mlp1"].items())


def test_trains_one_step_and_saves_a_directory_transformers_loads(family, tmp_path):
    name, directory, _, _ = family
    model, tokenizer = load_vlm(directory)
    ids, mask, pixels, tiles, labels = image_batch(model, tokenizer)
    model.train()
    model.set_gradient_checkpointing(True)
    before = {key: value.detach().clone() for key, value in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(ids, mask, pixels, tiles, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    optimizer.step()
    assert all(not torch.equal(before[key], value) for key, value in model.named_parameters())

    model.eval()
    save_vlm(model, tmp_path / "saved", tokenizer)
    theirs = InternVLForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    again, _ = load_vlm(tmp_path / "saved")
    with torch.no_grad():
        ours = model(ids, mask, pixels, tiles, return_logits=True).logits
        transformers_logits = theirs(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        reloaded = again.eval()(ids, mask, pixels, tiles, return_logits=True).logits
    assert (ours - transformers_logits).abs().max() <= LOGIT_TOLERANCE
    assert torch.equal(ours, reloaded)


def test_internlm2_tokenizer_ids_survive_saving_and_load_natively(tmp_path):
    directory = tmp_path / "InternVL2_5-2B-tiny"
    write_internlm2_internvl_checkpoint(directory)
    model, tokenizer = load_vlm(directory)
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img>\nWhat is  this? 遥感<|im_end|>\n<|im_start|>assistant\n"
    expected = internlm2_token_ids(directory, text)
    assert tokenizer(text)["input_ids"] == expected
    save_vlm(model, tmp_path / "saved", tokenizer)
    native = AutoTokenizer.from_pretrained(tmp_path / "saved", trust_remote_code=False)
    assert native(text)["input_ids"] == expected
