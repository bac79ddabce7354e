"""``larvseg data shard SOURCE --out DIR --format FMT``: a folder source written as WebDataset tar shards.

Any folder format (every entry of larvseg.data.formats.FORMATS with ``shardable``: all but
``webdataset``) is listed with its own dataset builder, so the shards hold exactly the samples training
from the folder would use. Image and label files are copied byte for byte (nothing re-encoded); each
label map is decoded once to validate it and count the classes it contains. The layout is in
larvseg.data.shards.

Samples go into shards in a random order seeded by ``--seed`` (so that each shard mixes classes, which
sequential streaming needs); a shard is closed when the next sample would take it past
``--shard-size`` bytes (or ``--shard-samples`` samples). Interrupted? Run the same command again:
finished shards (``.tar`` + ``.npz`` on disk) are kept and writing continues from the first missing one,
giving byte-identical shards to an uninterrupted run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from larvseg.config import IGNORE_INDEX, ConfigError, DataConfig, SourceConfig
from larvseg.data import shards as wds
from larvseg.data.datasets import INVALID, ImageTagFolder, SegmentationFolder, apply_lut
from larvseg.data.formats import dataset_format, shardable_formats
from larvseg.data.io import DataError, read_label
from larvseg.data.sources import build_source_checked, source_class_names
from larvseg.domains import SIZE_PATTERN
from larvseg.progress import progress_bar


class _OwnClasses:
    """A stand-in vocabulary whose ids are the source's own class indices: the folder dataset then
    yields class indices (tags) and raw -> class-index label tables, which is what the shards store."""

    def ids(self, names: Sequence[str]) -> np.ndarray:
        return np.arange(len(names), dtype=np.int64)


def parse_size(text: str) -> int:
    """'512MB', '1GB', '100k', '4096' -> bytes (powers of 1000; KiB/MiB/GiB are powers of 1024)."""
    m = SIZE_PATTERN.fullmatch(text.lower())
    if not m:
        raise ConfigError(f"--shard-size {text!r}: expected a size such as 512MB, 1GB or 1GiB")
    value, unit, binary = float(m.group(1)), m.group(2), m.group(3)
    scale = (1024 if binary else 1000) ** " kmgt".index(unit or " ")
    return max(1, int(value * scale))


def _coding(lut: np.ndarray) -> dict[str, list[int]]:
    """A raw -> class-index table as the index stores it."""
    values = np.flatnonzero((lut != INVALID) & (lut != IGNORE_INDEX))
    return {
        "values": values.tolist(),
        "classes": lut[values].astype(np.int64).tolist(),
        "ignore": np.flatnonzero(lut == IGNORE_INDEX).tolist(),
    }


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


class _Records:
    """The samples of a folder dataset as (image path, label path | None, class, coding)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.luts: list[np.ndarray] = []
        if isinstance(dataset, SegmentationFolder):
            self.kind = "seg"
            luts = [dataset.lut_for(label) for _, label in dataset.pairs]
            distinct = {id(lut): lut for lut in luts}  # one table per label naming scheme (COCO: two)
            order = list(distinct)
            self.luts = [distinct[k] for k in order]
            self.coding = np.array([order.index(id(lut)) for lut in luts], dtype=np.int8)
        elif isinstance(dataset, ImageTagFolder):
            self.kind = "tag"
        else:
            raise TypeError(f"cannot shard a {type(dataset).__name__}")

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, i: int) -> tuple[Path, Path | None, int, int]:
        if self.kind == "seg":
            image, label = self.dataset.pairs[i]
            return image, label, -1, int(self.coding[i])
        return self.dataset.table.path(i), None, int(self.dataset.file_class[i]), 0


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    """Append a member; returns (offset of its data in the tar, size)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed metadata: reproducible shards
    tar.addfile(info, io.BytesIO(data))
    blocks = (len(data) + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE
    return tar.offset - blocks * tarfile.BLOCKSIZE, len(data)


def _ext_code(suffix: str, exts: tuple[str, ...], path: Path) -> int:
    if suffix not in exts:
        raise DataError(path, f"cannot shard a file with suffix .{suffix}; expected one of {exts}")
    return exts.index(suffix)


class ShardWriter:
    """Writes one source into ``out`` (see the module docstring)."""

    def __init__(
        self,
        source: SourceConfig,
        data_cfg: DataConfig,
        out: Path,
        shard_bytes: int,
        shard_samples: int = 0,
        seed: int | None = 0,
        progress: bool = True,
    ) -> None:
        fmt = dataset_format(source)
        if not fmt.shardable:
            raise ConfigError(
                f"--format {fmt.name}: cannot be written as shards; choose one of {', '.join(shardable_formats())}"
            )
        role = "tag" if fmt.image_level_only else "seg"
        built = build_source_checked(source, data_cfg, _OwnClasses(), role)  # type: ignore[arg-type]
        self.build_problems, self.skip_bad = list(built.problems), source.skip_bad  # files left out by the listing
        self.problems: list[str] = []  # label maps left out while writing (skip_bad)
        self.records = _Records(built.dataset)
        self.root = Path(source.root)
        self.out, self.shard_bytes, self.shard_samples, self.progress = Path(out), shard_bytes, shard_samples, progress
        n = len(self.records)
        self.order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
        names = source_class_names(source, data_cfg.resolved_root())
        self.plan: dict[str, Any] = {
            "format": wds.INDEX_FORMAT,
            "version": wds.INDEX_VERSION,
            "complete": False,
            "name": built.dataset.name,
            "kind": self.records.kind,
            "source": {
                "format": source.format,
                "root": str(self.root),
                "split": source.split,
                "classes": source.classes,
            },
            "class_names": names,
            "label_codings": [_coding(lut) for lut in self.records.luts],
            "shard_size_bytes": shard_bytes,
            "shard_samples": shard_samples,
            "shuffle_seed": seed,
            "samples": n,
        }

    # -- resume ---------------------------------------------------------------------------------

    def _finished(self) -> list[dict[str, Any]]:
        """Shards already written by an earlier run of the same plan (contiguous from shard 0)."""
        index_path = self.out / wds.INDEX_NAME
        if not index_path.is_file():
            return []
        old = json.loads(index_path.read_text())
        mismatched = [k for k in self.plan if k != "complete" and old.get(k) != self.plan[k]]
        if mismatched:
            raise wds.ShardError(
                self.out,
                f"holds shards written with other settings or data ({', '.join(mismatched)} "
                "differ); write to an empty folder",
            )
        done = []
        for entry in old.get("shards", []):
            if not (self.out / entry["name"]).is_file() or not wds.sidecar_path(self.out / entry["name"]).is_file():
                break
            done.append(entry)
        return done

    # -- writing --------------------------------------------------------------------------------

    def _write_index(self, shards: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
        index = dict(self.plan, complete=complete, shards=shards)
        if complete:
            counts = np.zeros(len(self.plan["class_names"]), dtype=np.int64)
            for entry in shards:
                with np.load(wds.sidecar_path(self.out / entry["name"])) as z:
                    np.add.at(counts, z["hist_classes"], z["hist_counts"])
            index["class_counts"] = counts.tolist()  # aligned with class_names (names may repeat: COCO's "ceiling")
            index["skipped"] = self.build_problems + [p for entry in shards for p in entry["skipped"]]
        wds.write_json_atomic(self.out / wds.INDEX_NAME, index)
        return index

    def _write_shard(self, k: int, first: int, bar: Any) -> tuple[dict[str, Any], int]:
        """Shard k from position ``first`` of the order; returns its index entry and the next position."""
        name = wds.shard_name(k)
        tmp = self.out / f"{name}.tmp{os.getpid()}"
        cols: dict[str, list[int]] = {c: [] for c in wds.SIDECAR_COLUMNS}
        classes: list[np.ndarray] = []
        pos, problems_before = first, len(self.problems)
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            while pos < len(self.order):
                image_path, label_path, cls, coding = self.records.get(int(self.order[pos]))
                image = image_path.read_bytes()
                label = label_path.read_bytes() if label_path is not None else b""
                size = len(image) + len(label) + 4 * tarfile.BLOCKSIZE
                n_done = len(cols["key"])
                if n_done and (tar.offset + size > self.shard_bytes or n_done == self.shard_samples):
                    break
                present = self._check(label_path, label, coding, cls)
                if present is None:  # a bad label map, skipped with skip_bad
                    pos += 1
                    bar.update(1)
                    continue
                key = f"{pos:09d}"
                image_ext = image_path.suffix.lower().lstrip(".")
                off, n = _add(tar, f"{key}.{image_ext}", image)
                cols["image_offset"].append(off)
                cols["image_size"].append(n)
                cols["image_ext"].append(_ext_code(image_ext, wds.IMAGE_EXTS, image_path))
                meta: dict[str, Any] = {"path": _relative(image_path, self.root)}
                if label_path is not None:
                    label_ext = "label" + label_path.suffix.lower()
                    off, n = _add(tar, f"{key}.{label_ext}", label)
                    cols["label_ext"].append(_ext_code(label_ext, wds.LABEL_EXTS, label_path))
                    meta.update(label=_relative(label_path, self.root), coding=coding)
                else:
                    off, n = -1, -1
                    cols["label_ext"].append(-1)
                    _add(tar, f"{key}.cls", str(cls).encode())
                    meta["class"] = self.plan["class_names"][cls]
                cols["label_offset"].append(off)
                cols["label_size"].append(n)
                _add(tar, f"{key}.json", json.dumps(meta).encode())
                cols["key"].append(pos)
                cols["cls"].append(cls)
                cols["coding"].append(coding)
                classes.append(present)
                pos += 1
                bar.update(1)
        hist_classes, hist_counts = np.unique(np.concatenate(classes or [np.zeros(0, np.int64)]), return_counts=True)
        os.replace(tmp, self.out / name)
        tmp_npz = self.out / f"{Path(name).stem}.tmp{os.getpid()}.npz"
        arrays = {"hist_classes": hist_classes.astype(np.int64), "hist_counts": hist_counts.astype(np.int64)}
        arrays.update({c: np.asarray(v, dtype=wds.SIDECAR_COLUMNS[c]) for c, v in cols.items()})
        np.savez(tmp_npz, **arrays)  # type: ignore[arg-type]  # numpy's stub reads a key as allow_pickle
        os.replace(tmp_npz, wds.sidecar_path(self.out / name))  # written last: the shard is finished
        entry = {
            "name": name,
            "samples": len(cols["key"]),
            "bytes": (self.out / name).stat().st_size,
            "first": first,
            "end": pos,
            "skipped": self.problems[problems_before:],
        }
        return entry, pos

    def _check(self, label_path: Path | None, label: bytes, coding: int, cls: int) -> np.ndarray | None:
        """Classes of the sample (class indices); a label map is decoded to validate and count it."""
        if label_path is None:
            return np.array([cls], dtype=np.int64)
        try:
            mapped = apply_lut(read_label(label_path, label), self.records.luts[coding], label_path)
        except DataError as exc:
            if not self.skip_bad:
                raise
            self.problems.append(str(exc))
            return None
        present = np.unique(mapped)
        return present[present != IGNORE_INDEX].astype(np.int64)

    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in self.out.glob("*.tmp*"):  # partial files of an interrupted run
            stale.unlink()
        shards = self._finished()
        pos = shards[-1]["end"] if shards else 0
        self._write_index(shards, complete=False)
        with progress_bar(
            total=len(self.order),
            initial=pos,
            desc=f"sharding {self.plan['name']}",
            unit="img",
            disable=not self.progress,
        ) as bar:
            while pos < len(self.order):
                entry, pos = self._write_shard(len(shards), pos, bar)
                shards.append(entry)
                self._write_index(shards, complete=False)
        return self._write_index(shards, complete=True)


def main(args: argparse.Namespace) -> int:
    """Errors (bad data, an out folder of other shards, a bad size) are user errors: the command line
    prints them as one line."""
    source = SourceConfig(
        name=args.name or "",
        format=args.format,
        root=str(Path(args.source).resolve()),
        split=args.split,
        classes=args.classes or "",
        skip_bad=args.skip_bad,
    )
    data_cfg = DataConfig(root=str(Path(args.source).resolve().parent), index_cache_dir=args.index_cache_dir or "")
    writer = ShardWriter(
        source,
        data_cfg,
        Path(args.out),
        parse_size(args.shard_size),
        args.shard_samples,
        None if args.no_shuffle else args.seed,
    )
    index = writer.run()
    total = sum(s["samples"] for s in index["shards"])
    print(
        f"{total} samples in {len(index['shards'])} shards -> {Path(args.out) / wds.INDEX_NAME}"
        + (f" ({len(index['skipped'])} skipped: see index.json)" if index["skipped"] else "")
    )
    return 0
