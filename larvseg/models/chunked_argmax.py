"""Exact argmax of bilinearly resized logits on a GPU: dense, in class chunks x pixel tiles, bf16 GEMMs,
and an exact float32 re-check of the pixels whose best two classes are too close for bf16 to order.

The quantity is that of ``larvseg.models.bounded_argmax``: per class c, out_c = R L_c C^T with R
(H_out, H_f), C (W_out, W_f) non-negative, rows summing to 1. The bounded path evaluates few values but
in many small kernels with host-side bookkeeping: on a GPU, where the ViT-B forward takes ~10 ms, that
bookkeeping dominated (21,843 vs 150 classes cost 12.6x on an H200). Evaluating every class at every
pixel is 2 N H_out W_out W_f FLOPs (0.7 TFLOP at 512 x 512 and 21,843 classes): a few ms of bf16 tensor
cores. So, with no host synchronisation inside the loop (every shape is known in advance):

1. per chunk of ``CLASS_CHUNK`` classes: T = R L_chunk in float32 (the small GEMM), rounded to bf16;
2. per tile of output rows: V = T_tile C^T, a bf16 GEMM (float32 accumulation: reduced-precision
   reductions are switched off for it), (k, rows, W_out) in bf16; its best and second-best value over
   the chunk's classes are merged into running (best, second, index) maps in float32. A later chunk
   takes a pixel only if strictly better: ties keep the lower class.
3. Every approximate value is within ``err = ERR_UNITS * 2^-9 * max|L|`` of the float32 value (roundings
   of T, of C and of V, each at most 2^-9 relative for round-to-nearest bf16, on values bounded by
   max|L| since the maps are convex combinations; float32 accumulation adds ~2^-24 per term; ERR_UNITS
   = 4 covers three roundings with margin). Where best - second > 2 err, the approximate argmax is the
   exact one. The other pixels (near-ties, exact ties included) are evaluated again in float32 at every
   class, as broadcast multiply-adds over each pixel's support (identical classes get identical
   values), and take the first maximum in class order: ties go to the lowest class, as torch.argmax.

``compute_dtype=torch.float32`` runs the same loop in float32 with no re-check (err = 0): the dense
reference in pixel tiles. Memory: the logits, T (k x H_out x W_f), one tile of ``TILE_ELEMS`` values
and the running maps; the re-check runs in blocks of ``RECHECK_ELEMS``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from larvseg.models.bounded_argmax import row_support

CLASS_CHUNK = 256  # classes per GEMM: 86 chunks for 21,843 classes
TILE_ELEMS = 1 << 26  # classes x output pixels per tile (128 MB of bf16)
ERR_UNITS = 4  # error bound of one approximate value, in units of 2^-9 max|L| (see the module doc)
RECHECK_ELEMS = 1 << 24  # classes x pixels x support values per block of the exact re-check


@contextlib.contextmanager
def _float32_accumulation(device: torch.device):
    """cuBLAS may reduce bf16 GEMMs in bf16 (split-K) unless told not to; CPU GEMMs accumulate in float32."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    before = flags.allow_bf16_reduced_precision_reduction
    flags.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        flags.allow_bf16_reduced_precision_reduction = before


def _merge(best: Tensor, second: Tensor, idx: Tensor, vals: Tensor, offset: int) -> None:
    """Merge a chunk's (k, rows, W) values into the running best / second / index maps (in place)."""
    v1, i1 = vals.max(0)  # first maximum: the lowest class of the chunk
    if vals.shape[0] > 1:
        v2 = vals.scatter(0, i1[None], float("-inf")).max(0).values.float()
    else:
        v2 = torch.full_like(best, float("-inf"))
    v1 = v1.float()
    better = v1 > best  # strict: an earlier (lower) class keeps a tie
    second.copy_(torch.maximum(torch.minimum(best, v1), torch.maximum(second, v2)))
    idx.copy_(torch.where(better, i1 + offset, idx))
    best.copy_(torch.maximum(best, v1))


def exact_values_argmax(logits: Tensor, r: Tensor, c: Tensor, ys: Tensor, xs: Tensor) -> Tensor:
    """argmax over classes of out_c at the pixels (ys, xs), in float32 from each pixel's support: first
    maximum in class order. Broadcast multiply-adds (no fused kernels): identical classes, identical values."""
    n = logits.shape[0]
    sr, wr = row_support(r.float())
    sc, wc = row_support(c.float())
    sr, wr, sc, wc = sr[ys], wr[ys], sc[xs], wc[xs]  # (P, Pr), (P, Pc)
    p_r, p_c = sr.shape[1], sc.shape[1]
    best = torch.full(ys.shape, float("-inf"), device=logits.device)
    idx = torch.zeros(ys.shape, dtype=torch.long, device=logits.device)
    chunk = max(1, RECHECK_ELEMS // max(1, ys.numel() * p_r * p_c))
    for a in range(0, n, chunk):
        m = logits[a : a + chunk][:, sr[:, :, None], sc[:, None, :]]  # (k, P, Pr, Pc)
        t = m[..., 0] * wc[None, :, None, 0]  # (k, P, Pr)
        for j in range(1, p_c):
            t = t + m[..., j] * wc[None, :, None, j]
        val = t[..., 0] * wr[None, :, 0]  # (k, P)
        for i in range(1, p_r):
            val = val + t[..., i] * wr[None, :, i]
        v, i_ = val.max(0)
        better = v > best
        best = torch.where(better, v, best)
        idx = torch.where(better, i_ + a, idx)
    return idx


@torch.no_grad()
def chunked_argmax(logits: Tensor, r: Tensor, c: Tensor, compute_dtype: torch.dtype = torch.bfloat16,
                   class_chunk: int = CLASS_CHUNK, tile_elems: int = TILE_ELEMS) -> tuple[Tensor, dict[str, float]]:
    """argmax over classes of R L_c C^T at every output pixel: (H_out, W_out) int64 class positions.

    ``logits`` (N, H_f, W_f) float32; ``r`` (H_out, H_f), ``c`` (W_out, W_f) non-negative with rows
    summing to 1 (any float dtype). Also returns {"near_ties": pixels re-checked in float32}."""
    device = logits.device
    n, _, wf = logits.shape
    h_out, w_out = r.shape[0], c.shape[0]
    r32, c32 = r.to(device, torch.float32), c.to(device, torch.float32)
    c_low = c32.to(compute_dtype)
    k = max(1, min(class_chunk, n))
    rows = max(1, min(h_out, tile_elems // (k * w_out)))
    best = torch.full((h_out, w_out), float("-inf"), device=device)
    second = torch.full((h_out, w_out), float("-inf"), device=device)
    idx = torch.zeros((h_out, w_out), dtype=torch.long, device=device)
    with _float32_accumulation(device):
        for a in range(0, n, k):  # loops over class chunks and row tiles only: shapes known, no host sync
            t = torch.matmul(r32, logits[a : a + k]).to(compute_dtype)  # (k, H_out, W_f)
            for y in range(0, h_out, rows):
                vals = torch.matmul(t[:, y : y + rows], c_low.T)  # (k, rows, W_out)
                _merge(best[y : y + rows], second[y : y + rows], idx[y : y + rows], vals, a)
    if compute_dtype == torch.float32:
        return idx, {"near_ties": 0.0}
    err = ERR_UNITS * 2.0**-9 * logits.abs().max()
    ys, xs = ((best - second) <= 2 * err).nonzero(as_tuple=True)  # the one host sync: how many to re-check
    if ys.numel():
        idx[ys, xs] = exact_values_argmax(logits, r32, c32, ys, xs)
    return idx, {"near_ties": float(ys.numel())}
