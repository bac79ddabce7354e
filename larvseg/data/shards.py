"""Tar shards in the WebDataset format: the layout, the index, shard lists, and opening shards.

``larvseg data shard`` (larvseg.data.shard_writer) writes a folder source into ``OUT/``::

    shard-000000.tar   samples as WebDataset groups: members <key>.<ext> with the same key, adjacent
        <key>.jpg | .jpeg | .png | ...  the image file's bytes, untouched (its own suffix, lower case)
        <key>.label.png | .label.tif   segmentation sources: the label file's bytes, untouched (raw values)
        <key>.cls                      tag sources: index of the image's class in the index's class_names
        <key>.json                     {"path": image path in the source, "label": label path, "coding": k}
    shard-000000.npz   per sample: byte offset and size of the image and label members, class, label
                       coding; and the shard's class histogram (classes, counts)
    index.json         the source (format, class names, label codings), per-class image counts, and per
                       shard its file name, samples and bytes

Samples are written in a seeded random order (shards mix classes, as streaming needs); keys are the
sample's position in that order (``%09d``), unique over the whole set.

A label coding maps the raw values stored in the label files to class indices: ``values[i]`` ->
``classes[i]``, ``ignore`` values -> unlabeled, anything else is an error naming the sample. A user's
own webdataset pipeline can decode the shards with ``.decode("pil")`` and the index.

Shard lists (``root`` of a ``format: webdataset`` source): a folder holding ``index.json``; or a brace
pattern of local files, ``http(s)://`` URLs or ``pipe:COMMAND`` lines (``pipe:aws s3 cp
s3://bucket/shard-{000000..000099}.tar -``), whose index is ``index`` (default: ``index.json`` next to
the shards; required for ``pipe:``). Reading uses only the standard library (tarfile, urllib,
subprocess): no webdataset package needed.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import numpy as np

from larvseg.data.io import DataError

INDEX_NAME = "index.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp")  # member extensions; the .npz stores their position
LABEL_EXTS = ("label.png", "label.tif", "label.tiff")
# per sample in a shard's .npz: its key, members' byte offset/size (label_size -1: none), extensions,
# class index (-1: none) and label coding. Compact types: 21 bytes per image of a tag source in memory.
SIDECAR_COLUMNS = {
    "key": np.int32,
    "image_offset": np.int64,
    "image_size": np.int32,
    "image_ext": np.int8,
    "label_offset": np.int64,
    "label_size": np.int32,
    "label_ext": np.int8,
    "cls": np.int32,
    "coding": np.int8,
}
LABEL_COLUMNS = ("label_offset", "label_size", "label_ext", "coding")  # not kept for tag sources
INDEX_FORMAT = "larvseg-shards"
INDEX_VERSION = 1


class ShardError(DataError):
    """A shard, shard list or shard index that cannot be used (names the file, URL or command)."""


# ----------------------------------------------------------------------------------------------
# Names


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


def sidecar_path(shard: str | Path) -> Path:
    """The offsets file of a local shard: ``shard-000000.npz`` next to ``shard-000000.tar``."""
    return Path(shard).with_suffix(".npz")


def split_member(name: str) -> tuple[str, str]:
    """WebDataset grouping: key = the name up to the first dot of its last path part, ext = the rest."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def expand_braces(pattern: str) -> list[str]:
    """``a{000..002}b{x,y}`` -> a000bx, a000by, a001bx, ... (numeric ranges keep zero padding), as
    WebDataset's brace expansion does."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.groups()
        width = len(a) if len(a) == len(b) else 0
        items = [str(i).zfill(width) for i in range(int(a), int(b) + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def is_remote(url: str) -> bool:
    return url.startswith(("pipe:", "http://", "https://"))


# ----------------------------------------------------------------------------------------------
# Opening files, URLs and pipe: commands as byte streams


class PipeStream(io.RawIOBase):
    """stdout of a shell command (``pipe:`` shards). Closing early stops the command; a command that
    fails is an error with its exit code and the end of its stderr."""

    def __init__(self, command: str) -> None:
        self.command = command
        # a file, not a pipe: a chatty command cannot block on it (closed in close())
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        # shell=True: a `pipe:` shard names the user's own shell command (as in WebDataset)
        self._proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self._stderr)  # noqa: S602
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._proc.stdout.readinto(buffer)  # type: ignore[union-attr]
        if n == 0 and not self._eof:
            self._eof = True
            self._check(self._proc.wait())
        return n

    def _check(self, code: int) -> None:
        if code != 0:
            self._stderr.seek(0)
            tail = self._stderr.read()[-2000:].decode(errors="replace").strip()
            raise ShardError(f"pipe:{self.command}", f"command exited with status {code}: {tail}")

    def close(self) -> None:
        if not self.closed:
            if self._proc.poll() is None:  # stopped before the end: the rest is not wanted
                self._proc.kill()
            self._proc.wait()
            self._proc.stdout.close()  # type: ignore[union-attr]
            self._stderr.close()
        super().close()


def open_url(url: str) -> IO[bytes]:
    """A readable byte stream of a local path, ``file:`` path, ``http(s)://`` URL or ``pipe:`` command."""
    if url.startswith("pipe:"):
        return io.BufferedReader(PipeStream(url[len("pipe:") :]), buffer_size=1 << 20)
    if url.startswith(("http://", "https://")):
        try:
            return urllib.request.urlopen(url, timeout=120)  # noqa: S310 (the user's own shard URL)
        except OSError as exc:
            raise ShardError(url, f"cannot open ({exc})") from None
    path = url[len("file:") :] if url.startswith("file:") else url
    try:
        return open(path, "rb")
    except OSError as exc:
        raise ShardError(path, f"cannot open shard ({exc.strerror or exc})") from None


def iter_tar_samples(stream: IO[bytes], where: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of each sample of a tar stream, read sequentially (WebDataset grouping)."""
    key: str | None = None
    group: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = split_member(member.name)
                if k != key and group:
                    yield key, group  # type: ignore[misc]
                    group = {}
                key = k
                group[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    except tarfile.TarError as exc:
        raise ShardError(where, f"not a readable tar shard ({exc})") from None
    if group:
        yield key, group  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------
# The index


def read_json_url(url: str) -> dict[str, Any]:
    with open_url(url) as f:
        data = f.read()
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise ShardError(url, f"not valid JSON ({exc})") from None


def check_index(index: dict[str, Any], where: str) -> dict[str, Any]:
    if index.get("format") != INDEX_FORMAT or index.get("version") != INDEX_VERSION:
        raise ShardError(
            where,
            f"not a LarvSeg shard index (format {INDEX_FORMAT!r} version {INDEX_VERSION}); "
            "write shards with `larvseg data shard`",
        )
    if not index.get("complete"):
        raise ShardError(
            where,
            "the shard set is incomplete (interrupted `larvseg data shard`?): run the same command again to finish it",
        )
    return index


def write_json_atomic(path: Path, tree: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(tree, indent=1))
    os.replace(tmp, path)


@dataclass
class ShardList:
    """A source's shards: ``urls[k]`` holds index shard k (``counts[k]`` samples)."""

    urls: list[str]
    index: dict[str, Any]
    local: bool  # every shard is a local file (random access by offset is possible)

    @property
    def counts(self) -> np.ndarray:
        return np.array([s["samples"] for s in self.index["shards"]], dtype=np.int64)


def default_index_url(first_shard: str) -> str:
    if first_shard.startswith("pipe:"):
        raise ShardError(
            first_shard,
            "a pipe: shard list needs the source's 'index' (a path, URL or pipe: command giving index.json)",
        )
    return f"{first_shard.rsplit('/', 1)[0]}/{INDEX_NAME}" if "/" in first_shard else INDEX_NAME


@lru_cache(maxsize=32)
def resolve_shards(spec: str, index_url: str, data_root: Path) -> ShardList:
    """The shard list of a ``format: webdataset`` source's ``root`` (folder, brace pattern, URLs, pipe:).
    Cached per process: the vocabulary and the dataset of a source read its index once."""
    if not spec:
        raise ShardError(
            "root", "a webdataset source needs 'root': a shard folder, a brace pattern, URLs or pipe: commands"
        )

    def local(p: str) -> str:
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else data_root / path)

    if not is_remote(spec) and Path(local(spec)).is_dir():
        folder = Path(local(spec))
        index_url = index_url or str(folder / INDEX_NAME)
        index = check_index(read_json_url(local(index_url) if not is_remote(index_url) else index_url), index_url)
        urls = [str(folder / s["name"]) for s in index["shards"]]
    else:
        urls = [u if is_remote(u) else local(u) for u in expand_braces(spec)]
        index_url = index_url or default_index_url(urls[0])
        index_url = index_url if is_remote(index_url) else local(index_url)
        index = check_index(read_json_url(index_url), index_url)
    names = [s["name"] for s in index["shards"]]
    if len(urls) != len(names):
        raise ShardError(spec, f"gives {len(urls)} shards but its index {index_url} lists {len(names)}")
    for url, name in zip(urls, names):
        if name not in url:  # the k-th shard of the list must be the index's k-th shard
            raise ShardError(url, f"does not name shard {name} at its position in the index {index_url}")
    return ShardList(urls, index, local=not any(is_remote(u) for u in urls))


def label_lut(coding: dict[str, list[int]], class_ids: np.ndarray, invalid: np.uint32, ignore_index: int) -> np.ndarray:
    """A label coding of the index as a raw value -> union id table (``invalid`` for unknown values)."""
    lut = np.full(65536, invalid, dtype=np.uint32)
    lut[np.asarray(coding["values"], dtype=np.int64)] = class_ids[np.asarray(coding["classes"], dtype=np.int64)]
    lut[np.asarray(coding["ignore"], dtype=np.int64)] = ignore_index
    return lut
