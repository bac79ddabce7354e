"""Where LarvSeg keeps per-machine caches (file indexes, amp calibrations): ``$XDG_CACHE_HOME/larvseg``,
default ``~/.cache/larvseg``."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "larvseg"
