"""TMAug and TSAug: counts, kept special tokens, positions, labels, per-sample independence (rows and
packed samples), determinism."""

import pytest
import torch

from vitp.model.tmaug import TMAugConfig, apply_tmaug, apply_tsaug, choose_tokens

CTX, START, END, PAD = 9, 7, 8, 0


def batch(rows):
    """Right-padded batch from token lists; embeddings encode (token id, position) to track them."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), PAD)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    embeds = torch.stack([ids.float(), positions.float(), torch.ones_like(ids, dtype=torch.float)], dim=-1)
    labels = torch.where((ids == 1) | (ids == 2), ids, torch.full_like(ids, -100))
    return ids, mask, positions, embeds, labels


ROW_A = [3, START] + [CTX] * 20 + [END, 4, 1, 2]
ROW_B = [3, START] + [CTX] * 40 + [END, 4, 5, 1]
ROW_C = [3, 4, 1, 2]  # text only


def test_upstream_flag_meaning():
    config = TMAugConfig.from_upstream(0.75)
    assert (config.prob, config.ratio, config.mode) == (0.25, 0.75, "drop")


def test_drop_removes_the_chosen_count_and_keeps_everything_else():
    ids, mask, positions, embeds, labels = batch([ROW_A, ROW_B, ROW_C])
    out = apply_tmaug(embeds, mask, ids == CTX, TMAugConfig(prob=1.0, ratio=0.75),
                      {"position_ids": positions, "labels": labels})
    assert out.augmented_samples == 2 and out.affected_tokens == 15 + 30
    assert out.attention_mask.sum(1).tolist() == [len(ROW_A) - 15, len(ROW_B) - 30, len(ROW_C)]
    assert out.inputs_embeds.shape[1] == len(ROW_B) - 30  # re-padded to the new longest sample
    for row, original in enumerate([ROW_A, ROW_B, ROW_C]):
        kept = out.attention_mask[row].bool()
        tokens = out.inputs_embeds[row, kept, 0].long().tolist()
        assert [t for t in tokens if t != CTX] == [t for t in original if t != CTX]  # text, <img>, </img> kept
        kept_positions = out.per_token["position_ids"][row, kept]
        assert torch.equal(kept_positions, out.inputs_embeds[row, kept, 1].long())  # original positions
        assert (kept_positions.diff() > 0).all()
        assert kept_positions[-1] == len(original) - 1
        text = [i for i, t in enumerate(tokens) if t in (1, 2)]
        assert out.per_token["labels"][row, kept][text].tolist() == [t for t in tokens if t in (1, 2)]
        assert (out.per_token["labels"][row, ~kept] == -100).all()


def test_zero_mode_keeps_the_sequence_and_zeroes_embeddings():
    ids, mask, positions, embeds, labels = batch([ROW_A, ROW_B])
    out = apply_tmaug(embeds, mask, ids == CTX, TMAugConfig(prob=1.0, ratio=0.5, mode="zero"), {"labels": labels})
    assert out.inputs_embeds.shape == embeds.shape and torch.equal(out.attention_mask, mask)
    zeroed = (out.inputs_embeds == 0).all(-1)
    assert zeroed.sum(1).tolist() == [10, 20]
    assert (ids[zeroed] == CTX).all()


def test_probability_is_drawn_per_sample():
    ids, mask, positions, embeds, labels = batch([ROW_A] * 400)
    torch.manual_seed(0)
    chosen = choose_tokens(ids == CTX, TMAugConfig(prob=0.25, ratio=0.75))
    per_sample = chosen.sum(1)
    assert set(per_sample.tolist()) == {0, 15}
    assert 0.18 < (per_sample > 0).float().mean().item() < 0.32
    # samples with the same tokens drop different ones: the choice is independent per sample
    augmented = chosen[per_sample > 0]
    assert len({tuple(row.nonzero().flatten().tolist()) for row in augmented}) > len(augmented) * 0.9


def test_deterministic_under_a_seed():
    ids, mask, positions, embeds, labels = batch([ROW_A, ROW_B])
    config = TMAugConfig(prob=0.5, ratio=0.5)
    first = choose_tokens(ids == CTX, config, torch.Generator().manual_seed(3))
    second = choose_tokens(ids == CTX, config, torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


def test_invalid_settings():
    with pytest.raises(ValueError, match="tmaug_mode"):
        TMAugConfig(prob=0.5, ratio=0.5, mode="mask")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        TMAugConfig(prob=1.5, ratio=0.5)


def packed(rows):
    """One packed row of several samples: segment ids, per-sample positions, embeddings as in batch()."""
    ids = torch.tensor([t for row in rows for t in row]).unsqueeze(0)
    segments = torch.tensor([s for s, row in enumerate(rows) for _ in row]).unsqueeze(0)
    positions = torch.tensor([p for row in rows for p in range(len(row))]).unsqueeze(0)
    embeds = torch.stack([ids.float(), positions.float(), segments.float()], dim=-1)
    return ids, segments, positions, embeds


def test_each_packed_sample_is_augmented_on_its_own():
    ids, segments, positions, embeds = packed([ROW_A, ROW_B, ROW_C])
    mask = torch.ones_like(ids)
    out = apply_tmaug(embeds, mask, ids == CTX, TMAugConfig(prob=1.0, ratio=0.75),
                      {"position_ids": positions, "segment_ids": segments}, segment_ids=segments)
    assert out.augmented_samples == 2 and out.affected_tokens == 15 + 30
    kept_segments = out.per_token["segment_ids"][0]
    assert [int((kept_segments == s).sum()) for s in range(3)] == [len(ROW_A) - 15, len(ROW_B) - 30, len(ROW_C)]
    # every kept token stays with its sample and keeps its position within that sample
    assert torch.equal(out.inputs_embeds[0, :, 2].long(), kept_segments)
    assert torch.equal(out.inputs_embeds[0, :, 1].long(), out.per_token["position_ids"][0])
    # the draw is per sample: with probability 0.5 some samples of a pack are augmented and others not
    draws = [choose_tokens(ids == CTX, TMAugConfig(prob=0.5, ratio=0.5), torch.Generator().manual_seed(seed),
                           segment_ids=segments) for seed in range(40)]
    per_sample = {tuple(bool(c[0][segments[0] == s].any()) for s in range(2)) for c in draws}
    assert {(True, False), (False, True)} <= per_sample


def test_tsaug_permutes_image_tokens_with_their_positions_and_leaves_text():
    ids, segments, positions, embeds = packed([ROW_A, ROW_B])
    shuffled, new_positions, count = apply_tsaug(embeds, positions, ids == CTX, 1.0, segments,
                                                 torch.Generator().manual_seed(0))
    assert count == 2
    image = (ids == CTX)[0]
    assert torch.equal(shuffled[0, ~image], embeds[0, ~image]) and torch.equal(new_positions[0, ~image], positions[0, ~image])
    # each slot holds an image embedding of the same sample, carrying that token's own position id
    assert torch.equal(shuffled[0, image, 1].long(), new_positions[0, image])
    assert torch.equal(shuffled[0, image, 2], embeds[0, image, 2])
    for segment in (0, 1):
        slots = image & (segments[0] == segment)
        assert sorted(new_positions[0, slots].tolist()) == positions[0, slots].tolist()
        assert new_positions[0, slots].tolist() != positions[0, slots].tolist()
    unchanged, same_positions, none = apply_tsaug(embeds, positions, ids == CTX, 0.0, segments)
    assert none == 0 and torch.equal(unchanged, embeds) and torch.equal(same_positions, positions)
