"""The console output of LarvSeg's status messages: one handler on the ``larvseg`` logger, set up by the
entry points (``larvseg`` = larvseg.cli.main, ``python -m larvseg.reproductions``, the demo's worker
processes), never by library code.

Library modules log through ``log = logging.getLogger(__name__)``; without :func:`setup_logging` (LarvSeg
used as a library) their records go wherever the application's logging config sends them, and Python's
default shows only warnings. With it, as Detectron2 and MMEngine set up their loggers:

- rank 0 (``RANK`` unset or 0) shows INFO and above, the other ranks only WARNING and above, so that
  the main process prints a run's status once; every rank shows DEBUG with ``debug`` (``--debug`` or
  ``LARVSEG_DEBUG=1``);
- INFO and DEBUG go to stdout, WARNING and above to stderr (where the messages went as prints), each as
  its message alone: no time stamp or logger name, so the lines read as before; warnings start with
  ``warning:``, errors with ``error:``, and the lines of a rank other than 0 with ``[rank N]``;
- on a terminal a line is written above a running tqdm bar instead of through it (larvseg.progress).

Calling :func:`setup_logging` again replaces the handler (in-process callers such as tests run the CLI
many times): there is only ever one, so no line is printed twice. The ``larvseg`` logger still propagates
to the root logger, so pytest's ``caplog`` and an application's own handlers see the records.
"""

from __future__ import annotations

import logging
import os
import sys

from larvseg.progress import progress_bar

LOGGER_NAME = "larvseg"
_PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}


class ConsoleFormatter(logging.Formatter):
    """The message alone, after ``[rank N] `` (rank > 0) and ``warning: `` / ``error: `` (by level)."""

    def __init__(self, rank: int = 0) -> None:
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        text = _PREFIX.get(record.levelno, "") + super().format(record)
        return f"[rank {self.rank}] {text}" if self.rank else text


class ConsoleHandler(logging.Handler):
    """Writes INFO/DEBUG records to ``sys.stdout`` and WARNING and above to ``sys.stderr``, both looked up
    when a record is written (so that redirections made after the setup, such as pytest's capture, apply)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            progress_bar.write(self.format(record), file=stream)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - logging's contract: a failing handler reports, never raises
            self.handleError(record)


def env_rank() -> int:
    """This process's global rank as torchrun sets it (``RANK``), 0 outside a launcher."""
    value = os.environ.get("RANK", "").strip()
    return int(value) if value.isdigit() else 0


def has_console() -> bool:
    """Whether :func:`setup_logging` has given the ``larvseg`` logger its console handler in this process."""
    return any(isinstance(h, ConsoleHandler) for h in logging.getLogger(LOGGER_NAME).handlers)


def setup_logging(debug: bool = False, rank: int | None = None) -> logging.Logger:
    """Give the ``larvseg`` logger its one console handler (replacing any earlier one) and its level:
    INFO on rank 0, WARNING on the others, DEBUG on every rank with ``debug``. ``rank``: default
    :func:`env_rank`. Returns the logger."""
    rank = env_rank() if rank is None else rank
    logger = logging.getLogger(LOGGER_NAME)
    for old in [h for h in logger.handlers if isinstance(h, ConsoleHandler)]:
        logger.removeHandler(old)
    handler = ConsoleHandler()
    handler.setFormatter(ConsoleFormatter(rank))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO if rank == 0 else logging.WARNING)
    return logger
