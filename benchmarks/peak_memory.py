"""Resident memory of this process, from Linux's /proc (the benchmarks' shared helpers)."""

from __future__ import annotations


def status_kb(field: str) -> int:
    """A /proc/self/status field in KiB: VmRSS (resident now), VmHWM (peak resident); 0 where unsupported."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak() -> None:
    """Resets VmHWM (the peak) to the current resident memory, so that a peak can be measured per phase."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass
