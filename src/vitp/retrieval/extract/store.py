"""The writer of feature extraction: shards while the run goes, the output when it is done.

While the run goes, each rank buffers what it finished and writes it, every ``shard_size`` images (or
``shard_seconds``), into ``<output>.partial/`` as a pair of files: ``shard-s<run>-r<rank>-<n>.npy``
(the features) and the same name in ``.npz`` (path, size and modification time of each image, and the
skipped files with their reasons), written second, so a shard counts only once both exist. Each start
of the command is a new ``run`` number: when an image was computed twice (it changed on disk between
two runs), the later run's row wins. ``manifest.json`` holds the settings; a later run continues the
partial run only with the same ones. ``owner.json`` names the process (rank 0) that is writing: a second
extraction into the same output while it is alive is refused, since the first one to finish would
assemble the output from the other's half-written shards and remove the folder under it.

At the end the shards are read back, their features memory-mapped, and the output is assembled in
the order of the sorted file list:

* ``*.npz``: one features file (:mod:`vitp.retrieval.feature_file`), assembled in memory by rank 0;
* any other name: an embedding store (:mod:`vitp.retrieval.embedding_store`): one shard per
  ``store_shard_size`` files of the list, each written by one rank, one at a time;

then moved into place; the skipped files are listed in ``<output stem>.skipped.txt`` and the partial
directory is removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitp.errors import RetrievalError
from vitp.files import atomic_path, check_parent_folders, write_json
from vitp.retrieval import embedding_store
from vitp.retrieval.extract.reader import FileStamp, rank_batches
from vitp.retrieval.extract.world import World
from vitp.retrieval.feature_file import FeatureSet, labels_from_paths, replace_directory, save_features, write_npz

logger = logging.getLogger("vitp")

# Settings that a resumed run must share with the partial run it continues (they change the numbers).
RESUME_KEYS = ("model_fingerprint", "layer", "pool", "image_size", "dtype", "max_pixels")
# How the partial directory is laid out; a partial run of another layout (an older vitp) is started over.
PARTIAL_LAYOUT = 2
_SHARD_NAME = re.compile(r"shard-s(\d+)-r(\d+)-(\d+)\.npz")
_OPEN_SHARDS = 32
OWNER_FILE = "owner.json"
# How long a new run waits for the owner of a partial run to exit: the workers of a torchrun whose launcher
# was killed receive SIGTERM (see world.py), save their last shard and exit within moments.
OWNER_EXIT_SECONDS = 20.0


class UnusablePartialRun(RetrievalError):
    """The unfinished run in the output's partial directory cannot be continued with these settings."""


def partial_directory(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def skipped_report_path(output: Path) -> Path:
    """``gallery.npz`` -> ``gallery.skipped.txt``; a store ``gallery`` -> ``gallery.skipped.txt``."""
    return output.with_name(output.stem + ".skipped.txt")


def check_store_output(directory: Path) -> None:
    """Refuse, before any work, a store folder that would replace something that is not a store."""
    if directory.exists() and (
        not directory.is_dir()
        or (any(directory.iterdir()) and not (directory / embedding_store.STORE_MANIFEST).is_file())
    ):
        raise RetrievalError(f"{directory}: exists and is not an embedding store; not overwriting it")
    check_parent_folders(directory)


# --------------------------------------------------------------------------------------------------
# Shards: what the runs have done so far


@dataclass
class Progress:
    """Per-path results read from the shards: where a path's feature row is, or why it was skipped."""

    shard_files: list[Path] = field(default_factory=list)  # the shards' feature arrays (.npy)
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (shard, row)
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason
    stamps: dict[str, FileStamp] = field(default_factory=dict)
    dimension: int | None = None
    last_run: int = -1

    def __post_init__(self) -> None:
        self._mapped: OrderedDict[int, np.ndarray] = OrderedDict()

    def is_done(self, path: str, stamp: FileStamp) -> bool:
        return (path in self.rows or path in self.skipped) and self.stamps.get(path) == stamp

    def gather(self, names: list[str]) -> np.ndarray:
        """float32 [len(names), D]: the rows of these (finished) paths, read shard by shard."""
        out = np.empty((len(names), self.dimension or 0), dtype=np.float32)
        if not names:
            return out
        located = np.array([self.rows[name] for name in names], dtype=np.int64)
        for shard in np.unique(located[:, 0]):
            where = np.flatnonzero(located[:, 0] == shard)
            out[where] = self._features(int(shard))[located[where, 1]]
        return out

    def _features(self, shard: int) -> np.ndarray:
        mapped = self._mapped.get(shard)
        if mapped is None:
            mapped = self._mapped[shard] = np.load(self.shard_files[shard], mmap_mode="r", allow_pickle=False)
            if len(self._mapped) > _OPEN_SHARDS:
                self._mapped.popitem(last=False)
        return mapped


def read_progress(directory: Path) -> Progress:
    """Everything the shards in ``directory`` hold, in the order they were written."""
    progress = Progress()
    shards = sorted((int(m[1]), int(m[2]), int(m[3]), path) for path in directory.glob("shard-*.npz")
                    if (m := _SHARD_NAME.fullmatch(path.name)))
    for run, _, _, shard in shards:
        progress.last_run = max(progress.last_run, run)
        features_file = shard.with_suffix(".npy")
        try:
            with np.load(shard, allow_pickle=False) as data:
                members = {name: data[name] for name in data.files}
            shape = np.load(features_file, mmap_mode="r", allow_pickle=False).shape
            if len(shape) != 2 or shape[0] != len(members["image_paths"]):
                raise ValueError(f"{features_file.name} holds {shape} features for {len(members['image_paths'])} paths")
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            # Shards are written atomically, so this is outside damage; the images are simply recomputed.
            logger.warning("ignoring unreadable shard %s (%s); its images will be recomputed", shard, err)
            continue
        number = len(progress.shard_files)
        progress.shard_files.append(features_file)
        if shape[0]:
            progress.dimension = int(shape[1])
        for row, (path, size, mtime) in enumerate(zip(members["image_paths"], members["sizes"], members["mtimes"])):
            # A later shard wins: it holds a recomputation of an image that changed on disk.
            progress.rows[str(path)] = (number, row)
            progress.skipped.pop(str(path), None)
            progress.stamps[str(path)] = FileStamp(int(size), int(mtime))
        for path, reason, size, mtime in zip(
            members["skipped_paths"], members["skipped_reasons"], members["skipped_sizes"], members["skipped_mtimes"]
        ):
            progress.skipped[str(path)] = str(reason)
            progress.rows.pop(str(path), None)
            progress.stamps[str(path)] = FileStamp(int(size), int(mtime))
    return progress


class ShardWriter:
    """Buffers one rank's results and writes them as ``shard-s<run>-r<rank>-<n>.{npy,npz}``, atomically."""

    def __init__(self, directory: Path, run: int, rank: int):
        self.directory = directory
        self.prefix = f"shard-s{run:04d}-r{rank:05d}-"
        self.number = 0
        self.clear()

    def clear(self) -> None:
        self.paths: list[str] = []
        self.rows: list[np.ndarray] = []
        self.stamps: list[FileStamp] = []
        self.skipped: list[tuple[str, str, FileStamp]] = []
        self.started = time.monotonic()

    def add(self, paths: list[str], rows: np.ndarray, stamps: list[FileStamp]) -> None:
        self.paths += paths
        self.rows.append(rows)
        self.stamps += stamps

    def add_skipped(self, path: str, reason: str, stamp: FileStamp) -> None:
        self.skipped.append((path, reason, stamp))

    def __len__(self) -> int:
        return len(self.paths) + len(self.skipped)

    def flush(self) -> None:
        if not len(self):
            return
        name = f"{self.prefix}{self.number:06d}"
        features = np.concatenate(self.rows) if self.rows else np.zeros((0, 0), np.float32)
        with atomic_path(self.directory / f"{name}.npy") as tmp, open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(features, dtype=np.float32), allow_pickle=False)
        write_npz({
            "image_paths": np.array(self.paths, dtype=str),
            "sizes": np.array([s.size for s in self.stamps], dtype=np.int64),
            "mtimes": np.array([s.mtime_ns for s in self.stamps], dtype=np.int64),
            "skipped_paths": np.array([p for p, _, _ in self.skipped], dtype=str),
            "skipped_reasons": np.array([r for _, r, _ in self.skipped], dtype=str),
            "skipped_sizes": np.array([s.size for _, _, s in self.skipped], dtype=np.int64),
            "skipped_mtimes": np.array([s.mtime_ns for _, _, s in self.skipped], dtype=np.int64),
        }, self.directory / f"{name}.npz")
        self.number += 1
        self.clear()


# --------------------------------------------------------------------------------------------------
# Opening a run


def open_partial_run(output: Path, settings: dict[str, Any], restart: bool, world: World) -> tuple[Path, Progress, int]:
    """The shared partial directory, what it already holds, and this run's number.

    Rank 0 creates or checks it; every rank then sees the same verdict (an error is raised on all of
    them), and checks that it sees rank 0's directory: the output must be on a file system every node
    shares."""
    directory = partial_directory(output)
    problem = None
    if world.is_main:
        try:
            _prepare_partial_directory(directory, settings, restart)
        except RetrievalError as err:
            problem = err
    problem = world.gather(problem)[0]  # rank 0's error, of its own class, on every rank
    if problem is not None:
        raise problem
    if not (directory / "manifest.json").is_file():
        raise RetrievalError(
            f"{world.describe()} cannot see {directory / 'manifest.json'}, which rank 0 wrote: the output of a "
            f"multi-node run must be on a file system that every node shares"
        )
    progress = read_progress(directory)
    world.barrier()  # nobody writes a shard of this run before everyone has read the earlier ones
    return directory, progress, progress.last_run + 1


def _prepare_partial_directory(directory: Path, settings: dict[str, Any], restart: bool) -> None:
    manifest_path = directory / "manifest.json"
    _wait_for_owner_to_exit(directory)
    previous = None
    if manifest_path.is_file() and not restart:
        try:
            previous = json.loads(manifest_path.read_text(encoding="utf-8"))
            previous_settings = previous["settings"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UnusablePartialRun(
                f"{manifest_path}: unreadable ({err}); remove {directory} or restart the extraction to discard it"
            ) from err
        if previous.get("layout") != PARTIAL_LAYOUT:
            logger.warning("%s was written by an older vitp; starting over", directory)
            previous = None
        else:
            differences = [
                f"{key}: {previous_settings.get(key)!r} before, {settings.get(key)!r} now"
                for key in RESUME_KEYS
                if previous_settings.get(key) != settings.get(key)
            ]
            if differences:
                raise UnusablePartialRun(
                    f"{directory} holds a partial run made with different settings:\n  " + "\n  ".join(differences)
                    + "\nRun with the same settings to continue it, or restart the extraction to discard it"
                )
    if previous is None and directory.exists():
        # Without a (current) manifest nothing says how its shards were made, so they cannot be trusted.
        if not restart and not manifest_path.is_file():
            logger.warning("%s has no manifest.json; discarding it and starting over", directory)
        shutil.rmtree(directory)
    if previous is None:
        directory.mkdir(parents=True, exist_ok=True)
        write_json({"layout": PARTIAL_LAYOUT, "settings": settings}, manifest_path)
    write_json(_this_process(), directory / OWNER_FILE)


def _this_process() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid())}


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (Linux: clock ticks since boot), so that a reused pid is not taken for
    the process that wrote ``owner.json``; None where /proc does not tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the parenthesised command name


def _is_alive(owner: dict[str, Any]) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    started = owner.get("started")
    return started is None or _process_start(pid) in (None, started)


def _wait_for_owner_to_exit(directory: Path) -> None:
    """Refuse to work in a partial directory that a live extraction on this machine is writing to; a run
    on another machine cannot be checked from here, and its claim is taken over with a warning."""
    try:
        owner = json.loads((directory / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(owner, dict):
        return
    if owner.get("host") != socket.gethostname():
        logger.warning("%s was last written by an extraction on host %s, which cannot be checked from here; "
                       "continuing it (make sure it is not still running)", directory, owner.get("host"))
        return
    deadline = time.monotonic() + OWNER_EXIT_SECONDS
    while _is_alive(owner):
        if time.monotonic() > deadline:
            raise RetrievalError(
                f"{directory}: another extraction (process {owner['pid']}) is still writing to this output; "
                f"wait for it to finish or stop it, then run this command again"
            )
        time.sleep(0.2)


def check_same_file_list(names: list[str], world: World) -> None:
    """Every rank must cut the same sorted list: a node that sees other files would mix up the rows."""
    import hashlib

    digest = hashlib.sha256("\n".join(names).encode("utf-8", "surrogatepass")).hexdigest()
    seen = world.gather((len(names), digest))
    for rank, (count, other) in enumerate(seen):
        if other != seen[0][1]:
            raise RetrievalError(
                f"rank {rank} lists {count} images under the image folder and rank 0 lists {seen[0][0]} (or other "
                f"ones): every node must see the same image folder"
            )


# --------------------------------------------------------------------------------------------------
# The output


@dataclass
class Assembled:
    count: int
    dimension: int
    skipped: list[tuple[str, str]]  # (path, reason), in file order
    feature_set: FeatureSet | None  # the .npz output, on rank 0


def finish_output(
    output: Path,
    names: list[str],
    settings: dict[str, Any],
    world: World,
    *,
    store_dtype: str,
    store_shard_size: int,
) -> Assembled:
    """Assemble the output from every rank's shards (call on every rank once all have flushed)."""
    directory = partial_directory(output)
    done = read_progress(directory)
    world.barrier()  # every rank has read the shards before rank 0 may write the output and delete them
    missing = [name for name in names if name not in done.rows and name not in done.skipped]
    if missing:
        # Every rank wrote its share before this point, so a gap means the shards changed under this run
        # (a shard damaged or removed from outside, or another extraction into the same output). Writing
        # the output now would silently drop these images; a new run computes exactly the missing ones.
        raise RetrievalError(
            f"{directory}: {len(missing)} of the {len(names)} images have no result (first: {missing[0]}); their "
            f"shards were changed or removed while this run was writing, so no output was written. Run the same "
            f"command again to compute them (the other {len(names) - len(missing)} are kept)"
        )
    kept = [name for name in names if name in done.rows]
    skipped = [(name, done.skipped[name]) for name in names if name not in done.rows]
    if not kept:
        raise RetrievalError(
            f"image_dir {settings['image_dir']}: none of the {len(names)} image files could be read; "
            f"first: {skipped[0][0]}: {skipped[0][1]}"
        )
    settings = {**settings, "num_images": len(kept), "num_skipped": len(skipped)}
    feature_set = None
    if embedding_store.is_store_path(output):
        _write_store(output, names, done, settings, world, store_dtype, store_shard_size)
    elif world.is_main:
        image_paths = np.array(kept, dtype=str)
        feature_set = FeatureSet(done.gather(kept), image_paths, labels_from_paths(image_paths), settings, str(output))
        save_features(feature_set, output)
    if world.is_main:
        _write_skipped_report(output, skipped)
        shutil.rmtree(directory)
    world.barrier()  # the output is in place before any rank returns
    return Assembled(len(kept), done.dimension, skipped, feature_set)


def _write_store(
    output: Path, names: list[str], done: Progress, settings: dict[str, Any],
    world: World, dtype: str, shard_size: int,
) -> None:
    """Store shard ``j`` holds the kept images among files ``j * shard_size ...``: the same shards whatever
    the number of ranks. Each rank writes a contiguous run of them; rank 0 writes the manifest last."""
    building = partial_directory(output) / "store"
    if world.is_main:  # a killed earlier attempt may have left shards of another store_shard_size here
        shutil.rmtree(building, ignore_errors=True)
    world.barrier()
    # The kept paths of each store shard, in file order (every rank computes the same list).
    shard_paths = [[name for name in names[start : start + shard_size] if name in done.rows]
                   for start in range(0, len(names), shard_size)]
    for number in rank_batches(len(shard_paths), world.rank, world.size):
        paths = shard_paths[number]
        if paths:
            embedding_store.write_shard(
                building, embedding_store.shard_name(number), done.gather(paths), paths,
                list(labels_from_paths(np.array(paths, dtype=str))),
                [done.stamps[p].size for p in paths], [done.stamps[p].mtime_ns for p in paths], dtype,
            )
    world.barrier()
    if world.is_main:
        shards = [(embedding_store.shard_name(number), len(paths)) for number, paths in enumerate(shard_paths) if paths]
        embedding_store.write_manifest(building, settings, dtype, done.dimension, shards)
        replace_directory(building, output)


def _write_skipped_report(output: Path, skipped: list[tuple[str, str]]) -> Path | None:
    """One ``path<TAB>reason`` line per skipped file; a stale report from an earlier run is removed."""
    report = skipped_report_path(output)
    if not skipped:
        report.unlink(missing_ok=True)
        return None
    with atomic_path(report) as tmp:
        tmp.write_text("".join(f"{path}\t{reason}\n" for path, reason in skipped), encoding="utf-8")
    return report
