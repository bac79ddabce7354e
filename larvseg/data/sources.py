"""A config's sources read through their formats (larvseg.data.formats.FORMATS): each source's class
list, the experiment's union vocabulary and base/novel split, the split folder a source uses, and its
built dataset.

The union vocabulary takes the sources in a fixed order (segmentation sources, then image-level sources,
then the evaluation set), joining class lists by normalised name (larvseg.data.vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from larvseg.config import Config, DataConfig, SourceConfig
from larvseg.data.datasets import SourceDataset
from larvseg.data.formats import dataset_format
from larvseg.data.io import DatasetRootError
from larvseg.data.vocabulary import Vocabulary, VocabularyError, normalize_name


def source_class_names(source: SourceConfig, data_root: Path) -> list[str]:
    """A source's own class list, in its train-id order."""
    fmt = dataset_format(source)
    return fmt.class_names(source, fmt.folder(source, data_root), data_root)


def build_vocabulary(cfg: Config) -> Vocabulary:
    """The union vocabulary of an experiment: segmentation sources, then tag sources, then the eval set."""
    root = cfg.data.resolved_root()
    sources = [(f"data.seg_sources.{i}", s) for i, s in enumerate(cfg.data.seg_sources)]
    sources += [(f"data.tag_sources.{i}", s) for i, s in enumerate(cfg.data.tag_sources)]
    if cfg.data.eval.format:
        sources.append(("data.eval", cfg.data.eval))
    lists = []
    for key, source in sources:
        try:
            lists.append(source_class_names(source, root))
        except VocabularyError as exc:  # say which config entry to fix (the message has the value)
            raise VocabularyError(f"{key} ({source.name or source.format}): {exc}") from None
    return Vocabulary.union(*lists)


def base_novel_split(vocab: Vocabulary, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Union ids of the evaluation classes (eval-set order) and a bool mask: True = base.

    Base = the class also has pixel masks in a segmentation source of the experiment; novel = the rest.
    """
    root = cfg.data.resolved_root()
    eval_names = source_class_names(cfg.data.eval, root)
    seg_names = {normalize_name(n) for s in cfg.data.seg_sources for n in source_class_names(s, root)}
    ids = vocab.ids(eval_names)
    base = np.array([normalize_name(n) in seg_names for n in eval_names], dtype=bool)
    return ids, base


@dataclass
class ResolvedSplit:
    folder: str  # the split folder used ("" = none: a flat custom_seg folder)
    detected: bool  # True when ``split`` was left empty and the folder was looked up on disk
    accepted: tuple[str, ...] = ()  # the spellings looked for when detecting

    def describe(self) -> str:
        if not self.detected:
            return f"{self.folder} (as configured)"
        return f"{self.folder or '(none: files directly in images/)'} (detected; looked for {', '.join(self.accepted)})"


def resolve_split(source: SourceConfig, data_root: Path, role: str) -> ResolvedSplit | None:
    """The split folder a source uses (None for formats without split folders): ``source.split`` when
    set, else the first accepted spelling of the role's split (validation for "eval", else training)
    that exists on disk. A configured split whose folder is missing while another accepted spelling
    exists is an error that says so."""
    fmt = dataset_format(source)
    layout = fmt.split_folders
    if layout is None:
        return None
    images = fmt.folder(source, data_root) / "images"
    if source.split:
        if not layout.optional and images.is_dir() and not (images / source.split).is_dir():
            present = [f for f in layout.training + layout.validation if (images / f).is_dir()]
            if present:
                raise DatasetRootError(
                    images / source.split,
                    f"split folder not found; {images} holds "
                    f"{', '.join(present)}: set the source's split to one of them, or leave "
                    "split empty to detect it",
                )
        return ResolvedSplit(source.split, detected=False)
    accepted = layout.accepted(role)
    found = next((f for f in accepted if (images / f).is_dir()), None)
    if found is None and layout.optional:
        found = ""  # no split sub-folders: images/ and annotations/ hold the files
    if found is None and images.is_dir():
        raise DatasetRootError(
            images,
            f"no {'validation' if role == 'eval' else 'training'} split folder: "
            f"looked for {', '.join(accepted)} (or set the source's split)",
        )
    # (a missing images/ folder is reported by the builder, naming it)
    return ResolvedSplit(accepted[0] if found is None else found, detected=True, accepted=accepted)


@dataclass
class BuiltSource:
    dataset: SourceDataset
    problems: list[str]  # skipped files (only with skip_bad), one line each
    split: ResolvedSplit | None = None  # the split folder used (None for formats without split folders)


def build_source_checked(source: SourceConfig, data_cfg: DataConfig, vocab: Vocabulary, role: str) -> BuiltSource:
    """The dataset of one source and the files it skipped (``role``: seg | tag | eval; a segmentation
    format can serve any role, an image-level format only as a tag source)."""
    fmt = dataset_format(source)
    if role not in ("seg", "tag", "eval"):
        raise ValueError(f"role must be seg, tag or eval, got {role!r}")
    if role != "tag" and fmt.image_level_only:
        raise ValueError(f"source {source.name}: format {source.format} has no masks; it can only be a tag source")
    problems: list[str] = []
    data_root = data_cfg.resolved_root()
    split = resolve_split(source, data_root, role)
    if split is not None:
        source = replace(source, split=split.folder)
    dataset = fmt.build(source, fmt.folder(source, data_root), data_cfg, vocab, problems)
    if role != "tag" and getattr(dataset, "kind", "seg") == "tag":
        raise ValueError(
            f"source {source.name}: its shards hold image-level tags, no masks; it can only be a tag source"
        )
    if role == "eval" and getattr(dataset, "streamed", False):
        raise ValueError(
            f"source {source.name}: evaluation reads images by index; use local shards without stream: true"
        )
    return BuiltSource(dataset, problems, split)
