"""Progress of long work: a tqdm bar on a terminal; in a log file, a pipe or ``nohup`` output, a plain
line every ``LOG_INTERVAL_S`` seconds (and one at the end) instead of a bar redrawn with carriage
returns, which a file keeps as one endless line.

    for item in progress_bar(items, desc="eval", unit="img"): ...
    progress_bar.write("a message")   # above a terminal bar, or a plain line

``progress_bar`` takes tqdm's arguments (those it does not use in plain mode are ignored).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


def _is_terminal(stream: TextIO) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


class PlainProgress:
    """tqdm's interface as used here (iterate, update, set_postfix, write, close, ``n``), printing
    ``desc: n/total (pct%) rate unit/s eta postfix`` lines at most every ``interval`` seconds."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: int | None = None,
        initial: int = 0,
        desc: str = "",
        unit: str = "it",
        disable: bool = False,
        leave: bool = True,
        file: TextIO | None = None,
        interval: float = LOG_INTERVAL_S,
        **_ignored: Any,
    ) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n, self.start_n = total, initial, initial
        self.desc, self.unit, self.disable, self.leave = desc.strip(), unit, disable, leave
        self.file = file or sys.stderr
        self.interval = interval
        self.postfix = ""
        self.started = self.last_print = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable if self.iterable is not None else ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable and time.monotonic() - self.last_print >= self.interval:
            self._print()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = (self.n - self.start_n) / elapsed
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = ""
        if self.total and rate > 0:
            left = (self.total - self.n) / rate
            eta = (
                f", eta {int(left // 3600):d}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
                if math.isfinite(left)
                else ""
            )
        post = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc + ': ' if self.desc else ''}{done}{pct}, {rate:.2f} {self.unit}/s{eta}{post}"

    def _print(self) -> None:
        print(self.line(), file=self.file, flush=True)
        self.last_print = time.monotonic()

    def close(self) -> None:
        if not self.closed and not self.disable and self.leave and self.n > self.start_n:
            self._print()
        self.closed = True

    @staticmethod
    def write(s: str, file: TextIO | None = None, end: str = "\n") -> None:
        print(s, file=file or sys.stdout, end=end, flush=True)


def progress_bar(*args: Any, **kwargs: Any) -> tqdm | PlainProgress:
    """A tqdm bar when its stream (``file``, default stderr) is a terminal, else a PlainProgress."""
    stream = kwargs.get("file") or sys.stderr
    return tqdm(*args, **kwargs) if _is_terminal(stream) else PlainProgress(*args, **kwargs)


def _write(s: str, file: TextIO | None = None, end: str = "\n") -> None:
    """A line that does not break a terminal bar (tqdm.write), or a plain line."""
    if _is_terminal(file or sys.stdout):
        tqdm.write(s, file=file, end=end)
    else:
        PlainProgress.write(s, file=file, end=end)


progress_bar.write = _write  # type: ignore[attr-defined]
