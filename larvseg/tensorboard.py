"""TensorBoard event files in the work dir, next to ``metrics.jsonl`` (which stays the source of truth).

    tensorboard --logdir work_dirs/            # every run, side by side

Written with ``tensorboardX`` (small: numpy + protobuf; ``torch.utils.tensorboard`` would need the full
``tensorboard`` package and its server dependencies). Optional: ``pip install "larvseg[tensorboard]"``;
on by default when installed (``train.tensorboard=false`` turns it off). Tags:

    train/<term>       every loss term of the JSONL record (loss, seg/<source>, cls/<source>, cac/<source>)
    train/lr, train/images_per_s
    eval/<metric>      mIoU, mIoU_base, mIoU_novel, mAcc, aAcc, ... (the JSONL eval record)
    curve              the training-curve PNG, each time it is redrawn
    eval/prediction_<k>  overlays of the first ``OVERLAY_IMAGES`` evaluation images with a legend
                       (larvseg.eval.evaluate.Evaluator.overlays)

``larvseg eval`` writes the same eval/ scalars and overlays, at the checkpoint's step, into its output folder.
This module sits in the bottom layer (it imports only numpy and tensorboardX) so that the training loop's
logger and ``larvseg eval`` share it without importing each other.

A resumed run passes its start step as ``purge_step``, so TensorBoard drops the events that the killed
run wrote after its last checkpoint, as the JSONL does.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

OVERLAY_IMAGES = 3  # evaluation images drawn as overlays (training and `larvseg eval`)


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboardX") is not None


class TensorBoardLog:
    """A thin writer: scalars and HxWx3 uint8 images at a step."""

    def __init__(self, log_dir: str | Path, start_step: int = 0) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=start_step or None, flush_secs=30)

    def scalars(self, prefix: str, step: int, values: dict[str, Any]) -> None:
        for key, value in values.items():
            # NaN (e.g. mIoU_novel when no novel class is scored) has no point to plot; tensorboardX would
            # print "NaN or Inf found in input tensor." for each
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}{key}", float(value), step)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def log_images(
    log: TensorBoardLog, tag: str, step: int, images: Sequence[np.ndarray] | Callable[[], Sequence[np.ndarray]]
) -> None:
    for k, image in enumerate(images() if callable(images) else images):
        log.image(f"{tag}_{k}", step, image)


def log_evaluation(
    cfg: Any, out_dir: str | Path, step: int, results: dict[str, Any], images: Callable[[], Sequence[np.ndarray]]
) -> Path | None:
    """``larvseg eval``'s metrics and overlays as TensorBoard events in ``out_dir`` (when enabled and installed)."""
    if not (cfg.train.tensorboard and tensorboard_available()):
        return None
    log = TensorBoardLog(out_dir)
    log.scalars("eval/", step, results)
    log_images(log, "eval/prediction", step, images)
    log.close()
    return Path(out_dir)
