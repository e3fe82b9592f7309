"""Progress of long work: a tqdm bar on a terminal, plain lines in a captured log.

A bar redraws itself with carriage returns; in a file (a Slurm log, ``> run.log``) every frame stays and
the lines printed meanwhile end up glued to a frame. So a bar is drawn only when stderr is a terminal;
otherwise a plain line ``label: i/n (x unit/s)`` is written at most every ``VITP_PROGRESS_SECONDS``
seconds (default 30), and a last one when the work ends, if any was written. ``disable()`` (the
commands' ``--no_progress``) turns both off for the rest of the process.

Lines meant for the user while a bar may be drawn go through :func:`write`, which starts them at
column 0 (on a terminal it clears the bar first, as ``tqdm.write`` does).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

DEFAULT_SECONDS = 30.0

_enabled = True


def disable() -> None:
    """No bars and no progress lines from now on in this process (``--no_progress``)."""
    global _enabled
    _enabled = False


def bars_shown(stream: TextIO | None = None) -> bool:
    """Whether a redrawn bar is the right kind of progress: enabled, and ``stream`` (stderr) is a terminal."""
    stream = stream or sys.stderr
    return _enabled and _is_terminal(stream)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False


def interval_seconds() -> float:
    """Seconds between plain progress lines: VITP_PROGRESS_SECONDS, else 30."""
    text = os.environ.get("VITP_PROGRESS_SECONDS", "")
    try:
        value = float(text)
    except ValueError:
        return DEFAULT_SECONDS
    return value if value >= 0 else DEFAULT_SECONDS


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    show: bool = True,
    stream: TextIO | None = None,
    **tqdm_options: Any,
):
    """A progress counter over ``iterable`` (or updated by hand with ``update(n)``): a tqdm bar on a
    terminal, plain lines otherwise, nothing when ``show`` is False or progress is disabled."""
    stream = stream or sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if bars_shown(stream):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=not show, file=stream,
                    **tqdm_options)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial,
                         show=show and _enabled, stream=stream)


class PlainProgress:
    """The subset of tqdm's interface vitp uses (iterate, ``update``, ``close``, ``with``), written as
    whole lines at most every :func:`interval_seconds`."""

    def __init__(self, iterable: Iterable | None, *, total: int | None, desc: str, unit: str, initial: int,
                 show: bool, stream: TextIO, seconds: float | None = None) -> None:
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.show = show
        self.stream = stream
        self.seconds = interval_seconds() if seconds is None else seconds
        self._start_n = initial
        self._start = self._last = time.perf_counter()
        self._lines = 0
        self._closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.show and now - self._last >= self.seconds:
            self._last = now
            self._emit(now)

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Accepted for tqdm compatibility; plain lines carry the count and rate only."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.show and self._lines:
            self._emit(time.perf_counter(), done=True)

    def line(self, now: float | None = None) -> str:
        """'label: i/n (x unit/s)': the text of one progress line."""
        elapsed = max((now or time.perf_counter()) - self._start, 1e-9)
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        rate = (self.n - self._start_n) / elapsed
        label = f"{self.desc}: " if self.desc else ""
        return f"{label}{count} ({rate:.1f} {self.unit}/s)"

    def _emit(self, now: float, done: bool = False) -> None:
        sys.stdout.flush()  # what was printed before this line stays before it in a shared log
        self.stream.write(self.line(now) + (f", done in {now - self._start:.0f} s" if done else "") + "\n")
        self.stream.flush()
        self._lines += 1


def write(text: str, file: TextIO | None = None) -> None:
    """Print a line the user must see whole (a ``file:line:`` problem) at the start of a line, also
    while a bar is drawn."""
    file = file or sys.stdout
    if bars_shown():
        from tqdm import tqdm

        tqdm.write(text, file=file)
        return
    print(text, file=file, flush=file is not sys.stdout)
