"""TMAug: counts, kept special tokens, positions, labels, per-sample independence, determinism."""

import pytest
import torch

from vitp.model.tmaug import TMAugConfig, apply_tmaug, choose_tokens

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
    out = apply_tmaug(embeds, mask, positions, labels, ids == CTX, TMAugConfig(prob=1.0, ratio=0.75))
    assert out.augmented_samples == 2 and out.affected_tokens == 15 + 30
    assert out.attention_mask.sum(1).tolist() == [len(ROW_A) - 15, len(ROW_B) - 30, len(ROW_C)]
    assert out.inputs_embeds.shape[1] == len(ROW_B) - 30  # re-padded to the new longest sample
    for row, original in enumerate([ROW_A, ROW_B, ROW_C]):
        kept = out.attention_mask[row].bool()
        tokens = out.inputs_embeds[row, kept, 0].long().tolist()
        assert [t for t in tokens if t != CTX] == [t for t in original if t != CTX]  # text, <img>, </img> kept
        kept_positions = out.position_ids[row, kept]
        assert torch.equal(kept_positions, out.inputs_embeds[row, kept, 1].long())  # original positions
        assert (kept_positions.diff() > 0).all()
        assert kept_positions[-1] == len(original) - 1
        text = [i for i, t in enumerate(tokens) if t in (1, 2)]
        assert out.labels[row, kept][text].tolist() == [t for t in tokens if t in (1, 2)]
        assert (out.labels[row, ~kept] == -100).all()


def test_zero_mode_keeps_the_sequence_and_zeroes_embeddings():
    ids, mask, positions, embeds, labels = batch([ROW_A, ROW_B])
    out = apply_tmaug(embeds, mask, positions, labels, ids == CTX, TMAugConfig(prob=1.0, ratio=0.5, mode="zero"))
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
