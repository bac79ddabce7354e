"""``larvseg eval``: mIoU / mAcc / aAcc of a checkpoint on the config's evaluation set.

    larvseg eval CONFIG CHECKPOINT [key=value ...] [--eval mIoU] [--classes NAMES] [--out DIR]
    torchrun --nproc_per_node N -m larvseg.cli eval ...      (or tools/dist_test.sh)

Images are sharded across ranks (rank r takes the r-th contiguous chunk, as the training data), each
rank predicts its images with whole-image or sliding-window inference (``cfg.eval``), restricted to
the evaluation classes, at the resolution of the label, and accumulates a confusion matrix on its
device with bincount; the matrices are summed across ranks (integers, so N processes give exactly the
numbers of one). The per-class table is logged (INFO: rank 0 shows it); rank 0 writes ``eval_results.json``,
``eval_per_class.csv`` and ``confusion.npy`` (eval order; last row/column = "other", see
larvseg.eval.confusion).

``eval.classes`` (or ``--classes``: comma-separated names or a file) restricts both the prediction and
the scored classes to a subset of the evaluation set (how the demo scores its 14 trained classes).
Classes absent from the ground truth and never predicted are left out of the means (nan) and printed
as one collapsed line. With ``data.eval.skip_bad=true`` an unreadable image is skipped and counted
(``skipped_images``) instead of stopping the run.

``Evaluator(cfg, vocab)`` holds one config's evaluation (dataset, scored classes, base/novel split, built
once on first use); ``run(segmenter)`` and ``overlays(segmenter, n)`` are what ``larvseg eval``, the
training loop (``larvseg train`` hands it one) and the demo call. ``evaluate(cfg, segmenter, vocab)`` is one
run of a fresh Evaluator.

Headline numbers use the MMSegmentation convention (what the paper reports); the Detectron2
convention is reported alongside under ``detectron2/...``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from larvseg import atomic, distributed
from larvseg.config import IGNORE_INDEX, Config, load_config
from larvseg.data.class_query import ClassQuery, resolve_query
from larvseg.data.eval_dataset import build_eval_dataset
from larvseg.data.io import DataError
from larvseg.data.overlay import Prediction, class_areas, palette, render_overlay
from larvseg.data.sources import base_novel_split, build_vocabulary
from larvseg.data.transforms import to_chw
from larvseg.data.vocabulary import Vocabulary, class_terms
from larvseg.domains import require_writable
from larvseg.eval.confusion import ConfusionAccumulator, compute_metrics
from larvseg.models.inference import segment_image
from larvseg.models.io import load_segmenter
from larvseg.models.model_repo import (
    EVAL_RESULTS,  # written last by save_results: its presence means the evaluation finished
)
from larvseg.models.segmenter import Segmenter
from larvseg.progress import progress_bar
from larvseg.tensorboard import OVERLAY_IMAGES, log_evaluation
from larvseg.threads import configure_threads

log = logging.getLogger(__name__)

SUPPORTED_METRICS = ("mIoU",)  # --eval of the original's dist_test.sh; mIoU brings mAcc and aAcc too
SUMMARY_KEYS = ("mIoU", "mAcc", "aAcc")
GROUPS = ("", "_base", "_novel")


class _EvalItems(torch.utils.data.Dataset):
    """The eval dataset's items for the indices of this rank, as model-ready tensors. With ``skip_bad``
    an unreadable item comes back as (None, None, problem) and is counted, not evaluated."""

    def __init__(self, dataset: Any, indices: np.ndarray, skip_bad: bool = False) -> None:
        self.dataset, self.indices, self.skip_bad = dataset, indices, skip_bad

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
        try:
            item = self.dataset.load(int(self.indices[k]))
        except DataError as exc:
            if not self.skip_bad:
                raise
            return None, None, str(exc)
        if item.get("label") is None:
            raise ValueError(f"{item.get('path', self.indices[k])}: evaluation image without a label map")
        label = torch.from_numpy(np.asarray(item["label"]).astype(np.int64))
        return torch.from_numpy(to_chw(item["image"])), label, str(item.get("path", ""))


def shard_indices(n: int, rank: int, world_size: int) -> np.ndarray:
    """Rank r's contiguous chunk of 0..n-1 (numpy.array_split, as the training data)."""
    return np.array_split(np.arange(n), world_size)[rank]


def _model_class_ids(eval_ids: np.ndarray, num_model_classes: int) -> np.ndarray:
    """Eval classes the model can score; an eval class beyond the checkpoint's vocabulary is never
    predicted (it still counts in the mean, with IoU 0 where it occurs)."""
    return eval_ids[eval_ids < num_model_classes]


def scored_classes(cfg: Config, vocab: Any) -> tuple[np.ndarray, np.ndarray]:
    """Union ids of the evaluation classes and their base mask, restricted to ``eval.classes`` when set."""
    eval_ids, base_mask = base_novel_split(vocab, cfg)
    eval_ids = np.asarray(eval_ids, dtype=np.int64)
    if cfg.eval.classes:  # eval.classes / --classes: predict and score these classes only
        keep = _class_query(cfg, vocab, eval_ids).class_ids
        eval_ids, base_mask = eval_ids[keep], np.asarray(base_mask, dtype=bool)[keep]
    return eval_ids, np.asarray(base_mask, dtype=bool)


def _class_query(cfg: Config, vocab: Any, eval_ids: np.ndarray) -> ClassQuery:
    """``eval.classes`` over the evaluation set's classes: names, WordNet lemmas, wnids; a concept ``word*``
    selects every evaluation class at or below it, each scored on its own (ground-truth classes are not merged)."""
    return resolve_query(
        class_terms(cfg.eval.classes), [vocab.names[i] for i in eval_ids], "the evaluation set's classes"
    )


class Evaluator:
    """The evaluation of one config, built once: the evaluation dataset (``cfg.data.eval``), the scored
    classes (``cfg.eval.classes`` when set) and their base/novel split, for ``vocab``'s union ids.

    ``run(segmenter)`` scores a segmenter on it, ``overlays(segmenter, n)`` draws its predictions of the
    first ``n`` images. ``larvseg eval``, the training loop (handed one by ``larvseg train``) and the demo
    share it. The dataset and the classes are built on first use (once), so an evaluator that is never
    run reads nothing.
    """

    def __init__(self, cfg: Config, vocab: Any) -> None:
        self.cfg, self.vocab = cfg, vocab

    @functools.cached_property
    def dataset(self) -> Any:
        """The evaluation dataset (larvseg.data.eval_dataset.EvalDataset)."""
        return build_eval_dataset(self.cfg, self.vocab)

    @functools.cached_property
    def classes(self) -> tuple[np.ndarray, np.ndarray]:
        """Union ids of the scored classes and their base mask (``scored_classes``)."""
        return scored_classes(self.cfg, self.vocab)

    @torch.no_grad()
    def run(
        self,
        segmenter: torch.nn.Module,
        *,
        out_dir: str | Path | None = None,
        max_images: int = 0,
        keep_predictions: int = 0,
        verbose: bool = True,
    ) -> dict[str, Any]:
        """Evaluate ``segmenter`` (on its device); call on every rank.

        Returns, on every rank, the scalar metrics in percent (``mIoU``, ``mAcc``, ``aAcc``, each also with
        ``_base`` / ``_novel``, the same under ``detectron2/``), ``num_images`` and ``per_class`` (a list of
        dicts: class, union_id, base, IoU, Acc, detectron2_IoU, gt_pixels, pred_pixels; NaN = left out).
        ``max_images`` (or ``cfg.eval.max_images``; 0 = all) evaluates the first images only.
        ``cfg.eval.classes`` restricts prediction and metrics to these evaluation classes; ground-truth pixels
        of the other classes then count as unlabeled. ``keep_predictions`` > 0 also returns, under
        ``predictions``, this rank's first ``keep_predictions`` items as dicts (path, image uint8 HxWx3,
        label and prediction as int64 union ids). Rank 0 shows progress and the table is logged (INFO)
        unless ``verbose`` is False; with ``out_dir`` rank 0 writes JSON, CSV and the matrix there.
        """
        cfg, vocab = self.cfg, self.vocab
        device = next(segmenter.parameters()).device
        dataset = self.dataset
        eval_ids, base_mask = self.classes
        if cfg.eval.classes and verbose:  # which sense a word took, concepts' sizes
            for note in _class_query(cfg, vocab, base_novel_split(vocab, cfg)[0]).notes:
                log.info("note: %s", note)
        limit = max_images or cfg.eval.max_images
        n = min(len(dataset), limit) if limit else len(dataset)
        rank, world = distributed.rank(), distributed.world_size()
        items = _EvalItems(dataset, shard_indices(n, rank, world), cfg.data.eval.skip_bad)
        workers = min(cfg.data.num_workers, len(items))
        loader = torch.utils.data.DataLoader(items, batch_size=None, shuffle=False, num_workers=workers)

        num_model_classes = getattr(segmenter, "num_classes", len(vocab))
        class_ids = torch.from_numpy(_model_class_ids(eval_ids, num_model_classes)).to(device)
        acc = ConfusionAccumulator(eval_ids, device=device)
        restrict = torch.from_numpy(eval_ids).to(device) if cfg.eval.classes else None
        kept: list[dict[str, Any]] = []
        was_training = segmenter.training
        segmenter.eval()
        start = time.perf_counter()
        skipped: list[str] = []
        for image, label, path in progress_bar(
            loader,
            total=len(items),
            desc="eval",
            unit="img",
            dynamic_ncols=True,
            disable=not (verbose and distributed.is_main_process()),
        ):
            if image is None:  # unreadable, data.eval.skip_bad
                skipped.append(path)
                log.warning("skipped an evaluation image (data.eval.skip_bad): %s", path)
                continue
            pred = segment_image(
                segmenter,
                image.to(device, non_blocking=True),
                cfg.eval,
                class_ids=class_ids,
                out_size=tuple(label.shape[-2:]),
            )
            label = label.to(device, non_blocking=True)
            if restrict is not None:  # pixels of the classes left out count as unlabeled
                label = torch.where(torch.isin(label, restrict), label, IGNORE_INDEX)
            acc.update(pred, label)
            if len(kept) < keep_predictions:
                kept.append(
                    {
                        "path": path,
                        "image": image.permute(1, 2, 0).numpy(),
                        "label": label.cpu().numpy(),
                        "prediction": pred.cpu().numpy(),
                    }
                )
        segmenter.train(was_training)
        matrix = acc.reduce().cpu()
        num_skipped = int(distributed.all_reduce_sum(torch.tensor([len(skipped)], device=device)).item())

        names = list(vocab.names)
        results = summarise(matrix, eval_ids, base_mask, [names[i] for i in eval_ids])
        results["num_images"] = n - num_skipped
        results["skipped_images"] = num_skipped
        results["seconds"] = time.perf_counter() - start
        if keep_predictions:
            results["predictions"] = kept
        if verbose:
            log.info("%s", format_table(results))
        if out_dir is not None and distributed.is_main_process():
            save_results(results, matrix, Path(out_dir))
        return results

    @torch.no_grad()
    def overlays(self, segmenter: Segmenter, count: int = OVERLAY_IMAGES) -> list[np.ndarray]:
        """Overlays (image blended with the predicted classes, legend on the right) of the first ``count``
        evaluation images, predicted over the scored classes as ``run`` predicts."""
        dataset = self.dataset
        eval_ids = _model_class_ids(self.classes[0], segmenter.num_classes)  # as run() predicts
        device = next(segmenter.parameters()).device
        class_ids = torch.as_tensor(eval_ids, device=device)
        names = list(self.vocab.names)
        colours = palette(len(names))
        was_training = segmenter.training
        segmenter.eval()
        drawn = []
        for i in range(min(count, len(dataset))):
            image = np.asarray(dataset.load(i)["image"])
            labels = (
                segment_image(segmenter, torch.from_numpy(to_chw(image)), self.cfg.eval, class_ids=class_ids)
                .cpu()
                .numpy()
            )
            drawn.append(render_overlay(image, Prediction(labels, names, class_areas(labels, names)), colours))
        segmenter.train(was_training)
        return drawn


def evaluate(cfg: Config, segmenter: torch.nn.Module, vocab: Any, **options: Any) -> dict[str, Any]:
    """``Evaluator(cfg, vocab).run(segmenter, **options)``: one evaluation, for a caller that evaluates once."""
    return Evaluator(cfg, vocab).run(segmenter, **options)


def summarise(matrix: torch.Tensor, eval_ids: np.ndarray, base_mask: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Flat scalar metrics of both conventions and the per-class rows."""
    base_mask = np.asarray(base_mask, dtype=bool)
    mm = compute_metrics(matrix, base_mask, "mmseg")
    d2 = compute_metrics(matrix, base_mask, "detectron2")
    out: dict[str, Any] = {}
    for key in SUMMARY_KEYS:
        for group in GROUPS:
            out[key + group] = mm[key + group]
    for key in SUMMARY_KEYS:
        for group in GROUPS:
            out[f"detectron2/{key}{group}"] = d2[key + group]
    m = matrix.numpy()
    e = len(eval_ids)
    gt, pred = m[:e].sum(1), m[:, :e].sum(0)
    out["per_class"] = [
        {
            "class": names[k],
            "union_id": int(eval_ids[k]),
            "base": bool(base_mask[k]),
            "IoU": float(mm["IoU"][k]),
            "Acc": float(mm["Acc"][k]),
            "detectron2_IoU": float(d2["IoU"][k]),
            "gt_pixels": int(gt[k]),
            "pred_pixels": int(pred[k]),
        }
        for k in range(e)
    ]
    out["other_pixels"] = int(m[:e, e].sum())  # predictions outside the eval vocabulary
    return out


def _fmt(v: float) -> str:
    return "   nan" if math.isnan(v) else f"{v:6.2f}"


def format_table(results: dict[str, Any], max_names: int = 8) -> str:
    """The per-class table; classes absent from the ground truth and never predicted (left out of every
    mean) are one collapsed line instead of a row of nan each."""
    idle = [r for r in results["per_class"] if r["gt_pixels"] == 0 and r["pred_pixels"] == 0]
    rows = [r for r in results["per_class"] if r["gt_pixels"] or r["pred_pixels"]]
    width = min(32, max([5] + [len(r["class"]) for r in rows]))
    lines = [f"{'class':<{width}}  split   IoU    Acc", "-" * (width + 22)]
    for r in rows:
        lines.append(
            f"{r['class'][:width]:<{width}}  {'base ' if r['base'] else 'novel'} {_fmt(r['IoU'])} {_fmt(r['Acc'])}"
        )
    if idle:
        names = ", ".join(r["class"] for r in idle[:max_names]) + (", ..." if len(idle) > max_names else "")
        lines.append(
            f"({len(idle)} classes absent from the ground truth and never predicted, left out of the means: {names})"
        )
    lines.append("-" * (width + 22))
    for key in SUMMARY_KEYS:
        lines.append(
            f"{key:<5} all {_fmt(results[key])}  base {_fmt(results[key + '_base'])}  "
            f"novel {_fmt(results[key + '_novel'])}   (detectron2: {_fmt(results['detectron2/' + key])})"
        )
    skipped = results.get("skipped_images", 0)
    lines.append(
        f"{results['num_images']} images{f' ({skipped} unreadable, skipped)' if skipped else ''}, "
        f"mmseg convention (union 0 left out); "
        f"{results['other_pixels']} pixels predicted outside the eval vocabulary"
    )
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN: null = class left out of the mean
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def save_results(results: dict[str, Any], matrix: torch.Tensor, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "eval_per_class.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results["per_class"][0]))
        writer.writeheader()
        writer.writerows(results["per_class"])
    np.save(out_dir / "confusion.npy", matrix.numpy())
    atomic.write_text(out_dir / EVAL_RESULTS, json.dumps(_json_safe(results), indent=1, ensure_ascii=False))


def main(args: argparse.Namespace) -> int:
    unsupported = [m for m in args.metrics if m not in SUPPORTED_METRICS]
    if unsupported:
        raise SystemExit(
            f"larvseg eval: unsupported --eval metric(s) {unsupported}; supported: {list(SUPPORTED_METRICS)}"
        )
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "classes", None):
        cfg.eval.classes = args.classes
    device = distributed.init_from_env(cfg.train.device)
    out_dir = (
        Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / f"eval_{Path(args.checkpoint).stem}"
    )
    require_writable(out_dir, "output folder (--out)")  # before the evaluation, not after it
    try:
        # The checkpoint's architecture and vocabulary order define the model; the command's config
        # defines what to evaluate on. Eval classes missing from the checkpoint's vocabulary are appended
        # (the model cannot predict them).
        loaded = load_segmenter(args.checkpoint, device)
        segmenter, names = loaded.segmenter, loaded.class_names
        if device.type == "cpu":
            configure_threads(segmenter, cfg.eval.threads or cfg.train.threads)
        vocab = Vocabulary.union(names, build_vocabulary(cfg).names)
        if len(vocab) != len(names):
            log.info("note: %d classes of the config are not in the checkpoint's vocabulary", len(vocab) - len(names))
        evaluator = Evaluator(cfg, vocab)
        results = evaluator.run(segmenter, out_dir=out_dir)
        if distributed.is_main_process():
            log_evaluation(cfg, out_dir, loaded.step, results, lambda: evaluator.overlays(segmenter, OVERLAY_IMAGES))
            print(f"results written to {out_dir}")
    finally:
        distributed.cleanup()
    return 0
