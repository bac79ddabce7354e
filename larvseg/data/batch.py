"""The batches that flow from the data layer into the model's training objective.

One training step holds one batch per source (a source may have 0 images on a given rank). Labels
and tags are in the experiment's *union* vocabulary (larvseg.data.vocabulary.Vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TypeVar

import torch

from larvseg.config import IGNORE_INDEX

TAG_PAD = -1  # padding value of TagBatch.tags


_Batch = TypeVar("_Batch", "SegBatch", "TagBatch")


def _tensors_to(batch: _Batch, device: torch.device, non_blocking: bool) -> _Batch:
    """A copy of the dataclass ``batch`` with every tensor field on ``device`` (None fields stay None)."""
    moved = {
        f.name: getattr(batch, f.name).to(device, non_blocking=non_blocking)
        for f in fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    return replace(batch, **moved)


@dataclass
class SegBatch:
    """Images with pixel masks from one segmentation source."""

    source: str  # SourceConfig.name
    images: torch.Tensor  # (b, 3, H, W) float32 RGB pixel values (the model standardises them)
    labels: torch.Tensor  # (b, H, W) int64 union class ids, IGNORE_INDEX where unlabeled/padded
    class_ids: torch.Tensor  # (C,) int64 union ids of the source's vocabulary (pool for class sampling)
    global_size: int  # images of this source in the whole step, summed over ranks
    loss_weight: float = 1.0
    paths: list[str] = field(default_factory=list)

    def to(self, device: torch.device, non_blocking: bool = True) -> SegBatch:
        return _tensors_to(self, device, non_blocking)


@dataclass
class TagBatch:
    """Images with image-level tags from one image-level source (ImageNet-style or a tagged seg set)."""

    source: str
    images: torch.Tensor  # (b, 3, H, W) float32 RGB pixel values (the model standardises them)
    tags: torch.Tensor  # (b, T) int64 union class ids, TAG_PAD-padded; T >= 1
    class_ids: torch.Tensor  # (C,) int64 union ids of the source's vocabulary
    global_size: int
    loss_weight: float = 0.1  # lambda_cls
    cac_weight: float = 0.1  # lambda_cac
    cac_topk: int = 20  # K
    paths: list[str] = field(default_factory=list)
    # (b, H, W) bool: each image's tagged object (a source with object_masks, for the oracle attention), or None
    object_masks: torch.Tensor | None = None

    def to(self, device: torch.device, non_blocking: bool = True) -> TagBatch:
        return _tensors_to(self, device, non_blocking)


@dataclass
class StepBatch:
    """Everything one training step consumes on one rank."""

    step: int
    seg: list[SegBatch]
    tag: list[TagBatch]

    def to(self, device: torch.device) -> StepBatch:
        return StepBatch(self.step, [b.to(device) for b in self.seg], [b.to(device) for b in self.tag])


__all__ = ["IGNORE_INDEX", "TAG_PAD", "SegBatch", "TagBatch", "StepBatch"]
