"""Inference: bf16 autocast vs fp32, and 21,843-class vs 150-class prediction at 512x512.

- images/s of ``segment_image`` (ViT-B/16, 512x512, whole mode) in fp32 and with bf16 autocast;
- time of a 21,843-class prediction vs a 150-class prediction of the same image (ratio), and the peak RSS
  of a fresh process that does the 21,843-class prediction (ru_maxrss; includes the model and torch).

The weights are random (no trained checkpoint can be downloaded here). A random network is the worst
case for the 21K path: its top-k candidates are rarely certified (see models/inference.py), so the
ratio is an upper bound of what a trained model costs. Use --checkpoint to time a real one.

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
    image = torch.randn(3, args.size, args.size)
    small = torch.arange(150)
    paths = {}

    def run(amp: str, class_ids):
        def fn():
            with torch.no_grad():
                _, paths[(amp, class_ids is None)] = segment_image_detailed(
                    model, image, class_ids=class_ids, mode="whole", crop_size=args.size, stride=args.size, amp=amp
                )
        return fn

    t = time_side_by_side(
        {"fp32_150": run("off", small), "bf16_150": run("bf16", small), "fp32_all": run("off", None)},
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
        time_ratio_all_vs_150=t["fp32_all"] / t["fp32_150"],
        path_all=paths[("off", True)],
        peak_rss_GB=child_out["peak_rss"] / 1e9,
    )


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
