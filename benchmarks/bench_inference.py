"""Inference: bf16 autocast vs fp32, and 21,843-class vs 150-class prediction at 512x512.

- images/s of ``segment_image`` (ViT-B/16, 512x512, whole mode) in fp32 and with bf16 autocast;
- time of a 21,843-class prediction vs a 150-class prediction of the same image (ratio), and the peak RSS
  of a fresh process that does the 21,843-class prediction (ru_maxrss; includes the model and torch).

No trained checkpoint can be downloaded here, so two classifiers on a random ViT are timed:
- "random": random class vectors. The worst case for the 21K path: per-pixel scores are unrelated from
  one feature pixel to the next, the top-k candidates are rarely certified and the exact argmax expands
  to most classes (see models/inference.py).
- "confident": the first 150 class vectors are cluster centres (a few k-means steps) of this image's own
  pixel features, the other 21,693 random: every pixel sits close to one class vector, as in a trained
  model. A stand-in for a trained segmenter, not a measurement of one.

    python benchmarks/bench_inference.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch

from common import parser, report, setup, time_side_by_side

from larvseg.config import ModelConfig
from larvseg.models.inference import segment_image_detailed
from larvseg.models.segmenter import build_segmenter


def build(arch: str, classes: int, seed: int = 0):
    torch.manual_seed(seed)
    model = build_segmenter(ModelConfig(arch=arch, cac=False, drop_path=0.0), classes).eval()
    return model


@torch.no_grad()
def make_confident(model, image: torch.Tensor, clusters: int = 150, steps: int = 5) -> None:
    """Set class vectors 0..clusters-1 to k-means centres of the image's projected pixel features."""
    clf = model.classifier
    p = clf.pixel_vectors(model.backbone(image[None]))[0]  # (hw, D), L2-normalised
    g = torch.Generator().manual_seed(0)
    clusters = min(clusters, p.shape[0])
    centres = p[torch.randperm(p.shape[0], generator=g)[:clusters]].clone()
    for _ in range(steps):
        assign = (p @ centres.T).argmax(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, p)
        filled = torch.bincount(assign, minlength=clusters) > 0
        centres[filled] = torch.nn.functional.normalize(sums[filled], dim=-1)
    clf.proj_class.copy_(torch.eye(clf.dim))
    clf.class_embed[:clusters] = centres


def child(arch: str, size: int, classes: int) -> None:
    """Run one large-vocabulary prediction in this (fresh) process and print JSON with peak RSS."""
    model = build(arch, classes)
    image = torch.randn(3, size, size)
    t0 = time.perf_counter()
    with torch.no_grad():
        pred, path = segment_image_detailed(model, image, mode="whole", crop_size=size, stride=size)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": rss, "path": path, "pred_max": int(pred.max())}))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--arch", default="vit_base")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--classes", type=int, default=21843)
    p.add_argument("--child", action="store_true", help=argparse_hidden())
    args = p.parse_args()
    if args.tiny:
        args.arch, args.size, args.classes, args.repeats = "vit_tiny", 64, 2000, 1
    if args.child:
        child(args.arch, args.size, args.classes)
        return
    device = setup(args)
    model = build(args.arch, args.classes)
    confident = build(args.arch, args.classes)
    image = torch.randn(3, args.size, args.size)
    make_confident(confident, image, clusters=min(150, args.classes))
    small = torch.arange(150)
    paths = {}

    def run(net, name: str, amp: str, class_ids):
        def fn():
            with torch.no_grad():
                _, paths[name] = segment_image_detailed(
                    net, image, class_ids=class_ids, mode="whole", crop_size=args.size, stride=args.size, amp=amp
                )
        return fn

    t = time_side_by_side(
        {
            "fp32_150": run(model, "fp32_150", "off", small),
            "bf16_150": run(model, "bf16_150", "bf16", small),
            "fp32_all": run(model, "fp32_all", "off", None),
            "conf_150": run(confident, "conf_150", "off", small),
            "conf_all": run(confident, "conf_all", "off", None),
        },
        device,
        args.repeats,
    )
    proc = subprocess.run(
        [sys.executable, __file__, "--child", "--arch", args.arch, "--size", str(args.size), "--classes", str(args.classes)]
        + (["--threads", str(args.threads)] if args.threads else []),
        check=True, capture_output=True, text=True,
    )
    child_out = json.loads(proc.stdout.strip().splitlines()[-1])
    report(
        "inference",
        arch=args.arch,
        size=args.size,
        fp32_img_s=1 / t["fp32_150"],
        bf16_img_s=1 / t["bf16_150"],
        bf16_speedup=t["fp32_150"] / t["bf16_150"],
        classes=args.classes,
        random_ratio_all_vs_150=t["fp32_all"] / t["fp32_150"],
        random_path_all=paths["fp32_all"],
        confident_ratio_all_vs_150=t["conf_all"] / t["conf_150"],
        confident_path_all=paths["conf_all"],
        peak_rss_GB=child_out["peak_rss"] / 1e9,
    )


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
