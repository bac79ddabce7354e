"""Cost of the image-level loss options (model.image_loss, docs/METHOD.md section 6) against the paper's
mean-pooled L_cls: forward + backward of the loss alone, on logits given at feature resolution.

Two shapes, as the packaged experiments meet them: ImageNet-style (4 single-tag images of 320x320 ->
20x20 features, 104 scored classes: 100 sampled + the present ones) and ADE-tags-style (6 crops of
512x512 -> 32x32, 150 classes without sampling, 8 tags per image). Half the classes are "base" (have
masks). Reported: the paper's time per shape and each option's time as a ratio to it, measured side by
side (interleaved) in one run.

    python benchmarks/bench_image_loss.py
"""

from __future__ import annotations

import torch

from common import parser, report, setup, time_side_by_side
from larvseg.config import ImageLossConfig
from larvseg.models.image_loss import image_level_loss

PAD = -1
OPTIONS = {
    "paper": ImageLossConfig(),
    "topk": ImageLossConfig(pooling="topk"),
    "region": ImageLossConfig(pooling="region"),
    "nobaseneg": ImageLossConfig(drop_base_negatives=True),
    "confbase": ImageLossConfig(confident_base=0.5),
}


def make_inputs(b: int, n: int, hw: int, tags_per_image: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(b, n, hw, hw, generator=g)).to(device).requires_grad_()
    tags = torch.stack([torch.randperm(n, generator=g)[:tags_per_image] for _ in range(b)]).to(device)
    base = (torch.arange(n) % 2 == 0).to(device)
    return logits, tags, base


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    device = setup(args)
    shapes = {"in": (4, 104, 20, 1, 320), "ade": (6, 150, 32, 8, 512)}
    if args.tiny:
        shapes = {"in": (2, 12, 4, 1, 64), "ade": (2, 12, 4, 3, 64)}
    fields: dict[str, object] = {}
    for shape, (b, n, hw, t, crop) in shapes.items():
        logits, tags, base = make_inputs(b, n, hw, t, device)

        def step(opt: ImageLossConfig) -> None:
            loss = image_level_loss(logits, tags, PAD, 2, (crop, crop), opt, base)
            loss.backward()
            logits.grad = None

        times = time_side_by_side({k: (lambda o=o: step(o)) for k, o in OPTIONS.items()}, device, args.repeats)
        fields[f"{shape}_paper_ms"] = times["paper"] * 1e3
        for name in OPTIONS:
            if name != "paper":
                fields[f"{shape}_{name}_x"] = times[name] / times["paper"]
    report("image_loss", **fields)


if __name__ == "__main__":
    main()
