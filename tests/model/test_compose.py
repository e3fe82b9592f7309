"""compose_vlm: an InternVL from a ViT file or directory and a causal LM directory (upstream's --vision_path
--llm_path --mlp_path), with the projector sized from both and fresh unless given."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import InternVLForConditionalGeneration

from vitp import WeightFormatError, build_vit, save_vit
from vitp.data.templates import IMG_CONTEXT
from vitp.model.checkpoint import compose_vlm, save_vlm
from vitp_testing import internlm2_logits, randomize_, write_internlm2_causal_lm, write_qwen2_causal_lm

LOGIT_TOLERANCE = 1e-4


@pytest.fixture
def vitp_release_file(tmp_path):
    """A ViTP release file as ViTP publishes it: InternViT keys under vision_model., no config beside it."""
    vit = randomize_(build_vit("internvit-tiny"), seed=1).eval()
    save_vit(vit, tmp_path / "release" / "ViTP_ViT_tiny_rs.safetensors", to="vitp")
    path = tmp_path / "ViTP_ViT_tiny_rs.safetensors"
    save_file(load_file(tmp_path / "release" / "ViTP_ViT_tiny_rs.safetensors"), path)
    return path, vit


@pytest.fixture
def qwen2_directory(tmp_path, bpe_tokenizer):
    llm = write_qwen2_causal_lm(tmp_path / "Qwen2.5-tiny", bpe_tokenizer, seed=2)
    return tmp_path / "Qwen2.5-tiny", llm


def one_image_batch(model, tokenizer):
    ids = tokenizer("Describe the scene.", add_special_tokens=False)["input_ids"]
    ids += [model.vlm_config.image_token_id] * model.vlm_config.num_image_token
    ids += tokenizer(" Farmland and sea.", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ids])
    labels = torch.full_like(ids, -100)
    labels[0, -4:] = ids[0, -4:]
    return ids, torch.ones_like(ids), torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(3)), labels


def test_vitp_release_vit_and_a_qwen2_directory(vitp_release_file, qwen2_directory, tmp_path):
    vit_path, vit = vitp_release_file
    llm_path, llm = qwen2_directory
    model, tokenizer = compose_vlm(vit_path, llm_path)
    assert model.vlm_config.image_token_id == tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    state = model.state_dict()
    assert all(torch.equal(state["vision_model." + k], v) for k, v in vit.state_dict().items())
    assert all(torch.equal(state["language_model." + k], v) for k, v in llm.state_dict().items())
    # a fresh projector sized from both: LayerNorm(4 x 64) -> Linear(256, 48) -> GELU -> Linear(48, 48)
    assert state["mlp1.0.weight"].shape == (256,) and torch.equal(state["mlp1.0.weight"], torch.ones(256))
    assert state["mlp1.1.weight"].shape == (48, 256) and state["mlp1.3.weight"].shape == (48, 48)
    assert model.language_model.lm_head.weight is model.language_model.get_input_embeddings().weight

    ids, mask, pixels, labels = one_image_batch(model, tokenizer)
    model.train()
    loss = model(ids, mask, pixels, torch.tensor([1]), labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())

    model.eval()
    save_vlm(model, tmp_path / "composed", tokenizer)
    theirs = InternVLForConditionalGeneration.from_pretrained(tmp_path / "composed").eval()
    with torch.no_grad():
        difference = model(ids, mask, pixels, torch.tensor([1]), return_logits=True).logits - theirs(
            input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert difference.abs().max() <= LOGIT_TOLERANCE


@pytest.mark.parametrize("form", ["extract_mlp.pth", "mlp1.safetensors"])
def test_projector_from_an_mlp_file(vitp_release_file, qwen2_directory, tmp_path, form):
    vit_path, _ = vitp_release_file
    llm_path, _ = qwen2_directory
    generator = torch.Generator().manual_seed(4)
    projector = {"0.weight": torch.randn(256, generator=generator), "0.bias": torch.randn(256, generator=generator),
                 "1.weight": torch.randn(48, 256, generator=generator), "1.bias": torch.randn(48, generator=generator),
                 "3.weight": torch.randn(48, 48, generator=generator), "3.bias": torch.randn(48, generator=generator)}
    if form == "extract_mlp.pth":  # upstream's tools/extract_mlp.py: torch.save(mlp1.state_dict(), "mlp_projector.pth")
        path = tmp_path / "mlp_projector.pth"
        torch.save(projector, path)
    else:
        path = tmp_path / "mlp1.safetensors"
        save_file({"mlp1." + k: v for k, v in projector.items()}, path)
    model, _ = compose_vlm(vit_path, llm_path, path)
    assert all(torch.equal(model.state_dict()["mlp1." + k], v) for k, v in projector.items())


def test_internlm2_remote_code_llm_and_an_internvit_6b(tmp_path):
    llm_config, weights = write_internlm2_causal_lm(tmp_path / "internlm2_5-1_8b-chat-tiny")
    vit = randomize_(build_vit("internvit-6b-tiny"), std=0.1, seed=5).eval()
    save_vit(vit, tmp_path / "InternViT-6B-tiny", to="internvit")  # as upstream's extract_vit.py writes it
    model, tokenizer = compose_vlm(tmp_path / "InternViT-6B-tiny", tmp_path / "internlm2_5-1_8b-chat-tiny",
                                   drop_path_rate=0.1)
    assert type(model.language_model).__name__ == "LlamaForCausalLM"
    assert len(tokenizer) > llm_config["vocab_size"]  # InternVL's image tokens added
    assert model.language_model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.vision_model.drop_path_rates()[-1] == pytest.approx(0.1)
    model.eval()
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours = model.language_model(ids).logits[..., : llm_config["vocab_size"]]
    assert (ours - internlm2_logits(weights, llm_config, ids)).abs().max() <= LOGIT_TOLERANCE

    # pretraining with the 6B-shaped ViT: DropPath on, gradient checkpointing on, one step
    model.train()
    model.set_gradient_checkpointing(True)
    batch = one_image_batch(model, tokenizer)
    loss = model(*batch[:3], torch.tensor([1]), labels=batch[3]).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_wrong_parts_are_refused_with_the_offending_tensor(vitp_release_file, qwen2_directory, tmp_path):
    vit_path, _ = vitp_release_file
    llm_path, _ = qwen2_directory
    torch.save({"0.weight": torch.ones(256), "1.weight": torch.ones(32, 256)}, tmp_path / "bad_mlp.pth")
    with pytest.raises(WeightFormatError, match=r"mlp1[\s\S]*missing \(4\)[\s\S]*wrong shape \(1\): 1.weight is \[32, 256\]"):
        compose_vlm(vit_path, llm_path, tmp_path / "bad_mlp.pth")
    tensors = load_file(llm_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, llm_path / "model.safetensors")
    with pytest.raises(WeightFormatError, match=r"cannot load the LLM[\s\S]*missing \(1\): model.layers.1.mlp.up_proj.weight"):
        compose_vlm(vit_path, llm_path)
    with pytest.raises(ValueError, match="select_layer=5 is out of range"):
        compose_vlm(vit_path, llm_path, select_layer=5)
