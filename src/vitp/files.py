"""Writing files safely: atomic writes (a crash never leaves half a file under the final name) and
output paths refused before any work is done. Nothing heavy is imported here."""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from vitp.errors import ConfigError, VitpError


def read_json(path: Path | str, error: type[VitpError], object_only: bool = False) -> Any:
    """A JSON file's value, or ``error`` (the vitp error of the caller's stage) naming the file and,
    for a syntax error, the line and column. ``object_only``: anything but a JSON object is refused."""
    try:
        # utf-8-sig: editors on Windows save JSON with a byte-order mark
        value = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if object_only and not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def write_json(value: dict, path: Path) -> None:
    write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", path)


def write_text(text: str, path: Path) -> None:
    """Write a text file atomically."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_output_path(path: Path | str, name: str = "output") -> Path:
    """Refuse, before any work is done, an output path that cannot become a file: an existing
    directory, or a path under a file. Missing folders are fine: they are created when writing."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{name} {path}: is a directory; give the name of a file to write")
    check_parent_folders(path, name)
    return path


def check_parent_folders(path: Path, name: str = "output") -> None:
    """Refuse a path whose nearest existing parent is a file, or a folder this process cannot write in."""
    for parent in Path(path).parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ConfigError(f"{name} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"{name} {path}: no permission to write in {parent}")
            return


def make_parent_folder(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{path}: cannot create its folder ({err.strerror or err})") from None


class atomic_path:
    """Context manager yielding a temporary path in the target's folder (created if missing),
    renamed onto the target on success. The temporary file never outlives the block: if the rename
    fails (the target is a directory, ...) it is removed and :class:`ConfigError` says why."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        make_parent_folder(self.path)
        try:
            fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        except OSError as err:
            raise ConfigError(f"{self.path}: cannot write in {self.path.parent} ({err.strerror or err})") from None
        os.close(fd)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        try:
            os.chmod(self.tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600; use the usual mode
            os.replace(self.tmp, self.path)
        except OSError as err:
            self.tmp.unlink(missing_ok=True)
            what = "it is a directory" if self.path.is_dir() else err.strerror or str(err)
            raise ConfigError(f"{self.path}: cannot write it ({what})") from None


@functools.cache
def _current_umask() -> int:
    # Reading the umask means setting it: do it once per process, not in every write, where a
    # thread creating a file in between would get mode 0666.
    mask = os.umask(0)
    os.umask(mask)
    return mask
