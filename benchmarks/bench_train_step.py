"""Training step: the full LarvSeg step vs the plain backbone forward+backward of the same images.

Also the same full step under bf16 autocast (losses in float32: they run on .float() inputs), side by
side with float32, and the achieved FLOP/s as MFU against the GPU's bf16 peak (--device cuda) or as a
fraction of the float32 matmul peak measured in the same run (CPU).

Full step = TrainingObjective on a StepBatch of 2 segmentation images at 512x512 (C171-like source,
160 classes) and 2 image-level images at 320x320 (A847w-like source; ``--tags 3,1``: one crop with 3
classes, one with a single class, so the CAC runs both background rules), 913-class union vocabulary,
class sampling (100 + present), pixel CE, image-level CE and the CAC (bank warmed up), then backward. Plain = backbone(seg).sum() + backbone(tag).sum(), backward. Also reports the achieved
GFLOP/s of the full step (backbone FLOPs counted analytically, x3 for forward+backward) against a
fp32 matmul peak measured in the same run.

    python benchmarks/bench_train_step.py
"""

from __future__ import annotations

import torch

from common import efficiency, parser, peak_gflops, report, setup, time_side_by_side, vit_flops

from larvseg.config import ModelConfig
from larvseg.data.batch import TAG_PAD, SegBatch, StepBatch, TagBatch
from larvseg.models.objective import TrainingObjective
from larvseg.models.segmenter import build_segmenter
from larvseg.precision import autocast_context


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--arch", default="vit_base")
    p.add_argument("--vocab", type=int, default=913)
    p.add_argument("--tags", default="3,1", help="tags of each image-level image (comma-separated)")
    args = p.parse_args()
    device = setup(args)
    seg_size, tag_size, vocab, repeats = 512, 320, args.vocab, args.repeats
    if args.tiny:
        args.arch, seg_size, tag_size, vocab, repeats = "vit_tiny", 64, 48, 40, 1
    cfg = ModelConfig(arch=args.arch, cac=True, drop_path=0.1, num_sampled_classes=100)
    model = build_segmenter(cfg, vocab).to(device)
    objective = TrainingObjective(model, cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    seg_pool = torch.arange(min(160, vocab))
    tag_pool = torch.arange(vocab - min(847, vocab), vocab)
    # a warm bank, so the CAC loss is active for every pair
    d = model.bank.dim
    ids = torch.arange(vocab).repeat(cfg.memory_bank_size * cfg.warm_up + 1)
    feats = torch.nn.functional.normalize(torch.randn(ids.numel(), d, generator=g), dim=-1)
    model.bank.enqueue(ids.to(device), feats.to(device), gather=False)
    labels = seg_pool[torch.randint(0, seg_pool.numel(), (2, seg_size, seg_size), generator=g)]
    counts = [int(c) for c in args.tags.split(",")]
    if len(counts) != 2 or min(counts) < 1:
        raise SystemExit(f"--tags: two positive counts, got {args.tags!r}")
    tags = torch.full((2, max(counts)), TAG_PAD, dtype=torch.long)
    tags[0, : counts[0]] = tag_pool[: counts[0]]
    tags[1, : counts[1]] = tag_pool[counts[0]: counts[0] + counts[1]]
    batch = StepBatch(
        step=0,
        seg=[SegBatch("C171", torch.randn(2, 3, seg_size, seg_size, generator=g), labels, seg_pool, global_size=2)],
        tag=[TagBatch("A847w", torch.randn(2, 3, tag_size, tag_size, generator=g), tags, tag_pool, global_size=2,
                      loss_weight=0.2, cac_weight=0.1, cac_topk=20)],
    ).to(device)
    params = [q for q in model.parameters() if q.requires_grad]

    def full_step():
        model.zero_grad(set_to_none=True)
        objective(batch)["loss"].backward()

    def bf16_step():
        model.zero_grad(set_to_none=True)
        with autocast_context("bf16", device):
            loss = objective(batch)["loss"]
        loss.backward()

    def plain_step():
        model.zero_grad(set_to_none=True)
        (model.backbone(batch.seg[0].images).sum() + model.backbone(batch.tag[0].images).sum()).backward()

    t = time_side_by_side({"full": full_step, "plain": plain_step, "bf16": bf16_step}, device, repeats)
    dim, depth = model.backbone.embed_dim, len(model.backbone.blocks)
    flops = 3 * 2 * (vit_flops((seg_size // 16) ** 2 + 1, dim, depth)) + 3 * 2 * vit_flops((tag_size // 16) ** 2 + 1, dim, depth)
    peak, kind = peak_gflops(device, args.tiny)
    report(
        "train_step",
        arch=args.arch,
        vocab=vocab,
        tags=args.tags.replace(",", "+"),
        full_s=t["full"],
        plain_s=t["plain"],
        ratio=t["full"] / t["plain"],
        bf16_s=t["bf16"],
        bf16_speedup=t["full"] / t["bf16"],
        **efficiency(flops, t["full"], peak, kind, device),
        params_M=sum(q.numel() for q in params) / 1e6,
    )


if __name__ == "__main__":
    main()
