"""Extraction under torchrun: ranks split the sorted file list, and the output is the one-process output."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval_testing import make_image_tree
from vitp.retrieval.extract import extract_features
from vitp.retrieval.extract.reader import fixed_batches, rank_batches
from vitp.retrieval.feature_file import load_features


@pytest.mark.parametrize("num_batches, world_size", [(7, 2), (3, 4), (10, 3), (0, 2)])
def test_ranks_take_contiguous_balanced_runs_that_cover_every_batch_once(num_batches, world_size):
    runs = [rank_batches(num_batches, rank, world_size) for rank in range(world_size)]
    assert [b for run in runs for b in run] == list(range(num_batches))
    assert max(map(len, runs)) - min(map(len, runs)) <= 1


def test_batches_do_not_depend_on_the_ranks():
    assert [list(batch) for batch in fixed_batches(7, 3)] == [[0, 1, 2], [3, 4, 5], [6]]


def torchrun(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m vitp.cli features ...` on the CPU (gloo)."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vitp.cli", "features", *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=600)


@pytest.mark.slow
def test_two_ranks_write_exactly_what_one_process_writes(tmp_path, vit_file):
    make_image_tree(tmp_path / "images", per_class=5)
    (tmp_path / "images" / "disk" / "broken.png").write_bytes(b"\x89PNG\r\n")  # skipped, and reported once
    (tmp_path / "images" / "square" / "empty.jpg").write_bytes(b"")
    common = ["--image_dir", str(tmp_path / "images"), "--vit_checkpoint", str(vit_file), "--batch_size", "2",
              "--num_workers", "0", "--device", "cpu", "--no_progress"]

    ran = torchrun(tmp_path, *common, "--output", str(tmp_path / "two.npz"))
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.count("找到 17 张图像") == 1 and "2 processes (torchrun ranks)" in ran.stdout
    one = extract_features(tmp_path / "images", tmp_path / "one.npz", vit_file, batch_size=2, num_workers=0,
                           device="cpu", progress_bar=False)
    two = load_features(tmp_path / "two.npz")
    np.testing.assert_array_equal(two.image_paths, one.feature_set.image_paths)
    np.testing.assert_allclose(two.features, one.feature_set.features, atol=1e-6)
    assert (tmp_path / "two.skipped.txt").read_text() == (tmp_path / "one.skipped.txt").read_text()
    assert len((tmp_path / "two.skipped.txt").read_text().splitlines()) == 2
    assert not (tmp_path / "two.npz.partial").exists()

    # An embedding store: each rank writes its own store shards; the folder is the one-process folder.
    ran = torchrun(tmp_path, *common, "--output", str(tmp_path / "two_store"), "--store_shard_size", "4")
    assert ran.returncode == 0, ran.stderr
    extract_features(tmp_path / "images", tmp_path / "one_store", vit_file, batch_size=2, num_workers=0,
                     device="cpu", progress_bar=False, store_shard_size=4)
    files = sorted(p.relative_to(tmp_path / "one_store") for p in (tmp_path / "one_store").rglob("*") if p.is_file())
    assert len(files) == 2 * 5 + 1  # 17 files in shards of 4: 5 shards of .npy + .parquet, and store.json
    assert files == sorted(p.relative_to(tmp_path / "two_store") for p in (tmp_path / "two_store").rglob("*") if p.is_file())
    for name in files:
        if name.suffix == ".npy":
            np.testing.assert_allclose(np.load(tmp_path / "two_store" / name), np.load(tmp_path / "one_store" / name), atol=1e-6)
        else:
            assert (tmp_path / "two_store" / name).read_bytes() == (tmp_path / "one_store" / name).read_bytes(), name
