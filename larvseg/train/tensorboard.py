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

``larvseg eval`` writes the same eval/ scalars and overlays, at the checkpoint's step, into its output folder.

A resumed run passes its start step as ``purge_step``, so TensorBoard drops the events that the killed
run wrote after its last checkpoint, as the JSONL does.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

OVERLAY_IMAGES = 3


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboardX") is not None


class TensorBoardLog:
    """A thin writer: scalars and HxWx3 uint8 images at a step."""

    def __init__(self, log_dir: str | Path, start_step: int = 0) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=start_step or None, flush_secs=30)

    def scalars(self, prefix: str, step: int, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}{key}", float(value), step)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def eval_overlays(cfg: Any, segmenter: Any, vocab: Any, count: int = OVERLAY_IMAGES) -> list[np.ndarray]:
    """Overlays (image blended with the predicted classes, legend on the right) of the first ``count``
    evaluation images, predicted over the evaluation classes as ``larvseg eval`` does."""
    import torch

    from larvseg.data.mixing import build_eval_dataset
    from larvseg.eval.evaluate import _model_class_ids, scored_classes
    from larvseg.models.inference import segment_image
    from larvseg.predict import Prediction, class_areas, image_to_tensor, palette, render_overlay

    dataset = build_eval_dataset(cfg, vocab)
    eval_ids, _ = scored_classes(cfg, vocab)
    eval_ids = _model_class_ids(eval_ids, segmenter.num_classes)  # as larvseg eval predicts
    device = next(segmenter.parameters()).device
    class_ids = torch.as_tensor(eval_ids, device=device)
    names = list(vocab.names)
    colours = palette(len(names))
    was_training = segmenter.training
    segmenter.eval()
    overlays = []
    e = cfg.eval
    with torch.no_grad():
        for i in range(min(count, len(dataset))):
            image = np.asarray(dataset.load(i)["image"])
            labels = segment_image(segmenter, image_to_tensor(image).to(device), class_ids=class_ids, mode=e.mode,
                                   crop_size=e.crop_size, stride=e.stride, amp=e.amp).cpu().numpy()
            overlays.append(render_overlay(image, Prediction(labels, names, class_areas(labels, names)), colours))
    segmenter.train(was_training)
    return overlays


def log_images(log: TensorBoardLog, tag: str, step: int, images: Sequence[np.ndarray] | Callable[[], Sequence[np.ndarray]]) -> None:
    for k, image in enumerate(images() if callable(images) else images):
        log.image(f"{tag}_{k}", step, image)


def log_evaluation(cfg: Any, out_dir: str | Path, step: int, results: dict[str, Any],
                   images: Callable[[], Sequence[np.ndarray]]) -> Path | None:
    """``larvseg eval``'s metrics and overlays as TensorBoard events in ``out_dir`` (when enabled and installed)."""
    if not (cfg.train.tensorboard and tensorboard_available()):
        return None
    log = TensorBoardLog(out_dir)
    log.scalars("eval/", step, results)
    log_images(log, "eval/prediction", step, images)
    log.close()
    return Path(out_dir)
