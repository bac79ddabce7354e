"""``larvseg data check CONFIG [key=value ...]``: validate every source of a config against the disk.

For each source (segmentation, image-level, evaluation) it lists the files, decodes every image and
label map (or the first ``--max-images``), and prints the number of images, the class coverage (classes
with at least one labelled pixel or tagged image, out of the source's vocabulary), the split folder used
(as configured, or detected when ``split`` is empty), the resize and crop that training (or evaluation)
will apply to it, and every problem found, each naming its file. The exit code is 1 when anything is
wrong, 0 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from larvseg.config import Config, SourceConfig, load_config
from larvseg.data.datasets import ImageTagFolder, ShardStream
from larvseg.data.io import DataError
from larvseg.data.sources import build_source_checked, build_vocabulary
from larvseg.data.transforms import source_scale
from larvseg.data.vocabulary import VocabularyError
from larvseg.progress import progress_bar


@dataclass
class SourceReport:
    name: str
    role: str
    format: str
    images: int = 0
    checked: int = 0
    classes_seen: int = 0
    classes_total: int = 0
    split: str = ""  # the split folder used and how it was chosen; "" for formats without split folders
    pipeline: str = ""  # the rescale and crop training applies (evaluation: the resize and windows)
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        head = (
            f"[{self.role}] {self.name} ({self.format}): {self.images} images"
            + (f", {self.checked} decoded" if self.checked != self.images else "")
            + f", classes {self.classes_seen}/{self.classes_total}"
            + (f", {len(self.problems)} problem(s)" if self.problems else ", ok")
        )
        return (
            [head]
            + ([f"    split folder: {self.split}"] if self.split else [])
            + ([f"    {self.pipeline}"] if self.pipeline else [])
            + [f"    - {p}" for p in self.problems]
        )


def pipeline_line(source: SourceConfig, role: str, cfg: Config, labelled: bool) -> str:
    """What training does to this source's images (evaluation: how the eval set is resized and windowed)."""
    d, e = cfg.data, cfg.eval
    if role == "eval":
        windows = "the whole image at once" if e.mode == "whole" else f"slide windows {e.crop_size} / stride {e.stride}"
        return f"evaluation: resize to short side {e.short_side} (long side <= {e.max_long_side}), {windows}"
    long, short = source_scale(source, d)
    own = "its own scale" if source.scale else "data.scale"
    if not labelled:
        retry = "not retried: no label map"
    elif d.cat_max_ratio < 1:
        retry = f"retried while one class covers >= {d.cat_max_ratio:g}"
    else:
        retry = "not retried: data.cat_max_ratio >= 1"
    return (
        f"training: rescale to fit ({long}, {short}) ({own}) x ratio {d.ratio_range[0]:g}-{d.ratio_range[1]:g}, "
        f"crop {source.crop_size} ({retry}), pad to {source.crop_size}"
    )


def check_source(source: SourceConfig, role: str, cfg: Config, vocab, max_images: int = 0) -> SourceReport:
    report = SourceReport(source.name or source.format, role, source.format)
    try:
        # skip_bad so that every missing annotation / empty class folder is listed, not just the first
        built = build_source_checked(dataclasses.replace(source, skip_bad=True), cfg.data, vocab, role)
    except (DataError, VocabularyError, ValueError, OSError) as exc:
        report.problems.append(str(exc))
        return report
    dataset = built.dataset
    report.split = built.split.describe() if built.split else ""
    labelled = not isinstance(dataset, ImageTagFolder) and getattr(dataset, "kind", "seg") != "tag"
    report.pipeline = pipeline_line(source, role, cfg, labelled)
    report.problems.extend(built.problems)
    report.images = len(dataset)
    # coverage over distinct union classes (COCO-Stuff's 171 train ids are 160 names of the union)
    source_ids = np.unique(dataset.class_ids)
    report.classes_total = len(source_ids)
    seen: set[int] = set()
    if isinstance(dataset, ImageTagFolder):  # coverage from the folders; images are still decoded below
        seen.update(dataset.class_ids[np.unique(dataset.file_class)].tolist())
    if isinstance(dataset, ShardStream):  # no random access: coverage from the shard index, nothing decoded
        counts = dataset.shards.index["class_counts"]
        report.classes_seen = len({int(i) for i, c in zip(dataset.class_ids, counts) if c})
        return report
    n = min(len(dataset), max_images) if max_images > 0 else len(dataset)
    # spread the decoded sample over the whole set (files are sorted by class folder)
    indices = np.unique(np.linspace(0, len(dataset) - 1, n).round().astype(np.int64)) if n else np.zeros(0, int)
    for i in progress_bar(indices, desc=f"checking {report.name}", unit="img", leave=False):
        try:
            item = dataset.load(int(i))
        except DataError as exc:
            report.problems.append(str(exc))
            continue
        if item["label"] is not None:
            values = np.unique(item["label"])
            seen.update(values[np.isin(values, source_ids)].tolist())
        if item["tags"] is not None:
            seen.update(item["tags"].tolist())
    report.checked = len(indices)
    report.classes_seen = len(seen)
    return report


def check_config(cfg: Config, max_images: int = 0) -> list[SourceReport]:
    vocab = build_vocabulary(cfg)
    reports = [check_source(s, "seg", cfg, vocab, max_images) for s in cfg.data.seg_sources]
    reports += [check_source(s, "tag", cfg, vocab, max_images) for s in cfg.data.tag_sources]
    if cfg.data.eval.format:
        reports.append(check_source(cfg.data.eval, "eval", cfg, vocab, max_images))
    return reports


def _moved_root(cfg: Config, root: Path) -> Config:
    """``cfg`` with data.root at ``root``, and the source paths written under the old root moved with it."""
    old = str(cfg.data.resolved_root())
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(root)))
    for source in [*cfg.data.seg_sources, *cfg.data.tag_sources, cfg.data.eval]:
        for key in ("root", "classes", "index"):
            value = getattr(source, key)
            if value and str(Path(value).expanduser()).startswith(old + os.sep):
                setattr(source, key, str(root / Path(value).expanduser().relative_to(old)))
    return cfg


def main(args: argparse.Namespace) -> int:
    from larvseg.data.synthetic import SMOKE_SPEC, ensure_benchmark

    cfg = load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory(prefix="larvseg-check-") as scratch:
        if cfg.data.demo_benchmark and not cfg.data.resolved_root().exists():
            # data.demo_benchmark (tiny_cpu): training would generate the data there; a check writes nothing,
            # so it checks what the generator writes, in a temporary folder that is removed afterwards
            print(
                f"data root {cfg.data.resolved_root()} does not exist yet: `larvseg train` generates it "
                "(data.demo_benchmark); checking a generated copy in a temporary folder"
            )
            ensure_benchmark(Path(scratch) / "data", SMOKE_SPEC)
            cfg = _moved_root(cfg, Path(scratch) / "data")
        return _check_and_report(cfg, args.max_images)


def _check_and_report(cfg: Config, max_images: int) -> int:
    print(f"data root: {cfg.data.resolved_root()}")
    try:
        reports = check_config(cfg, max_images)
    except (DataError, VocabularyError) as exc:  # the vocabulary itself could not be built
        print(f"error: {exc}")
        return 1
    for r in reports:
        print("\n".join(r.lines()))
    bad = sum(len(r.problems) for r in reports)
    print(f"{len(reports)} sources, {bad} problem(s)")
    return 1 if bad else 0
