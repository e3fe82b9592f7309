"""Upstream's sample orders: length grouping (LLaVA's megabatches) and sqrt-of-size data resampling;
with their flags, a run by epochs."""

import json

import numpy as np
import pytest
import torch

from vitp.train.sampling import LengthGroupedSampler, ResamplingSampler, even_chunks, length_grouped_indices

from train_testing import run


def test_length_groups_are_megabatches_sorted_longest_first_and_dealt_evenly():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 1000, 96).tolist()
    order = length_grouped_indices(lengths, batch_size=4, world_size=3, generator=torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(96))
    for start in range(0, 96, 12):  # a megabatch: world_size x batch_size samples
        chunks = [order[start + 4 * r : start + 4 * (r + 1)] for r in range(3)]
        totals = [sum(lengths[i] for i in chunk) for chunk in chunks]
        group = sorted((i for chunk in chunks for i in chunk), key=lambda i: -lengths[i])
        assert chunks[0][0] == group[0]  # the longest sample opens the first chunk
        assert max(totals) - min(totals) <= max(lengths[i] for i in group)  # dealt to the shortest chunk


def test_even_chunks_deal_to_the_shortest_chunk():
    lengths = {0: 9, 1: 8, 2: 5, 3: 4, 4: 2, 5: 1}
    assert even_chunks([0, 1, 2, 3, 4, 5], lengths, 2) == [[0, 3, 4], [1, 2, 5]]
    assert even_chunks([0, 1, 2], lengths, 2) == [[0, 2], [1]]  # not divisible: round robin


def test_samplers_reshuffle_per_epoch_and_resampling_favours_small_datasets():
    sampler = LengthGroupedSampler([5, 3, 8, 1] * 10, batch_size=2, world_size=1, seed=0)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == sorted(second) == list(range(40)) and first != second
    sampler.set_epoch(0)
    assert list(sampler) == first
    resampled = list(ResamplingSampler([900, 100], seed=0))
    assert len(resampled) == 1000
    assert 0.22 < sum(i >= 900 for i in resampled) / 1000 < 0.28  # sqrt(100) / (sqrt(900) + sqrt(100)) = 0.25


@pytest.mark.slow
@pytest.mark.parametrize("flags", [dict(group_by_length=True), dict(use_data_resampling=True),
                                   dict(train_sampling_strategy="sequential")])
def test_an_epoch_in_each_order(workspace, small_meta, tmp_path, flags):
    output = run(workspace, tmp_path / "run", meta_path=str(small_meta), max_steps=-1, num_train_epochs=1,
                 per_device_train_batch_size=2, save_steps=100, **flags)
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 3  # 6 samples, 2 per step
