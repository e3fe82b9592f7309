"""`vitp pretrain --vision_path VIT --llm_path LLM`: upstream's way to start from parts (a ViTP release ViT
and a causal LM directory), from the command line to a checkpoint transformers loads."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import InternVLForConditionalGeneration, Qwen2ForCausalLM

from vitp import build_vit, save_vit
from vitp.cli import main
from vitp.data.tokenizer import load_tokenizer
from vitp_testing import randomize_, write_qwen2_causal_lm


@pytest.fixture(scope="module")
def parts(workspace, tmp_path_factory):
    """A ViTP release ViT file and a Qwen2 directory with the workspace's tokenizer."""
    root = tmp_path_factory.mktemp("parts")
    vit = randomize_(build_vit("internvit-tiny"), seed=1)
    save_vit(vit, root / "vit" / "ViTP_ViT_tiny.safetensors", to="vitp")
    write_qwen2_causal_lm(root / "llm", load_tokenizer(workspace / "tok"))
    return root / "vit" / "ViTP_ViT_tiny.safetensors", root / "llm"


@pytest.mark.slow
def test_pretrain_from_a_vit_file_and_an_llm_directory(parts, small_meta, tmp_path, capsys):
    vit_file, llm = parts
    output = tmp_path / "composed"
    code = main(["pretrain", "--vision_path", str(vit_file), "--llm_path", str(llm), "--meta_path", str(small_meta),
                 "--output_dir", str(output), "--conv_style", "internvl2_5", "--force_image_size", "56",
                 "--freeze_llm", "True", "--freeze_backbone", "True", "--max_steps", "2",
                 "--per_device_train_batch_size", "2", "--dataloader_num_workers", "0", "--report_to", "none"])
    assert code == 0, capsys.readouterr().err[-2000:]
    model = InternVLForConditionalGeneration.from_pretrained(output)
    saved = model.state_dict()
    # frozen ViT and LLM are the parts, bit for bit; only the fresh projector trained
    vit = load_file(vit_file)["vision_model.embeddings.patch_embedding.weight"]
    assert torch.equal(saved["model.vision_tower.embeddings.patch_embeddings.projection.weight"], vit)
    llm = Qwen2ForCausalLM.from_pretrained(llm).state_dict()
    assert torch.equal(saved["model.language_model.embed_tokens.weight"], llm["model.embed_tokens.weight"])
