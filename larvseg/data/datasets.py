"""One dataset class per kind of on-disk layout, and the builder of each dataset format.

Each builder is the ``build`` of its format's entry in larvseg.data.formats.FORMATS (which also holds
the format's class list, default folder and split-folder spellings); larvseg.data.sources calls it.

Layouts (under ``data.root``, default ``/workspace/dataset`` or ``$LARVSEG_DATA``):

======== ================================================ ==================================================
format   files                                            labels
======== ================================================ ==================================================
ade150   A150/images/<split>/*.jpg,                       uint8 png; 0 = unlabeled, value v = class v-1
         A150/annotations/<split>/*.png
ade847   A847/images/<split>/*.jpg,                       uint16 tif; value = class 0..846, 65535 = unlabeled
         A847/annotations/<split>/*.tif
coco171  C171/images/<split>/*.jpg,                       uint8 png with raw COCO-Stuff ids 0..181 (unlisted
         C171/annotations/<split>/*.png                   ids and 255 -> ignore), or ``*_labelTrainIds.png``
                                                          with train ids 0..170 (255 = ignore)
imagenet I22K/fall11_whole/<wnid>/*.JPEG                  one tag per image: its folder's synset; files are
                                                          listed once and cached (larvseg.data.file_index)
custom_seg <root>/images[/<split>]/*.{jpg,png},           png, value = index in the class file, 255 (8-bit)
         <root>/annotations[/<split>]/*.png,              or 65535 (16-bit) = unlabeled
         class file (``classes``, default <root>/classes.txt)
custom_tags <root>/<class name>/*.{jpg,png}               one tag per image: its folder's class; the class
                                                          file (``classes``) picks/orders folders, default all
webdataset <root>/shard-*.tar + index.json (or a brace    any of the above written by ``larvseg data shard``:
         pattern, URLs, ``pipe:`` commands; ``index``)    labels/tags as stored there (larvseg.data.shards)
======== ================================================ ==================================================

``<split>`` is the source's ``split``. Left empty (the default) it is detected: the training split for
training sources, the validation split for the evaluation source, under whichever of its spellings
exists on disk (the format's ``split_folders``: COCO-Stuff's ``train2017``/``val2017`` as COCO names them, or
``training``/``validation`` as the original project's README lays C171 out). A ``split`` that is set
is used as given. ``larvseg data check`` prints the folder each source used.

Raw label values are mapped to union ids with one lookup table per source. A value that is neither a
class nor the unlabeled value raises :class:`LabelValueError` naming the file: never a silent label.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from larvseg.config import IGNORE_INDEX, DataConfig, SourceConfig
from larvseg.data import shards as wds
from larvseg.data.file_index import FileTable, FolderIndex, list_folder
from larvseg.data.io import (
    IMAGE_SUFFIXES,
    AnnotationError,
    DatasetRootError,
    EmptyDatasetError,
    LabelValueError,
    read_image,
    read_label,
    require_dir,
)
from larvseg.data.vocabulary import (
    Vocabulary,
    coco_stuff_classes,
    custom_seg_names,
    custom_tag_names,
    imagenet_names,
    imagenet_subset,
    load_class_names,
)

INVALID = np.uint32(0xFFFFFFFF)  # LUT entry of a raw value that is neither a class nor "unlabeled"


# ----------------------------------------------------------------------------------------------
# Label lookup tables: raw on-disk value -> union id (IGNORE_INDEX for unlabeled, INVALID for errors)


def make_lut(raw_to_class: dict[int, int], class_to_union: np.ndarray, ignore_values: tuple[int, ...]) -> np.ndarray:
    lut = np.full(65536, INVALID, dtype=np.uint32)
    raw = np.fromiter(raw_to_class.keys(), dtype=np.int64, count=len(raw_to_class))
    cls = np.fromiter(raw_to_class.values(), dtype=np.int64, count=len(raw_to_class))
    lut[raw] = class_to_union[cls]
    lut[list(ignore_values)] = IGNORE_INDEX
    return lut


def apply_lut(raw: np.ndarray, lut: np.ndarray, path: str | Path) -> np.ndarray:
    """Vectorised raw -> union id; any INVALID value is an error naming the file and the values."""
    mapped = lut[raw]
    bad = mapped == INVALID
    if bad.any():
        values = np.unique(raw[bad])
        raise LabelValueError(
            path, f"{int(bad.sum())} pixels with label values outside the source's classes: {values[:10].tolist()}"
        )
    return mapped.astype(np.uint16)


# ----------------------------------------------------------------------------------------------
# Datasets


class SourceDataset(torch.utils.data.Dataset):
    """Samples of one source. ``load(i)`` returns a dict: image (uint8 HxWx3 RGB), label (uint16 HxW union
    ids, IGNORE_INDEX = unlabeled) or None, tags (int64 union ids) or None, path."""

    def __init__(self, name: str, class_names: list[str], class_ids: np.ndarray) -> None:
        self.name = name
        self.class_names = class_names  # this source's own classes, in its train-id order
        self.class_ids = np.asarray(class_ids, dtype=np.int64)  # their union ids (aligned with class_names;
        # several may share a union id: COCO-Stuff's wall-brick and wall-stone are both "wall")

    def load(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load(index)


class SegmentationFolder(SourceDataset):
    """Images with label maps, paired by file stem."""

    def __init__(
        self,
        name: str,
        class_names: list[str],
        class_ids: np.ndarray,
        pairs: list[tuple[Path, Path]],
        lut: np.ndarray,
        label_bits: int | None = None,
        bits_note: str = "",
    ) -> None:
        super().__init__(name, class_names, class_ids)
        if not pairs:
            raise EmptyDatasetError(name, "no image with an annotation")
        self.pairs, self.lut = pairs, lut
        # the bit depth the layout's label files must have (None = either): where 8 and 16 bits give the
        # same values different meanings (A847: 255 is a class in 16 bits, "unlabeled" in 8), another
        # depth is refused rather than silently mis-read
        self.label_bits, self.bits_note = label_bits, bits_note

    def __len__(self) -> int:
        return len(self.pairs)

    def lut_for(self, label_path: Path) -> np.ndarray:
        return self.lut

    def load(self, index: int) -> dict[str, Any]:
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        raw = read_label(label_path)
        if self.label_bits is not None and raw.dtype.itemsize * 8 != self.label_bits:
            raise AnnotationError(
                label_path,
                f"{raw.dtype.itemsize * 8}-bit label map, but {self.name} annotations are "
                f"{self.label_bits}-bit{self.bits_note}",
            )
        if raw.shape != image.shape[:2]:
            raise AnnotationError(
                label_path,
                f"label map is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image "
                f"{image_path.name} is {image.shape[1]}x{image.shape[0]}",
            )
        label = apply_lut(raw, self.lut_for(label_path), label_path)
        return {"image": image, "label": label, "tags": None, "path": str(image_path)}


class ImageTagFolder(SourceDataset):
    """Images tagged with one class each: the class folder they are in (``table.folders[k]`` is the
    folder of class k)."""

    def __init__(
        self,
        name: str,
        class_names: list[str],
        class_ids: np.ndarray,
        table: FileTable,
        object_masks: Path | None = None,
    ) -> None:
        super().__init__(name, class_names, class_ids)
        self.object_masks = object_masks  # folder of <class folder>/<stem>.png masks of the tagged object, or None
        if len(table) == 0:
            raise EmptyDatasetError(
                table.root, f"source {name}: no image in any of its {len(table.folders)} class folders"
            )
        self.table = table
        self.file_class = table.folder  # class index of each file (int32, shared by DataLoader workers)

    def __len__(self) -> int:
        return len(self.table)

    def load(self, index: int) -> dict[str, Any]:
        path = self.table.path(index)
        tags = self.class_ids[self.file_class[index : index + 1]]
        image = read_image(path)
        label = None if self.object_masks is None else self.object_mask(path, image.shape[:2])
        return {"image": image, "label": label, "tags": tags, "path": str(path)}

    def object_mask(self, image_path: Path, hw: tuple[int, ...]) -> np.ndarray:
        """The tagged object's mask of an image (uint16: 1 = object, 0 = not), checked against the image."""
        if self.object_masks is None:
            raise ValueError(f"{self.name}: this source has no object masks")
        mask_path = self.object_masks / image_path.parent.name / f"{image_path.stem}.png"
        if not mask_path.is_file():
            raise AnnotationError(mask_path, f"no object mask for {image_path}")
        mask = read_label(mask_path)
        if mask.shape != tuple(hw):
            raise AnnotationError(
                mask_path, f"object mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is {hw[1]}x{hw[0]}"
            )
        if mask.max(initial=0) > 1:
            raise LabelValueError(mask_path, f"object mask holds value {int(mask.max())}; only 0 and 1 are allowed")
        return mask.astype(np.uint16)


class ShardSource(SourceDataset):
    """Samples of tar shards written by ``larvseg data shard`` (larvseg.data.shards): decoding shared by
    random access (:class:`ShardFiles`) and streaming (:class:`ShardStream`)."""

    streamed = False

    def __init__(self, name: str, class_ids: np.ndarray, shards: wds.ShardList) -> None:
        index = shards.index
        super().__init__(name, list(index["class_names"]), class_ids)
        self.shards, self.kind = shards, index["kind"]
        self.luts = [wds.label_lut(c, self.class_ids, INVALID, IGNORE_INDEX) for c in index.get("label_codings", [])]
        self.counts = shards.counts
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def decode(
        self, image: tuple[str, bytes], label: tuple[str, bytes] | None, cls: int, coding: int
    ) -> dict[str, Any]:
        """A sample from its members' (name, bytes); ``cls`` the class index (tag shards), ``coding`` the
        label coding (segmentation shards)."""
        item: dict[str, Any] = {"image": read_image(image[0], image[1]), "label": None, "tags": None, "path": image[0]}
        if label is not None:
            raw = read_label(label[0], label[1])
            if raw.shape != item["image"].shape[:2]:
                raise AnnotationError(
                    label[0],
                    f"label map is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image is "
                    f"{item['image'].shape[1]}x{item['image'].shape[0]}",
                )
            item["label"] = apply_lut(raw, self.luts[coding], label[0])
        elif cls >= 0:
            item["tags"] = self.class_ids[cls : cls + 1]
        return item


class ShardFiles(ShardSource):
    """Random access into local shards by byte offset (from each shard's ``.npz``): the same indexable
    dataset as a folder, so mixing, resume and rank sharding are exactly those of folder sources."""

    MAX_OPEN = 256  # open shard files per process (least recently used closed first)

    def __init__(self, name: str, class_ids: np.ndarray, shards: wds.ShardList) -> None:
        super().__init__(name, class_ids, shards)
        tables = []
        for url in shards.urls:
            path = wds.sidecar_path(url)
            try:
                with np.load(path, allow_pickle=False) as z:
                    tables.append(
                        {
                            k: z[k].astype(t, copy=False)
                            for k, t in wds.SIDECAR_COLUMNS.items()
                            if self.kind == "seg" or k not in wds.LABEL_COLUMNS
                        }
                    )
            except (OSError, KeyError, ValueError) as exc:
                raise wds.ShardError(
                    path,
                    f"cannot read the shard's offsets file ({exc}); stream the shards instead "
                    "(stream: true) or write them again with `larvseg data shard`",
                ) from None
        self.table = {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}
        if len(self.table["cls"]) != len(self):
            raise wds.ShardError(shards.urls[0], "offset files and index.json disagree on the number of samples")
        self._files: dict[int, Any] = {}
        self._pid = -1

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # a DataLoader worker: its own handles, never the parent's
            self._files, self._pid = {}, os.getpid()
        f = self._files.pop(shard, None)
        if f is None:
            if len(self._files) >= self.MAX_OPEN:
                self._files.pop(next(iter(self._files))).close()
            f = open(self.shards.urls[shard], "rb")  # noqa: SIM115 - kept open in the LRU, closed on eviction
        self._files[shard] = f  # most recently used last
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise wds.ShardError(self.shards.urls[shard], f"truncated: {size} bytes expected at offset {offset}")
        return data

    def load(self, index: int) -> dict[str, Any]:
        k = int(np.searchsorted(self.starts, index, side="right") - 1)
        t = self.table
        where = f"{self.shards.urls[k]}:{int(t['key'][index]):09d}"
        image = (
            f"{where}.{wds.IMAGE_EXTS[t['image_ext'][index]]}",
            self._read(k, int(t["image_offset"][index]), int(t["image_size"][index])),
        )
        label = None
        if self.kind == "seg":
            label = (
                f"{where}.{wds.LABEL_EXTS[t['label_ext'][index]]}",
                self._read(k, int(t["label_offset"][index]), int(t["label_size"][index])),
            )
        return self.decode(image, label, int(t["cls"][index]), int(t["coding"][index]) if label else 0)


class ShardStream(ShardSource):
    """Shards read sequentially (URLs, ``pipe:`` commands, or ``stream: true``); the training loader
    streams them (larvseg.data.shard_stream). No random access: ``load`` is not available."""

    streamed = True

    def load(self, index: int) -> dict[str, Any]:
        raise TypeError(f"source {self.name}: streamed shards have no random access (use the training loader)")

    def decode_members(self, key: str, members: dict[str, bytes], url: str) -> dict[str, Any]:
        """A sample from the members of its key in a tar stream."""
        image_ext = next((e for e in members if e in wds.IMAGE_EXTS), None)
        if image_ext is None:
            raise wds.ShardError(f"{url}:{key}", f"sample has no image member (members: {sorted(members)})")
        label_ext = next((e for e in members if e.startswith("label.")), None)
        meta = json.loads(members["json"]) if "json" in members else {}
        cls = int(members["cls"]) if "cls" in members else -1
        label = (f"{url}:{key}.{label_ext}", members[label_ext]) if label_ext else None
        return self.decode((f"{url}:{key}.{image_ext}", members[image_ext]), label, cls, int(meta.get("coding", 0)))


# ----------------------------------------------------------------------------------------------
# Layout helpers


def pair_by_stem(
    image_dir: Path, label_dir: Path, label_suffixes: tuple[str, ...], skip_bad: bool, problems: list[str]
) -> list[tuple[Path, Path]]:
    """(image, annotation) pairs; the first matching suffix wins. A missing annotation is an error, or a
    counted skip (reported in ``problems``) with skip_bad."""
    images = sorted(p for p in require_dir(image_dir, "image folder").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    require_dir(label_dir, "annotation folder")
    if not images:
        raise EmptyDatasetError(image_dir, f"no images ({'/'.join(IMAGE_SUFFIXES)})")
    labels = {p.name for p in label_dir.iterdir()}  # one listing instead of a stat per image
    pairs = []
    for image in images:
        label = next((label_dir / f"{image.stem}{s}" for s in label_suffixes if f"{image.stem}{s}" in labels), None)
        if label is None:
            problem = AnnotationError(
                label_dir / f"{image.stem}{label_suffixes[-1]}", f"annotation of {image.name} is missing"
            )
            if not skip_bad:
                raise problem
            problems.append(str(problem))
            continue
        pairs.append((image, label))
    return pairs


def split_pairs(
    root: Path, split: str, label_suffixes: tuple[str, ...], skip_bad: bool, problems: list[str]
) -> list[tuple[Path, Path]]:
    """pair_by_stem over the mask layouts' ``images/<split>`` and ``annotations/<split>`` under ``root``
    (``split`` "": ``images/`` and ``annotations/`` themselves)."""
    return pair_by_stem(root / "images" / split, root / "annotations" / split, label_suffixes, skip_bad, problems)


def _ids(vocab: Vocabulary, names: list[str]) -> np.ndarray:
    return vocab.ids(names)


# ----------------------------------------------------------------------------------------------
# Builders: (source, root, data_cfg, vocab, problems) -> dataset. ``root`` is the source's folder (its
# ``root``, or the format's default_root, under data.root); skipped files are appended to ``problems``


def build_ade150(
    source: SourceConfig, root: Path, data_cfg: DataConfig, vocab: Vocabulary, problems: list[str]
) -> SourceDataset:
    names = load_class_names("ade150")
    ids = _ids(vocab, names)
    lut = make_lut({v + 1: v for v in range(len(names))}, ids, ignore_values=(0,))
    pairs = split_pairs(root, source.split, (".png",), source.skip_bad, problems)
    return SegmentationFolder(source.name or "A150", names, ids, pairs, lut)


def build_ade847(
    source: SourceConfig, root: Path, data_cfg: DataConfig, vocab: Vocabulary, problems: list[str]
) -> SourceDataset:
    names = load_class_names("ade847")
    ids = _ids(vocab, names)
    lut = make_lut({v: v for v in range(len(names))}, ids, ignore_values=(65535,))
    pairs = split_pairs(root, source.split, (".tif", ".tiff"), source.skip_bad, problems)
    note = (
        f" (65535 = unlabeled; 255 is class {names[255]!r}, the unlabeled value of 8-bit maps, so an 8-bit map "
        "cannot be read unambiguously): re-save it as a 16-bit TIFF with 65535 for unlabeled pixels"
    )
    return SegmentationFolder(source.name or "A847", names, ids, pairs, lut, label_bits=16, bits_note=note)


class CocoStuffFolder(SegmentationFolder):
    """COCO-Stuff: raw-id pngs or already converted ``*_labelTrainIds.png`` (each file by its name)."""

    def __init__(self, *args: Any, train_id_lut: np.ndarray) -> None:
        super().__init__(*args)
        self.train_id_lut = train_id_lut

    def lut_for(self, label_path: Path) -> np.ndarray:
        return self.train_id_lut if label_path.name.endswith("_labelTrainIds.png") else self.lut


def build_coco171(
    source: SourceConfig, root: Path, data_cfg: DataConfig, vocab: Vocabulary, problems: list[str]
) -> SourceDataset:
    classes = coco_stuff_classes()
    names = [c["merged_name"] for c in classes]
    ids = _ids(vocab, names)
    raw_to_train = {c["raw_id"]: c["train_id"] for c in classes}
    unlisted = tuple(v for v in range(182) if v not in raw_to_train)  # COCO ids without a class -> ignore
    raw_lut = make_lut(raw_to_train, ids, ignore_values=unlisted + (255,))
    train_lut = make_lut({t: t for t in range(len(classes))}, ids, ignore_values=(255,))
    pairs = split_pairs(root, source.split, ("_labelTrainIds.png", ".png"), source.skip_bad, problems)
    return CocoStuffFolder(source.name or "C171", names, ids, pairs, raw_lut, train_id_lut=train_lut)


def build_custom_seg(
    source: SourceConfig, root: Path, data_cfg: DataConfig, vocab: Vocabulary, problems: list[str]
) -> SourceDataset:
    names = custom_seg_names(source, root)
    ids = _ids(vocab, names)
    lut = make_lut({v: v for v in range(len(names))}, ids, ignore_values=(255, 65535) if len(names) < 255 else (65535,))
    split = source.split if source.split and (root / "images" / source.split).is_dir() else ""  # split folders optional
    pairs = split_pairs(root, split, (".png",), source.skip_bad, problems)
    return SegmentationFolder(source.name or root.name, names, ids, pairs, lut)


def check_class_folders(table: FileTable, skip_bad: bool, problems: list[str]) -> None:
    """A missing or empty class folder is an error, or with skip_bad a reported skip."""
    counts = table.counts()
    for k, folder in enumerate(table.folders):
        if counts[k]:
            continue
        error = (
            DatasetRootError(table.root / folder, "class folder not found")
            if folder in table.missing
            else EmptyDatasetError(table.root / folder, f"class folder holds no image ({'/'.join(IMAGE_SUFFIXES)})")
        )
        if not skip_bad:
            raise error
        problems.append(str(error))


def imagenet_table(
    source: SourceConfig, root: Path, data_cfg: DataConfig, wnids: list[str], problems: list[str]
) -> FileTable:
    root = require_dir(root / "fall11_whole", "ImageNet folder fall11_whole")
    cache_dir = Path(data_cfg.index_cache_dir).expanduser() if data_cfg.index_cache_dir else None
    table = FolderIndex(root, cache_dir).table(wnids)
    check_class_folders(table, source.skip_bad, problems)
    return table


def build_imagenet(
    source: SourceConfig, root: Path, data_cfg: DataConfig, vocab: Vocabulary, problems: list[str]
) -> SourceDataset:
    wnids = imagenet_subset(source.classes)
    names = imagenet_names(source.classes)
    table = imagenet_table(source, root, data_cfg, wnids, problems)
    masks = (
        require_dir(data_cfg.resolved_root() / source.object_masks, "object_masks folder")
        if source.object_masks
        else None
    )
    return ImageTagFolder(source.name or "I22K", names, _ids(vocab, names), table, masks)


def build_custom_tags(
    source: SourceConfig, root: Path, data_cfg: DataConfig, vocab: Vocabulary, problems: list[str]
) -> SourceDataset:
    require_dir(root, "image-level folder")
    names = custom_tag_names(source, root)
    # small user folders: listed directly, no cache
    table = FileTable.from_listing(
        root, names, {n: list_folder(root / n) if (root / n).is_dir() else None for n in names}
    )
    check_class_folders(table, source.skip_bad, problems)
    return ImageTagFolder(source.name or root.name, names, _ids(vocab, names), table)


def build_webdataset(
    source: SourceConfig, root: Path, data_cfg: DataConfig, vocab: Vocabulary, problems: list[str]
) -> SourceDataset:
    """``root`` is unused: a shard source's ``root`` is a folder, brace pattern, URL or pipe: command that
    larvseg.data.shards resolves."""
    shards = wds.resolve_shards(source.root, source.index, data_cfg.resolved_root())
    ids = _ids(vocab, list(shards.index["class_names"]))
    name = source.name or shards.index.get("name", "shards")
    if source.stream or not shards.local:
        return ShardStream(name, ids, shards)
    return ShardFiles(name, ids, shards)


__all__ = [
    "SourceDataset",
    "SegmentationFolder",
    "ImageTagFolder",
    "ShardFiles",
    "ShardStream",
    "build_ade150",
    "build_ade847",
    "build_coco171",
    "build_custom_seg",
    "build_imagenet",
    "build_custom_tags",
    "build_webdataset",
]
