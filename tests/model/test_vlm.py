"""The vision-language model against transformers' InternVLForConditionalGeneration, checkpoints in
both InternVL formats, the image-token check, TMAug in the forward pass, freezing."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import InternVLForConditionalGeneration

from vitp.model.checkpoint import build_vlm, load_vlm, save_vlm
from vitp.model.tmaug import TMAugConfig
from vitp_testing import hf_to_remote_code, multi_image_batch, randomize_

LOGIT_TOLERANCE = 1e-4


@pytest.fixture
def tiny_vlm(bpe_tokenizer):
    torch.manual_seed(0)
    return randomize_(build_vlm("internvl-tiny", bpe_tokenizer), std=0.2).eval()


def test_same_logits_as_transformers_after_saving_ours(tiny_vlm, bpe_tokenizer, tmp_path):
    save_vlm(tiny_vlm, tmp_path / "ckpt", bpe_tokenizer)
    theirs = InternVLForConditionalGeneration.from_pretrained(tmp_path / "ckpt").eval()
    ids, mask, labels, pixels, tiles = multi_image_batch(tiny_vlm, bpe_tokenizer.pad_token_id)
    with torch.no_grad():
        ours = tiny_vlm(ids, mask, pixels, tiles, labels=labels, return_logits=True)
        reference = theirs(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    valid = mask.bool()
    assert (ours.logits - reference.logits)[valid].abs().max() <= LOGIT_TOLERANCE
    assert reference.logits[valid].abs().max() > 0.1  # not a comparison of near-zero numbers
    assert torch.allclose(ours.loss, reference.loss, atol=1e-5)  # loss on the answer tokens only, same mean


def test_transformers_model_loads_into_ours_with_the_same_logits(tiny_vlm, bpe_tokenizer, tmp_path):
    save_vlm(tiny_vlm, tmp_path / "a", bpe_tokenizer)
    theirs = InternVLForConditionalGeneration.from_pretrained(tmp_path / "a").eval()
    randomize_(theirs, std=0.2, seed=5)
    theirs.save_pretrained(tmp_path / "b")
    bpe_tokenizer.save_pretrained(tmp_path / "b")
    ours, _ = load_vlm(tmp_path / "b")
    ours.eval()
    ids, mask, _, pixels, tiles = multi_image_batch(ours, bpe_tokenizer.pad_token_id)
    with torch.no_grad():
        difference = ours(ids, mask, pixels, tiles, return_logits=True).logits - theirs(
            input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert difference[mask.bool()].abs().max() <= LOGIT_TOLERANCE


def test_saved_model_generates_with_transformers(tiny_vlm, bpe_tokenizer, tmp_path):
    save_vlm(tiny_vlm, tmp_path / "ckpt", bpe_tokenizer)
    theirs = InternVLForConditionalGeneration.from_pretrained(tmp_path / "ckpt").eval()
    ids, mask, _, pixels, _ = multi_image_batch(tiny_vlm, bpe_tokenizer.pad_token_id)
    length = int(mask[0].sum())
    out = theirs.generate(input_ids=ids[:1, :length], attention_mask=mask[:1, :length], pixel_values=pixels[:3],
                          max_new_tokens=3, do_sample=False)
    assert out.shape == (1, length + 3)


def test_internvl_remote_code_checkpoint(tiny_vlm, bpe_tokenizer, tmp_path):
    """An InternVL2.5-style directory (vision_model.* InternViT keys, mlp1, language_model.*, llm_config)."""
    save_vlm(tiny_vlm, tmp_path / "hf", bpe_tokenizer)
    reference = InternVLForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    state = reference.state_dict()
    vision = {k[len("model.vision_tower."):]: v for k, v in state.items() if k.startswith("model.vision_tower.")}
    tensors = hf_to_remote_code(vision, depth=2)
    projector = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}
    for key, value in state.items():
        if key.startswith("model.multi_modal_projector."):
            layer, kind = key.split(".")[-2:]
            tensors[f"mlp1.{projector[layer]}.{kind}"] = value.clone()
        elif key.startswith("model.language_model."):
            tensors["language_model.model." + key[len("model.language_model."):]] = value.clone()
    directory = tmp_path / "InternVL2_5-tiny"
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    vc = hf_config["vision_config"]
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internvl2_5",
        "select_layer": -1, "downsample_ratio": 0.5, "ps_version": "v2", "force_image_size": 112,
        "vision_config": {"model_type": "intern_vit_6b", "hidden_size": vc["hidden_size"], "image_size": 112,
                          "patch_size": 14, "num_hidden_layers": vc["num_hidden_layers"],
                          "num_attention_heads": vc["num_attention_heads"], "intermediate_size": vc["intermediate_size"],
                          "qkv_bias": True, "norm_type": "layer_norm", "qk_normalization": False,
                          "initializer_factor": 0.1, "layer_norm_eps": 1e-6, "hidden_act": "gelu"},
        # as upstream saves it: flash-attention requested, bf16 (neither must break loading on a CPU)
        "llm_config": {**hf_config["text_config"], "attn_implementation": "flash_attention_2", "torch_dtype": "bfloat16"},
    }))
    bpe_tokenizer.save_pretrained(directory)
    ours, _ = load_vlm(directory)
    ids, mask, _, pixels, tiles = multi_image_batch(ours, bpe_tokenizer.pad_token_id)
    with torch.no_grad():
        difference = ours.eval()(ids, mask, pixels, tiles, return_logits=True).logits - reference(
            input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert difference[mask.bool()].abs().max() <= LOGIT_TOLERANCE


def test_image_token_count_mismatch_is_refused(tiny_vlm, bpe_tokenizer):
    ids, mask, _, pixels, _ = multi_image_batch(tiny_vlm, bpe_tokenizer.pad_token_id)
    with pytest.raises(ValueError, match=r"row 0 of the batch: 48 <IMG_CONTEXT> tokens for 2 tile\(s\) x 16"):
        tiny_vlm(ids, mask, pixels, torch.tensor([2, 3]))
    with pytest.raises(ValueError, match=r"80 <IMG_CONTEXT> tokens but 4 tiles"):
        tiny_vlm(ids, mask, pixels[:4])


def test_tmaug_acts_in_training_only_and_shortens_the_sequence(bpe_tokenizer):
    torch.manual_seed(0)
    model = build_vlm("internvl-tiny", bpe_tokenizer, TMAugConfig(prob=1.0, ratio=0.75))
    plain = build_vlm("internvl-tiny", bpe_tokenizer)
    plain.load_state_dict(model.state_dict())
    ids, mask, labels, pixels, tiles = multi_image_batch(model, bpe_tokenizer.pad_token_id)
    model.eval()
    plain.eval()
    with torch.no_grad():
        evaluated = model(ids, mask, pixels, tiles, labels=labels)
        assert torch.equal(evaluated.loss, plain(ids, mask, pixels, tiles, labels=labels).loss)
        assert evaluated.tmaug is None
    model.train()
    out = model(ids, mask, pixels, tiles, labels=labels)
    image_tokens = 5 * model.vlm_config.num_image_token
    assert out.tmaug == {"tmaug_samples": 2, "tmaug_tokens": int(0.75 * 48) + int(0.75 * 32), "samples": 2}
    assert out.sequence_tokens == int(mask.sum()) - out.tmaug["tmaug_tokens"]
    assert out.answer_tokens == int((labels[:, 1:] != -100).sum()) and image_tokens == 80


def test_freezing_flags_freeze_what_they_say(bpe_tokenizer):
    model = build_vlm("internvl-tiny", bpe_tokenizer)
    model.freeze(llm=True, backbone=False, mlp=True)
    assert not any(p.requires_grad for p in model.language_model.parameters())
    assert not any(p.requires_grad for p in model.mlp1.parameters())
    assert all(p.requires_grad for p in model.vision_model.parameters())
    model.freeze(backbone=True)
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    assert all(p.requires_grad for p in model.language_model.parameters())


def test_text_only_batch_still_gives_every_trainable_parameter_a_gradient(bpe_tokenizer):
    model = build_vlm("internvl-tiny", bpe_tokenizer).train()
    ids = torch.tensor([[40, 41, 42, 43]])
    out = model(ids, torch.ones_like(ids), labels=ids.clone())
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_missing_tokenizer_tokens_grow_the_vocabulary(tiny_vlm, bpe_tokenizer, tmp_path):
    save_vlm(tiny_vlm, tmp_path / "ckpt", bpe_tokenizer)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == len(bpe_tokenizer)
    loaded, tokenizer = load_vlm(tmp_path / "ckpt")
    assert len(tokenizer) == len(bpe_tokenizer)
    assert torch.equal(loaded.state_dict()["mlp1.1.weight"], tiny_vlm.state_dict()["mlp1.1.weight"])


def test_loaded_model_is_real_tied_and_trainable(tiny_vlm, bpe_tokenizer, tmp_path):
    """load_vlm builds on the meta device: nothing may stay there, and tied weights stay one tensor."""
    save_vlm(tiny_vlm, tmp_path / "ckpt", bpe_tokenizer)
    loaded, _ = load_vlm(tmp_path / "ckpt")
    tensors = list(loaded.parameters()) + list(loaded.buffers())
    assert not any(t.is_meta for t in tensors)
    reference = dict(tiny_vlm.named_buffers())
    for name, buffer in loaded.named_buffers():  # buffers no checkpoint holds (rotary frequencies) rebuilt
        assert torch.equal(buffer, reference[name]), name
    language_model = loaded.language_model
    assert language_model.lm_head.weight is language_model.get_input_embeddings().weight
    loaded.train()
    ids = torch.tensor([[40, 41, 42, 43]])
    loaded(ids, torch.ones_like(ids), labels=ids.clone()).loss.backward()
    assert all(p.requires_grad and p.grad is not None for p in loaded.parameters())


def pack(rows):
    """Samples (ids, labels, tiles) laid into one row: segment ids, positions restarting per sample."""
    ids = torch.tensor([[t for row, _, _ in rows for t in row]])
    labels = torch.tensor([[t for _, row, _ in rows for t in row]])
    segments = torch.tensor([[s for s, (row, _, _) in enumerate(rows) for _ in row]])
    positions = torch.tensor([[p for row, _, _ in rows for p in range(len(row))]])
    return ids, labels, segments, positions, torch.tensor([sum(tiles for _, _, tiles in rows)])


@pytest.mark.parametrize("implementation", ["sdpa", "eager", "vitp_packed_sdpa"])
def test_packed_samples_do_not_see_each_other(tiny_vlm, bpe_tokenizer, implementation):
    """Each sample's loss in a packed row equals its loss alone: attention stays within a sample."""
    tiny_vlm.language_model.set_attn_implementation(implementation)
    ids, mask, labels, pixels, tiles = multi_image_batch(tiny_vlm, bpe_tokenizer.pad_token_id)
    lengths = mask.sum(1).tolist()
    samples = [(ids[r, :n].tolist(), labels[r, :n].tolist(), int(tiles[r])) for r, n in enumerate(lengths)]
    text_only = ([40, 41, 42, 43, 44, 45], [-100, -100, 42, 43, 44, 45], 0)
    samples.append(text_only)
    with torch.no_grad():
        alone = []
        for r, (row, label, count) in enumerate(samples):
            first = sum(t for _, _, t in samples[:r])
            alone.append(tiny_vlm(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long),
                                  pixels[first : first + count], torch.tensor([count]),
                                  labels=torch.tensor([label])).loss)
        packed_ids, packed_labels, segments, positions, packed_tiles = pack(samples)
        for k in range(len(samples)):
            only_k = torch.where(segments == k, packed_labels, torch.full_like(packed_labels, -100))
            loss = tiny_vlm(packed_ids, torch.ones_like(packed_ids), pixels, packed_tiles, labels=only_k,
                            position_ids=positions, segment_ids=segments).loss
            assert torch.allclose(loss, alone[k], atol=1e-5), (k, loss, alone[k])
        # and the whole pack: the token-weighted mean of the samples' losses
        counts = torch.tensor([sum(1 for v in label[1:] if v != -100) for _, label, _ in samples], dtype=torch.float)
        whole = tiny_vlm(packed_ids, torch.ones_like(packed_ids), pixels, packed_tiles, labels=packed_labels,
                         position_ids=positions, segment_ids=segments).loss
        assert torch.allclose(whole, (torch.stack(alone) * counts).sum() / counts.sum(), atol=1e-5)


def test_loss_weights_reduce_per_sample(tiny_vlm, bpe_tokenizer):
    """Upstream's loss_reduction 'sample': every sample weighs 1/its supervised tokens."""
    ids, mask, labels, pixels, tiles = multi_image_batch(tiny_vlm, bpe_tokenizer.pad_token_id)
    counts = (labels[:, 1:] != -100).sum(1)
    weights = torch.where(labels != -100, 1.0 / counts.unsqueeze(1).float(), torch.zeros(labels.shape))
    with torch.no_grad():
        per_sample = [tiny_vlm(ids[r : r + 1], mask[r : r + 1], pixels[[0, 1, 2]] if r == 0 else pixels[3:],
                               tiles[r : r + 1], labels=labels[r : r + 1]).loss for r in range(2)]
        reduced = tiny_vlm(ids, mask, pixels, tiles, labels=labels, loss_weight=weights).loss
    assert torch.allclose(reduced, torch.stack(per_sample).mean(), atol=1e-5)


def test_classifier_loss_is_the_choice_cross_entropy(tiny_vlm, bpe_tokenizer):
    from vitp.data.templates import ClassifyTarget

    ids, mask, labels, pixels, tiles = multi_image_batch(tiny_vlm, bpe_tokenizer.pad_token_id)
    position = int((labels[1] != -100).nonzero()[0])
    request = (1, ClassifyTarget(position, (42, 46, int(ids[1, position])), int(ids[1, position])))
    with torch.no_grad():
        plain = tiny_vlm(ids, mask, pixels, tiles, labels=labels)
        out = tiny_vlm(ids, mask, pixels, tiles, labels=labels, classify=[request], return_logits=True)
    logits = out.logits[1, position - 1, list(request[1].choice_ids)]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(2), label_smoothing=0.01) / 2  # 2 samples
    assert torch.allclose(out.classifier_loss, expected, atol=1e-6)
    assert torch.allclose(out.loss, plain.loss + expected, atol=1e-6)


def test_tsaug_and_tmaug_act_per_sample_in_training(bpe_tokenizer):
    torch.manual_seed(0)
    model = build_vlm("internvl-tiny", bpe_tokenizer, TMAugConfig(prob=1.0, ratio=0.5)).train()
    model.tsaug_prob = 1.0
    ids, mask, labels, pixels, tiles = multi_image_batch(model, bpe_tokenizer.pad_token_id)
    out = model(ids, mask, pixels, tiles, labels=labels)
    assert out.tmaug == {"tsaug_samples": 2, "tmaug_samples": 2, "tmaug_tokens": 24 + 16, "samples": 2}
    out.loss.backward()


@pytest.mark.gpu
def test_packed_attention_on_cuda_matches_each_sample_alone(tiny_vlm, bpe_tokenizer):
    from transformers.utils import is_flash_attn_2_available

    model = tiny_vlm.cuda().to(torch.bfloat16)
    for implementation in ["sdpa"] + (["flash_attention_2"] if is_flash_attn_2_available() else []):
        model.language_model.set_attn_implementation(implementation)
        ids, mask, labels, pixels, tiles = multi_image_batch(model, bpe_tokenizer.pad_token_id)
        lengths = mask.sum(1).tolist()
        samples = [(ids[r, :n].tolist(), labels[r, :n].tolist(), int(tiles[r])) for r, n in enumerate(lengths)]
        packed_ids, packed_labels, segments, positions, packed_tiles = (t.cuda() for t in pack(samples))
        with torch.no_grad():
            for k, (row, label, count) in enumerate(samples):
                first = sum(t for _, _, t in samples[:k])
                alone = model(torch.tensor([row]).cuda(), torch.ones(1, len(row), dtype=torch.long).cuda(),
                              pixels[first : first + count].cuda(), torch.tensor([count]).cuda(),
                              labels=torch.tensor([label]).cuda()).loss
                only_k = torch.where(segments == k, packed_labels, torch.full_like(packed_labels, -100))
                loss = model(packed_ids, torch.ones_like(packed_ids), pixels.cuda(), packed_tiles, labels=only_k,
                             position_ids=positions, segment_ids=segments).loss
                assert torch.allclose(loss, alone, rtol=2e-2), (implementation, k, loss, alone)


def test_projector_weights_from_upstreams_mlp_file(tiny_vlm, bpe_tokenizer, tmp_path):
    """--mlp_path: the projector state dict as InternVL's tools/extract_mlp.py saves it (torch.save)."""
    from vitp.errors import WeightFormatError
    from vitp.model.projector import load_projector_weights

    other = randomize_(build_vlm("internvl-tiny", bpe_tokenizer), seed=3)
    torch.save(other.mlp1.state_dict(), tmp_path / "mlp_projector.pth")
    load_projector_weights(tiny_vlm.mlp1, tmp_path / "mlp_projector.pth")
    assert all(torch.equal(a, b) for a, b in zip(tiny_vlm.mlp1.state_dict().values(), other.mlp1.state_dict().values()))
    broken = {k: v for k, v in other.mlp1.state_dict().items() if k != "3.bias"}
    torch.save({**broken, "0.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightFormatError, match=r"missing \['3.bias'\].*shapes differ for \[\('0.weight'"):
        load_projector_weights(tiny_vlm.mlp1, tmp_path / "wrong.pth")
