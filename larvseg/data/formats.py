"""Dataset formats: one :class:`DatasetFormat` per value of a source's ``format``, all in ``FORMATS``.

A format is everything the package knows about one on-disk layout: where it lies by default, its split
folders, its class list, whether it has masks, how its dataset is built, whether ``larvseg data shard``
can write it. Adding a format means adding its builder (larvseg.data.datasets) and one entry here;
everything that depends on the format (source checks, class lists, split detection, shard roles, the
table of docs/DATASETS.md) reads this dict. Only the names are also below the data layer, in
larvseg.domains.DATASET_FORMATS, so that configs and the command line are checked when read;
tests/test_data_formats.py keeps the two equal and checks that nothing else lists formats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from larvseg.config import DataConfig, SourceConfig
from larvseg.data import datasets
from larvseg.data.datasets import SourceDataset
from larvseg.data.io import source_root
from larvseg.data.shards import resolve_shards
from larvseg.data.vocabulary import Vocabulary, custom_seg_names, custom_tag_names, imagenet_names, load_class_names

ClassNames = Callable[[SourceConfig, Path, Path], list[str]]  # (source, its folder, data.root) -> its own class list
Builder = Callable[[SourceConfig, Path, DataConfig, Vocabulary, list[str]], SourceDataset]


@dataclass(frozen=True)
class SplitFolders:
    """Accepted spellings of a format's training / validation split folders (images/<split>,
    annotations/<split>), in order of preference when several exist."""

    training: tuple[str, ...]
    validation: tuple[str, ...]
    optional: bool = False  # the files may also lie directly in images/ and annotations/

    def accepted(self, role: str) -> tuple[str, ...]:
        return self.validation if role == "eval" else self.training


@dataclass(frozen=True)
class DatasetFormat:
    """One on-disk dataset format (the layouts are drawn in larvseg.data.datasets)."""

    name: str  # the value of SourceConfig.format
    description: str  # one line: what the folder holds
    class_names: ClassNames  # the source's own class list in train-id order, without listing its images
    build: Builder  # (source, its folder, data config, vocabulary, problems) -> dataset
    default_root: str  # folder under data.root when the source's root is empty ("" = data.root itself)
    split_folders: SplitFolders | None = None  # None: the format has no split folders
    image_level_only: bool = False  # no masks: the format can only be a tag source
    shardable: bool = True  # `larvseg data shard --format NAME` can write it

    def folder(self, source: SourceConfig, data_root: Path) -> Path:
        """The source's folder: its ``root``, or this format's default, under ``data_root`` unless absolute."""
        return source_root(source, data_root, self.default_root)


def _packaged(list_name: str) -> ClassNames:
    """The class list packaged under ``list_name`` (larvseg/data/classlists), whatever the source says."""
    return lambda source, folder, data_root: load_class_names(list_name)


def _shard_class_names(source: SourceConfig, folder: Path, data_root: Path) -> list[str]:
    # a shard source's root may be a brace pattern, URLs or pipe: commands, not a folder: read as given
    return list(resolve_shards(source.root, source.index, data_root).index["class_names"])  # from index.json


ADE_SPLITS = SplitFolders(("training",), ("validation",))

FORMATS: dict[str, DatasetFormat] = {
    f.name: f
    for f in (
        DatasetFormat(
            "ade150",
            "ADE20K, 150 classes: `images/<split>/*.jpg`, `annotations/<split>/*.png` "
            "(uint8; 0 = unlabeled, v = class v-1)",
            _packaged("ade150"),
            datasets.build_ade150,
            "A150",
            ADE_SPLITS,
        ),
        DatasetFormat(
            "ade847",
            "ADE20K, 847 classes: `images/<split>/*.jpg`, `annotations/<split>/*.tif` (uint16; 65535 = unlabeled)",
            _packaged("ade847"),
            datasets.build_ade847,
            "A847",
            ADE_SPLITS,
        ),
        # COCO's own split names (our packaged configs) and the original project's README layout
        DatasetFormat(
            "coco171",
            "COCO-Stuff, 171 classes: `images/<split>/*.jpg`, `annotations/<split>/*.png` "
            "(raw COCO ids, or train ids in `*_labelTrainIds.png`)",
            _packaged("coco171"),
            datasets.build_coco171,
            "C171",
            SplitFolders(("train2017", "training"), ("val2017", "validation")),
        ),
        DatasetFormat(
            "imagenet",
            "ImageNet-21K: `fall11_whole/<wnid>/*.JPEG`, one tag per image; `classes`: ade150, "
            "ade847, all or a file of wnids",
            lambda source, folder, data_root: imagenet_names(source.classes),
            datasets.build_imagenet,
            "I22K",
            image_level_only=True,
        ),
        DatasetFormat(
            "custom_seg",
            "your masks: `images[/<split>]/*.jpg`, `annotations[/<split>]/*.png` (value = line "
            "of `classes.txt`, 255 or 65535 = unlabeled)",
            lambda source, folder, data_root: custom_seg_names(source, folder),
            datasets.build_custom_seg,
            "",
            SplitFolders(("training",), ("validation",), optional=True),
        ),
        DatasetFormat(
            "custom_tags",
            "your tags: `<class name>/*.jpg`, one tag per image (`classes`: a file that picks "
            "and orders the folders; default all)",
            lambda source, folder, data_root: custom_tag_names(source, folder),
            datasets.build_custom_tags,
            "",
            image_level_only=True,
        ),
        DatasetFormat(
            "webdataset",
            "tar shards written by `larvseg data shard` (docs/SHARDS.md), masks or tags as "
            "sharded; `root`: a folder, brace pattern, URLs or `pipe:` commands",
            _shard_class_names,
            datasets.build_webdataset,
            "",
            shardable=False,
        ),
    )
}


def dataset_format(source: SourceConfig) -> DatasetFormat:
    """The format of ``source``; an unknown name is an error that lists the choices."""
    if source.format not in FORMATS:
        raise ValueError(
            f"source {source.name or '?'}: unknown format {source.format!r}; choose one of {sorted(FORMATS)}"
        )
    return FORMATS[source.format]


def shardable_formats() -> list[str]:
    """The formats ``larvseg data shard`` writes (every folder format; shards are not sharded again)."""
    return [name for name, fmt in FORMATS.items() if fmt.shardable]


def markdown_table() -> str:
    """FORMATS as the table of docs/DATASETS.md (tests/test_data_formats.py checks that the page shows it)."""

    def splits(fmt: DatasetFormat) -> str:
        if fmt.split_folders is None:
            return "none"
        sf = fmt.split_folders
        text = f"{' or '.join(sf.training)} / {' or '.join(sf.validation)}"
        return text + " (optional)" if sf.optional else text

    rows = [
        "| format | default folder | split folders (training / validation) | tag sources only | `data shard` | holds |",
        "|---|---|---|---|---|---|",
    ]
    rows += [
        f"| `{f.name}` | {f'`{f.default_root}`' if f.default_root else '(set `root`)'} | {splits(f)} | "
        f"{'yes' if f.image_level_only else 'no'} | {'yes' if f.shardable else 'no'} | "
        f"{f.description} |"
        for f in FORMATS.values()
    ]
    return "\n".join(rows)
