"""A cached index of the files in class folders (ImageNet-21K: 14M files in 21,843 folders).

Listing 14M files takes many minutes on a network file system, so it happens once: the index is kept
in a JSON file per dataset root under the cache folder, and on later starts only folders whose
modification time changed (a file added, removed or renamed changes it) are listed again. Checking
21,843 folder mtimes takes well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
INDEX_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "larvseg"


def cache_file(root: Path, cache_dir: Path) -> Path:
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return cache_dir / f"file_index_{root.name}_{key}.json"


def _list_folder(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))


class FolderIndex:
    """Files of ``root/<folder>`` for the requested folders, listed once and cached.

    ``stats`` tells what the last :meth:`files` call did: folders listed vs reused from the cache.
    """

    def __init__(self, root: Path, cache_dir: Path | None = None, progress: bool = True) -> None:
        self.root = Path(root)
        self.cache_path = cache_file(self.root, Path(cache_dir) if cache_dir else default_cache_dir())
        self.progress = progress
        self.stats = {"listed": 0, "reused": 0}

    def _load(self) -> dict:
        if not self.cache_path.is_file():
            return {}
        try:
            data = json.loads(self.cache_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}  # a damaged cache is only a cache: rebuild it
        if data.get("version") != INDEX_VERSION or data.get("root") != str(self.root.resolve()):
            return {}
        return data.get("folders", {})

    def _save(self, folders: dict) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"version": INDEX_VERSION, "root": str(self.root.resolve()), "folders": folders}))
        os.replace(tmp, self.cache_path)

    def files(self, folders: Sequence[str]) -> dict[str, list[str]]:
        """folder name -> sorted image file names; a folder that does not exist maps to None."""
        cached = self._load()
        out: dict[str, list[str] | None] = {}
        stale: list[tuple[str, int]] = []
        for name in folders:
            try:
                mtime = (self.root / name).stat().st_mtime_ns
            except FileNotFoundError:
                out[name] = None
                continue
            entry = cached.get(name)
            if entry is not None and entry["mtime_ns"] == mtime:
                out[name] = entry["files"]
            else:
                stale.append((name, mtime))
        self.stats = {"listed": len(stale), "reused": len(folders) - len(stale)}
        if stale:
            bar = tqdm(stale, desc=f"indexing {self.root}", unit="folder", disable=not self.progress or len(stale) < 2)
            for name, mtime in bar:
                listed = _list_folder(self.root / name)
                cached[name] = {"mtime_ns": mtime, "files": listed}
                out[name] = listed
            self._save(cached)
        return out  # type: ignore[return-value]
