"""Exact argmax of bilinearly resized logits on a GPU: dense, in class chunks x pixel tiles, bf16 GEMMs,
and an exact float32 re-check of the pixels whose best two classes are too close for them to order.

The quantity is that of ``larvseg.models.bounded_argmax``: per class c, out_c = R L_c C^T with R
(H_out, H_f), C (W_out, W_f) non-negative, rows summing to 1. The bounded path evaluates few values but
in many small kernels with host-side bookkeeping: on a GPU, where the ViT-B forward takes ~10 ms, that
bookkeeping dominated (21,843 vs 150 classes cost 12.6x on an H200). Evaluating every class at every
pixel is 2 N H_out W_out W_f FLOPs (0.7 TFLOP at 512 x 512 and 21,843 classes): a few ms of bf16 tensor
cores. So, with no host synchronisation inside the loop (every shape is known in advance):

1. per chunk of ``CLASS_CHUNK`` classes: T = R L_chunk in float32 (the small GEMM), split into two bf16
   terms T_hi + T_lo (T_hi = bf16(T), T_lo = bf16(T - T_hi): together 16 significant bits); C alike
   when bf16 does not hold it exactly (x16 bilinear upsampling weights are multiples of 1/32: exact);
2. per tile of output rows: V = T_hi C_hi^T + T_lo C_hi^T (+ T_hi C_lo^T), bf16 GEMMs with float32
   accumulation and float32 output (``torch.mm(..., out_dtype=float32)`` on CUDA, reduced-precision
   reductions off; on the CPU the same products of bf16 values accumulated in float32), (k, rows,
   W_out); its best and second-best value over the chunk's classes are merged into running (best,
   second, index) maps in float32. A later chunk takes a pixel only if strictly better: ties keep the
   lower class.
3. Every approximate value is within ``err = max|L| (ERR_UNITS 2^-18 + 2 (H_f + W_f + 4) 2^-24)`` of the
   value computed in float32 (the dropped terms T_lo C_lo, the roundings of T_lo and C_lo, each at most
   2^-18 relative on values bounded by max|L| since the maps are convex combinations; float32
   accumulation in both computations). Where best - second > 2 err the approximate argmax is the exact
   one. The other pixels (near-ties: exact ties, or classes within ~1e-5 relative: 0.1 % of the pixels
   for a random 21,843-class classifier, 0.01 % for a trained-like one; with one bf16 term instead of
   two, 37 % and 8 %: docs/PERFORMANCE.md row N1) are evaluated again in float32 at every class, as broadcast multiply-adds over each
   pixel's support (identical classes get identical values), and take the first maximum in class
   order: ties go to the lowest class, as torch.argmax.

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
TILE_ELEMS = 1 << 25  # classes x output pixels per tile (128 MB of float32)
ERR_UNITS = 4  # bound of the split's error in units of 2^-18 max|L| (3 terms + margin; the module doc)
RECHECK_ELEMS = 1 << 24  # classes x pixels x support values per block of the exact re-check


@contextlib.contextmanager
def _float32_accumulation(device: torch.device):
    """cuBLAS may reduce bf16 GEMMs in bf16 (split-K) and run float32 GEMMs in TF32 if allowed: both off
    here, as the error bound assumes float32 arithmetic. CPU GEMMs accumulate in float32."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    before = flags.allow_bf16_reduced_precision_reduction, flags.allow_tf32
    flags.allow_bf16_reduced_precision_reduction, flags.allow_tf32 = False, False
    try:
        yield
    finally:
        flags.allow_bf16_reduced_precision_reduction, flags.allow_tf32 = before


def _merge(best: Tensor, second: Tensor, idx: Tensor, vals: Tensor, offset: int) -> None:
    """Merge a chunk's (k, rows, W) values into the running best / second / index maps (in place)."""
    v1, i1 = vals.max(0)  # first maximum: the lowest class of the chunk
    if vals.shape[0] > 1:
        v2 = vals.scatter(0, i1[None], float("-inf")).max(0).values
    else:
        v2 = torch.full_like(best, float("-inf"))
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


def _mm_float32(a: Tensor, b: Tensor) -> Tensor:
    """bf16 (m, k) @ (k, n) with float32 accumulation and output."""
    if a.is_cuda and hasattr(torch.ops.aten.mm, "dtype"):  # cuBLAS bf16 GEMM writing float32 (torch >= 2.8)
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # the same exact products of bf16 values, accumulated in float32


def split_values(t: Tensor, c_hi: Tensor, c_lo: Tensor | None) -> Tensor:
    """(k, rows, W_out) float32 values of T C^T for a (k, rows, W_f) float32 tile of T, from the bf16
    split of T and C (``split_c``): within ``error_bound`` of the float32 values."""
    k, rows, wf = t.shape
    t_hi = t.to(torch.bfloat16)
    t_lo = (t - t_hi.float()).to(torch.bfloat16)  # the difference is exact in float32
    a_hi, a_lo = t_hi.reshape(-1, wf), t_lo.reshape(-1, wf)
    vals = _mm_float32(a_hi, c_hi) + _mm_float32(a_lo, c_hi)
    if c_lo is not None:
        vals += _mm_float32(a_hi, c_lo)
    return vals.view(k, rows, -1)


def split_c(c32: Tensor) -> tuple[Tensor, Tensor | None]:
    """C^T (W_f, W_out) as bf16 hi + lo; lo is None where bf16 holds C exactly (one host sync)."""
    hi = c32.T.contiguous().to(torch.bfloat16)
    rest = c32.T - hi.float()
    return hi, (rest.to(torch.bfloat16) if bool(rest.any()) else None)


def error_bound(logits: Tensor) -> Tensor:
    """Bound of |split_values - float32 values| for maps with rows summing to 1 (the module doc, 3.)."""
    _, hf, wf = logits.shape
    return logits.abs().max() * (ERR_UNITS * 2.0**-18 + 2 * (hf + wf + 4) * 2.0**-24)


@torch.no_grad()
def chunked_argmax(
    logits: Tensor,
    r: Tensor,
    c: Tensor,
    compute_dtype: torch.dtype = torch.bfloat16,
    class_chunk: int = CLASS_CHUNK,
    tile_elems: int = TILE_ELEMS,
) -> tuple[Tensor, dict[str, float]]:
    """argmax over classes of R L_c C^T at every output pixel: (H_out, W_out) int64 class positions.

    ``logits`` (N, H_f, W_f) float32; ``r`` (H_out, H_f), ``c`` (W_out, W_f) non-negative with rows
    summing to 1 (any float dtype). ``compute_dtype``: bfloat16 (split GEMMs + re-check, see the module
    doc) or float32 (float32 GEMMs, no re-check: the dense reference in tiles). Also returns
    {"near_ties": pixels re-checked in float32}."""
    if compute_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"compute_dtype must be bfloat16 or float32, got {compute_dtype}")
    device = logits.device
    n = logits.shape[0]
    h_out, w_out = r.shape[0], c.shape[0]
    r32, c32 = r.to(device, torch.float32), c.to(device, torch.float32)
    low = compute_dtype == torch.bfloat16
    c_hi, c_lo = split_c(c32) if low else (c32.T, None)
    k = max(1, min(class_chunk, n))
    rows = max(1, min(h_out, tile_elems // (k * w_out)))
    best = torch.full((h_out, w_out), float("-inf"), device=device)
    second = torch.full((h_out, w_out), float("-inf"), device=device)
    idx = torch.zeros((h_out, w_out), dtype=torch.long, device=device)
    with _float32_accumulation(device):
        for a in range(0, n, k):  # loops over class chunks and row tiles only: shapes known, no host sync
            t = torch.matmul(r32, logits[a : a + k])  # (k, H_out, W_f) float32
            for y in range(0, h_out, rows):
                tile = t[:, y : y + rows]
                vals = split_values(tile, c_hi, c_lo) if low else torch.matmul(tile, c_hi)  # (k, rows, W_out)
                _merge(best[y : y + rows], second[y : y + rows], idx[y : y + rows], vals, a)
    if not low:
        return idx, {"near_ties": 0.0}
    ys, xs = ((best - second) <= 2 * error_bound(logits)).nonzero(as_tuple=True)  # the one host sync after the loop
    if ys.numel():
        idx[ys, xs] = exact_values_argmax(logits, r32, c32, ys, xs)
    return idx, {"near_ties": float(ys.numel())}
