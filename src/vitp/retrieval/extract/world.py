"""The processes of one extraction: a single process, or the ranks of a torchrun launch.

``torchrun --nproc_per_node N [--nnodes M --node_rank R --master_addr A] -m vitp.cli features ...``
sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; the ranks then meet in a gloo process group (only
barriers and a few small Python objects travel through it; features go through the shared output
folder, which is why every node must see the same file system there).

torchrun starts each worker in a session of its own, so a launcher killed with SIGKILL (``kill -9``, an
out-of-memory kill) leaves its workers running, unseen, into an output that a restarted command is
about to continue. A worker therefore asks the kernel for SIGTERM when its launcher dies (Linux), which
the extraction treats like Ctrl-C: it saves its finished batches and stops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

# Ranks wait for each other at the end of the extraction: a resumed run may give one rank far less to
# do than another, so the wait may be as long as a whole run. torchrun stops every rank if one fails.
_BARRIER_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int | None = None  # None outside torchrun

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every rank, in rank order, on every rank."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size}" if self.size > 1 else "one process"


@contextmanager
def launched_world() -> Iterator[World]:
    """The torchrun world this process belongs to (a process group is created if none exists), or a
    world of one process when it was not started by torchrun."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun, whatever the number of ranks
        stop_with_launcher()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        yield World()
        return
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=_BARRIER_TIMEOUT)
    try:
        yield World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    finally:
        if created:
            dist.destroy_process_group()


_PR_SET_PDEATHSIG = 1  # prctl option, <linux/prctl.h>


def stop_with_launcher() -> bool:
    """Have SIGTERM sent to this process when its parent (the torchrun launcher) exits, however it exits.
    Linux only; elsewhere (and if the parent is already gone) nothing changes. Returns whether it was set."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the launcher died before the request was made: stop now
        os.kill(os.getpid(), signal.SIGTERM)
    return True
