"""The models on CUDA in bf16 against transformers' own classes (fp32 on the same device is the truth;
transformers in bf16 is the yardstick of what bf16 costs), the flash kernel of SDPA, packed attention
kernels against per-sample losses, and TMAug drop on the GPU against the CPU."""

import copy
import importlib.util

import pytest
import torch
from transformers import InternVLForConditionalGeneration, InternVLVisionModel

from vitp import save_vit
from vitp.model.checkpoint import build_vlm, save_vlm
from vitp.model.tmaug import TMAugConfig
from vitp.model.vlm import PACKED_SDPA
from vitp.train.packing import PackedCollator
from vitp.data.dataset import Collator

from gpu_testing import lively_
from vitp_testing import multi_image_batch

pytestmark = pytest.mark.gpu

BF16_FLOOR = 1e-2  # relative error bf16 may always have (8 mantissa bits: about 4e-3 per rounding)
BF16_SLACK = 2.0  # vitp in bf16 may be at most this many times further from fp32 than transformers in bf16
BF16_CEILING = 5e-2  # and never further than this (InternViT-300M measured 1.2 % on a CPU, both libraries)
FP32_RELATIVE = 1e-4  # fp32 on the device, TF32 off: only the order of the sums differs
PACKED_BF16_RELATIVE = 1.5e-2  # a loss computed in a packed row vs alone, in bf16
PACKED_FP32_ABSOLUTE = 1e-4


def relative(value: torch.Tensor, truth: torch.Tensor) -> float:
    return ((value.float() - truth.float()).norm() / truth.float().norm()).item()


def assert_bf16_close(ours: torch.Tensor, theirs: torch.Tensor, truth: torch.Tensor, what: str) -> None:
    ours_error, theirs_error = relative(ours, truth), relative(theirs, truth)
    assert ours_error <= min(max(BF16_SLACK * theirs_error, BF16_FLOOR), BF16_CEILING), (what, ours_error, theirs_error)


def test_vit_in_bf16_matches_transformers_and_takes_the_flash_kernel(lively_vit, device, tmp_path):
    save_vit(lively_vit, tmp_path, to="hf")
    theirs = InternVLVisionModel.from_pretrained(tmp_path).to(device).eval()
    size = lively_vit.config.image_size
    pixels = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    ours = copy.deepcopy(lively_vit).to(device).eval()
    with torch.inference_mode():
        truth = theirs(pixels).last_hidden_state
        assert relative(ours(pixels), truth) <= FP32_RELATIVE
        theirs_bf16 = theirs.to(torch.bfloat16)(pixels.bfloat16()).last_hidden_state
        ours.to(torch.bfloat16)
        ours_bf16 = ours(pixels.bfloat16())
        assert_bf16_close(ours_bf16, theirs_bf16, truth, "last hidden state")
        if device == "cuda":  # InternViT has no attention mask: SDPA must be able to run flash only
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # (the default may pick cuDNN's kernel instead)
                assert_bf16_close(ours(pixels.bfloat16()), theirs_bf16, truth, "last hidden state, flash only")


def image_text_batch(model, pad_id: int, device: str):
    return [t.to(device) for t in multi_image_batch(model, pad_id)]


def test_vlm_logits_in_bf16_match_transformers(bpe_tokenizer, device, vlm_preset, tmp_path):
    torch.manual_seed(0)
    ours = lively_(build_vlm(vlm_preset, bpe_tokenizer)).eval()
    save_vlm(ours, tmp_path, bpe_tokenizer)
    theirs = InternVLForConditionalGeneration.from_pretrained(tmp_path).to(device).eval()
    ours.to(device)
    ids, mask, labels, pixels, tiles = image_text_batch(ours, bpe_tokenizer.pad_token_id, device)
    valid = mask.bool()
    with torch.inference_mode():
        truth = theirs(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
        fp32 = ours(ids, mask, pixels, tiles, labels=labels, return_logits=True)
        assert relative(fp32.logits[valid], truth.logits[valid]) <= FP32_RELATIVE
        theirs.to(torch.bfloat16)
        ours.to(torch.bfloat16)
        theirs_bf16 = theirs(input_ids=ids, attention_mask=mask, pixel_values=pixels.bfloat16(), labels=labels)
        ours_bf16 = ours(ids, mask, pixels.bfloat16(), tiles, labels=labels, return_logits=True)
    assert_bf16_close(ours_bf16.logits[valid], theirs_bf16.logits[valid], truth.logits[valid], "logits")
    assert_bf16_close(ours_bf16.loss, theirs_bf16.loss, truth.loss, "loss")


def packed_samples(model, count: int = 3) -> list[dict]:
    """Samples as the dataset yields them, of different lengths and tile counts."""
    ctx, per_tile = model.vlm_config.image_token_id, model.vlm_config.num_image_token
    size = model.vlm_config.vision.image_size
    generator = torch.Generator().manual_seed(5)
    samples = []
    for k in range(count):
        tiles = 1 + k % 2
        prompt = torch.randint(20, 200, (3 + 2 * k,), generator=generator).tolist()
        answer = torch.randint(20, 200, (4 + 3 * k,), generator=generator).tolist()
        ids = torch.tensor(prompt + [ctx] * (tiles * per_tile) + answer)
        labels = torch.full_like(ids, -100)
        labels[-len(answer):] = ids[-len(answer):]
        samples.append({"input_ids": ids, "labels": labels, "num_tiles": tiles, "where": f"sample {k}",
                        "pixel_values": torch.randn(tiles, 3, size, size, generator=generator), "classify": None})
    return samples


def attention_kernels(device: str) -> list[tuple[str, torch.dtype]]:
    kernels = [("sdpa", torch.float32), (PACKED_SDPA, torch.float32), ("sdpa", torch.bfloat16),
               (PACKED_SDPA, torch.bfloat16)]
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        kernels.append(("flash_attention_2", torch.bfloat16))
    return kernels


def test_packed_losses_equal_per_sample_losses_on_every_kernel(bpe_tokenizer, device):
    torch.manual_seed(0)
    model = lively_(build_vlm("internvl-tiny", bpe_tokenizer)).eval()
    samples = packed_samples(model)
    packed = PackedCollator(bpe_tokenizer.pad_token_id, "token")([{**s, "pack": 0} for s in samples])
    keys = ("input_ids", "attention_mask", "pixel_values", "num_tiles", "position_ids", "segment_ids", "image_flags")
    for implementation, dtype in attention_kernels(device):
        model.language_model.set_attn_implementation(implementation)
        model.to(device, dtype)
        forward = {k: packed[k].to(device) for k in keys}
        forward["pixel_values"] = forward["pixel_values"].to(dtype)
        with torch.inference_mode():
            for k, sample in enumerate(samples):
                alone = Collator(bpe_tokenizer.pad_token_id)([sample])
                expected = model(alone["input_ids"].to(device), alone["attention_mask"].to(device),
                                 alone["pixel_values"].to(device, dtype), alone["num_tiles"].to(device),
                                 labels=alone["labels"].to(device)).loss.item()
                only_k = torch.where(packed["segment_ids"] == k, packed["labels"], -100).to(device)
                loss = model(**forward, labels=only_k).loss.item()
                if dtype == torch.float32:
                    assert abs(loss - expected) <= PACKED_FP32_ABSOLUTE, (implementation, k, loss, expected)
                else:
                    assert abs(loss - expected) <= PACKED_BF16_RELATIVE * expected, (implementation, k, loss, expected)


def test_tmaug_drop_on_the_device_drops_what_the_cpu_drops(bpe_tokenizer, device):
    """The draw is made on the CPU generator, so under one seed the device drops the same tokens."""
    torch.manual_seed(0)
    cpu_model = lively_(build_vlm("internvl-tiny", bpe_tokenizer, TMAugConfig(prob=1.0, ratio=0.75))).train()
    device_model = copy.deepcopy(cpu_model).to(device)
    results = {}
    for name, model, where in (("cpu", cpu_model, "cpu"), ("device", device_model, device)):
        batch = image_text_batch(model, bpe_tokenizer.pad_token_id, where)
        torch.manual_seed(3)
        results[name] = model(*batch[:2], batch[3], batch[4], labels=batch[2])
    assert results["device"].tmaug == results["cpu"].tmaug
    per_tile = cpu_model.vlm_config.num_image_token
    assert results["device"].tmaug["tmaug_tokens"] == int(0.75 * 3 * per_tile) + int(0.75 * 2 * per_tile)
    assert results["device"].sequence_tokens == results["cpu"].sequence_tokens
    assert results["device"].loss.item() == pytest.approx(results["cpu"].loss.item(), abs=1e-4)
    device_model.to(torch.bfloat16)
    ids, mask, labels, pixels, tiles = image_text_batch(device_model, bpe_tokenizer.pad_token_id, device)
    out = device_model(ids, mask, pixels.bfloat16(), tiles, labels=labels)
    out.loss.backward()
    gradients = [p.grad for p in device_model.parameters() if p.grad is not None]
    assert gradients and all(torch.isfinite(g.float()).all() for g in gradients)
    assert out.sequence_tokens == int(mask.sum()) - out.tmaug["tmaug_tokens"]
