"""Exact argmax of bilinearly resized logits at a cost bounded by cells x classes, not pixels x classes.

The inference pipeline (windows upsampled, averaged on the canvas, resized to the output) is, for every
class c, a *separable, non-negative, row-stochastic* map of its feature-resolution logits:

    out_c = R L_c C^T        R (H_out, H_f), C (W_out, W_f) >= 0, rows summing to 1

where L_c (H_f, W_f) holds every window's feature map on one global grid (slide windows form a grid of
row boxes x column boxes). ``larvseg.models.inference`` builds R, C and L; this module finds the argmax
over classes of out_c at every output pixel without forming out_c for all classes.

Geometry. Output rows are grouped by the set of feature rows they mix (their *support*). In a group
whose weight vectors r_Y lie, in order, on one segment (always the case for a plain bilinear resize),
any run of rows [a, b] lies between the *corner rows* a and hi (hi = b + 1 inside the group, else b). A
group that is not such a segment is split into single rows. Columns alike. On a sub-cell (row run x
column run) out_c(Y, X) = r^T M_c s with r, s moving along segments: a bilinear function of two
parameters, so its max and its min over the sub-cell are attained at the 4 corner pixels.

Algorithm (all steps vectorised over (sub-cell, class) pairs; loops only over refinement levels and
blocks of classes or sub-cells). ``logits`` are (N, H_f, W_f), classes first, as the classifier's GEMM
writes them fastest.
1. One pass over the classes in blocks of ``CLASS_CHUNK_ELEMS`` (each block transposed to classes-last
   while it is in cache): per cell (group x group) and class, the max over the cell's support feature
   pixels (an upper bound: every pixel is a convex combination of them; kept for step 3), the sum over
   them (its top classes are seeds: the best near the cell's centre), and the top classes of every
   feature pixel (seeds too).
2. Thresholds. A quadtree over each cell's seeds gives, per leaf, t = max over seeds of their min over
   the leaf's corners: a lower bound of the best value at every pixel of the leaf; t_cell = min over
   leaves.
3. Level 0: a class whose upper bound from step 1 is below t_cell cannot win in the cell.
4. Refinement: a surviving (sub-cell, class) pair of a sub-cell larger than ``DENSE_PIXELS`` is split in
   2 x 2; per child, UB = max and LB = min over its 4 corners; t_child = max over the pairs of LB; pairs
   with UB < t_child are dropped. A sub-cell with one surviving class is painted with it; a sub-cell of
   at most ``DENSE_PIXELS`` pixels evaluates its candidates at every pixel (one block of broadcast
   multiply-adds) and takes their first maximum in class order: ties go to the lowest class position,
   as torch.argmax.

Exact up to float rounding (a relative margin ``MARGIN`` keeps near-ties among the candidates). The
work is one pass over classes at feature resolution plus the candidates: for a trained model a few
classes per cell, for a random classifier about 2 % of the classes per cell at level 0, each evaluated
at the cell's pixels (16 x 16 at 512 px: cheaper than more corner levels).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

MARGIN = 1e-5  # relative slack of every pruning test: float rounding never drops a near-tied class
SEED_TOPK = 2  # seeds per support feature pixel (and of their sum) for the thresholds
SEED_DEPTH = 3  # quadtree levels over the seeds (8 x 8 leaves per cell)
PAIR_CHUNK = 1 << 18  # (sub-cell, class) pairs per vectorised block
DENSE_PIXELS = 256  # sub-cells of at most this many pixels evaluate their candidates at every pixel
DENSE_ELEMS = 1 << 21  # (sub-cell, candidate, pixel, support) values per block of that evaluation
DENSE_KEYS = 1 << 22  # sub-cell keys below this are reduced in a dense array, above it via unique
CLASS_CHUNK_ELEMS = 1 << 20  # (feature pixels + cells) x classes per block of step 1 (fits in cache)


@dataclass
class Axis:
    """One output axis: per output index its support (padded) and weights; a binary tree of runs.

    Nodes are runs [a, b] of output indices inside one group, with corners (a, mid, hi); the roots are
    the groups. ``kid[n]`` are the two halves (a single index is its own first kid, the second is -1),
    ``kid_corner[n, i]`` the positions in (a, mid, hi) of kid i's two corners."""

    support: Tensor  # (n_out, P) feature indices (padding repeats the first with weight 0)
    weights: Tensor  # (n_out, P) float32
    a: Tensor  # (nodes,) first output index
    b: Tensor  # (nodes,) last output index
    corners: Tensor  # (nodes, 3) output indices (a, mid, hi)
    kid: Tensor  # (nodes, 2)
    kid_corner: Tensor  # (nodes, 2, 2)
    roots: int  # nodes 0..roots-1 are the groups


def row_support(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of a non-negative (n_out, n_feat) matrix: its non-zero columns in order, (n_out, P) with
    P the widest row (padding repeats the first column), and their weights (padding: weight 0), in the
    matrix's dtype and device."""
    nz = matrix > 0
    width = int(nz.sum(1).max())
    order = torch.sort((~nz).to(torch.int8), dim=1, stable=True).indices[:, :width]  # support first, in order
    pad = torch.arange(width, device=matrix.device)[None] >= nz.sum(1)[:, None]
    support = torch.where(pad, order[:, :1], order)
    return support, torch.where(pad, 0.0, matrix.gather(1, support))


def build_axis(matrix: Tensor) -> Axis:
    """Groups and run tree of one axis from its (n_out, n_feat) float64 resize matrix (exact support and
    collinearity tests)."""
    if matrix.dtype != torch.float64:
        raise TypeError("build_axis needs the float64 matrix (support and collinearity are tested exactly)")
    m = matrix.cpu()
    nz = m > 0
    support, weights = row_support(m)
    new = torch.ones(m.shape[0], dtype=torch.bool)
    new[1:] = (nz[1:] != nz[:-1]).any(1)
    starts = new.nonzero().squeeze(1).tolist() + [m.shape[0]]
    runs: list[tuple[int, int]] = []
    for a, b in itertools.pairwise(starts):  # loop over groups (about 2 per feature row), not pixels
        w = weights[a:b]
        d = w[-1] - w[0]
        if b - a <= 2 or float(d.abs().max()) == 0.0:
            runs.append((a, b - 1))
            continue
        t = (w - w[0]) @ d / (d @ d)
        on_segment = float((w - w[0] - t[:, None] * d[None]).abs().max()) <= 1e-12
        if on_segment and bool((t[1:] >= t[:-1]).all()):
            runs.append((a, b - 1))
        else:  # not one segment: every index is its own group (its own corner)
            runs.extend((y, y) for y in range(a, b))
    a = torch.tensor([r[0] for r in runs])
    b = torch.tensor([r[1] for r in runs])
    hi = b.clone()
    nodes_a, nodes_b, nodes_hi, kids = [a], [b], [hi], []
    offset, level = 0, (a, b, hi)
    while True:  # one iteration per tree level (log2 of the longest group)
        a, b, hi = level
        n = a.numel()
        split = b > a
        mid = torch.where(split, (a + b + 1) // 2, a)
        k = int(split.sum())
        base = offset + n  # the next level starts after this one
        kid0 = torch.arange(offset, offset + n)  # a single index is its own first kid
        kid1 = torch.full((n,), -1, dtype=torch.long)
        new_ids = base + torch.arange(2 * k)
        kid0[split] = new_ids[0::2]
        kid1[split] = new_ids[1::2]
        kids.append(torch.stack([kid0, kid1], 1))
        if k == 0:
            break
        na = torch.stack([a[split], mid[split]], 1).reshape(-1)
        nb = torch.stack([mid[split] - 1, b[split]], 1).reshape(-1)
        nh = torch.stack([mid[split], hi[split]], 1).reshape(-1)
        nodes_a.append(na)
        nodes_b.append(nb)
        nodes_hi.append(nh)
        offset, level = offset + n, (na, nb, nh)
    a, b, hi = torch.cat(nodes_a), torch.cat(nodes_b), torch.cat(nodes_hi)
    kid = torch.cat(kids)
    mid = torch.where(b > a, (a + b + 1) // 2, a)
    kid_corner = torch.tensor([[0, 1], [1, 2]]).repeat(a.numel(), 1, 1)
    kid_corner[b == a, 0] = torch.tensor([0, 2])
    return Axis(support, weights.float(), a, b, torch.stack([a, mid, hi], 1), kid, kid_corner, len(runs))


def _axis_to(ax: Axis, device: torch.device) -> Axis:
    return Axis(
        *(
            getattr(ax, f).to(device) if isinstance(getattr(ax, f), Tensor) else getattr(ax, f)
            for f in Axis.__dataclass_fields__
        )
    )


def _corner_grid(logits: Tensor, rows: Axis, cols: Axis, ry: Tensor, cx: Tensor, cls: Tensor) -> Tensor:
    """(n, 3, 3) values of classes ``cls`` at pixels ry (n, 3) x cx (n, 3), each of a run whose support is
    that of its first index. Broadcast multiply-adds: identical classes give identical values."""
    sr, sc = rows.support[ry[:, 0]], cols.support[cx[:, 0]]  # (n, P)
    m = logits[cls[:, None, None], sr[:, :, None], sc[:, None, :]]  # (n, Pr, Pc)
    wr, wc = rows.weights[ry], cols.weights[cx]  # (n, 3, P)
    t = (m[:, None, :, :] * wc[:, :, None, :]).sum(-1)  # (n, 3 cols, Pr)
    return (wr[:, :, None, :] * t[:, None, :, :]).sum(-1)  # (n, 3 rows, 3 cols)


class _Painter:
    """The label map, filled rectangle by rectangle."""

    def __init__(self, shape: tuple[int, int], fill: int, device: torch.device) -> None:
        self.label = torch.full(shape, fill, dtype=torch.long, device=device)

    def paint(self, y0: Tensor, y1: Tensor, x0: Tensor, x1: Tensor, cls: Tensor) -> None:
        if y0.numel() == 0:
            return
        h, w = y1 - y0 + 1, x1 - x0 + 1
        area = h * w
        owner = torch.repeat_interleave(torch.arange(area.numel(), device=area.device), area)
        local = torch.arange(owner.numel(), device=area.device) - (torch.cumsum(area, 0) - area)[owner]
        self.label[y0[owner] + local // w[owner], x0[owner] + local % w[owner]] = cls[owner]


def _groups(key: Tensor, key_space: int) -> tuple[Tensor, int]:
    """A slot per distinct key for scatter reductions: the key itself when the key space is small (no
    sort), else the rank among the distinct keys."""
    if key_space <= DENSE_KEYS:
        return key, key_space
    keys, slot = torch.unique(key, return_inverse=True)
    return slot, keys.numel()


def _refine(
    logits: Tensor,
    rows: Axis,
    cols: Axis,
    pairs: tuple[Tensor, Tensor, Tensor, Tensor],
    painter: _Painter | None,
    depth: int | None,
    stats: dict[str, float],
):
    """Quadtree over (row node, column node, class, cell) pairs. With a painter it runs until every pixel
    is decided; without one it stops after ``depth`` levels and returns (cell, t) of the last level's
    sub-cells, t a lower bound of the best value over the sub-cell."""
    rn, cn, cls, cell = pairs
    n_cnodes = cols.a.numel()
    level = 0
    while cls.numel():
        if painter is not None:  # small sub-cells: every candidate at every pixel, no more corner levels
            small = (rows.b[rn] - rows.a[rn] + 1) * (cols.b[cn] - cols.a[cn] + 1) <= DENSE_PIXELS
            if bool(small.any()):
                _paint_dense(logits, rows, cols, rn[small], cn[small], cls[small], painter, stats)
                rn, cn, cls, cell = rn[~small], cn[~small], cls[~small], cell[~small]
                if cls.numel() == 0:
                    break
        parts: list[tuple[Tensor, ...]] = []
        for s in range(0, cls.numel(), PAIR_CHUNK):  # bounded memory per block of pairs
            r_, c_, k_, e_ = (
                rn[s : s + PAIR_CHUNK],
                cn[s : s + PAIR_CHUNK],
                cls[s : s + PAIR_CHUNK],
                cell[s : s + PAIR_CHUNK],
            )
            grid = _corner_grid(logits, rows, cols, rows.corners[r_], cols.corners[c_], k_).flatten(1)  # (n, 9)
            # the 2 x 2 kids at once: kid (i, j) has corners kid_corner[r, i] x kid_corner[c, j] of the 3 x 3 grid
            pos = rows.kid_corner[r_][:, :, None, :, None] * 3 + cols.kid_corner[c_][:, None, :, None, :]  # (n,2,2,2,2)
            vals = grid.gather(1, pos.flatten(1)).view(-1, 2, 2, 4)
            rk = rows.kid[r_][:, :, None].expand(-1, 2, 2)
            ck = cols.kid[c_][:, None, :].expand(-1, 2, 2)
            ok = (rk >= 0) & (ck >= 0)
            parts.append(
                (
                    rk[ok],
                    ck[ok],
                    k_[:, None, None].expand(-1, 2, 2)[ok],
                    e_[:, None, None].expand(-1, 2, 2)[ok],
                    vals.amin(-1)[ok],
                    vals.amax(-1)[ok],
                )
            )
        rn, cn, cls, cell, lb, ub = (torch.cat(x) for x in zip(*parts))
        slot, n_slots = _groups(rn * n_cnodes + cn, rows.a.numel() * n_cnodes)
        t = torch.full((n_slots,), float("-inf"), device=lb.device).scatter_reduce(0, slot, lb, "amax")[slot]
        keep = ub >= t - MARGIN * (1 + t.abs())
        rn, cn, cls, cell, slot, t = rn[keep], cn[keep], cls[keep], cell[keep], slot[keep], t[keep]
        level += 1
        stats["pairs"] = stats.get("pairs", 0.0) + float(cls.numel())
        if painter is None:
            if level == depth or bool(((rows.a[rn] == rows.b[rn]) & (cols.a[cn] == cols.b[cn])).all()):
                return cell, t
            continue
        single = torch.bincount(slot, minlength=n_slots)[slot] == 1
        painter.paint(rows.a[rn[single]], rows.b[rn[single]], cols.a[cn[single]], cols.b[cn[single]], cls[single])
        rest = ~single  # sub-cells with several candidates: split again (or evaluated densely when small)
        rn, cn, cls, cell = rn[rest], cn[rest], cls[rest], cell[rest]
    return None


def _paint_dense(
    logits: Tensor,
    rows: Axis,
    cols: Axis,
    rn: Tensor,
    cn: Tensor,
    cls: Tensor,
    painter: _Painter,
    stats: dict[str, float],
) -> None:
    """Paint sub-cells (row node rn x column node cn) with the argmax over their candidate classes
    ``cls`` (one (rn, cn, cls) triple per candidate), every pixel evaluated. Candidates are sorted by
    class inside each sub-cell and the first maximum is taken: ties go to the lowest class position.
    Values are broadcast multiply-adds, so identical classes get identical values."""
    n_cnodes = cols.a.numel()
    slot, _ = _groups(rn * n_cnodes + cn, rows.a.numel() * n_cnodes)
    order = torch.argsort(slot * logits.shape[0] + cls)  # by sub-cell, then class
    slot, cls = slot[order], cls[order]
    _, slot = torch.unique_consecutive(slot, return_inverse=True)  # 0..S-1, in order
    count = torch.bincount(slot)
    start = torch.cumsum(count, 0) - count
    first = start  # a candidate of each sub-cell: its nodes
    srn, scn = rn[order][first], cn[order][first]
    one = count == 1  # a single candidate: the whole sub-cell is that class
    painter.paint(rows.a[srn[one]], rows.b[srn[one]], cols.a[scn[one]], cols.b[scn[one]], cls[first[one]])
    multi = (~one).nonzero().squeeze(1)
    if multi.numel() == 0:
        return
    multi = multi[torch.argsort(count[multi], descending=True)]  # blocks of similar candidate counts
    hmax = int((rows.b[srn[multi]] - rows.a[srn[multi]]).max()) + 1
    wmax = int((cols.b[scn[multi]] - cols.a[scn[multi]]).max()) + 1
    p_r, p_c = rows.support.shape[1], cols.support.shape[1]
    stats["dense_values"] = stats.get("dense_values", 0.0) + float(count[multi].sum()) * hmax * wmax
    ar_h, ar_w = torch.arange(hmax, device=cls.device), torch.arange(wmax, device=cls.device)
    counts = count[multi].tolist()
    s0 = 0
    while s0 < multi.numel():  # blocks of sub-cells, each padded to its first (largest) count: bounded memory
        k = counts[s0]
        step = max(1, DENSE_ELEMS // (k * hmax * wmax * max(p_r, p_c)))
        sub = multi[s0 : s0 + step]
        s0 += step
        pos = torch.arange(k, device=cls.device)
        valid = pos[None] < count[sub][:, None]  # (S, k)
        idx = (start[sub][:, None] + pos[None]).clamp_max(cls.numel() - 1)
        # padding repeats the sub-cell's first (lowest) class: equal values after it, so never the first maximum
        kcls = torch.where(valid, cls[idx], cls[start[sub]][:, None])  # (S, k)
        r_a, r_b, c_a, c_b = rows.a[srn[sub]], rows.b[srn[sub]], cols.a[scn[sub]], cols.b[scn[sub]]
        ry = torch.minimum(r_a[:, None] + ar_h[None], r_b[:, None])  # (S, hmax) output rows (repeat the last)
        cx = torch.minimum(c_a[:, None] + ar_w[None], c_b[:, None])
        sr, sc = rows.support[r_a], cols.support[c_a]  # (S, P): the sub-cell's support
        m = logits[kcls[:, None, None, :], sr[:, :, None, None], sc[:, None, :, None]]  # (S, Pr, Pc, k)
        wr, wc = rows.weights[ry], cols.weights[cx]  # (S, hmax, Pr), (S, wmax, Pc)
        # separate multiplies and adds (no fused or blocked kernels): identical classes, identical values
        t = wc[:, None, :, 0, None] * m[:, :, None, 0, :]  # (S, Pr, wmax, k)
        for j in range(1, p_c):  # support width (2 for upsampling)
            t += wc[:, None, :, j, None] * m[:, :, None, j, :]
        val = wr[:, :, 0, None, None] * t[:, None, 0]  # (S, hmax, wmax, k)
        for i in range(1, p_r):
            val += wr[:, :, i, None, None] * t[:, None, i]
        best = kcls.gather(1, val.argmax(-1).flatten(1)).view(val.shape[:3])  # first maximum: lowest class
        inside = ((r_a[:, None] + ar_h[None]) <= r_b[:, None])[:, :, None] & (
            (c_a[:, None] + ar_w[None]) <= c_b[:, None]
        )[:, None, :]
        yy, xx = ry[:, :, None].expand_as(best), cx[:, None, :].expand_as(best)
        painter.label[yy[inside], xx[inside]] = best[inside]


@torch.no_grad()
def bounded_argmax(logits: Tensor, r: Tensor, c: Tensor) -> tuple[Tensor, dict[str, float]]:
    """argmax over classes of R L_c C^T at every output pixel: (H_out, W_out) int64 class positions.

    ``logits`` (N, H_f, W_f) float32; ``r`` (H_out, H_f) and ``c`` (W_out, W_f) float64, non-negative,
    rows summing to 1. Also returns counters (cells, level-0 pairs, refinement pairs)."""
    device = logits.device
    n, hf, wf = logits.shape
    rows, cols = _axis_to(build_axis(r), device), _axis_to(build_axis(c), device)
    gr, gc = rows.roots, cols.roots
    cell_r, cell_c = torch.meshgrid(torch.arange(gr, device=device), torch.arange(gc, device=device), indexing="ij")
    cell_r, cell_c = cell_r.reshape(-1), cell_c.reshape(-1)
    sup_r, sup_c = rows.support[rows.a[:gr]], cols.support[cols.a[:gc]]  # (G, P) per group
    stats: dict[str, float] = {"cells": float(gr * gc)}

    # 1. one pass over the classes in chunks: per cell and class, the max over the cell's support
    #    feature pixels (the level-0 upper bound, kept for step 3) and the sum over them (its top classes
    #    are seeds: the best classes near the cell's centre). Padding repeats a support pixel in the sum;
    #    seeds only tighten the threshold, any seed gives a valid one.
    k = min(SEED_TOPK, n)
    chunk = max(1, CLASS_CHUNK_ELEMS // (hf * wf + gr * gc))
    ubs, top_val, top_idx, px_val, px_idx = [], [], [], [], []
    for a in range(0, n, chunk):
        # classes last for this chunk (a transposed copy that stays in cache): the pooling below then
        # copies contiguous runs of classes, and top-k runs along the contiguous dim
        blk = logits[a : a + chunk].permute(1, 2, 0).contiguous()  # (H_f, W_f, k) for k classes
        r_max = blk.index_select(0, sup_r[:, 0])  # (Gr, W_f, k) over each group's support rows
        r_sum = r_max.clone()
        for i in range(1, sup_r.shape[1]):
            x = blk.index_select(0, sup_r[:, i])
            torch.maximum(r_max, x, out=r_max)
            r_sum += x
        ub = r_max.index_select(1, sup_c[:, 0])  # (Gr, Gc, k) over the columns too
        c_sum = r_sum.index_select(1, sup_c[:, 0])
        for j in range(1, sup_c.shape[1]):
            torch.maximum(ub, r_max.index_select(1, sup_c[:, j]), out=ub)
            c_sum += r_sum.index_select(1, sup_c[:, j])
        ubs.append(ub.view(gr * gc, -1))
        kk = min(k, blk.shape[-1])
        v, i_ = c_sum.view(gr * gc, -1).topk(kk, dim=-1)  # per cell
        top_val.append(v)
        top_idx.append(i_ + a)
        v, i_ = blk.view(hf * wf, -1).topk(kk, dim=-1)  # per feature pixel
        px_val.append(v)
        px_idx.append(i_ + a)
    del blk, r_max, r_sum, c_sum
    top_cell = torch.cat(top_idx, 1).gather(1, torch.cat(top_val, 1).topk(k, dim=-1).indices)  # (cells, k)
    top_px = torch.cat(px_idx, 1).gather(1, torch.cat(px_val, 1).topk(k, dim=-1).indices).view(hf, wf, k)
    # 2. thresholds: seeds are these and the top classes of every support feature pixel
    seeds = torch.cat([top_px[sup_r[cell_r][:, :, None], sup_c[cell_c][:, None, :]].flatten(1), top_cell], 1)
    seeds = seeds.sort(1).values
    seeds = torch.where(
        torch.cat([torch.ones_like(seeds[:, :1], dtype=torch.bool), seeds[:, 1:] != seeds[:, :-1]], 1), seeds, -1
    )  # duplicates of a cell marked -1
    cell_id, which = (seeds >= 0).nonzero(as_tuple=True)
    leaf_cell, leaf_t = _refine(
        logits, rows, cols, (cell_r[cell_id], cell_c[cell_id], seeds[cell_id, which], cell_id), None, SEED_DEPTH, stats
    )
    t_cell = torch.full((gr * gc,), float("inf"), device=device).scatter_reduce(0, leaf_cell, leaf_t, "amin")
    t_cell = t_cell - MARGIN * (1 + t_cell.abs())

    # 3. level 0: the classes whose upper bound reaches the cell's threshold
    painter = _Painter((r.shape[0], c.shape[0]), n, device)
    hits: list[Tensor] = []
    for a, ub in zip(range(0, n, chunk), ubs):
        hit = (ub >= t_cell[:, None]).nonzero()  # (cell, class in chunk)
        hit[:, 1] += a
        hits.append(hit)
    del ubs
    found = torch.cat(hits)  # (cell, class)
    stats["level0_pairs"] = float(found.shape[0])
    # 4. refinement down to decided rectangles, small sub-cells evaluated at every pixel
    _refine(
        logits, rows, cols, (cell_r[found[:, 0]], cell_c[found[:, 0]], found[:, 1], found[:, 0]), painter, None, stats
    )
    return painter.label, stats
