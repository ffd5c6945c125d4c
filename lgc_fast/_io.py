"""Atomic file writes: readers see the old file or the whole new one, never a half-written file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lgc_fast.errors import LgcError


def _new_file_mode() -> int:
    """What open() would give a new file (0666 minus the umask); mkstemp's own 0600 would hide outputs from others."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path, write) -> None:
    """Call ``write(file)`` on a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, path.stat().st_mode & 0o7777 if path.exists() else _new_file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def make_output_folder(path, argument: str) -> Path:
    """Create the folder `path` (and its parents) for the command-line option `argument`, or raise an LgcError that
    names both: a CLI makes its output folders before the work, so a bad one costs nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LgcError(f"{argument} {path}: a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LgcError(f"{argument} {path}: cannot make this folder ({exc.strerror or exc})") from None
    return path


def make_output_file_folder(path, argument: str) -> Path:
    """``make_output_folder`` for the folder of the output file `path` of option `argument`, after checking that
    `path` is not itself a folder; returns `path`."""
    path = Path(path)
    if path.is_dir():
        raise LgcError(f"{argument} {path}: a folder, not a file name")
    make_output_folder(path.parent, argument)
    return path
