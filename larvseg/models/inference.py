"""Whole-image and sliding-window prediction, memory-bounded for vocabularies of 21,843 classes.

Semantics follow MMSegmentation 0.x ``slide_inference``: windows of ``crop_size`` on a grid of
``stride`` with the last window aligned to the border; each window's logits are bilinearly upsampled to
the window, overlapping windows are averaged, the averaged map is bilinearly resized to ``out_size``;
the prediction is the argmax. (Ours: a window smaller than a multiple of 16 — only when the image is
smaller than the crop — is zero-padded at the bottom/right, its logits upsampled to the padded size and
cropped back, so padding never shifts the geometry; MMSegmentation resizes the padded grid onto the
unpadded crop.)

Never a full-resolution N-channel tensor for large N. Every stage of the pipeline is linear in each
window's feature-resolution logits with non-negative weights that sum to one, so:

1. Per window we keep only the projected pixel features p (hw, D) and the per-pixel mean/rstd of the
   scores over all N classes (one class-chunked pass, float64 sums); the logits of any class chunk are recomputed on
   the fly: gamma * (p c^T - mean) * rstd + beta.
2. N <= ``exact_max_classes``: the pipeline runs over all classes in chunks (running max/argmax) — exact.
3. N larger: the same single pass keeps each feature pixel's 2*``topk`` best classes; candidates = union
   over windows and pixels of the per-pixel top-``topk``. Any other class has, at each feature pixel j,
   a logit <= t(j) (the best non-candidate among j's stored classes, or the last stored one); running
   the same pipeline on the single map t gives an upper bound B(x) for every non-candidate at every
   output pixel. Where the best candidate beats B, the candidate argmax is *the* argmax ("certified").
   Elsewhere (typically class boundaries) every class whose feature-resolution logit reaches the lowest
   uncertified best value somewhere is added and the fusion rerun ("expanded"; worst case all classes,
   still in bounded-memory chunks). The result is always the exact argmax
   (up to float rounding in exact ties).

Peak memory (float32 elements), besides the backbone: chunk * (canvas + output pixels) <=
``chunk_elems`` (default 2^22, 16 MB) for the fusion, N x D class vectors (67 MB for 21,843 x 768),
and per window p (hw x D) plus a (hw x chunk) score block. A 512x512 image with 21,843 classes needs
about 0.5 GB; a full-resolution logit tensor would need 23 GB.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from larvseg.config import EvalConfig, check_amp
from larvseg.models.bilinear import bilinear_resize_hwc
from larvseg.models.cosine_classifier import STANDARDIZE_EPS

EXACT_MAX_CLASSES = 1024  # below this the candidate step is skipped (exact pass over all classes)
TOPK = 8  # per-pixel candidates for large vocabularies
CHUNK_ELEMS = 1 << 22  # bound on chunk * pixels of the fused canvases (16 MB: measured fastest on CPU)
SCORE_CHUNK = 4096  # classes per block when computing per-window score statistics


def autocast_context(amp: str, device: torch.device):
    """"off" | "bf16" (torch.autocast bfloat16 on cpu or cuda) | "auto" (bf16 on CUDA when supported, else off).

    "auto" stays off on CPU: on this project's CPU (2-vCPU Xeon with avx512_bf16 but no AMX) bf16
    autocast made a ViT-B/16 forward at 512x512 *slower* (0.58x the images/s of float32;
    benchmarks/bench_inference.py, docs/PERFORMANCE.md). Ask for "bf16" explicitly on a CPU with AMX."""
    check_amp(amp)
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if not use:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) windows of MMSegmentation's slide inference."""
    h_grids = max(height - crop + stride - 1, 0) // stride + 1
    w_grids = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for i in range(h_grids):
        for j in range(w_grids):
            y1, x1 = i * stride, j * stride
            y2, x2 = min(y1 + crop, height), min(x1 + crop, width)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


@dataclass
class _Window:
    box: tuple[int, int, int, int]
    padded_hw: tuple[int, int]
    feat_hw: tuple[int, int]
    p: Tensor  # (hw, D) float32
    mean: Tensor  # (hw,)
    rstd: Tensor  # (hw,)


class _Scorer:
    """Feature-resolution logits of any class slice, for every window.

    One pass over the classes per window (the pass is the cost at 21K classes: hw x N x D MACs) gathers
    the per-pixel sum and sum of squares of the raw scores (for the classifier's standardisation) and,
    when ``keep_top`` > 0, each pixel's ``keep_top`` highest-scoring classes."""

    def __init__(self, segmenter, image: Tensor, boxes, class_vecs: Tensor, amp: str, keep_top: int = 0,
                 progress: Callable[[int, int], None] | None = None) -> None:
        clf = segmenter.classifier
        self.c = class_vecs
        self.gamma, self.beta = float(clf.gamma), float(clf.beta)
        self.sign = 1.0 if self.gamma >= 0 else -1.0  # logits are monotone in sign * s per pixel
        self.windows: list[_Window] = []
        self.top: list[tuple[Tensor, Tensor]] = []  # per window: (hw, keep_top) raw scores and class positions
        n = class_vecs.shape[0]
        for box in boxes:
            y1, y2, x1, x2 = box
            crop = image[:, y1:y2, x1:x2]
            ph, pw = -(-crop.shape[1] // 16) * 16, -(-crop.shape[2] // 16) * 16
            crop = F.pad(crop, (0, pw - crop.shape[2], 0, ph - crop.shape[1]))
            with autocast_context(amp, image.device):
                x = segmenter.backbone(crop[None])
            p = clf.pixel_vectors(x.float())[0]  # classifier stage in float32
            total = p.new_zeros(p.shape[0], dtype=torch.float64)
            sq = p.new_zeros(p.shape[0], dtype=torch.float64)
            vals = p.new_full((p.shape[0], 0), float("-inf"))
            idx = torch.zeros(p.shape[0], 0, dtype=torch.long, device=p.device)
            for a, blk in zip(range(0, n, SCORE_CHUNK), self._score_blocks(p, 0, n)):
                total += blk.sum(1, dtype=torch.float64)
                sq += blk.square().sum(1, dtype=torch.float64)
                if keep_top:
                    ids = torch.arange(a, a + blk.shape[1], device=blk.device).expand(blk.shape[0], -1)
                    vals, pos = torch.cat([vals, self.sign * blk], 1).topk(min(keep_top, vals.shape[1] + blk.shape[1]), dim=1)
                    idx = torch.cat([idx, ids], 1).gather(1, pos)
            mean = total / n
            var = (sq / n - mean.square()).clamp(min=0.0)  # biased variance, as the classifier; float64 sums
            rstd = torch.rsqrt(var + STANDARDIZE_EPS).float()
            self.windows.append(_Window(box, (ph, pw), tuple(x.shape[-2:]), p, mean.float(), rstd))
            self.top.append((self.sign * vals, idx))
            if progress is not None:  # the backbone pass per window is the cost: report each
                progress(len(self.windows), len(boxes))

    def _score_blocks(self, p: Tensor, start: int, stop: int):
        for a in range(start, stop, SCORE_CHUNK):
            yield p @ self.c[a : min(a + SCORE_CHUNK, stop)].T

    def _logit_of_scores(self, wi: int, s: Tensor) -> Tensor:
        """The classifier's logits from raw scores s (hw, C) of window ``wi``: gamma * standardized + beta."""
        w = self.windows[wi]
        return self.gamma * ((s - w.mean[:, None]) * w.rstd[:, None]) + self.beta

    def logits_hwc(self, wi: int, idx: Tensor) -> Tensor:
        """(h, w, len(idx)) logits of window ``wi`` for class positions ``idx``, channels-last."""
        w = self.windows[wi]
        return self._logit_of_scores(wi, w.p @ self.c[idx].T).reshape(*w.feat_hw, len(idx))

    def topk(self, wi: int, k: int) -> Tensor:
        """Per-pixel top-k class positions (hw, k), from the stored pass."""
        return self.top[wi][1][:, :k]

    def bound_outside(self, wi: int, is_cand: Tensor) -> Tensor:
        """(h, w) upper bound of the logit of every class with ``is_cand`` False: the best non-candidate
        among the pixel's stored top classes, or the last stored one (any class not stored is below it)."""
        s, idx = self.top[wi]
        logits = self._logit_of_scores(wi, s)  # (hw, keep_top), descending
        outside = logits.masked_fill(is_cand[idx], float("-inf")).max(1).values
        return torch.maximum(outside, logits[:, -1]).reshape(self.windows[wi].feat_hw)


def _fuse_max(scorer: _Scorer, channels, n: int, canvas_hw, out_hw, chunk_elems: int) -> tuple[Tensor, Tensor]:
    """Max and argmax over ``n`` channels of the slide pipeline; ``channels(wi, start, stop)`` gives a
    window's (h, w, stop - start) feature-resolution maps. Runs in class chunks, channels-last: resizes
    are matmuls and the class reduction runs over the contiguous last dim (an argmax over the leading
    dim of a (C, H, W) tensor is ~10x slower on CPU)."""
    device = scorer.c.device
    hh, ww = canvas_hw
    count = torch.zeros(hh, ww, 1, device=device)
    for w in scorer.windows:
        y1, y2, x1, x2 = w.box
        count[y1:y2, x1:x2] += 1
    single = len(scorer.windows) == 1 and scorer.windows[0].box == (0, hh, 0, ww)
    chunk = max(1, chunk_elems // (hh * ww + out_hw[0] * out_hw[1]))
    best_val = torch.full(out_hw, float("-inf"), device=device)
    best_idx = torch.zeros(out_hw, dtype=torch.long, device=device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        if single:  # whole mode: the window is the canvas
            w = scorer.windows[0]
            canvas = bilinear_resize_hwc(channels(0, start, stop), w.padded_hw)[:hh, :ww]
        else:
            canvas = torch.zeros(hh, ww, stop - start, device=device)
            for wi, w in enumerate(scorer.windows):
                y1, y2, x1, x2 = w.box
                up = bilinear_resize_hwc(channels(wi, start, stop), w.padded_hw)
                canvas[y1:y2, x1:x2] += up[: y2 - y1, : x2 - x1]
            canvas = canvas / count
        if (hh, ww) != tuple(out_hw):
            canvas = bilinear_resize_hwc(canvas.contiguous(), out_hw)
        val, arg = canvas.max(-1)  # first maximal index on ties, like argmax
        better = val > best_val  # strict: earlier (lower) class positions win ties, like argmax
        best_val = torch.where(better, val, best_val)
        best_idx = torch.where(better, arg + start, best_idx)
    return best_val, best_idx


@torch.no_grad()
def segment_image_detailed(
    segmenter,
    image: Tensor,
    *,
    class_ids: Tensor | None = None,
    mode: str = "slide",
    crop_size: int = 512,
    stride: int = 512,
    out_size: tuple[int, int] | None = None,
    amp: str = "off",
    exact_max_classes: int = EXACT_MAX_CLASSES,
    topk: int = TOPK,
    chunk_elems: int = CHUNK_ELEMS,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Tensor, str]:
    """``segment_image`` plus how the argmax was obtained: "exact", "certified" or "expanded"."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(image.shape)}")
    modes = {"whole": lambda h, w: [(0, h, 0, w)], "slide": lambda h, w: slide_windows(h, w, crop_size, stride)}
    if mode not in modes:
        raise ValueError(f"mode must be one of {sorted(modes)}, got {mode!r}")
    device = next(segmenter.parameters()).device
    image = segmenter.preprocess(image.to(device))  # before windowing: padding is 0 = the mean colour
    hh, ww = image.shape[-2:]
    out_hw = tuple(out_size) if out_size is not None else (hh, ww)
    classes = (
        torch.arange(segmenter.num_classes, device=device) if class_ids is None else class_ids.to(device).long()
    )
    if classes.numel() == 0:
        raise ValueError("class_ids is empty")
    was_training = segmenter.training
    segmenter.eval()
    try:
        keep_top = 0 if classes.numel() <= exact_max_classes else 2 * topk
        scorer = _Scorer(segmenter, image, modes[mode](hh, ww), segmenter.classifier.class_vectors(classes).float(), amp,
                         keep_top=keep_top, progress=progress)
    finally:
        segmenter.train(was_training)
    n = classes.numel()
    all_channels = lambda wi, a, b: scorer.logits_hwc(wi, torch.arange(a, b, device=device))  # noqa: E731
    if n <= exact_max_classes:
        _, idx = _fuse_max(scorer, all_channels, n, (hh, ww), out_hw, chunk_elems)
        return classes[idx], "exact"
    cand = torch.cat([scorer.topk(wi, topk).reshape(-1) for wi in range(len(scorer.windows))]).unique()  # sorted
    cand_channels = lambda wi, a, b: scorer.logits_hwc(wi, cand[a:b])  # noqa: E731
    best_val, best_idx = _fuse_max(scorer, cand_channels, cand.numel(), (hh, ww), out_hw, chunk_elems)
    # Bound for every non-candidate: the pipeline applied to a per-pixel upper bound of the non-candidates'
    # logits (from the 2k classes stored per pixel: the best non-candidate among them, or the 2k-th).
    is_cand = torch.zeros(n, dtype=torch.bool, device=device)
    is_cand[cand] = True
    outside = [scorer.bound_outside(wi, is_cand) for wi in range(len(scorer.windows))]
    bound, _ = _fuse_max(scorer, lambda wi, a, b: outside[wi][..., None], 1, (hh, ww), out_hw, chunk_elems)
    certified = best_val > bound
    if bool(certified.all()):
        return classes[cand[best_idx]], "certified"
    # Where the bound fails, a non-candidate c can only win at x if l_c(j) > best(x) at some contributing
    # feature pixel j (x's value is a convex combination of those). Adding every class whose logit
    # exceeds m = min over the uncertified x of best(x) anywhere gives a set that contains the winner of
    # every pixel: its argmax is exact (costs grow with the set, up to all classes; memory stays bounded).
    m = best_val[~certified].min()
    for wi in range(len(scorer.windows)):
        for a in range(0, n, SCORE_CHUNK):
            idx = torch.arange(a, min(a + SCORE_CHUNK, n), device=device)
            is_cand[idx] |= scorer.logits_hwc(wi, idx).flatten(0, 1).max(0).values >= m
    cand = is_cand.nonzero().squeeze(1)
    cand_channels = lambda wi, a, b: scorer.logits_hwc(wi, cand[a:b])  # noqa: E731
    _, best_idx = _fuse_max(scorer, cand_channels, cand.numel(), (hh, ww), out_hw, chunk_elems)
    return classes[cand[best_idx]], "expanded"


def segment_image(
    segmenter,
    image: Tensor,
    eval_cfg: EvalConfig | None = None,
    *,
    class_ids: Tensor | None = None,
    out_size: tuple[int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Predicted union class ids (H_out, W_out) int64 for an RGB (3, H, W) image (pixel values 0..255,
    uint8 or float; the segmenter's ``preprocess`` standardises them).

    ``eval_cfg`` (default ``EvalConfig()``) gives ``mode`` ("slide", MMSegmentation semantics, or
    "whole"), ``crop_size``, ``stride`` and ``amp`` (see ``autocast_context``). ``class_ids`` restricts
    the prediction (and the classifier's standardisation, as in training with a class subset) to these
    union ids. ``out_size``: output size (default: the image size). ``progress(done, total)`` is called
    after each window's backbone pass (progress bars for large images).
    """
    e = eval_cfg or EvalConfig()
    pred, _ = segment_image_detailed(
        segmenter, image, class_ids=class_ids, mode=e.mode, crop_size=e.crop_size, stride=e.stride,
        out_size=out_size, amp=e.amp, progress=progress,
    )
    return pred
