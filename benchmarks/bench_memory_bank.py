"""Memory bank at 21,843 classes: our per-slot-mean bank vs the original's (classes x M x K x D) fp32 bank.

Bytes are those of the allocated buffers (ours is allocated for real; the full bank's 27 GB are
computed, since it does not fit this machine). Scores are checked identical on a subset of classes for
which the full bank is materialised, filled with the same pixel features.

    python benchmarks/bench_memory_bank.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common import parser, report, setup
from larvseg.models.memory_bank import MemoryBank


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--classes", type=int, default=21843)
    p.add_argument("--slots", type=int, default=20, help="M")
    p.add_argument("--topk", type=int, default=20, help="K")
    p.add_argument("--dim", type=int, default=768, help="D")
    p.add_argument("--check-classes", type=int, default=64, help="classes with a real full bank for the score check")
    args = p.parse_args()
    device = setup(args)
    v, m, k, d, vc = args.classes, args.slots, args.topk, args.dim, args.check_classes
    if args.tiny:
        v, m, k, d, vc = 50, 4, 5, 32, 8

    bank = MemoryBank(v, m, d).to(device)
    # Features vs features, and totals with the per-class ring counters (ptr, wraps), which a full bank
    # needs just the same.
    counter_bytes = bank.ptr.numel() * bank.ptr.element_size() + bank.wraps.numel() * bank.wraps.element_size()
    ours_bytes = sum(b.numel() * b.element_size() for b in bank.buffers())
    full_feature_bytes = v * m * k * d * 4
    full_bytes = full_feature_bytes + counter_bytes

    # Identical scores: fill both banks from the same K pixel features per slot (two full wraps).
    g = torch.Generator().manual_seed(0)
    full = torch.zeros(vc, m, k, d)
    for _wrap in range(2):
        pixels = F.normalize(torch.randn(vc, m, k, d, generator=g), dim=-1)
        full.copy_(pixels)
        ids = torch.arange(vc).repeat_interleave(m)
        bank.enqueue(ids.to(device), pixels.mean(2).reshape(vc * m, d).to(device), gather=False)
    queries = F.normalize(torch.randn(4096, d, generator=g), dim=-1)
    ref = torch.einsum("pd,cmkd->cp", queries, full) / (m * k)  # mean of M*K dot products
    ours = (bank.class_means(torch.arange(vc, device=device)) @ queries.to(device).T).cpu()
    max_err = float((ref - ours).abs().max())

    report(
        "memory_bank",
        classes=v,
        M=m,
        K=k,
        D=d,
        ours_MB=ours_bytes / 2**20,
        full_MB=full_bytes / 2**20,
        feature_ratio=full_feature_bytes / (ours_bytes - counter_bytes),
        total_ratio=full_bytes / ours_bytes,
        score_max_abs_err=max_err,
        mfu="n/a",  # a memory measurement, no timed compute
    )
    if max_err > 1e-5:
        raise SystemExit(f"scores differ by {max_err}")


if __name__ == "__main__":
    main()
