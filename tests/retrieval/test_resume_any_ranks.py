"""A killed extraction, finished with another number of ranks, writes exactly what an uninterrupted run writes.

Each case runs `vitp features` (under torchrun for 2 or 3 ranks) on the CPU, stops it dead with SIGKILL
at a chosen point (tests/retrieval/pausing_features.py), possibly again with other rank counts, then
finishes it and compares the output byte for byte with an uninterrupted single-process run made with the
same thread settings. ``VITP_RESUME_MATRIX=full`` runs every pair of rank counts from {1, 2, 3} at every
kill point, for both output kinds.
"""

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest

from retrieval_testing import make_image_tree
from vitp.errors import RetrievalError
from vitp.retrieval.extract import extract_features, store
from vitp.retrieval.extract.world import World

SCRIPT = Path(__file__).with_name("pausing_features.py")
POINTS = ("first-shard", "mid-shard", "output-manifest")
ENVIRONMENT = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}


def command(ranks: int, arguments: list[str]) -> list[str]:
    if ranks == 1:
        return [sys.executable, str(SCRIPT), "features", *arguments]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
            str(SCRIPT), "features", *arguments]


def run_to_end(ranks: int, arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command(ranks, arguments), capture_output=True, text=True, env=ENVIRONMENT, cwd=cwd,
                          timeout=600)


def run_and_kill(ranks: int, arguments: list[str], cwd: Path, point: str, only_the_launcher: bool = False) -> None:
    """Start the command, wait until rank 0 reaches ``point``, then SIGKILL every process of it (or only
    the torchrun launcher, whose workers must then stop by themselves)."""
    marker = cwd / f"paused-{point}"
    marker.unlink(missing_ok=True)
    environment = {**ENVIRONMENT, "VITP_TEST_PAUSE_AT": point, "VITP_TEST_PAUSE_MARKER": str(marker)}
    launched = subprocess.Popen(command(ranks, arguments), env=environment, cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if launched.poll() is not None:
            raise AssertionError(f"the run ended (status {launched.returncode}) before {point}: {launched.stderr.read()}")
        assert time.monotonic() < deadline, f"the run never reached {point}"
        time.sleep(0.05)
    workers = psutil.Process(launched.pid).children(recursive=True)
    launched.kill()
    launched.wait()
    if only_the_launcher:
        gone, alive = psutil.wait_procs(workers, timeout=60)
        assert not alive, f"workers outlived their launcher: {alive}"
        return
    for worker in workers:
        try:
            worker.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(workers, timeout=60)


def output_files(output: Path) -> dict[str, bytes]:
    """Every file of an output (an .npz with its skipped list, or a store folder) by name."""
    if output.suffix == ".npz":
        files = [output, output.with_name(output.stem + ".skipped.txt")]
        return {path.name: path.read_bytes() for path in files}
    return {str(path.relative_to(output)): path.read_bytes() for path in sorted(output.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """36 images in 3 classes, a broken one and an empty one (skipped for their own reasons), a tiny ViT,
    and the uninterrupted single-process outputs of both kinds."""
    root = tmp_path_factory.mktemp("resume")
    make_image_tree(root / "images", per_class=12)
    (root / "images" / "disk" / "broken.png").write_bytes(b"\x89PNG\r\n")
    (root / "images" / "square" / "empty.jpg").write_bytes(b"")
    from vitp import build_vit, save_vit
    from vitp_testing import randomize_

    save_vit(randomize_(build_vit("internvit-tiny"), std=0.05).eval(), root / "vit.safetensors")
    common = ["--image_dir", str(root / "images"), "--vit_checkpoint", str(root / "vit.safetensors"),
              "--batch_size", "2", "--shard_size", "4", "--num_workers", "0", "--device", "cpu", "--no_progress",
              "--store_shard_size", "8"]
    expected = {}
    for name in ("reference.npz", "reference_store"):
        ran = run_to_end(1, [*common, "--output", str(root / name)], root)
        assert ran.returncode == 0, ran.stderr
        expected[name.split("_")[-1].replace("reference.npz", "npz")] = output_files(root / name)
    assert len(expected["store"]) == 2 * 5 + 1  # 38 files, 2 skipped: 36 rows in store shards of 8 files
    assert expected["npz"]["reference.skipped.txt"].count(b"\n") == 2
    return root, common, expected


def resume_case(gallery, tmp_path, kind: str, plan: list[tuple[int, str]], finish_ranks: int, **kill_options):
    """Kill runs with the ranks and at the points of ``plan``, in turn, then finish with ``finish_ranks``."""
    root, common, expected = gallery
    output = tmp_path / ("out.npz" if kind == "npz" else "out_store")
    arguments = [*common, "--output", str(output)]
    for ranks, point in plan:
        run_and_kill(ranks, arguments, tmp_path, point, **kill_options)
    assert not output.exists() or kind == "store" and not (output / "store.json").exists()
    finished = run_to_end(finish_ranks, arguments, tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert "internal error" not in finished.stdout + finished.stderr
    files = output_files(output)
    reference = {name.replace("reference", "out"): data for name, data in expected[kind].items()}
    assert sorted(files) == sorted(reference)
    for name in files:
        assert files[name] == reference[name], f"{name} differs from the uninterrupted run's"
    assert not store.partial_directory(output).exists()
    return finished


CASES = [  # (output, [(ranks, kill point), ...], ranks that finish)
    ("npz", [(2, "first-shard")], 1),  # the report: a torchrun job pre-empted, finished by one process
    ("store", [(1, "mid-shard")], 2),
    ("store", [(2, "output-manifest")], 3),
    ("npz", [(3, "mid-shard"), (1, "first-shard"), (2, "output-manifest")], 1),  # several kills
    ("store", [(2, "partial-manifest")], 1),  # killed while starting: nothing to continue
]
if os.environ.get("VITP_RESUME_MATRIX") == "full":
    CASES = [(kind, [(before, point)], after) for kind in ("npz", "store") for point in POINTS
             for before, after in itertools.product((1, 2, 3), repeat=2)]


@pytest.mark.slow
@pytest.mark.parametrize("kind, plan, finish_ranks", CASES,
                         ids=[f"{k}-" + "-".join(f"{r}@{p}" for r, p in plan) + f"-then-{f}" for k, plan, f in CASES])
def test_a_killed_run_finished_with_any_number_of_ranks_is_identical(gallery, tmp_path, kind, plan, finish_ranks):
    finished = resume_case(gallery, tmp_path, kind, plan, finish_ranks)
    if plan[-1][1] != "partial-manifest":
        assert "continued an unfinished run" in finished.stdout


@pytest.mark.slow
def test_workers_stop_with_a_killed_launcher_and_the_run_continues_with_one_process(gallery, tmp_path):
    """`kill -9` of torchrun alone: its workers (each in a session of its own) must not run on unseen
    into the output that the next command continues."""
    finished = resume_case(gallery, tmp_path, "npz", [(2, "mid-shard")], 1, only_the_launcher=True)
    assert "continued an unfinished run" in finished.stdout


def test_a_second_run_into_an_output_that_a_live_run_is_writing_is_refused(tmp_path, monkeypatch):
    directory = tmp_path / "out.npz.partial"
    directory.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = {"host": store.socket.gethostname(), "pid": writer.pid, "started": store._process_start(writer.pid)}
        store.write_json(owner, directory / store.OWNER_FILE)
        monkeypatch.setattr(store, "OWNER_EXIT_SECONDS", 0.5)
        with pytest.raises(RetrievalError, match=f"another extraction \\(process {writer.pid}\\) is still writing"):
            store._prepare_partial_directory(directory, {"layer": 1}, restart=False)
        writer.kill()
        writer.wait()
        store._prepare_partial_directory(directory, {"layer": 1}, restart=False)  # a dead owner is taken over
    finally:
        writer.kill()
    # a live process with another start time is a recycled pid, not the owner
    assert not store._is_alive({**owner, "pid": os.getppid(), "started": "0"})


def test_a_shard_that_vanishes_before_the_output_is_assembled_stops_the_run_without_output(
        tmp_path, vit_file, monkeypatch):
    """Images without a result are never reported as skipped files or left out of a short output."""
    import vitp.retrieval.extract.run as run

    make_image_tree(tmp_path / "images", per_class=4)
    output = tmp_path / "out.npz"
    finish = store.finish_output

    def lose_a_shard(output, *args, **kwargs):
        shard = sorted(store.partial_directory(output).glob("shard-*.npz"))[0]
        shard.unlink()
        return finish(output, *args, **kwargs)

    monkeypatch.setattr(run, "finish_output", lose_a_shard)
    with pytest.raises(RetrievalError, match=r"4 of the 12 images have no result .* Run the same command again"):
        extract_features(tmp_path / "images", output, vit_file, batch_size=2, shard_size=4, num_workers=0,
                         device="cpu", progress_bar=False)
    monkeypatch.setattr(run, "finish_output", finish)
    assert not output.exists() and not store.skipped_report_path(output).exists()
    result = extract_features(tmp_path / "images", output, vit_file, batch_size=2, shard_size=4, num_workers=0,
                              device="cpu", progress_bar=False)
    assert result.shape[0] == 12 and result.num_reused == 8 and not result.skipped


@dataclass(frozen=True)
class ThreadWorld(World):
    """Ranks as threads of one process, meeting at a threading barrier (enough for finish_output)."""

    meeting: threading.Barrier | None = None

    def barrier(self) -> None:
        self.meeting.wait(timeout=60)


def test_no_rank_reads_the_shards_after_rank_0_assembled_and_removed_them(tmp_path, vit_file, monkeypatch):
    """A rank with nothing left to compute reaches the assembly first; the others must still read the shards."""
    import vitp.retrieval.extract.run as run

    make_image_tree(tmp_path / "images", per_class=4)
    finish, read = store.finish_output, store.read_progress
    outcomes = {}

    def read_late_on_other_ranks(directory):
        if threading.current_thread().name != "rank-0":
            time.sleep(0.5)
        return read(directory)

    def finish_on_three_ranks(output, names, settings, world, **options):
        meeting = threading.Barrier(3)
        monkeypatch.setattr(store, "read_progress", read_late_on_other_ranks)

        def rank(number):
            try:
                outcomes[number] = finish(output, names, settings, ThreadWorld(number, 3, meeting=meeting), **options)
            except Exception as err:  # noqa: BLE001 - reported by the assertion below
                outcomes[number] = err
                meeting.abort()

        threads = [threading.Thread(target=rank, args=(number,), name=f"rank-{number}") for number in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return outcomes[0]

    monkeypatch.setattr(run, "finish_output", finish_on_three_ranks)
    result = extract_features(tmp_path / "images", tmp_path / "out.npz", vit_file, batch_size=2, shard_size=4,
                              num_workers=0, device="cpu", progress_bar=False)
    assert not any(isinstance(outcome, Exception) for outcome in outcomes.values()), outcomes
    assert result.shape[0] == 12 and (tmp_path / "out.npz").is_file()
