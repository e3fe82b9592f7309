"""Packed training: upstream's buffer algorithm and sample stream, the packed collator, packed = alone
per sample through the real data path, and a packed run that resumes exactly."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vitp.data.dataset import Collator, InstructionDataset, data_settings
from vitp.data.meta import read_meta
from vitp.data.tokenizer import load_tokenizer
from vitp.model.checkpoint import build_vlm
from vitp.train.arguments import DataTrainingArguments
from vitp.train.packing import PackedBatchSampler, PackedCollator, PackedItems, PackPlanner, sample_stream

from train_testing import logged_losses, run


def test_planner_follows_upstreams_buffers():
    """max 100 tokens, 4 tiles, 2 open packs: a sample joins the first pack it fits; a pack leaves when
    its tokens or tiles are full, or as the fullest when too many are open."""
    planner = PackPlanner(max_tokens=100, max_tiles=4, max_buffers=2)
    assert planner.add(0, 60, 1) == [] and planner.add(1, 50, 1) == []
    (full,) = planner.add(2, 40, 2)  # joins pack [0]: exactly 100 tokens
    assert (full.indices, full.tokens, full.tiles) == ([0, 2], 100, 3)
    (full,) = planner.add(3, 30, 3)  # joins pack [1]: 4 tiles
    assert (full.indices, full.tiles) == ([1, 3], 4)
    assert planner.add(4, 70, 0) == [] and planner.add(5, 70, 2) == []
    assert [p.indices for p in planner.open] == [[5], [4]]  # most tiles first
    (evicted,) = planner.add(6, 70, 1)  # three open packs: the one with most tiles leaves
    assert evicted.indices == [5] and [p.indices for p in planner.open] == [[6], [4]]
    assert [p.indices for p in planner.flush()] == [[6], [4]] and planner.open == []


def test_sample_stream_visits_each_entry_once_per_pass_and_weights_datasets():
    rng = np.random.default_rng(0)
    one_pass = list(sample_stream([5, 3, 0, 4], [5 / 12, 3 / 12, 0, 4 / 12], replacement=False, rng=rng))
    assert sorted(one_pass) == list(range(12))
    # upstream's --use_data_resampling: sqrt weights draw the small dataset far more often than its size
    stream = sample_stream([900, 100], [0.75, 0.25], replacement=True, rng=np.random.default_rng(1))
    draws = [next(stream) for _ in range(2000)]
    small = sum(d >= 900 for d in draws) / len(draws)
    assert 0.22 < small < 0.28
    assert len(set(d for d in draws if d >= 900)) == 100  # replacement: the small dataset restarts


@pytest.fixture(scope="module")
def packed_data(workspace):
    tokenizer = load_tokenizer(workspace / "tok")
    args = DataTrainingArguments(dynamic_image_size=True, use_thumbnail=True, max_dynamic_patch=2,
                                 conv_style="internvl2_5", system_message="Answer.", max_seq_length=400)
    settings = data_settings(args, 56, 4)
    dataset = InstructionDataset(read_meta(workspace / "data" / "meta.json"), tokenizer, settings, replace_bad=False)
    return dataset, tokenizer


def test_packed_batches_respect_the_limits_and_cover_the_data(packed_data):
    dataset, _ = packed_data
    sampler = PackedBatchSampler(dataset, packs_per_batch=2, max_tokens=600, max_tiles=12, max_buffers=4,
                                 replacement=False, resampling=False, seed=3)
    keys, batches = [], iter(sampler)
    while len(keys) < len(dataset):
        keys += next(batches)
    first_pass = keys[: len(dataset)]
    assert sorted(index for _, index in first_pass) == list(range(len(dataset)))  # every sample once
    packs = {}
    for pack, index in first_pass:
        packs.setdefault(pack, []).append(index)
    for indices in packs.values():
        lengths = [dataset.measure(i) for i in indices]
        assert sum(t for t, _ in lengths) <= 600 and sum(n for _, n in lengths) <= 12
    assert len(packs) <= len(dataset) / 2  # two or more samples per pack on average
    again = PackedBatchSampler(dataset, 2, 600, 12, 4, False, False, seed=3)
    assert next(iter(again)) == next(iter(sampler))  # deterministic: every rank plans the same packs


def test_collator_lays_packs_into_rows(packed_data):
    dataset, tokenizer = packed_data
    items = [PackedItems(dataset)[key] for key in [(0, 0), (0, 1), (1, 2), ("dropped", "x.jsonl:9", "kind", "why")]]
    batch = PackedCollator(tokenizer.pad_token_id, "sample", strict_tokens=700, strict_tiles=8, tile_size=56)(items)
    first, second = (len(dataset[i]["input_ids"]) for i in (0, 1))
    assert batch["input_ids"].shape == (2, 700) and batch["pixel_values"].shape == (16, 3, 56, 56)
    segments = batch["segment_ids"][0]
    assert (segments[:first] == 0).all() and (segments[first : first + second] == 1).all()
    assert (segments[first + second :] == -1).all() and batch["attention_mask"][0].sum() == first + second
    assert batch["position_ids"][0, first] == 0 and batch["position_ids"][0, first - 1] == first - 1
    assert batch["labels"][0, first] == -100  # a sample's first token is never predicted from the previous one
    weights = batch["loss_weight"][0]
    assert torch.allclose(weights[:first].sum(), torch.tensor(1.0)) and torch.allclose(weights[first:].sum(), torch.tensor(1.0))
    tiles = [dataset[i]["num_tiles"] for i in range(3)]
    assert batch["num_tiles"].tolist() == [tiles[0] + tiles[1], tiles[2]]
    assert batch["image_flags"].tolist() == [True] * (tiles[0] + tiles[1]) + [False] * (8 - tiles[0] - tiles[1]) + \
        [True] * tiles[2] + [False] * (8 - tiles[2])
    assert batch["dropped"] == [("x.jsonl:9", "kind", "why")]


def test_packed_loss_of_each_sample_equals_its_loss_alone(packed_data):
    dataset, tokenizer = packed_data
    torch.manual_seed(0)
    model = build_vlm("internvl-tiny", tokenizer, image_size=56).eval()
    samples = [dataset[i] for i in range(4)]
    packed = PackedCollator(tokenizer.pad_token_id, "token")([{**s, "pack": 0} for s in samples])
    padded = Collator(tokenizer.pad_token_id)
    forward = {k: packed[k] for k in ("input_ids", "attention_mask", "pixel_values", "num_tiles", "position_ids",
                                      "segment_ids", "image_flags")}
    with torch.no_grad():
        for k, sample in enumerate(samples):
            alone = padded([sample])
            expected = model(**{key: alone[key] for key in ("input_ids", "attention_mask", "pixel_values", "num_tiles",
                                                            "labels")}).loss
            only_k = torch.where(packed["segment_ids"] == k, packed["labels"], torch.full_like(packed["labels"], -100))
            loss = model(**forward, labels=only_k).loss
            assert abs(loss.item() - expected.item()) <= 1e-5, (k, loss.item(), expected.item())


@pytest.mark.slow
def test_packed_run_learns_and_resumes_exactly(workspace, tmp_path):
    packed = dict(use_packed_ds=True, max_packed_tokens=700, max_seq_length=400, num_images_expected=8,
                  max_buffer_size=4, strict_mode=False, per_device_train_batch_size=1, max_steps=6, save_steps=3,
                  TMAug_prob=0.5, loss_reduction="square", TSAug_prob=0.5)
    full = tmp_path / "full"
    run(workspace, full, **packed)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")  # as if killed after step 3
    run(workspace, resumed, **packed)
    first, second = logged_losses(full / "checkpoint-6"), logged_losses(resumed / "checkpoint-6")
    for step in (4, 5, 6):
        assert second[step] == pytest.approx(first[step], abs=1e-6), step
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    history = json.loads((full / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert all("tmaug_sample_fraction" in e and "tsaug_sample_fraction" in e for e in history if "loss" in e)
