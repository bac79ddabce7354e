"""The evaluation source as ``larvseg eval`` and the training loop's evaluation read it: images resized for
inference (``eval.short_side``, ``eval.max_long_side``), labels at their own resolution."""

from __future__ import annotations

import logging
from typing import Any

import torch

from larvseg.config import Config
from larvseg.data.datasets import SourceDataset
from larvseg.data.sources import build_source_checked
from larvseg.data.transforms import eval_resize
from larvseg.data.vocabulary import Vocabulary

log = logging.getLogger(__name__)


class EvalDataset(torch.utils.data.Dataset):
    """The evaluation source with images resized for inference (labels stay at their resolution)."""

    def __init__(self, dataset: SourceDataset, short_side: int, max_long_side: int) -> None:
        self.dataset, self.short_side, self.max_long_side = dataset, short_side, max_long_side
        self.class_ids, self.class_names, self.name = dataset.class_ids, dataset.class_names, dataset.name

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset.load(index))
        item["image"] = eval_resize(item["image"], self.short_side, self.max_long_side)
        return item

    __getitem__ = load


def build_eval_dataset(cfg: Config, vocab: Vocabulary) -> EvalDataset:
    """Items: image (uint8 RGB, resized so the short side is eval.short_side), label (uint16 union ids at
    the original resolution), path."""
    built = build_source_checked(cfg.data.eval, cfg.data, vocab, "eval")
    if built.problems:
        log.warning(
            "eval source %s: skipped %d files; first: %s", cfg.data.eval.name, len(built.problems), built.problems[0]
        )
    return EvalDataset(built.dataset, cfg.eval.short_side, cfg.eval.max_long_side)
