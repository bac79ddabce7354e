"""``larvseg demo``: the mini benchmark end to end on the CPU.

    larvseg demo [--quick] [--out DIR] [--data DIR] [--seeds N]

1. generate the mini benchmark (larvseg.demo.benchmark) under ``<out>/data`` unless it is there;
2. for every seed, train three variants with the real training loop (config ``demo``):
   segmentation only, the baseline image-level loss (CAC off), LarvSeg (CAC on);
3. evaluate each with the real data layer and inference on the A847-style set;
4. write ``<out>/report.md`` with the figures (larvseg.demo.report) and print its path.

Evaluation restricts the prediction to the benchmark's 14 classes. Ours, for the demo: the eval set is
ADE-847-formatted (847 classes), but only 14 of them have any training data here (in the paper every
ADE-847 class has image-level data through A847w), and the other 833 classifier rows stay at their
random initialisation; scoring them would measure noise. Metrics are the MMSegmentation convention of
larvseg.eval.confusion.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from larvseg.config import IGNORE_INDEX, Config, load_config
from larvseg.demo.benchmark import DEMO_CLASSES, BenchmarkLayout, BenchmarkSpec, ensure_benchmark
from larvseg.demo.report import PanelRow, RunResult, write_report
from larvseg.train.checkpoint import FINAL_WEIGHTS

# name -> config overrides of the variant (on top of the ``demo`` config)
VARIANTS: dict[str, list[str]] = {
    "segmentation only": ["data.tag_sources=[]", "data.tag_batch_size=0", "model.cac=false"],
    "baseline (CAC off)": ["model.cac=false"],
    "LarvSeg (CAC)": ["model.cac=true"],
}
VARIANT_ROLES = ("segmentation only", "baseline (CAC off)", "LarvSeg (CAC)")  # (seg-only, baseline, LarvSeg)


@dataclass(frozen=True)
class Profile:
    iters: int
    seeds: int
    panel_images: int = 4


PROFILES: dict[str, Profile] = {
    "full": Profile(iters=450, seeds=3),  # 22-39 s per run on 2 cores: 5.2 min in all, install included
    "quick": Profile(iters=120, seeds=1),
}


def run_dir(out: Path, seed: int, variant: str) -> Path:
    """Work dir of one run: ``<out>/runs/seed<seed>/<first word of the variant>`` (e.g. .../seed0/larvseg)."""
    return out / "runs" / f"seed{seed}" / variant.split(" ")[0].lower()


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def variant_config(layout: BenchmarkLayout, work_dir: Path, variant: str, seed: int, iters: int,
                   extra: list[str] | None = None) -> Config:
    """The ``demo`` config pointed at the generated benchmark, for one variant and seed."""
    overrides = [
        f"data.root={layout.root.resolve()}",
        f"data.tag_sources.0.classes={layout.wnid_file.resolve()}",
        f"train.work_dir={work_dir.resolve()}",
        f"train.seed={seed}",
        f"train.iters={iters}",
        f"train.log_interval={max(1, iters // 6)}",
    ]
    # the tag-source override must come before the variant's (which may drop the tag sources)
    return load_config("demo", overrides + VARIANTS[variant] + list(extra or []))


def train_variant(cfg: Config) -> torch.nn.Module:
    """Train with the real loop (from scratch) and return the final model, loaded from its exported weights."""
    from larvseg.predict import segmenter_from_checkpoint
    from larvseg.train.checkpoint import FINAL_WEIGHTS, load_checkpoint
    from larvseg.train.loop import train

    work_dir = train(cfg, resume="none")
    segmenter, _names, _cfg = segmenter_from_checkpoint(load_checkpoint(Path(work_dir) / FINAL_WEIGHTS), "cpu")
    return segmenter


@torch.no_grad()
def evaluate_variant(cfg: Config, segmenter: torch.nn.Module, vocab, panel_images: int) -> tuple[dict, list[PanelRow]]:
    """mIoU (all / base / novel) over the benchmark's classes, and the panel rows of the first images."""
    from larvseg.data.mixing import build_eval_dataset
    from larvseg.eval.confusion import ConfusionAccumulator, compute_metrics
    from larvseg.models.inference import segment_image
    from larvseg.predict import image_to_tensor

    union_ids = np.array([vocab.index(c.name) for c in DEMO_CLASSES], dtype=np.int64)
    base_mask = np.array([c.role == "base" for c in DEMO_CLASSES])
    to_demo = np.full(len(vocab) + 1, -1, dtype=np.int64)  # union id -> demo class index (-1: none)
    to_demo[union_ids] = np.arange(len(DEMO_CLASSES))
    dataset = build_eval_dataset(cfg, vocab)
    acc = ConfusionAccumulator(union_ids)
    class_ids = torch.from_numpy(union_ids)
    rows: list[PanelRow] = []
    segmenter.eval()
    for i in range(len(dataset)):
        item = dataset.load(i)
        label = torch.from_numpy(np.asarray(item["label"]).astype(np.int64))
        pred = segment_image(segmenter, image_to_tensor(item["image"]), class_ids=class_ids, mode=cfg.eval.mode,
                             crop_size=cfg.eval.crop_size, stride=cfg.eval.stride, out_size=tuple(label.shape),
                             amp="off")
        acc.update(pred, label)
        if i < panel_images:
            lab = label.numpy()
            shown = np.where(lab == IGNORE_INDEX, -1, to_demo[np.minimum(lab, len(vocab))])
            rows.append(PanelRow(Path(str(item.get("path", i))).stem, np.asarray(item["image"]), shown,
                                 {"": to_demo[pred.numpy()]}))
    return compute_metrics(acc.matrix, base_mask, "mmseg"), rows


def run_demo(out: Path, data: Path, profile: Profile, seeds: int, extra: list[str] | None = None) -> Path:
    from larvseg.data.vocabulary import build_vocabulary

    start = time.perf_counter()
    _say(f"mini benchmark: {data}")
    layout = ensure_benchmark(data, BenchmarkSpec(), progress=_say)
    results: list[RunResult] = []
    panel: list[PanelRow] = []
    total = seeds * len(VARIANTS)
    for seed in range(seeds):
        for v_index, variant in enumerate(VARIANTS):
            k = seed * len(VARIANTS) + v_index + 1
            work_dir = run_dir(out, seed, variant)
            cfg = variant_config(layout, work_dir, variant, seed, profile.iters, extra)
            _say(f"[{k}/{total}] {variant}, seed {seed}: training {cfg.train.iters} iterations -> {work_dir}")
            t0 = time.perf_counter()
            segmenter = train_variant(cfg)
            t1 = time.perf_counter()
            vocab = build_vocabulary(cfg)
            metrics, rows = evaluate_variant(cfg, segmenter, vocab, profile.panel_images if seed == 0 else 0)
            t2 = time.perf_counter()
            results.append(RunResult(variant, seed, metrics["mIoU"], metrics["mIoU_base"], metrics["mIoU_novel"],
                                     [float(x) for x in metrics["IoU"]], t1 - t0, t2 - t1))
            _say(f"[{k}/{total}] {variant}, seed {seed}: mIoU {metrics['mIoU']:.1f}, base {metrics['mIoU_base']:.1f}, "
                 f"novel {metrics['mIoU_novel']:.1f} (train {t1 - t0:.0f} s, eval {t2 - t1:.0f} s)")
            if seed == 0:
                if not panel:
                    panel = [PanelRow(r.name, r.image, r.label, {}) for r in rows]
                for row, new in zip(panel, rows):
                    row.predictions[variant] = new.predictions[""]
    elapsed = time.perf_counter() - start
    setup = {
        "benchmark": (f"{layout.root} (C171-style masks for {sum(c.role == 'base' for c in DEMO_CLASSES)} base classes, "
                      f"I22K-style folders for all {len(DEMO_CLASSES)} synsets, the only data of the "
                      f"{sum(c.role == 'novel' for c in DEMO_CLASSES)} novel classes, "
                      "A847-style 16-bit masks for all classes)"),
        "model": (f"{cfg.model.arch} (ViT, 192-d, 4 blocks, patch 16) with the cosine classifier, **random "
                  "initialisation**: no AugReg weights can be downloaded here, so absolute numbers are far below "
                  "what a pretrained backbone gives"),
        "training": (f"{cfg.train.iters} iterations, {cfg.data.seg_batch_size} + {cfg.data.tag_batch_size} images per "
                     f"step at {cfg.data.seg_sources[0].crop_size} px, SGD lr {cfg.train.lr}, poly; CPU"),
        "evaluation": ("whole-image inference restricted to the benchmark's 14 classes (the other 833 ADE-847 "
                       "classes have no training data in the demo); mIoU in the MMSegmentation convention"),
        "seeds": f"{seeds} ({'--quick' if profile is PROFILES['quick'] else 'full run'}); std is the sample std over seeds",
        "wall time": f"{elapsed / 60:.1f} min on {torch.get_num_threads()} CPU threads",
        "checkpoints": "; ".join(
            f"{variant}: " + ", ".join(f"`{run_dir(out, seed, variant) / FINAL_WEIGHTS}`" for seed in range(seeds))
            for variant in VARIANTS),
        # predict defaults to the classes with training data (the benchmark's 14)
        "predict with LarvSeg (from the folder the demo ran in)": (
            f"`larvseg predict {run_dir(out, 0, VARIANT_ROLES[2]) / FINAL_WEIGHTS} {layout.eval_images} "
            f"--out {out / 'predictions'}`"),
    }
    return write_report(out, results, [c.name for c in DEMO_CLASSES], [c.role for c in DEMO_CLASSES], panel,
                        setup, VARIANT_ROLES)


def main(args: argparse.Namespace) -> int:
    profile = PROFILES["quick" if args.quick else "full"]
    seeds = args.seeds or profile.seeds
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    report = run_demo(out, data, profile, seeds, getattr(args, "overrides", None))
    _say(f"report: {report.resolve()}")
    _say(f"try the LarvSeg model in a browser: larvseg serve {(run_dir(out, 0, VARIANT_ROLES[2]) / FINAL_WEIGHTS).resolve()}")
    return 0


if __name__ == "__main__":
    from larvseg.cli import main as cli_main

    sys.exit(cli_main(["demo", *sys.argv[1:]]))
