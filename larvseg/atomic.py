"""Atomic file writes (temp file next to the target, fsync, os.replace) and cleanup of the temp files
that killed writers leave behind.

A temp file is ``.<name>.tmp-<pid>`` in the target's folder: the same file system, so the rename is
atomic; the leading dot keeps it out of listings such as ``iter_*.pth``; the pid says whose it is, so a
later process can tell a dead writer's leftover from a live writer's file in progress.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO

from larvseg.errors import OutputWriteError

TEMP_PATTERN = re.compile(r"^\..+\.tmp-(\d+)$")
# torch.save's messages when its writer fails underneath (ENOSPC gives "[enforce fail at
# inline_container.cc:...] . unexpected pos ..." without any errno)
_TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "unexpected pos", "file write failed")


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _open_temp(tmp: Path) -> IO[bytes]:
    return open(tmp, "wb")


def _write_failure(path: Path, exc: BaseException) -> OutputWriteError:
    try:
        free = f"; {shutil.disk_usage(path.parent).free / 2**20:.0f} MB free there"
    except OSError:
        free = ""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip()
    return OutputWriteError(f"{path}: could not be written ({reason}{free})")


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, fsync, then rename it over ``path``.

    ``path`` is either the old file or the complete new one, never a partial file; on failure the temp
    file is removed. A full disk (also as torch.save's RuntimeError) raises OutputWriteError naming
    ``path``; a missing permission stays a PermissionError (which names the file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with _open_temp(tmp) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, PermissionError):
            raise
        if isinstance(exc, OSError) or (
            isinstance(exc, RuntimeError) and any(s in str(exc) for s in _TORCH_WRITE_FAILURES)
        ):
            raise _write_failure(path, exc) from exc
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files in ``folder`` whose writer process no longer runs; returns them.

    (A temp file of a live process, e.g. another run writing into the same folder, is left alone. On a
    folder shared by several machines a pid says nothing about the other machines: run this only from
    the process that owns the folder, as training's rank 0 does.)"""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        m = TEMP_PATTERN.match(p.name)
        if m and not p.is_dir() and not _pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return sorted(removed)
