"""The demo's pre-registered checks of the paper's claim: the rules, and the arithmetic on collected counts.

The rule, fixed before any number (docs/CLAIM.md gives the reasons); ``CLAIM_RULE`` is the text the
report prints before the numbers, and :func:`claim_verdict` computes exactly it:

- **P1 premise** (segmentation-only model): seed-point feature propagation, as the authors' oracle
  notebook: one ground-truth point per segment of an evaluation image, every other patch labelled by
  its most similar seed feature (cosine); mIoU of novel classes / mIoU of base classes. Holds if >= 0.8.
- **P2 target failure** (baseline model, image-level training images): the share of the tag's habitat
  patches predicted as the tag, against the share of the other background patches (every non-tag patch
  of a class outside the tag's habitat), novel tags. Holds if the habitat share is at least 1.5 x the
  other share (habitat share > 0).
- **M mechanism** (LarvSeg model, image-level training images): within-image ROC-AUC of the CAC attention
  and of the classifier's own score for the tag, object vs the other patches of the generator's mask,
  averaged per image, per class, then over novel classes. Reported: attention - classifier (holds if > 0).
- **U upper bound**: the same training with the attention replaced by the object's true mask, paired
  difference with the baseline as for LarvSeg.
- **Delta**: LarvSeg - baseline novel mIoU, paired by seed, mean and its 95 % Student-t interval.
  *supported* if the interval's lower bound > 0; *not reproduced at this scale* if P1 and P2 hold, the
  lower bound <= 0 and the upper bound < +6.0 (the paper's ADE-150 gain is excluded); *inconclusive*
  otherwise, naming the condition that failed.
- **Base**: LarvSeg's and the baseline's base mIoU within 3 points of segmentation only, beside the verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

P1_MIN_RATIO = 0.8
P2_MIN_RATIO = 1.5
PAPER_GAIN = 6.0  # LarvSeg - baseline on ADE-150 in the paper (mIoU points)
BASE_TOLERANCE = 3.0
CONFIDENCE = 0.95

CLAIM_RULE = (
    f"P1 holds if novel/base mIoU of seed-point propagation >= {P1_MIN_RATIO}; P2 holds if the baseline predicts the tag on "
    f"the tag's habitat patches at least {P2_MIN_RATIO} x as often as on the other background patches (novel tags); "
    f"M is the mean over novel classes of the within-image AUC of the CAC attention minus that of the classifier (holds "
    f"if > 0). Delta = LarvSeg - baseline novel mIoU paired by seed, mean with its {CONFIDENCE:.0%} Student-t interval "
    f"[lo, hi]. Verdict: *supported* if lo > 0; *not reproduced at this scale* if P1 and P2 hold, lo <= 0 and "
    f"hi < +{PAPER_GAIN:.1f} (the paper's ADE-150 gain); *inconclusive* otherwise, naming the failed condition. Base: "
    f"baseline and LarvSeg base mIoU within {BASE_TOLERANCE:.0f} points of segmentation only, reported beside the verdict."
)


# ----------------------------------------------------------------------------------------------
# Student-t interval (numpy only)


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (Simpson's rule on the density; error < 1e-9)."""
    if t < 0:
        return 1.0 - t_cdf(-t, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    # substitute x = atan(t'): the density in x is smooth and bounded on [0, atan(t)]
    x = np.linspace(0.0, math.atan(t), 4001)
    u = np.tan(x)
    f = np.exp(log_c - (df + 1) / 2 * np.log1p(u * u / df)) * (1.0 + u * u)
    h = x[1] - x[0]
    integral = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 0.5 + float(integral)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t (bisection on t_cdf), for 0.5 <= p < 1."""
    if not 0.5 <= p < 1.0 or df < 1:
        raise ValueError(f"t_quantile: need 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Interval:
    mean: float
    lo: float  # NaN with fewer than 2 values
    hi: float
    n: int
    values: list[float]

    def text(self) -> str:
        if self.n < 2:
            return f"{self.mean:+.2f} (n = {self.n}: no interval)"
        return f"{self.mean:+.2f}, {CONFIDENCE:.0%} interval [{self.lo:+.2f}, {self.hi:+.2f}] (n = {self.n})"


def t_interval(values: list[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and the two-sided Student-t confidence interval of the mean (sample std, n - 1 df)."""
    arr = np.asarray(values, dtype=np.float64)
    n = int(arr.size)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, [])
    mean = float(arr.mean())
    if n < 2:
        return Interval(mean, float("nan"), float("nan"), n, arr.tolist())
    half = t_quantile(0.5 + confidence / 2, n - 1) * float(arr.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, arr.tolist())


# ----------------------------------------------------------------------------------------------
# The verdict


def claim_verdict(delta: Interval, p1_holds: bool, p2_holds: bool) -> tuple[str, str]:
    """(verdict, reason) by the rule of the module docstring."""
    if delta.n < 2:
        return "inconclusive", f"only {delta.n} paired seed(s): no interval"
    if delta.lo > 0:
        return "supported", f"lower bound {delta.lo:+.2f} > 0"
    failed = [
        text
        for ok, text in (
            (p1_holds, "P1 (premise) does not hold"),
            (p2_holds, "P2 (target failure) does not hold"),
            (
                delta.hi < PAPER_GAIN,
                f"upper bound {delta.hi:+.2f} >= +{PAPER_GAIN:.1f}: the paper's gain is not excluded",
            ),
        )
        if not ok
    ]
    if not failed:
        return "not reproduced at this scale", (
            f"P1 and P2 hold, lower bound {delta.lo:+.2f} <= 0 and upper bound {delta.hi:+.2f} < +{PAPER_GAIN:.1f}"
        )
    return "inconclusive", f"lower bound {delta.lo:+.2f} <= 0, and " + "; ".join(failed)


# ----------------------------------------------------------------------------------------------
# P1: seed-point propagation


def segments(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(class, boolean mask) of every 4-connected segment of a (h, w) map of class indices (-1 = none)."""
    import cv2

    out = []
    for c in np.unique(labels[labels >= 0]):
        n, comp = cv2.connectedComponents((labels == c).astype(np.uint8), connectivity=4)
        out += [(int(c), comp == k) for k in range(1, n)]
    return out


def propagate_seeds(features: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Seed-point propagation on one image: (D, h, w) L2-normalised features, (h, w) class indices (-1 =
    unlabeled) -> (h, w) predicted classes: one random point per segment, every patch takes the class of
    its most similar seed (cosine)."""
    d, h, w = features.shape
    segs = segments(labels)
    if not segs:
        return np.full((h, w), -1, dtype=np.int64)
    flat = features.reshape(d, -1)
    seeds = [int(rng.choice(np.flatnonzero(mask))) for _, mask in segs]
    classes = np.array([c for c, _ in segs], dtype=np.int64)
    similarity = flat[:, seeds].T @ flat  # (segments, hw)
    return classes[similarity.argmax(0)].reshape(h, w)


def confusion(pred: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """(n, n) counts of (ground truth, prediction) over labelled positions."""
    keep = labels >= 0
    return np.bincount(labels[keep] * n + pred[keep], minlength=n * n).reshape(n, n)


def class_iou(conf: np.ndarray) -> np.ndarray:
    """Per-class IoU (%) from a confusion matrix; NaN for a class absent from ground truth and prediction."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, 100.0 * tp / union, np.nan)


@dataclass
class PremiseResult:
    iou: list[float]  # per class, seed-point propagation
    miou_base: float
    miou_novel: float

    @property
    def ratio(self) -> float:
        return self.miou_novel / self.miou_base if self.miou_base > 0 else float("nan")


def premise(conf: np.ndarray, base_mask: np.ndarray) -> PremiseResult:
    iou = class_iou(conf)
    return PremiseResult(iou.tolist(), float(np.nanmean(iou[base_mask])), float(np.nanmean(iou[~base_mask])))


# ----------------------------------------------------------------------------------------------
# P2: the tag predicted on its habitat


def habitat_counts(pred: np.ndarray, labels: np.ndarray, tag: int, habitat: tuple[int, ...]) -> np.ndarray:
    """[habitat patches predicted as the tag, habitat patches, other background patches predicted as the
    tag, other background patches] of one image-level image (patches labelled with a class; not the tag's)."""
    background = (labels >= 0) & (labels != tag)
    in_habitat = background & np.isin(labels, habitat)
    other = background & ~in_habitat
    as_tag = pred == tag
    return np.array(
        [(in_habitat & as_tag).sum(), in_habitat.sum(), (other & as_tag).sum(), other.sum()], dtype=np.int64
    )


@dataclass
class TargetFailure:
    habitat_share: float  # % of habitat patches predicted as the tag
    other_share: float  # % of the other background patches predicted as the tag

    @property
    def holds(self) -> bool:
        return self.habitat_share > 0 and self.habitat_share >= P2_MIN_RATIO * self.other_share


def target_failure(counts: np.ndarray) -> TargetFailure:
    """From summed :func:`habitat_counts`."""
    pct = lambda a, b: 100.0 * a / b if b else float("nan")  # noqa: E731
    return TargetFailure(pct(counts[0], counts[1]), pct(counts[2], counts[3]))


# ----------------------------------------------------------------------------------------------
# M: within-image AUC


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney ROC-AUC with tied scores counted half; NaN without both classes."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # average rank (1-based) of each distinct value: ties share the mean of their ranks
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0
    rank_sum = avg_rank[inverse][positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def within_image_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC-AUC of one image's patch scores for "the patch is the tagged object" (ties count half)."""
    return roc_auc(np.asarray(scores, dtype=np.float64).ravel(), np.asarray(positive, dtype=bool).ravel())


def per_class_mean(values: list[float], classes: list[int], n: int) -> np.ndarray:
    """Mean of per-image values by class (NaN values and classes without images: NaN)."""
    v, c = np.asarray(values, dtype=np.float64), np.asarray(classes, dtype=np.int64)
    ok = ~np.isnan(v)
    sums = np.bincount(c[ok], weights=v[ok], minlength=n)
    counts = np.bincount(c[ok], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


__all__ = [
    "BASE_TOLERANCE",
    "CLAIM_RULE",
    "Interval",
    "P1_MIN_RATIO",
    "P2_MIN_RATIO",
    "PAPER_GAIN",
    "PremiseResult",
    "TargetFailure",
    "claim_verdict",
    "class_iou",
    "confusion",
    "habitat_counts",
    "per_class_mean",
    "premise",
    "propagate_seeds",
    "roc_auc",
    "segments",
    "t_cdf",
    "t_interval",
    "t_quantile",
    "target_failure",
    "within_image_auc",
]
