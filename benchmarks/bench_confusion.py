"""Confusion-matrix accumulation for 847 classes: LarvSeg's bincount vs a per-class loop.

The per-class loop is the style of the original metric code: one pass over the pixels per class.
Both must give identical matrices; we report pixels/s of each and the speed-up.

    python benchmarks/bench_confusion.py            # 847 classes, 8 images of 512x683
"""

from __future__ import annotations

import torch

from common import parser, report, setup, time_side_by_side
from larvseg.config import IGNORE_INDEX
from larvseg.eval.confusion import confusion_matrix


def confusion_per_class_loop(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int
) -> torch.Tensor:
    valid = label != ignore_index
    pred, label = pred[valid], label[valid]
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long, device=pred.device)
    for c in range(num_classes):  # deliberately the slow reference
        of_class = label == c
        if of_class.any():
            matrix[c] = torch.bincount(pred[of_class], minlength=num_classes)[:num_classes]
    return matrix


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--classes", type=int, default=847)
    p.add_argument("--images", type=int, default=8)
    args = p.parse_args()
    device = setup(args)
    n, images, h, w = args.classes, args.images, 512, 683
    if args.tiny:
        n, images, h, w = 20, 2, 32, 48
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, n, (images, h, w), generator=g)
    label[:, :4] = IGNORE_INDEX
    # predictions mostly right, as for a trained model
    pred = torch.where(
        torch.rand(images, h, w, generator=g) < 0.7, label, torch.randint(0, n, (images, h, w), generator=g)
    )
    pred[label == IGNORE_INDEX] = 0
    label, pred = label.to(device), pred.to(device)

    ours = confusion_matrix(pred, label, n, IGNORE_INDEX)
    ref = confusion_per_class_loop(pred, label, n, IGNORE_INDEX)
    identical = bool(torch.equal(ours.long().cpu(), ref.cpu()))
    t = time_side_by_side(
        {
            "bincount": lambda: confusion_matrix(pred, label, n, IGNORE_INDEX),
            "loop": lambda: confusion_per_class_loop(pred, label, n, IGNORE_INDEX),
        },
        device,
        max(1, args.repeats if not args.tiny else 1),
    )
    pixels = images * h * w
    report(
        "confusion",
        classes=n,
        pixels=pixels,
        bincount_mpix_s=pixels / t["bincount"] / 1e6,
        loop_mpix_s=pixels / t["loop"] / 1e6,
        speedup=t["loop"] / t["bincount"],
        identical=identical,
        mfu="n/a",  # integer counting, no matmul work
    )
    if not identical:
        raise SystemExit("confusion matrices differ")


if __name__ == "__main__":
    main()
