"""Errors a user can fix, shown as one readable line; the traceback only on request.

Every error class that means "your input is wrong" (bad data, bad config, bad checkpoint, an image
that cannot be read, an output that cannot be written) derives from :class:`UserError` and names the
file in its message; its ``hint`` says what to do. ``larvseg`` prints such errors (and ``OSError``s
such as a read-only folder or a full disk) as one line and exits non-zero; ``--debug`` or
``LARVSEG_DEBUG=1`` shows the traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os

DEBUG_ENV = "LARVSEG_DEBUG"

# what to do about an OSError, by errno
_OS_HINTS = {
    errno.EACCES: "choose a folder you can write to (e.g. --out / --work-dir / train.work_dir) or fix its permissions",
    errno.EPERM: "choose a folder you can write to or fix its permissions",
    errno.EROFS: "the file system is read-only: choose another output folder",
    errno.ENOSPC: "the disk is full: free some space or choose an output folder on another disk",
    errno.EDQUOT: "the disk quota is exceeded: free some space or choose another output folder",
    errno.ENOENT: "check the path",
    errno.EISDIR: "give a file, not a folder",
    errno.ENOTDIR: "a parent of the path is a file, not a folder: check the path",
}


class UserError(Exception):
    """Base class of the errors caused by the user's input; ``hint`` says how to fix them."""

    hint = ""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read (missing, truncated, corrupt, or of the wrong kind); names the file."""

    hint = "pass a complete checkpoint written by larvseg train (iter_*.pth, or final.safetensors with its .json)"


class OutputWriteError(UserError, OSError):
    """An output file that could not be written (full disk, read-only folder); names the file."""

    hint = _OS_HINTS[errno.ENOSPC]


def debug_requested(flag: bool = False) -> bool:
    """``--debug`` given, or ``LARVSEG_DEBUG`` set to anything but "" / "0"."""
    return bool(flag) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def describe(exc: BaseException) -> str | None:
    """One line for a user-facing error (message, then what to do), or None for a bug."""
    if isinstance(exc, UserError):
        message, hint = str(exc), exc.hint
    elif isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        message = f"{where}{exc.strerror or exc}"
        hint = _OS_HINTS.get(exc.errno or 0, "")
    else:
        return None
    if "Original Traceback" in message:  # re-raised from a DataLoader worker: keep the original's last line
        last = [line for line in message.splitlines() if line.strip()][-1]
        message = last.split(": ", 1)[1] if last.startswith(type(exc).__module__) else last
    message = " ".join(message.split())  # one line, whatever the message held
    return f"{message} ({hint})" if hint and hint not in message else message


DEBUG_NOTE = f"run with --debug or {DEBUG_ENV}=1 for the traceback"
