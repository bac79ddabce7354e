"""A cached index of the files in class folders (ImageNet-21K: 14M files in 21,843 folders).

Listing 14M files takes many minutes on a network file system, so it happens once (with a progress
bar): the index is kept in one ``.npz`` file per dataset root under the cache folder
(``data.index_cache_dir``, default ``~/.cache/larvseg``), and on later starts only folders whose
modification time changed (a file added, removed or renamed changes it) are listed again. Checking
21,843 folder mtimes takes well under a second.

File names are held as one byte blob plus offsets (NumPy), not as 14M Python strings: that is about
20 bytes per file instead of ~100, loads in a second, and DataLoader workers share it after fork
without the copy-on-write blow-up that lists of Python objects cause.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from larvseg.cache_dir import default_cache_dir
from larvseg.data.io import IMAGE_SUFFIXES
from larvseg.progress import progress_bar

INDEX_VERSION = 3  # 3: the suffixes of larvseg.data.io.IMAGE_SUFFIXES (was .jpeg .jpg .png)


def cache_file(root: Path, cache_dir: Path) -> Path:
    """One cache file per dataset root, keyed by its resolved path."""
    key = hashlib.sha1(str(Path(root).resolve()).encode(), usedforsecurity=False).hexdigest()[:16]
    return Path(cache_dir) / f"file_index_{Path(root).name}_{key}.npz"


def list_folder(folder: Path) -> list[str]:
    """Sorted image file names of one folder (not recursive)."""
    return sorted(e.name for e in os.scandir(folder) if e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file())


@dataclass
class FileTable:
    """The files of several class folders: file i is ``root / folders[folder[i]] / name(i)``.

    ``missing``: requested folders that do not exist. Folders keep the requested order and files are
    sorted by name within a folder, so indices are stable for a given disk state.
    """

    root: Path
    folders: list[str]
    blob: np.ndarray  # uint8: all file names, UTF-8, concatenated
    offsets: np.ndarray  # int64 (n + 1,): name i is blob[offsets[i]:offsets[i + 1]]
    folder: np.ndarray  # int32 (n,): index into folders
    missing: list[str]

    def __len__(self) -> int:
        return len(self.folder)

    def name(self, i: int) -> str:
        return self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes().decode()

    def path(self, i: int) -> Path:
        return self.root / self.folders[int(self.folder[i])] / self.name(i)

    def counts(self) -> np.ndarray:
        """Files per folder (0 for missing or empty folders)."""
        return np.bincount(self.folder, minlength=len(self.folders))

    @classmethod
    def from_listing(cls, root: Path, folders: Sequence[str], listing: dict[str, list[str] | None]) -> FileTable:
        """From folder -> file names (None = folder missing)."""
        parts = [_encode(listing[f] or []) for f in folders]
        return cls._concat(root, folders, parts, [f for f in folders if listing[f] is None])

    @classmethod
    def _concat(
        cls, root: Path, folders: Sequence[str], parts: list[tuple[np.ndarray, np.ndarray]], missing: list[str]
    ) -> FileTable:
        """``parts``: per folder (blob, lengths)."""
        lengths = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        counts = np.array([len(p[1]) for p in parts], dtype=np.int64)
        return cls(
            root=Path(root),
            folders=list(folders),
            blob=np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.uint8),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            folder=np.repeat(np.arange(len(folders), dtype=np.int32), counts),
            missing=missing,
        )


def _encode(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [n.encode() for n in names]
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return blob, np.array([len(e) for e in encoded], dtype=np.int64)


class FolderIndex:
    """Files of ``root/<folder>`` for the requested folders, listed once and cached.

    ``stats`` tells what the last :meth:`table` call did: folders listed vs reused from the cache.
    """

    def __init__(self, root: Path, cache_dir: Path | None = None, progress: bool = True) -> None:
        self.root = Path(root)
        self.cache_path = cache_file(self.root, Path(cache_dir) if cache_dir else default_cache_dir())
        self.progress = progress
        self.stats = {"listed": 0, "reused": 0}

    def _load(self) -> dict[str, tuple[int, np.ndarray, np.ndarray]]:
        """folder -> (mtime_ns, blob, lengths) from the cache; {} when there is none (or it is stale)."""
        if not self.cache_path.is_file():
            return {}
        try:
            with np.load(self.cache_path, allow_pickle=False) as z:
                if int(z["version"]) != INDEX_VERSION or str(z["root"]) != str(self.root.resolve()):
                    return {}
                names, mtimes, counts = z["folders"].tolist(), z["mtimes"], z["counts"]
                blob, lengths = z["blob"], z["lengths"]
        except (OSError, ValueError, KeyError):
            return {}  # a damaged cache is only a cache: rebuild it
        file_end = np.cumsum(counts)
        byte_end = np.concatenate([[0], np.cumsum(lengths)])
        out = {}
        for k, name in enumerate(names):
            f0, f1 = int(file_end[k] - counts[k]), int(file_end[k])
            out[name] = (int(mtimes[k]), blob[byte_end[f0] : byte_end[f1]], lengths[f0:f1])
        return out

    def _save(self, folders: dict[str, tuple[int, np.ndarray, np.ndarray]]) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        names = sorted(folders)
        tmp = self.cache_path.with_name(f"{self.cache_path.stem}.tmp{os.getpid()}.npz")
        np.savez(
            tmp,
            version=np.int64(INDEX_VERSION),
            root=np.str_(str(self.root.resolve())),
            folders=np.array(names, dtype=str),
            mtimes=np.array([folders[n][0] for n in names], dtype=np.int64),
            counts=np.array([len(folders[n][2]) for n in names], dtype=np.int64),
            blob=np.concatenate([folders[n][1] for n in names]) if names else np.zeros(0, np.uint8),
            lengths=np.concatenate([folders[n][2] for n in names]) if names else np.zeros(0, np.int64),
        )
        os.replace(tmp, self.cache_path)  # atomic: a concurrent reader sees the old or the new index

    def table(self, folders: Sequence[str]) -> FileTable:
        """The files of ``folders`` (in that order); folders that do not exist are in ``missing``."""
        cached = self._load()
        missing: list[str] = []
        stale: list[tuple[str, int]] = []
        for name in folders:
            try:
                mtime = (self.root / name).stat().st_mtime_ns
            except FileNotFoundError:
                missing.append(name)
                continue
            if name not in cached or cached[name][0] != mtime:
                stale.append((name, mtime))
        self.stats = {"listed": len(stale), "reused": len(folders) - len(stale) - len(missing)}
        if stale:
            bar = progress_bar(stale, desc=f"indexing {self.root}", unit="folder", disable=not self.progress)
            for name, mtime in bar:
                cached[name] = (mtime, *_encode(list_folder(self.root / name)))
            self._save(cached)
        empty = (0, np.zeros(0, np.uint8), np.zeros(0, np.int64))
        parts = [cached.get(name, empty)[1:] for name in folders]
        return FileTable._concat(self.root, folders, parts, missing)
