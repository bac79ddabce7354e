"""Inference: bf16 autocast vs fp32, 21,843 vs 150 classes at 512x512, and a 12 MP photo at 909 vs 14 classes.

- images/s of ``segment_image`` (ViT-B/16, 512x512, whole mode) in fp32 and with bf16 autocast, side by
  side, and how far bf16 moves the labels: pixel agreement and mIoU of the bf16 label maps against the
  fp32 ones (a trained-like classifier, see "confident", on ``--agreement-images`` random smooth images);
- time of a 21,843-class prediction vs a 150-class prediction of the same image (ratio), for a random
  and a confident classifier (argmax path: ``--argmax``, default the bounded path on the CPU and the
  chunked bf16 path on CUDA; the chunked path also reports its near-tie pixels re-checked in float32), and the peak RSS of a fresh process doing the 21,843-class random case
  (ru_maxrss; includes the model and torch);
- ``larvseg predict`` on a 4000x3000 photo (resized to short side 512 for the model, labels at 12 MP)
  with a ViT-Tiny and 909 classes vs 14 classes (confident classifier);
- achieved FLOP/s of the fp32 forward: MFU against the bf16 peak (--device cuda) or fraction of the
  measured fp32 matmul peak (CPU).

No trained checkpoint can be downloaded here, so the classifiers sit on a random ViT:
- "random": random class vectors. The worst case: per-pixel scores are unrelated from one feature pixel
  to the next, so many classes stay possible in every cell (see models/bounded_argmax.py).
- "confident": the first classes are cluster centres (a few k-means steps) of this image's own pixel
  features, the rest random: every pixel sits close to one class vector, as in a trained model. A
  stand-in for a trained segmenter, not a measurement of one.

    python benchmarks/bench_inference.py [--device cuda]

With ``--checkpoint`` (a trained checkpoint, e.g. the demo's ``final.safetensors``) it measures only
what bf16 does to a trained model's labels: ``larvseg eval``'s evaluation of the checkpoint's eval set
(``--data-root`` replaces the checkpoint config's ``data.root``) run with ``eval.amp`` off and bf16;
prints the pixel agreement of the two label maps, the mIoU of the bf16 labels against the fp32 ones,
both mIoUs against the ground truth, and both evaluation times:

    python benchmarks/bench_inference.py --checkpoint runs/seed0/larvseg/final.safetensors --data-root DATA
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import cv2
import numpy as np
import torch

from common import efficiency, parser, peak_gflops, report, setup, time_side_by_side, vit_flops
from larvseg.config import ModelConfig
from larvseg.data.transforms import eval_resize, to_chw
from larvseg.models.inference import segment_image_detailed
from larvseg.models.segmenter import build_segmenter


def build(arch: str, classes: int, device: torch.device | str = "cpu", seed: int = 0):
    torch.manual_seed(seed)
    return build_segmenter(ModelConfig(arch=arch, cac=False, drop_path=0.0), classes).to(device).eval()


@torch.no_grad()
def make_confident(model, image: torch.Tensor, clusters: int = 150, steps: int = 5) -> None:
    """Set class vectors 0..clusters-1 to k-means centres of the image's projected pixel features."""
    clf = model.classifier
    p = clf.pixel_vectors(model.backbone(model.preprocess(image[None].to(clf.class_embed.device))))[
        0
    ]  # (hw, D), L2-normalised
    g = torch.Generator().manual_seed(0)
    clusters = min(clusters, p.shape[0])
    centres = p[torch.randperm(p.shape[0], generator=g)[:clusters].to(p.device)].clone()
    for _ in range(steps):
        assign = (p @ centres.T).argmax(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, p)
        filled = torch.bincount(assign, minlength=clusters) > 0
        centres[filled] = torch.nn.functional.normalize(sums[filled], dim=-1)
    clf.proj_class.copy_(torch.eye(clf.dim))
    clf.class_embed[:clusters] = centres


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like uint8 RGB image: random colours on a coarse grid, cubic-interpolated."""
    rng = np.random.default_rng(seed)
    return cv2.resize(
        rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8), (width, height), interpolation=cv2.INTER_CUBIC
    )


def agreement(a: torch.Tensor, b: torch.Tensor, classes: int) -> tuple[float, float]:
    """(pixel agreement, mIoU of a against b as the reference) over the classes present in either."""
    conf = torch.bincount((b.reshape(-1) * classes + a.reshape(-1)).cpu(), minlength=classes * classes)
    conf = conf.view(classes, classes).double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return float(inter.sum() / conf.sum()), float((inter[present] / union[present]).mean())


def checkpoint_agreement(path: str, data_root: str, classes: str, device: torch.device) -> None:
    """bf16 vs fp32 label maps of a trained checkpoint on its evaluation set (see the module doc)."""
    import dataclasses

    from larvseg.data.sources import build_vocabulary
    from larvseg.data.vocabulary import Vocabulary
    from larvseg.eval.evaluate import evaluate
    from larvseg.models.io import load_segmenter

    loaded = load_segmenter(path, device)
    segmenter, names, cfg = loaded.segmenter, loaded.class_names, loaded.config
    if data_root:
        cfg.data.root = data_root
    cfg.eval.classes = classes or cfg.eval.classes  # e.g. the demo's 14 benchmark classes, as its report
    vocab = Vocabulary.union(names, build_vocabulary(cfg).names)  # as larvseg eval builds it
    runs = {}
    for amp in ("off", "bf16"):
        run_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, amp=amp))
        runs[amp] = evaluate(run_cfg, segmenter, vocab, keep_predictions=1 << 30, verbose=False)
    fp32 = torch.cat([torch.from_numpy(p["prediction"]).reshape(-1) for p in runs["off"]["predictions"]])
    bf16 = torch.cat([torch.from_numpy(p["prediction"]).reshape(-1) for p in runs["bf16"]["predictions"]])
    pixel, miou = agreement(bf16, fp32, len(vocab))
    report(
        "inference_checkpoint",
        images=runs["off"]["num_images"],
        classes=len(names),
        eval_classes=len(runs["off"]["per_class"]),
        bf16_pixel_agreement=pixel,
        bf16_miou_vs_fp32=miou,
        fp32_mIoU=runs["off"]["mIoU"],
        bf16_mIoU=runs["bf16"]["mIoU"],
        fp32_mIoU_novel=runs["off"]["mIoU_novel"],
        bf16_mIoU_novel=runs["bf16"]["mIoU_novel"],
        fp32_eval_s=runs["off"]["seconds"],
        bf16_eval_s=runs["bf16"]["seconds"],
    )


def child(arch: str, size: int, classes: int, device: str) -> None:
    """Run one large-vocabulary prediction in this (fresh) process and print JSON with peak RSS."""
    model = build(arch, classes, device)
    image = torch.rand(3, size, size, device=device) * 255  # RGB pixel values
    t0 = time.perf_counter()
    pred, info = segment_image_detailed(model, image, mode="whole", crop_size=size, stride=size)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    print(json.dumps({"seconds": seconds, "peak_rss": rss, "peak_gpu": gpu, "path": info["path"]}))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--arch", default="vit_base")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--classes", type=int, default=21843)
    p.add_argument("--agreement-images", type=int, default=4)
    p.add_argument("--photo", default="4000x3000", help="WxH of the predict case")
    p.add_argument("--checkpoint", default="", help="only bf16 vs fp32 labels of this trained checkpoint")
    p.add_argument("--data-root", default="", help="with --checkpoint: data.root of its eval set")
    p.add_argument("--eval-classes", default="", help="with --checkpoint: eval.classes (comma-separated names)")
    p.add_argument(
        "--argmax",
        default="auto",
        help="argmax path of the 21K cases: auto (bounded on the CPU, chunked on CUDA) | bounded | chunked",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.checkpoint:
        checkpoint_agreement(args.checkpoint, args.data_root, args.eval_classes, setup(args))
        return
    photo_w, photo_h = (int(v) for v in args.photo.split("x"))
    photo_classes = 909
    if args.tiny:
        args.arch, args.size, args.classes, args.repeats, args.agreement_images = "vit_tiny", 64, 2000, 1, 1
        photo_w, photo_h, photo_classes = 160, 120, 60
    if args.child:
        child(args.arch, args.size, args.classes, args.device)
        return
    device = setup(args)
    model = build(args.arch, args.classes, device)
    confident = build(args.arch, args.classes, device)
    image = torch.rand(3, args.size, args.size, device=device) * 255  # RGB pixel values
    make_confident(confident, image, clusters=min(150, args.classes))
    small = torch.arange(150, device=device)
    paths = {}

    def run(net, name: str, amp: str, class_ids, img=image):
        def fn():
            _, paths[name] = segment_image_detailed(
                net,
                img,
                class_ids=class_ids,
                mode="whole",
                crop_size=args.size,
                stride=args.size,
                amp=amp,
                argmax="auto" if class_ids is not None else args.argmax,
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
    # bf16 vs fp32 labels: confident classifier (150 classes) on smooth images
    pix, miou = [], []
    for k in range(args.agreement_images):
        img = torch.from_numpy(to_chw(smooth_image(args.size, args.size, k))).to(device)
        ref, _ = segment_image_detailed(confident, img, class_ids=small, mode="whole", amp="off")
        low, _ = segment_image_detailed(confident, img, class_ids=small, mode="whole", amp="bf16")
        a, m = agreement(low, ref, 150)
        pix.append(a), miou.append(m)
    # predict on a photo: the model sees it at short side 512, the labels are at full resolution
    tiny = build("vit_tiny", photo_classes, device)
    photo = torch.from_numpy(to_chw(eval_resize(smooth_image(photo_h, photo_w, 7), min(512, photo_h), 2048))).to(device)
    crop = [min(512, n) // 16 * 16 for n in photo.shape[1:]]  # one window of it, a multiple of the patch size
    make_confident(tiny, photo[:, : crop[0], : crop[1]], clusters=14)
    few = torch.arange(14, device=device)
    tp = time_side_by_side(
        {
            "photo_14": lambda: segment_image_detailed(tiny, photo, class_ids=few, out_size=(photo_h, photo_w)),
            "photo_all": lambda: segment_image_detailed(tiny, photo, out_size=(photo_h, photo_w)),
        },
        device,
        max(1, min(args.repeats, 3)),
    )
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            "--arch",
            args.arch,
            "--size",
            str(args.size),
            "--classes",
            str(args.classes),
            "--device",
            args.device,
        ]
        + (["--threads", str(args.threads)] if args.threads else []),
        check=True,
        capture_output=True,
        text=True,
    )
    child_out = json.loads(proc.stdout.strip().splitlines()[-1])
    dim, depth = model.backbone.embed_dim, len(model.backbone.blocks)
    tokens = (args.size // 16) ** 2
    flops = vit_flops(tokens + 1, dim, depth) + 2 * tokens * 150 * dim
    peak, kind = peak_gflops(device, args.tiny)
    report(
        "inference",
        arch=args.arch,
        size=args.size,
        fp32_img_s=1 / t["fp32_150"],
        bf16_img_s=1 / t["bf16_150"],
        bf16_speedup=t["fp32_150"] / t["bf16_150"],
        bf16_pixel_agreement=float(np.mean(pix)),
        bf16_miou_vs_fp32=float(np.mean(miou)),
        classes=args.classes,
        random_ratio_all_vs_150=t["fp32_all"] / t["fp32_150"],
        random_path_all=paths["fp32_all"]["path"],
        confident_ratio_all_vs_150=t["conf_all"] / t["conf_150"],
        confident_path_all=paths["conf_all"]["path"],
        **{
            f"{k}_near_ties": paths[n]["near_ties"]
            for k, n in (("random", "fp32_all"), ("confident", "conf_all"))
            if "near_ties" in paths[n]
        },  # the chunked path's pixels re-checked in float32
        peak_rss_GB=child_out["peak_rss"] / 1e9,
        photo=f"{photo_w}x{photo_h}",
        photo_s_14=tp["photo_14"],
        photo_s_all=tp["photo_all"],
        photo_ratio_all_vs_14=tp["photo_all"] / tp["photo_14"],
        photo_classes=photo_classes,
        **efficiency(flops, t["fp32_150"], peak, kind, device),
    )


if __name__ == "__main__":
    main()
