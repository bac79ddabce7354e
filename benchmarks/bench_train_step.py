"""Training step: images/s, MFU, bf16 vs fp32, and the CAC step's overhead over the plain backbone step.

Full step = TrainingObjective on a StepBatch of ``--batch`` segmentation images at 512x512 (C171-like
source, 160 classes) and ``--batch`` image-level images at 320x320 (A847w-like source; ``--tags 3,1``:
half the crops with 3 classes, half with a single class, so the CAC runs both background rules),
913-class union vocabulary, class sampling (100 + present), pixel CE, image-level CE and the CAC (bank
warmed up), then backward. Plain = backbone(seg).sum() + backbone(tag).sum(), backward: the CAC
overhead is full / plain, in float32 and in bf16. Train = the bf16 full step plus the optimizer step
(SGD with momentum as ``larvseg train``; fused on CUDA): images/s of a whole training iteration.

``--batch``: images per source; default 8 on CUDA (the paper's 8 x 512^2 + 8 x 320^2 per step) and 2 on
the CPU. FLOPs of the bf16 full step are counted by ``torch.utils.flop_counter`` (GEMMs, convolutions
and, on CUDA, flash / memory-efficient attention; the CPU's attention kernel is not counted, so the
analytic count of the backbone is printed beside it). MFU = counted FLOPs / bf16 train-step time / the
GPU's dense bf16 peak (``common.GPU_BF16_PEAK_TFLOPS``; --device cuda); on the CPU the float32 step's
analytic FLOP/s is reported as a fraction of the float32 matmul peak measured in the same run.

``--loader-img-s SEG,TAG``: images/s of one data-loader worker per source (``bench_data.py``): prints how
many workers one device needs to feed the measured train step.

    python benchmarks/bench_train_step.py [--device cuda] [--loader-img-s 51.6,166]
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import efficiency, parser, peak_gflops, report, setup, time_side_by_side, vit_flops
from larvseg.config import ModelConfig
from larvseg.data.batch import TAG_PAD, SegBatch, StepBatch, TagBatch
from larvseg.models.objective import TrainingObjective
from larvseg.models.segmenter import build_segmenter
from larvseg.precision import bf16_autocast


def make_batch(
    batch: int, seg_size: int, tag_size: int, vocab: int, counts: list[int], g: torch.Generator
) -> StepBatch:
    """``batch`` segmentation + ``batch`` image-level images; tag counts alternate over ``counts``."""
    seg_pool = torch.arange(min(160, vocab))
    tag_pool = torch.arange(vocab - min(847, vocab), vocab)
    labels = seg_pool[torch.randint(0, seg_pool.numel(), (batch, seg_size, seg_size), generator=g)]
    tags = torch.full((batch, max(counts)), TAG_PAD, dtype=torch.long)
    for i in range(batch):
        n = counts[i % len(counts)]
        tags[i, :n] = tag_pool[torch.randperm(tag_pool.numel(), generator=g)[:n]]
    return StepBatch(
        step=0,
        seg=[
            SegBatch(
                "C171", torch.rand(batch, 3, seg_size, seg_size, generator=g) * 255, labels, seg_pool, global_size=batch
            )
        ],
        tag=[
            TagBatch(
                "A847w",
                torch.rand(batch, 3, tag_size, tag_size, generator=g) * 255,
                tags,
                tag_pool,
                global_size=batch,
                loss_weight=0.2,
                cac_weight=0.1,
                cac_topk=20,
            )
        ],
    )


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--arch", default="vit_base")
    p.add_argument("--vocab", type=int, default=913)
    p.add_argument("--batch", type=int, default=0, help="images per source (0: 8 on CUDA, 2 on the CPU)")
    p.add_argument("--tags", default="3,1", help="tags per image-level image, cycled over the batch (comma-separated)")
    p.add_argument("--loader-img-s", default="", help="SEG,TAG images/s of one data-loader worker (bench_data.py)")
    args = p.parse_args()
    device = setup(args)
    seg_size, tag_size, vocab, repeats = 512, 320, args.vocab, args.repeats
    batch = args.batch or (8 if device.type == "cuda" else 2)
    if args.tiny:
        args.arch, seg_size, tag_size, vocab, repeats, batch = "vit_tiny", 64, 48, 40, 1, 2
    counts = [int(c) for c in args.tags.split(",")]
    if not counts or min(counts) < 1:
        raise SystemExit(f"--tags: positive counts, got {args.tags!r}")
    cfg = ModelConfig(arch=args.arch, cac=True, drop_path=0.1, num_sampled_classes=100)
    model = build_segmenter(cfg, vocab).to(device)
    objective = TrainingObjective(model, cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    # a warm bank, so the CAC loss is active for every pair
    ids = torch.arange(vocab).repeat(cfg.memory_bank_size * cfg.warm_up + 1)
    feats = torch.nn.functional.normalize(torch.randn(ids.numel(), model.bank.dim, generator=g), dim=-1)
    model.bank.enqueue(ids.to(device), feats.to(device), gather=False)
    step_batch = make_batch(batch, seg_size, tag_size, vocab, counts, g).to(device)
    seg_images = model.preprocess(step_batch.seg[0].images)
    tag_images = model.preprocess(step_batch.tag[0].images)
    params = [q for q in model.parameters() if q.requires_grad]
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.SGD(params, lr=1e-6, momentum=0.9, weight_decay=1e-4, **fused)

    def full(bf16: bool):
        def fn():
            model.zero_grad(set_to_none=True)
            with bf16_autocast(bf16, device):
                loss = objective(step_batch)["loss"]
            loss.backward()

        return fn

    def plain(bf16: bool):
        def fn():
            model.zero_grad(set_to_none=True)
            with bf16_autocast(bf16, device):
                loss = model.backbone(seg_images).float().sum() + model.backbone(tag_images).float().sum()
            loss.backward()

        return fn

    def train_step():
        full(True)()
        optimizer.step()

    t = time_side_by_side(
        {
            "full": full(False),
            "plain": plain(False),
            "bf16": full(True),
            "bf16_plain": plain(True),
            "train": train_step,
        },
        device,
        repeats,
    )
    with FlopCounterMode(display=False) as counter:
        full(True)()
    counted = counter.get_total_flops()
    dim, depth = model.backbone.embed_dim, len(model.backbone.blocks)
    backbone_flops = (
        3
        * batch
        * (vit_flops((seg_size // 16) ** 2 + 1, dim, depth) + vit_flops((tag_size // 16) ** 2 + 1, dim, depth))
    )
    images = 2 * batch
    fields: dict[str, object] = dict(
        arch=args.arch,
        batch=f"{batch}x{seg_size}+{batch}x{tag_size}",
        vocab=vocab,
        tags=args.tags.replace(",", "+"),
        full_s=t["full"],
        plain_s=t["plain"],
        ratio=t["full"] / t["plain"],
        bf16_s=t["bf16"],
        bf16_plain_s=t["bf16_plain"],
        bf16_ratio=t["bf16"] / t["bf16_plain"],
        bf16_speedup=t["full"] / t["bf16"],
        train_s=t["train"],
        train_img_s=images / t["train"],
        fp32_img_s=images / t["full"],
        counted_tflop=counted / 1e12,
        backbone_tflop=backbone_flops / 1e12,
    )
    peak, kind = peak_gflops(device, args.tiny)
    if device.type == "cuda":  # MFU of the bf16 training iteration against the bf16 peak
        fields.update(efficiency(counted, t["train"], peak, kind, device))
    else:
        fields.update(efficiency(backbone_flops, t["full"], peak, kind, device))
    if args.loader_img_s:
        seg_rate, tag_rate = (float(v) for v in args.loader_img_s.split(","))
        steps_s = 1 / t["train"]
        fields.update(
            workers_seg=math.ceil(batch * steps_s / seg_rate), workers_tag=math.ceil(batch * steps_s / tag_rate)
        )
    fields["params_M"] = sum(q.numel() for q in params) / 1e6
    report("train_step", **fields)


if __name__ == "__main__":
    main()
