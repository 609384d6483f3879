"""Atomic file writes (a temp file in the same folder, fsync, then rename over the target) and the
one overwrite rule of every command that writes: an existing output is refused unless forced."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable, Literal, TypeVar

from bitalloc.errors import InputError, OutputBusyError, OutputExistsError


log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _temp_dir_pattern(target: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(target.name)}\.tmp-(?P<host>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def make_temp_dir(target: str | os.PathLike[str]) -> Path:
    """A new temporary directory next to ``target``, named ``.NAME.tmp-HOST.PID.XXXX`` and with the
    permissions the umask allows, to be renamed into place when complete.

    Temporary directories of the same ``target`` left by a process of this host that no longer
    runs (a killed writer) are removed first."""
    target = Path(target)
    host = socket.gethostname()
    pattern = _temp_dir_pattern(target)
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        match = pattern.match(leftover.name)
        if match and match["host"] == host and not _alive(int(match["pid"])) and leftover.is_dir():
            log.info("removing %s, left by an interrupted write of %s", leftover, target)
            shutil.rmtree(leftover, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{host}.{os.getpid()}.", dir=target.parent))
    folder.chmod(0o777 & ~current_umask())
    return folder


def permit_tree(folder: str | os.PathLike[str]) -> None:
    """Give ``folder``, its subfolders and files the permissions the umask allows (some writers,
    safetensors among them, create files 0600 whatever the umask)."""
    umask = current_umask()
    folder = Path(folder)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp makes 0600; the umask decides
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


def _lock_holder(lock: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(lock.read_text())
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def output_lock(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the lock of output ``target`` (the file ``.NAME.lock`` next to it, with the holder's pid,
    host and start time) for the ``with`` block.

    A lock held by a running process is refused with OutputBusyError naming it; one left by a
    process of this host that no longer runs is taken over."""
    target = Path(target)
    lock = target.parent / f".{target.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    mine = {"pid": os.getpid(), "host": host, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            break
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None and holder.get("host") == host and not _alive(holder["pid"]):
                log.warning("taking over the lock of %s left by process %d, which no longer runs", target,
                            holder["pid"])
                lock.unlink(missing_ok=True)
                continue
            who = ("an unknown process" if holder is None else
                   f"process {holder['pid']} on {holder.get('host')} (since {holder.get('since')})")
            raise OutputBusyError(f"{target} is being written by {who}: wait for it to finish or stop it; if no "
                                  f"such process runs, remove {lock}") from None
    with os.fdopen(fd, "w") as f:
        json.dump(mine, f)
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def locked_output(argument: str) -> Callable[[F], F]:
    """Decorate a function that writes the output named by its keyword argument ``argument``: the
    call holds :func:`output_lock` of that output, so a second writer of the same output (another
    process, or this one) is refused with OutputBusyError naming the holder."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def locked(*args: Any, **kwargs: Any) -> Any:
            with output_lock(kwargs[argument]):
                return func(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate
