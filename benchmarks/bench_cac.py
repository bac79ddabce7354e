"""CAC loss: LarvSeg's batched implementation vs a straightforward per-image, per-tag one.

The reference is written in the original's style: a Python loop over images and tags, the background
rule chosen per pair (the image's other tags, or for an image's only tag a loop over classes for the
top-k score rule), a full (classes x M x K x D) memory bank, logits and standardized score upsampled to
the loss resolution and the sigmoid applied after the upsampling. Both run on the same inputs (batch 8,
913 classes, 320x320 crops -> 20x20 features, loss at 160x160, D=768; logits given at feature
resolution) whose pixel features are clustered around class prototypes, so that the background rule has
candidates to keep or drop. Three batches: every image single-tag (ImageNet-like), every image with 3
tags, and a mix (half the images hold one class, as a crop of a wall would). The losses must be equal;
we report the speed-up.

    python benchmarks/bench_cac.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common import parser, report, setup, time_side_by_side
from larvseg.models.attentive_classifier import BackgroundRule, cac_loss
from larvseg.models.cosine_classifier import standardize
from larvseg.models.memory_bank import MemoryBank

PAD = -1


def make_inputs(b: int, n: int, d: int, h: int, w: int, m: int, k: int, tags_per_image: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    # each image: its tags' regions, the rest filled with a few other ("background") classes
    t = max(tags_per_image)
    tags = torch.stack([torch.randperm(n, generator=g)[:t] for _ in range(b)])
    extra = torch.randint(0, n, (b, 3), generator=g)
    region_classes = torch.cat([tags, extra], 1)  # (b, R)
    region = torch.randint(0, region_classes.shape[1], (b, h * w), generator=g)
    pixel_class = region_classes.gather(1, region)  # (b, hw)
    feats = F.normalize(protos[pixel_class] + 0.8 * torch.randn(b, h * w, d, generator=g) / d**0.5 * 4, dim=-1)
    scores = feats @ protos.T  # (b, hw, n)
    logits = standardize(scores, -1) * 2.0
    feats_map = feats.transpose(1, 2).reshape(b, d, h, w)
    scores_map = scores.transpose(1, 2).reshape(b, n, h, w)
    logits_map = logits.transpose(1, 2).reshape(b, n, h, w)  # feature resolution; the loss is at 8x
    counts = torch.tensor(tags_per_image)[:, None]
    tags = torch.where(torch.arange(t)[None] < counts, tags, torch.full_like(tags, PAD))  # pad the tag lists
    # full bank: M slots x K pixel features per class, near the prototypes
    full = F.normalize(protos[:, None, None, :] + 4 * torch.randn(n, m, k, d, generator=g) / d**0.5, dim=-1)
    return tags, feats_map, scores_map, logits_map, full


def cac_reference(logits, scores, feats, tags, full, rule: BackgroundRule, loss_hw: tuple[int, int]) -> torch.Tensor:
    """Per image, per tag; loops over classes for the single-tag background rule; the full K-feature
    bank; logits and standardized score upsampled to the loss resolution, then the sigmoid."""
    logits = F.interpolate(logits, size=loss_hw, mode="bilinear", align_corners=False)
    b, n, hl, wl = logits.shape
    h, w = scores.shape[-2:]
    bank = full.flatten(1, 2)  # (n, M*K, D)
    total, pairs = logits.new_zeros(()), 0
    for i in range(b):
        p = feats[i].flatten(1)  # (D, hw)
        s = scores[i].flatten(1)  # (n, hw)
        image_tags = [int(t) for t in tags[i] if t != PAD]
        for l in image_tags:
            pairs += 1
            f = (bank[l] @ p).mean(0)
            backgrounds = []
            if len(image_tags) == 1:
                for c in range(n):
                    if c == l or s[c].topk(rule.bg_topk).values.mean() <= rule.score_thresh:
                        continue
                    bc = (bank[c] @ p).mean(0)
                    zf = (f - f.mean()) / f.std()
                    zb = (bc - bc.mean()) / bc.std()
                    if ((zf - zb) ** 2).mean() > rule.mse_thresh:
                        backgrounds.append(bc)
            else:
                backgrounds = [(bank[c] @ p).mean(0) for c in image_tags if c != l]
            score = f - torch.stack(backgrounds).mean(0) if backgrounds else f - (1 - f)
            z = standardize(score, 0).view(1, 1, h, w)
            a = torch.sigmoid(F.interpolate(z, size=(hl, wl), mode="bilinear", align_corners=False))[0, 0]
            pooled = (logits[i] * a).mean((1, 2))
            for c in image_tags:
                if c != l:
                    pooled[c] = float("-inf")
            total = total + F.cross_entropy(pooled[None], torch.tensor([l], device=pooled.device))
    return total / max(pairs, 1)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=913)
    args = p.parse_args()
    device = setup(args)
    b, n, d, h, w, m, k = args.batch, args.classes, 768, 20, 20, 20, 20
    repeats = args.repeats
    if args.tiny:
        b, n, d, h, w, m, k, repeats = 2, 12, 32, 4, 4, 3, 4, 1
    rule = BackgroundRule()
    loss_hw = (8 * h, 8 * w)  # 320 px crops: features at 1/16, loss at 1/2
    line = {}
    kinds = {"single_tag": [1] * b, "multi_tag": [3] * b, "mixed": [1, 3] * (b // 2) + [1] * (b % 2)}
    for name, tags_per_image in kinds.items():
        tags, feats, scores, logits, full = (x.to(device) for x in make_inputs(b, n, d, h, w, m, k, tags_per_image))
        bank = MemoryBank(n, m, d).to(device)
        bank.enqueue(torch.arange(n, device=device).repeat_interleave(m), full.mean(2).flatten(0, 1), gather=False)
        class_ids = torch.arange(n, device=device)
        npairs = int((tags != PAD).sum())

        def ours():
            res = cac_loss(
                logits, scores, feats, tags, PAD, class_ids, bank, loss_hw=loss_hw, topk=k, warm_up=1, rule=rule
            )
            return res.loss_sum / npairs

        def reference():
            return cac_reference(logits, scores, feats, tags, full, rule, loss_hw)

        a, r = float(ours()), float(reference())
        if abs(a - r) > 1e-4 * max(1.0, abs(r)):
            raise SystemExit(f"{name}: losses differ: ours {a} vs reference {r}")
        t = time_side_by_side({"ours": ours, "reference": reference}, device, repeats)
        line[f"{name}_speedup"] = t["reference"] / t["ours"]
        line[f"{name}_ours_ms"] = t["ours"] * 1e3
        line[f"{name}_loss"] = a
        line[f"{name}_loss_abs_diff"] = abs(a - r)
    report("cac", batch=b, classes=n, **line, mfu="n/a")  # index/memory-bound, not matmul work


if __name__ == "__main__":
    main()
