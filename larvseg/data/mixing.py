"""Mixed batches: every training step gets a batch of every source, deterministic and rank-sharded.

The *global* batch of a step is fixed by the config and the seed alone:

- ``data.seg_batch_size`` images are split evenly over the segmentation sources and
  ``data.tag_batch_size`` over the tag sources by their ``share`` (largest remainder rounding);
- source s walks through its samples in epoch-wise permutations seeded by (seed, s, epoch); step t
  takes the next ``count_s`` of them;
- the image at position j of the step is augmented with a Generator seeded by (seed, s, t, j).

Rank r of W takes the r-th contiguous chunk (``numpy.array_split``) of each source's global batch, so
1 process, 2 processes or 64 see exactly the same images with the same augmentation, and gathering in
rank order restores the single-process order. A rank may get 0 images of a source (the model's
objective still produces every loss term). One DataLoader per source (``data.num_workers`` workers
each, pinned memory on GPU) runs ahead of the step.

Sharded sources (``format: webdataset``) on local disk are read by byte offset and follow exactly these
rules. Streamed shards (URLs, ``pipe:`` commands, ``stream: true``) cannot be indexed: each rank and
worker streams its own shards instead (larvseg.data.shard_stream), keeping the per-step counts, the
rank's share, the per-position augmentation seeds and class sampling, but not the global sample list.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from itertools import count
from typing import Any, cast

import numpy as np
import torch

from larvseg.config import IGNORE_INDEX, Config, DataConfig, SourceConfig
from larvseg.data.batch import TAG_PAD, SegBatch, StepBatch, TagBatch
from larvseg.data.datasets import ShardStream, SourceDataset
from larvseg.data.io import DataError
from larvseg.data.shard_stream import StreamPlan
from larvseg.data.sources import build_source_checked
from larvseg.data.transforms import TrainTransform, train_transform
from larvseg.data.vocabulary import Vocabulary

log = logging.getLogger(__name__)


def split_counts(total: int, weights: list[float]) -> list[int]:
    """Integers proportional to ``weights`` summing to ``total`` (largest remainder; ties to the first)."""
    if not weights:
        return []
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts.tolist()


def sample_seed(seed: int, source_index: int, step: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, source_index, step, position]).generate_state(1)[0])


class SourceSchedule:
    """Which samples of a source each step uses: epoch-wise permutations, ``per_step`` per step."""

    def __init__(self, length: int, per_step: int, seed: int, source_index: int) -> None:
        self.length, self.per_step, self.seed, self.source_index = length, per_step, seed, source_index
        self._perm = lru_cache(maxsize=2)(self._permutation)

    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.source_index, epoch, 0x5EED]))
        return rng.permutation(self.length)

    def indices(self, step: int) -> np.ndarray:
        positions = step * self.per_step + np.arange(self.per_step)
        epochs, within = positions // self.length, positions % self.length
        return np.array([self._perm(int(e))[i] for e, i in zip(epochs, within)], dtype=np.int64)


class _StepSampler(torch.utils.data.Sampler):
    """Yields, per step, this rank's list of (sample index, augmentation seed)."""

    def __init__(
        self, schedule: SourceSchedule, rank: int, world_size: int, start_step: int, stop_step: int | None
    ) -> None:
        self.schedule, self.start, self.stop = schedule, start_step, stop_step
        self.chunk = np.array_split(np.arange(schedule.per_step), world_size)[rank]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        steps = count(self.start) if self.stop is None else range(self.start, self.stop)
        s = self.schedule
        for step in steps:
            idx = s.indices(step)
            yield [(int(idx[j]), sample_seed(s.seed, s.source_index, step, int(j))) for j in self.chunk]


@dataclass
class _SourceSpec:
    config: SourceConfig
    role: str  # seg | tag
    index: int  # position among all sources of the step (seg first): seeds and class sampling
    dataset: SourceDataset
    per_step: int


class _Samples(torch.utils.data.Dataset):
    """Loads and augments one sample; unreadable samples raise, or with skip_bad are replaced by the
    next index and reported."""

    def __init__(self, spec: _SourceSpec, transform: TrainTransform) -> None:
        self.spec, self.transform = spec, transform

    def __len__(self) -> int:
        return len(self.spec.dataset)

    def _load(self, index: int) -> tuple[dict[str, Any], list[str]]:
        dataset = self.spec.dataset
        skipped: list[str] = []
        for attempt in range(len(dataset)):
            try:
                return dataset.load((index + attempt) % len(dataset)), skipped
            except DataError as exc:
                if not self.spec.config.skip_bad:
                    raise
                skipped.append(str(exc))
        raise DataError(self.spec.config.name, f"every sample failed to load; first problem: {skipped[0]}")

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        sample, skipped = self._load(index)
        return self.prepare(sample, seed, skipped)

    def prepare(self, sample: dict[str, Any], seed: int, skipped: list[str]) -> dict[str, Any]:
        """Augments a loaded sample with the Generator of its seed."""
        rng = np.random.default_rng(seed)
        image, label = self.transform(sample["image"], sample["label"], rng)
        if sample["tags"] is not None:
            tags = np.asarray(sample["tags"], dtype=np.int64)
        else:  # a segmentation set used for tags: the classes present in the augmented crop
            present = np.unique(label)
            tags = present[present != IGNORE_INDEX].astype(np.int64)
        return {"image": image, "label": label, "tags": tags, "path": sample["path"], "skipped": skipped}


class _Collate:
    """Stacks one rank's samples of a source into plain tensors (a dict, so DataLoader's pin_memory
    pins them); 0 samples give tensors with 0 rows. The batch object is made in the main process."""

    def __init__(self, spec: _SourceSpec) -> None:
        self.spec = spec

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        crop = self.spec.config.crop_size
        out: dict[str, Any] = {
            "images": torch.from_numpy(np.stack([it["image"] for it in items]))
            if items
            else torch.zeros(0, 3, crop, crop),
            "paths": [it["path"] for it in items],
            "skipped": [s for it in items for s in it["skipped"]],
        }
        if self.spec.role == "seg":
            out["labels"] = (
                torch.from_numpy(np.stack([it["label"] for it in items]).astype(np.int64))
                if items
                else torch.zeros(0, crop, crop, dtype=torch.long)
            )
        else:
            width = max([1] + [len(it["tags"]) for it in items])
            tags = np.full((len(items), width), TAG_PAD, dtype=np.int64)
            for row, it in enumerate(items):  # a few tags of a few images
                tags[row, : len(it["tags"])] = it["tags"]
            out["tags"] = torch.from_numpy(tags)
            if self.spec.config.object_masks:  # 1 = the tagged object; 0 and the padding (IGNORE_INDEX) = not
                out["object_masks"] = (
                    torch.from_numpy(np.stack([it["label"] for it in items]) == 1)
                    if items
                    else torch.zeros(0, crop, crop, dtype=torch.bool)
                )
        return out


class _StreamSteps(torch.utils.data.IterableDataset):
    """This rank's per-step batches of a streamed source (collated), see larvseg.data.shard_stream.

    DataLoader hands out the items of its W workers round-robin, so worker w yields the steps
    ``start + w, start + w + W, ...``; their residue ``step mod W`` picks the stream, so a stream always
    feeds the same steps whatever step the run (re)starts at."""

    def __init__(
        self,
        samples: _Samples,
        collate: _Collate,
        schedule: SourceSchedule,
        rank: int,
        world_size: int,
        workers: int,
        start_step: int,
        stop_step: int | None,
    ) -> None:
        self.samples, self.collate, self.schedule = samples, collate, schedule
        self.rank, self.workers, self.start, self.stop = rank, max(1, workers), start_step, stop_step
        self.chunk = np.array_split(np.arange(schedule.per_step), world_size)[rank]
        dataset = samples.spec.dataset
        if not isinstance(dataset, ShardStream):
            raise TypeError(f"{dataset.name}: a streamed source must be a ShardStream, got {type(dataset).__name__}")
        self.dataset = dataset
        self.plan = StreamPlan(
            dataset.shards.urls, dataset.counts, schedule.seed, schedule.source_index, world_size * self.workers
        )

    def _decoded(self, stream: int, position: int) -> Iterator[tuple[dict[str, Any], list[str]]]:
        """Decoded samples of a stream; with skip_bad an unreadable one is replaced by the previous good
        sample (or the next, at the start), so that positions, and resume, never shift."""
        dataset, skip_bad = self.dataset, self.samples.spec.config.skip_bad
        last, owed = None, []
        for url, key, members in self.plan.samples(stream, position):
            try:
                item = dataset.decode_members(key, members, url)
            except DataError as exc:
                if not skip_bad:
                    raise
                if last is None:
                    owed.append(str(exc))
                    if len(owed) > len(dataset):  # a whole epoch and more: nothing here decodes
                        raise DataError(
                            self.samples.spec.config.name,
                            f"every streamed sample failed to load; first problem: {owed[0]}",
                        ) from None
                    continue
                yield last, [str(exc)]
                continue
            for problem in owed:
                yield item, [problem]
            owed, last = [], item
            yield item, []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        first = self.start + (info.id if info is not None else 0)
        residue = first % self.workers
        stream = self.rank * self.workers + residue
        done = (first - residue) // self.workers  # steps this stream fed before ``first``
        decoded = self._decoded(stream, done * len(self.chunk)) if len(self.chunk) else iter(())
        steps = count(first, self.workers) if self.stop is None else range(first, self.stop, self.workers)
        s = self.schedule
        for step in steps:
            items = []
            for j in self.chunk:
                sample, skipped = next(decoded)
                items.append(self.samples.prepare(sample, sample_seed(s.seed, s.source_index, step, int(j)), skipped))
            yield self.collate(items)


def _as_is(batch: Any) -> Any:  # the collate_fn of batch_size=None: one item, already a batch
    return batch


def make_batch(spec: _SourceSpec, data: dict[str, Any]) -> SegBatch | TagBatch:
    cfg, class_ids = spec.config, torch.from_numpy(spec.dataset.class_ids)
    if spec.role == "seg":
        return SegBatch(
            cfg.name, data["images"], data["labels"], class_ids, spec.per_step, cfg.loss_weight, data["paths"]
        )
    return TagBatch(
        cfg.name,
        data["images"],
        data["tags"],
        class_ids,
        spec.per_step,
        cfg.loss_weight,
        cfg.cac_weight,
        cfg.cac_topk,
        data["paths"],
        data.get("object_masks"),
    )


def source_batches(d: DataConfig) -> list[tuple[SourceConfig, str, int]]:
    """(source, role "seg" | "tag", images per step summed over ranks) of every training source, in
    source-index order: data.seg_batch_size split evenly over the segmentation sources,
    data.tag_batch_size over the image-level ones by their ``share``."""
    seg_counts = split_counts(d.seg_batch_size, [1.0] * len(d.seg_sources))
    tag_counts = split_counts(d.tag_batch_size, [s.share for s in d.tag_sources])
    return [(s, "seg", n) for s, n in zip(d.seg_sources, seg_counts)] + [
        (s, "tag", n) for s, n in zip(d.tag_sources, tag_counts)
    ]


def build_training_sources(cfg: Config, vocab: Vocabulary, report: bool = True) -> list[_SourceSpec]:
    """The datasets of every training source with their per-step global counts (sources with 0 dropped)."""
    d = cfg.data
    specs = []
    for index, (source, role, n) in enumerate(source_batches(d)):
        if n == 0:
            continue
        built = build_source_checked(source, d, vocab, role)
        if built.problems and report:  # every rank finds the same problems: one of them says so
            log.warning(
                "source %s: skipped %d files (skip_bad); first: %s", source.name, len(built.problems), built.problems[0]
            )
        specs.append(_SourceSpec(source, role, index, built.dataset, n))
    if not specs:
        raise ValueError("no training source: data.seg_sources and data.tag_sources give 0 images per step")
    return specs


class MixedLoader:
    """Iterates :class:`StepBatch` for this rank from ``start_step`` on (forever, or until ``stop_step``).

    ``skipped``: source name -> problems of samples skipped while loading (only with skip_bad).
    """

    def __init__(
        self,
        cfg: Config,
        vocab: Vocabulary,
        rank: int,
        world_size: int,
        start_step: int = 0,
        pin_memory: bool = False,
        stop_step: int | None = None,
    ) -> None:
        self.cfg, self.start_step = cfg, start_step
        self.specs = build_training_sources(cfg, vocab, report=rank == 0)
        self.skipped: dict[str, list[str]] = {s.config.name: [] for s in self.specs}
        d = cfg.data
        self.loaders = []
        for spec in self.specs:
            transform = train_transform(spec.config, d)
            schedule = SourceSchedule(len(spec.dataset), spec.per_step, cfg.train.seed, spec.index)
            if isinstance(spec.dataset, ShardStream):
                if start_step:  # the interrupted run's layout is not recorded: say what exactness needs
                    log.info(
                        "note: streamed source %s resumes at step %d exactly only if the interrupted run also had "
                        "%d processes and data.num_workers=%d",
                        spec.config.name,
                        start_step,
                        world_size,
                        d.num_workers,
                    )
                self.loaders.append(
                    torch.utils.data.DataLoader(
                        _StreamSteps(
                            _Samples(spec, transform),
                            _Collate(spec),
                            schedule,
                            rank,
                            world_size,
                            d.num_workers,
                            start_step,
                            stop_step,
                        ),
                        batch_size=None,
                        collate_fn=_as_is,
                        num_workers=d.num_workers,
                        pin_memory=pin_memory,
                        persistent_workers=d.num_workers > 0,
                    )
                )
                continue
            self.loaders.append(
                torch.utils.data.DataLoader(
                    _Samples(spec, transform),
                    batch_sampler=_StepSampler(schedule, rank, world_size, start_step, stop_step),
                    collate_fn=_Collate(spec),
                    num_workers=d.num_workers,
                    pin_memory=pin_memory,
                    persistent_workers=d.num_workers > 0,
                )
            )

    def start_at(self, step: int) -> None:
        """Iterate from ``step`` on (a resumed run); call before iterating. Batches are a function of the
        step alone, so starting at t gives exactly the batches an uninterrupted run sees from t on."""
        self.start_step = step
        for loader in self.loaders:
            if isinstance(loader.dataset, _StreamSteps):  # streamed shards: skips its streams' samples
                loader.dataset.start = step
                if step:  # the interrupted run's layout is not recorded
                    log.info(
                        "note: a streamed source resumes at step %d exactly only if the interrupted run had "
                        "the same number of processes and data.num_workers",
                        step,
                    )
            else:
                cast(_StepSampler, loader.batch_sampler).start = step  # every other loader has one

    def __iter__(self) -> Iterator[StepBatch]:
        iterators = [iter(loader) for loader in self.loaders]
        for step in count(self.start_step):
            seg: list[SegBatch] = []
            tag: list[TagBatch] = []
            for spec, it in zip(self.specs, iterators):
                try:
                    data = next(it)
                except StopIteration:
                    return
                batch, skipped = make_batch(spec, data), data["skipped"]
                if skipped:
                    self.skipped[spec.config.name].extend(skipped)
                    log.warning(
                        "step %d: skipped %d unreadable samples of %s: %s",
                        step,
                        len(skipped),
                        spec.config.name,
                        skipped[0],
                    )
                if isinstance(batch, SegBatch):  # make_batch's type follows spec.role
                    seg.append(batch)
                else:
                    tag.append(batch)
            yield StepBatch(step, seg, tag)
