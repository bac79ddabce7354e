"""Whole-image and sliding-window prediction: exact argmax, memory- and time-bounded for 21,843 classes.

Semantics follow MMSegmentation 0.x ``slide_inference``: windows of ``crop_size`` on a grid of
``stride`` with the last window aligned to the border; each window's logits are bilinearly upsampled to
the window, overlapping windows are averaged, the averaged map is bilinearly resized to ``out_size``;
the prediction is the argmax. (Ours: a window smaller than a multiple of 16 — only when the image is
smaller than the crop — is zero-padded at the bottom/right, its logits upsampled to the padded size and
cropped back, so padding never shifts the geometry; MMSegmentation resizes the padded grid onto the
unpadded crop.)

That whole pipeline is, per class, one separable linear map of the windows' feature-resolution logits:
``out_c = R L_c C^T`` where L_c (H_f, W_f) places every window's feature map on one grid (the windows
form a grid of row boxes x column boxes) and R (H_out, H_f), C (W_out, W_f) are non-negative with rows
summing to 1 (upsampling, cropping, averaging and the final resize multiplied out, in float64).
``_pipeline_matrices`` builds them; then

- small problems (output pixels x classes <= ``dense_max_elems``) take the dense argmax of R L C^T in
  class chunks, as two batched matmuls per chunk;
- larger ones (large vocabularies, large outputs such as 12 MP photos) on a CPU use
  ``larvseg.models.bounded_argmax``: per cell of feature pixels, only the classes that can still win
  there after upsampling are evaluated (a bound proven from the corners of each cell), and a cell with
  one possible class is painted without evaluating its pixels. Same labels, cost about cells x classes
  plus the contested pixels;
- on a GPU, ``larvseg.models.chunked_argmax``: every class at every pixel in class chunks x pixel
  tiles, split (hi + lo) bf16 GEMMs with float32 accumulation, no host sync inside the loop, and an
  exact float32 re-check of the pixels whose best two classes are within the split's error bound.
  Same labels.

The logits come from one GEMM per window (``CosineClassifier.logits_one_gemm``: the standardisation
over classes folded in), classes first; the centred class vectors and their covariance are cached per
classifier and class set (``centered_classes``), so only the first image of a class set pays for them.

In whole mode at the image's own size (no ``out_size``, or the image's) with the dense argmax,
``segment_image`` runs ``whole_image_segmentation``: the pipeline above for one window, written so that
it traces with symbolic image sizes (``torch.export``); ``larvseg export`` traces exactly it.

Memory besides the backbone: the feature-resolution logits of every window ((N, h, w) float32: 90 MB
for one 512 x 512 window at 21,843 classes), the cached class vectors (N x D: 67 MB), the bounded
path's per-cell maxima (cells x N: 95 MB at 512 px), R and C, and chunks of ``CHUNK_ELEMS``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from larvseg.config import EvalConfig
from larvseg.models.amp_workload import vit_workload
from larvseg.models.bilinear import resize_matrix
from larvseg.models.bounded_argmax import bounded_argmax
from larvseg.models.chunked_argmax import chunked_argmax
from larvseg.models.cosine_classifier import CenteredClasses, CosineClassifier
from larvseg.precision import bf16_autocast, choose

DENSE_MAX_ELEMS = 1 << 26  # output pixels x classes up to which the dense argmax is used (512^2 x 256)
CHUNK_ELEMS = 1 << 22  # bound on output pixels x classes per chunk of the dense argmax


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


def _boxes_grid(boxes: list[tuple[int, int, int, int]]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The row boxes and column boxes of a window grid (every window is one row box x one column box)."""
    row_boxes = sorted({(y1, y2) for y1, y2, _, _ in boxes})
    col_boxes = sorted({(x1, x2) for _, _, x1, x2 in boxes})
    if len(boxes) != len(row_boxes) * len(col_boxes):
        raise ValueError("windows do not form a grid of row boxes x column boxes")
    return row_boxes, col_boxes


def upsample_crop_matrix(n_feat: int, n_out: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(n_out, n_feat): one axis of a window's feature map bilinearly upsampled x16 (align_corners=False)
    to its zero-padded size, then cropped to the window's ``n_out`` pixels. F.interpolate's own arithmetic
    on the identity; traceable with symbolic sizes (``torch.export``). Every weight is a multiple of 1/32,
    so float32 and float64 give the same values."""
    eye = torch.eye(n_feat, dtype=dtype).view(n_feat, 1, n_feat, 1)
    up = F.interpolate(eye, size=(16 * n_feat, 1), mode="bilinear", align_corners=False)
    return up[:, 0, :n_out, 0].T


def _axis_matrix(extent: int, out: int, boxes: list[tuple[int, int]]) -> Tensor:
    """(out, sum of feature sizes) float64: per box, upsample its features to the padded box, crop,
    average where boxes overlap, then resize the canvas axis (``extent``) to ``out``."""
    count = torch.zeros(extent, dtype=torch.float64)
    for y1, y2 in boxes:
        count[y1:y2] += 1
    blocks = []
    for y1, y2 in boxes:
        n_feat = -(-(y2 - y1) // 16)
        block = torch.zeros(extent, n_feat, dtype=torch.float64)
        block[y1:y2] = upsample_crop_matrix(n_feat, y2 - y1, torch.float64) / count[y1:y2, None]
        blocks.append(block)
    canvas = torch.cat(blocks, 1)
    return canvas if out == extent else resize_matrix(extent, out, dtype=torch.float64) @ canvas


def _pipeline_matrices(height: int, width: int, boxes, out_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """R (H_out, H_f) and C (W_out, W_f) of the whole slide pipeline (see the module doc)."""
    row_boxes, col_boxes = _boxes_grid(boxes)
    return _axis_matrix(height, out_hw[0], row_boxes), _axis_matrix(width, out_hw[1], col_boxes)


# per classifier: its last few class sets' CenteredClasses (most recent last). The class vectors of
# 21,843 classes cost a (N, D) x (D, D) GEMM and their covariance another: per model and class set,
# not per image (an evaluation or a benchmark alternating two class sets hits this every time).
_CLASS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
CLASS_CACHE_SETS = 4


@torch.no_grad()
def centered_classes(clf: CosineClassifier, classes: Tensor) -> CenteredClasses:
    """``CenteredClasses`` of the classifier's current weights for ``classes`` (union ids), cached
    until the weights change (in-place updates bump the tensors' version counters, a new tensor has
    another address)."""
    weights = (
        clf.class_embed._version,
        clf.class_embed.data_ptr(),
        clf.proj_class._version,
        clf.proj_class.data_ptr(),
        str(classes.device),
    )
    entries = [e for e in _CLASS_CACHE.get(clf, []) if e[0] == weights]  # stale weights: dropped
    for i, e in enumerate(entries):
        if e[1].shape == classes.shape and torch.equal(e[1], classes):
            _CLASS_CACHE[clf] = entries[:i] + entries[i + 1 :] + [e]
            return e[2]
    prepared = CenteredClasses.of(clf.class_vectors(classes).float())
    _CLASS_CACHE[clf] = (entries + [(weights, classes.clone(), prepared)])[-CLASS_CACHE_SETS:]
    return prepared


def window_logits(segmenter, window: Tensor, classes: CenteredClasses, bf16: bool = False) -> Tensor:
    """(N, ceil(h/16), ceil(w/16)) float32 logits of one standardised (3, h, w) window: zero-padded at the
    bottom/right to a multiple of 16, backbone (bf16 autocast when ``bf16``), classifier in float32 as
    one GEMM (gamma * standardize(s) + beta over ``classes``). Traceable with symbolic h, w."""
    h, w = window.shape[-2:]
    # the padded size written as 16 * ceil(x / 16), so that torch.export can prove it is a multiple of 16
    window = F.pad(window, (0, (w + 15) // 16 * 16 - w, 0, (h + 15) // 16 * 16 - h))
    with bf16_autocast(bf16, window.device):
        x = segmenter.backbone(window[None])
    p = segmenter.classifier.pixel_vectors(x.float())[0]  # (hw, D); the classifier stage in float32
    return segmenter.classifier.logits_one_gemm(p, classes).view(-1, x.shape[2], x.shape[3])


def _feature_logits(
    segmenter,
    image: Tensor,
    boxes,
    classes: CenteredClasses,
    bf16: bool,
    progress: Callable[[int, int], object] | None = None,
) -> Tensor:
    """(N, H_f, W_f) float32 logits of every window on the global feature grid (classifier in float32)."""
    row_boxes, col_boxes = _boxes_grid(boxes)
    row_at = {b: i for i, b in enumerate(row_boxes)}
    col_at = {b: j for j, b in enumerate(col_boxes)}
    hs = [-(-(y2 - y1) // 16) for y1, y2 in row_boxes]
    ws = [-(-(x2 - x1) // 16) for x1, x2 in col_boxes]
    r0 = [sum(hs[:i]) for i in range(len(hs))]
    c0 = [sum(ws[:j]) for j in range(len(ws))]
    out = None if len(boxes) == 1 else torch.empty(classes.centered.shape[0], sum(hs), sum(ws), device=image.device)
    for done, (y1, y2, x1, x2) in enumerate(boxes, 1):  # loop over windows
        logits = window_logits(segmenter, image[:, y1:y2, x1:x2], classes, bf16)
        if out is None:  # one window is the whole grid: no copy
            out = logits
        else:
            i, j = row_at[(y1, y2)], col_at[(x1, x2)]
            out[:, r0[i] : r0[i] + logits.shape[1], c0[j] : c0[j] + logits.shape[2]] = logits
        if progress is not None:  # the backbone pass per window is the cost: report each
            progress(done, len(boxes))
    if out is None:
        raise ValueError("no windows to segment")  # unreachable: every image has at least one window
    return out


def dense_argmax(
    logits: Tensor, r: Tensor, c: Tensor, chunk_elems: int = CHUNK_ELEMS, class_chunk: int | None = None
) -> Tensor:
    """argmax over classes of R L_c C^T for (N, H_f, W_f) logits, all classes at all pixels, in class
    chunks (two batched matmuls per chunk, one per class: identical classes get identical values).
    Ties: the lowest class position. Classes per chunk: ``class_chunk``, else as many as keep a chunk's
    output pixels x classes near ``chunk_elems``."""
    n, hf, wf = logits.shape
    r32, c32 = r.to(logits.device, torch.float32), c.to(logits.device, torch.float32)
    out_hw = (r.shape[0], c.shape[0])
    chunk = class_chunk or max(1, chunk_elems // (out_hw[0] * max(out_hw[1], wf)))
    best_val = torch.full(out_hw, float("-inf"), device=logits.device)
    best_idx = torch.zeros(out_hw, dtype=torch.long, device=logits.device)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        val, arg = torch.matmul(torch.matmul(r32, logits[a:b]), c32.T).max(0)  # (k, H_out, W_out) -> first max
        better = val > best_val  # strict: earlier (lower) class positions win ties, like argmax
        best_val = torch.where(better, val, best_val)
        best_idx = torch.where(better, arg + a, best_idx)
    return best_idx


def whole_image_segmentation(
    segmenter, image: Tensor, classes: CenteredClasses, *, bf16: bool = False, class_chunk: int | None = None
) -> tuple[Tensor, Tensor]:
    """Whole-image segmentation of a (3, H, W) RGB image (0..255) at its own size: (N, ceil(H/16),
    ceil(W/16)) logits and (H, W) positions into ``classes`` from the dense argmax. ``segment_image``
    runs it in whole mode when the output has the image's size and the problem is small enough for the
    dense argmax; ``larvseg export`` traces it (float32, all classes in one chunk, since the image size is
    symbolic there)."""
    x = segmenter.preprocess(image)  # zero padding after this is the mean colour
    logits = window_logits(segmenter, x, classes, bf16)
    r = upsample_crop_matrix(logits.shape[1], x.shape[1]).to(x.device)
    c = upsample_crop_matrix(logits.shape[2], x.shape[2]).to(x.device)
    return logits, dense_argmax(logits, r, c, class_chunk=class_chunk)


# the large-problem argmax paths (both exact): fewest values on CPUs, dense bf16 GEMMs on GPUs
ARGMAX_PATHS = {"bounded": bounded_argmax, "chunked": chunked_argmax}


def argmax_path(device: torch.device, elems: int, dense_max_elems: int = DENSE_MAX_ELEMS) -> str:
    """ "dense" for small problems (output pixels x classes <= dense_max_elems), else "chunked" on a GPU
    (its tensor cores evaluate every class faster than the bounded path's small kernels and host
    bookkeeping) and "bounded" on a CPU (cost about cells x classes instead of pixels x classes)."""
    if elems <= dense_max_elems:
        return "dense"
    return "chunked" if device.type == "cuda" else "bounded"


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
    dense_max_elems: int = DENSE_MAX_ELEMS,
    argmax: str = "auto",
    progress: Callable[[int, int], object] | None = None,
) -> tuple[Tensor, dict[str, float | str]]:
    """``segment_image`` plus how the argmax was taken: {"path": "dense" | "bounded" | "chunked",
    counters...}. ``argmax``: "auto" (``argmax_path``) or one of the paths, forced (tests, benchmarks)."""
    if argmax != "auto" and argmax != "dense" and argmax not in ARGMAX_PATHS:
        raise ValueError(f"argmax must be 'auto', 'dense' or one of {sorted(ARGMAX_PATHS)}, got {argmax!r}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(image.shape)}")
    modes = {"whole": lambda h, w: [(0, h, 0, w)], "slide": lambda h, w: slide_windows(h, w, crop_size, stride)}
    if mode not in modes:
        raise ValueError(f"mode must be one of {sorted(modes)}, got {mode!r}")
    device = next(segmenter.parameters()).device
    # before the backbone runs: validates amp; "auto" is measured once per machine (larvseg.precision)
    bf16 = choose(amp, device, vit_workload(segmenter.backbone, "inference"), announce=True).bf16
    image = image.to(device)
    hh, ww = image.shape[-2:]
    out_hw = (out_size[0], out_size[1]) if out_size is not None else (hh, ww)
    classes = torch.arange(segmenter.num_classes, device=device) if class_ids is None else class_ids.to(device).long()
    if classes.numel() == 0:
        raise ValueError("class_ids is empty")
    boxes = modes[mode](hh, ww)
    path = argmax if argmax != "auto" else argmax_path(device, out_hw[0] * out_hw[1] * classes.numel(), dense_max_elems)
    was_training = segmenter.training
    segmenter.eval()
    try:
        prepared = centered_classes(segmenter.classifier, classes)
        if mode == "whole" and path == "dense" and out_hw == (hh, ww):  # the function `larvseg export` traces
            _, idx = whole_image_segmentation(segmenter, image, prepared, bf16=bf16)
            if progress is not None:
                progress(1, 1)
            return classes[idx], {"path": "dense"}
        # preprocess before windowing: the windows' zero padding is the mean colour
        logits = _feature_logits(segmenter, segmenter.preprocess(image), boxes, prepared, bf16, progress)
    finally:
        segmenter.train(was_training)
    r, c = _pipeline_matrices(hh, ww, boxes, out_hw)
    if path == "dense":
        return classes[dense_argmax(logits, r.to(device), c.to(device))], {"path": "dense"}
    idx, stats = ARGMAX_PATHS[path](logits, r.to(device), c.to(device))
    return classes[idx], {"path": path, **stats}


def segment_image(
    segmenter,
    image: Tensor,
    eval_cfg: EvalConfig | None = None,
    *,
    class_ids: Tensor | None = None,
    out_size: tuple[int, int] | None = None,
    progress: Callable[[int, int], object] | None = None,
) -> Tensor:
    """Predicted union class ids (H_out, W_out) int64 for an RGB (3, H, W) image (pixel values 0..255,
    uint8 or float; the segmenter's ``preprocess`` standardises them).

    ``eval_cfg`` (default ``EvalConfig()``) gives ``mode`` ("slide", MMSegmentation semantics, or
    "whole"), ``crop_size``, ``stride`` and ``amp`` (see ``larvseg.precision``). ``class_ids`` restricts
    the prediction (and the classifier's standardisation, as in training with a class subset) to these
    union ids. ``out_size``: output size (default: the image size). ``progress(done, total)`` is called
    after each window's backbone pass (progress bars for large images).
    """
    e = eval_cfg or EvalConfig()
    pred, _ = segment_image_detailed(
        segmenter,
        image,
        class_ids=class_ids,
        mode=e.mode,
        crop_size=e.crop_size,
        stride=e.stride,
        out_size=out_size,
        amp=e.amp,
        progress=progress,
    )
    return pred
