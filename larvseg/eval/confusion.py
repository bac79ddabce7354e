"""Confusion matrix on the device (one ``torch.bincount`` per image) and the mIoU-family metrics.

Layout: ``matrix[g, p]`` counts pixels whose ground truth is class ``g`` and whose prediction is ``p``
(rows = ground truth, columns = prediction), both as *eval indices* 0..E-1 (positions in the
evaluation vocabulary, e.g. the 847 ADE classes), not union ids.

Predictions outside the evaluation vocabulary: a model with a larger vocabulary (e.g. the 21K model,
or a COCO-only class predicted on ADE) can emit a union id that is no eval class. Such pixels go to an
extra **"other" column** E: they are wrong for the ground-truth class (they count in its row sum, hence
in its union and its accuracy denominator) and are a prediction of no eval class (they count in no
column sum of 0..E-1). The matrix therefore has E+1 rows and columns; its last row counts ground-truth
pixels that are no eval class, which must stay empty (the data layer maps labels into the eval
vocabulary), and :func:`compute_metrics` refuses a matrix where it is not.

Metric conventions (IoU and Acc per class, then means):

* ``mmseg`` (MMSegmentation 0.x, what the paper reports; docs/METHOD.md section 5): IoU = TP / (GT + Pred - TP)
  accumulated over the whole set; a class with union 0 is NaN and left out of the mean, so a class
  predicted somewhere but absent from the ground truth counts as IoU 0. Acc = TP / GT, NaN where GT = 0.
* ``detectron2``: every class absent from the ground truth is left out (IoU and Acc NaN), even if it
  was predicted.

aAcc is the fraction of all labelled pixels predicted correctly. All values are percentages (0-100),
as in the papers' tables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from larvseg.config import IGNORE_INDEX
from larvseg.distributed import all_reduce_sum


def confusion_matrix(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, ``[label, pred]``, of the pixels whose label is not ``ignore_index``.

    ``pred`` and ``label`` are integer tensors of the same shape on any device; every non-ignored pixel
    must have both values in ``[0, num_classes)`` (ValueError otherwise: an out-of-range value would
    silently land in a neighbouring row). One bincount over ``label * num_classes + pred``; no loop.
    """
    if pred.shape != label.shape:
        raise ValueError(f"confusion_matrix: pred {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    valid = label != ignore_index
    pred = pred[valid].long()
    label = label[valid].long()
    if pred.numel():
        # one small reduction (a single sync on GPU, which bincount needs anyway to size its output)
        lo, hi = torch.stack([torch.minimum(pred.min(), label.min()), torch.maximum(pred.max(), label.max())]).tolist()
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"confusion_matrix: values must lie in [0, {num_classes}) outside ignored pixels, got range [{lo}, {hi}]"
            )
    counts = torch.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


class ConfusionAccumulator:
    """Accumulates the (E+1, E+1) confusion matrix of union-id predictions over an evaluation set.

    ``eval_class_ids``: the union ids of the E evaluation classes, in eval order. Labels and predictions
    are handed in as union ids; a lookup table on the device maps them to eval indices (any other id
    -> the "other" index E). ``reduce()`` sums the matrix over ranks.
    """

    def __init__(
        self,
        eval_class_ids: Sequence[int] | np.ndarray | torch.Tensor,
        device: torch.device | str = "cpu",
        ignore_index: int = IGNORE_INDEX,
    ):
        ids = torch.as_tensor(np.asarray(eval_class_ids), dtype=torch.long)
        if ids.ndim != 1 or ids.numel() == 0:
            raise ValueError("eval_class_ids must be a non-empty 1-D list of union ids")
        if ids.min() < 0 or len(torch.unique(ids)) != len(ids):
            raise ValueError("eval_class_ids must be distinct, non-negative union ids")
        self.num_classes = int(ids.numel())  # E
        self.other = self.num_classes  # index of the "other" row/column
        self.ignore_index = ignore_index
        self.device = torch.device(device)
        # lookup table over union ids 0..max(eval id); ids beyond it are "other" as well
        self._lut = torch.full((int(ids.max()) + 1,), self.other, dtype=torch.long)
        self._lut[ids] = torch.arange(self.num_classes)
        self._lut = self._lut.to(self.device)
        self.matrix = torch.zeros(self.num_classes + 1, self.num_classes + 1, dtype=torch.long, device=self.device)

    def to_eval_index(self, union_ids: torch.Tensor) -> torch.Tensor:
        """Union ids -> eval indices; ids that are no eval class -> E ("other"). Ignore stays ignore."""
        union_ids = union_ids.to(self.device).long()
        n = self._lut.numel()
        known = (union_ids >= 0) & (union_ids < n)
        mapped = self._lut[union_ids.clamp(0, n - 1)]
        mapped = torch.where(known, mapped, torch.full_like(mapped, self.other))
        return torch.where(union_ids == self.ignore_index, union_ids, mapped)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add one image (or a batch): ``pred`` and ``label`` are union ids of the same shape."""
        self.matrix += confusion_matrix(
            self.to_eval_index(pred), self.to_eval_index(label), self.num_classes + 1, self.ignore_index
        )

    def reduce(self) -> torch.Tensor:
        """Sum over ranks (in place; a no-op in one process); returns the matrix."""
        return all_reduce_sum(self.matrix)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _per_class_mmseg(tp: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    iou = _safe_div(tp, gt + pred - tp)  # union 0 -> NaN; predicted but absent -> 0
    acc = _safe_div(tp, gt)
    return iou, acc


def _per_class_detectron2(tp: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    iou, acc = _per_class_mmseg(tp, gt, pred)
    iou[gt == 0] = np.nan  # absent from the ground truth -> left out, even if predicted
    return iou, acc


PER_CLASS_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    "mmseg": _per_class_mmseg,
    "detectron2": _per_class_detectron2,
}


def _nanmean(values: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN if there are none (without numpy's warning)."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


def compute_metrics(
    matrix: torch.Tensor | np.ndarray, base_mask: Sequence[bool] | np.ndarray | None = None, convention: str = "mmseg"
) -> dict:
    """Metrics of an (E+1, E+1) matrix from :class:`ConfusionAccumulator` (last row/column: "other").

    Returns percentages: ``IoU`` and ``Acc`` (per class, length E, NaN = left out), ``mIoU``, ``mAcc``,
    ``aAcc``, and with ``base_mask`` (bool, length E) the same three for ``_base`` and ``_novel``
    classes (aAcc of a group: its classes' correctly predicted pixels over their labelled pixels).
    """
    if convention not in PER_CLASS_METRICS:
        raise ValueError(f"unknown metric convention {convention!r}; choose one of {sorted(PER_CLASS_METRICS)}")
    m = matrix.detach().cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        raise ValueError(f"expected an (E+1, E+1) confusion matrix, got shape {m.shape}")
    m = m.astype(np.float64)
    e = m.shape[0] - 1
    if m[e].sum() > 0:
        raise ValueError(
            f"{int(m[e].sum())} labelled pixels have a class outside the evaluation vocabulary; "
            "labels must be mapped into the eval classes (or IGNORE_INDEX) before evaluation"
        )
    tp = np.diag(m)[:e]
    gt = m[:e].sum(axis=1)  # includes predictions in the "other" column
    pred = m[:, :e].sum(axis=0)
    iou, acc = PER_CLASS_METRICS[convention](tp, gt, pred)
    out: dict = {"convention": convention, "IoU": iou * 100, "Acc": acc * 100}
    groups = {"": np.ones(e, dtype=bool)}
    if base_mask is not None:
        base = np.asarray(base_mask, dtype=bool)
        if base.shape != (e,):
            raise ValueError(f"base_mask has shape {base.shape}, expected ({e},)")
        groups.update({"_base": base, "_novel": ~base})
    for suffix, sel in groups.items():
        out[f"mIoU{suffix}"] = _nanmean(iou[sel]) * 100
        out[f"mAcc{suffix}"] = _nanmean(acc[sel]) * 100
        labelled = gt[sel].sum()
        out[f"aAcc{suffix}"] = float(tp[sel].sum() / labelled * 100) if labelled > 0 else float("nan")
    return out
