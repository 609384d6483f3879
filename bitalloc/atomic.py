"""Atomic file writes (a temp file in the same folder, fsync, then rename over the target) and the
one overwrite rule of every command that writes: an existing output is refused unless forced."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from bitalloc.errors import InputError, OutputExistsError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def check_output(path: str | os.PathLike[str], *, force: bool, kind: Literal["file", "dir"],
                 what: str = "output") -> Path:
    """Check that ``path`` may be written as a ``kind`` and return it.

    The one overwrite rule: an existing file, or a directory that is not empty, is refused
    (OutputExistsError) unless ``force``; a path of the wrong kind (a directory where a file
    goes, a file where a directory goes) is refused (InputError) even with ``force``.
    ``what`` names the output in the messages (e.g. ``--out``)."""
    path = Path(path)
    if kind == "file":
        if path.is_dir():
            raise InputError(f"{what} {path} is a directory; give the path of a file")
        if path.exists() and not force:
            raise OutputExistsError(f"{what} {path} exists; choose another path or pass --force to replace it")
    else:
        if path.exists() and not path.is_dir():
            raise InputError(f"{what} {path} is a file; give the path of a directory")
        if path.is_dir() and any(path.iterdir()) and not force:
            raise OutputExistsError(f"{what} {path} exists and is not empty; choose another path or pass --force "
                                    "to replace it")
    if path.parent.exists() and not path.parent.is_dir():
        raise InputError(f"{what} {path}: {path.parent} is a file, not a directory")
    return path
