"""``larvseg demo``: the mini benchmark end to end on the CPU, and the pre-registered check of the paper's claim.

    larvseg demo [--quick | --full] [--benchmark habitat|uniform] [--out DIR] [--data DIR] [--seeds N] [--jobs N]
                 [key=value ...]

(With ``--compare OPTION ...``, larvseg.demo.compare: stages 1-2 as below, then the comparison instead of 3-5.)

1. generate the mini benchmark (larvseg.data.synthetic; ``--benchmark``: the habitat family, the default,
   or the uniform-context control) under ``<out>/data`` unless it is there;
2. stage 0: pretrain the demo's ViT by image classification on every synset folder of the benchmark's
   ``I22K/fall11_whole`` with ``larvseg pretrain``'s code (as the paper's backbone was pretrained on all of
   ImageNet-21K), written as an AugReg ``.npz`` under ``<out>/pretrain``;
3. train the variants from that ``.npz`` (``model.pretrained=``) with the real training loop (config
   ``demo``): the baseline image-level loss (CAC off) and LarvSeg (CAC on) on every seed (5 paired seeds by
   default), segmentation only on the first 2, and with ``--full`` (and ``--quick``) the oracle-attention
   upper bound U (larvseg.models.oracle_attention) on every seed;
4. evaluate each with ``larvseg.eval.evaluate.Evaluator`` (the code of ``larvseg eval``) on the
   A847-style set, plus feature-resolution diagnostics (larvseg.demo.diagnostics: per-class ROC-AUC of
   bank, classifier and attention scores; base patches predicted as novel; the seed-point propagation of
   check P1) and, for runs with image-level data, the probe of the image-level training images
   (larvseg.demo.image_level_probe: checks P2 and M);
5. write ``<out>/report.md`` (larvseg.demo.report): the claim check's rule, then P1, P2, M, U, the paired
   Delta with its t-interval and the verdict (larvseg.demo.checks), the figures and tables; print its path.

Runs are independent, so stages 3-4 run them as ``--jobs`` parallel processes (default: the CPUs this
process may use), each with **one** intra-op thread, and stage 0 runs single-threaded too. Why
(docs/PERFORMANCE.md, benchmarks/bench_demo_threads.py): as soon as anything else uses the cores, a
2-thread step slows down by an order of magnitude (oversubscribed OpenMP threads spin and wait on each
other: 9.5x slower than 1 thread on the shared development VM), while a 1-thread step slows down only
by the share of CPU it loses. Each run is deterministic whatever the number of jobs (its seed and
config alone fix it).

Evaluation is restricted to the benchmark's classes (``eval.classes``): the eval set is
ADE-847-formatted (847 classes), but only the benchmark's have any training data here (in the paper
every ADE-847 class has image-level data through A847w), and the other classifier rows stay at their
random initialisation; scoring them would measure noise. Metrics are the MMSegmentation convention of
larvseg.eval.confusion.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from larvseg import distributed
from larvseg.config import IGNORE_INDEX, Config, load_config
from larvseg.data.synthetic import DEMO_CLASSES, BenchmarkLayout, BenchmarkSpec, ensure_benchmark
from larvseg.data.vocabulary import Vocabulary
from larvseg.demo.diagnostics import FeatureDiagnostics
from larvseg.demo.image_level_probe import ImageLevelProbe, probe_image_level
from larvseg.demo.report import ClaimInputs, PanelRow, PretrainSummary, RunResult, write_report
from larvseg.eval.evaluate import Evaluator
from larvseg.log import has_console, setup_logging
from larvseg.models.io import load_checkpoint, load_segmenter
from larvseg.models.memory_bank import MemoryBank
from larvseg.models.segmenter import Segmenter, memory_bank_from_weights
from larvseg.models.vit import VisionTransformer
from larvseg.train.checkpoint import FINAL_WEIGHTS, latest_checkpoint
from larvseg.train.loop import build, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One trained variant: how the report names it, its run folder, its config overrides."""

    label: str  # in the report's tables and figures
    directory: str  # <out>/runs/seed<k>/<directory>
    overrides: tuple[str, ...]  # on top of the ``demo`` config


SEG_ONLY = Variant(
    "segmentation only", "segmentation", ("data.tag_sources=[]", "data.tag_batch_size=0", "model.cac=false")
)
BASELINE = Variant("baseline (CAC off)", "baseline", ("model.cac=false",))
LARVSEG = Variant("LarvSeg (CAC)", "larvseg", ("model.cac=true",))
# the CAC with the generator's object mask of each image-level photo as its attention (larvseg.models.oracle_attention)
ORACLE = Variant(
    "oracle attention (U)",
    "oracle",
    ("model.cac=true", "model.oracle_attention=true", "data.tag_sources.0.object_masks=I22K/object_masks"),
)
VARIANTS: tuple[Variant, ...] = (SEG_ONLY, BASELINE, LARVSEG, ORACLE)
BENCHMARKS = {"habitat": BenchmarkSpec(), "uniform": BenchmarkSpec(family="uniform")}


@dataclass(frozen=True)
class Profile:
    iters: int
    seeds: int  # paired seeds of the baseline, LarvSeg (and U)
    pretrain_iters: int
    seg_seeds: int | None = None  # segmentation only on the first seg_seeds seeds (None: every seed)
    oracle: bool = False  # train U, the oracle-attention upper bound
    panel_images: int = 4
    benchmark_size: tuple[int, int, int] | None = None  # (num_seg, per_class, num_eval) of a smaller benchmark

    def seg_seed_count(self, seeds: int) -> int:
        """How many of ``seeds`` paired seeds also train segmentation only (the first ones)."""
        return seeds if self.seg_seeds is None else min(seeds, self.seg_seeds)


# The default fits the 10-minute budget on 2 quiet cores: 5 paired seeds, segmentation only on 2 of them
# (P1 and the base tolerance need it, the paired Delta does not), 270 iterations instead of 360 (the step is
# model compute: forward ~50 %, backward ~30 %, data ~20 % of a step, profiled; docs/CLAIM.md).
PROFILES: dict[str, Profile] = {
    "default": Profile(iters=270, seeds=5, pretrain_iters=500, seg_seeds=2),
    "full": Profile(iters=270, seeds=5, pretrain_iters=500, oracle=True),
    "quick": Profile(iters=120, seeds=1, pretrain_iters=20, seg_seeds=1, oracle=True, benchmark_size=(160, 12, 16)),
}
PRETRAIN_DATA_WORKERS = 1
THREADS_PER_RUN = 1  # see the module docstring: robust to a busy machine, and no slower on an idle one


def run_dir(out: Path, seed: int, variant: Variant) -> Path:
    """Work dir of one run: ``<out>/runs/seed<seed>/<variant.directory>`` (e.g. .../seed0/larvseg)."""
    return out / "runs" / f"seed{seed}" / variant.directory


def _say(msg: str) -> None:
    log.info("[demo] %s", msg)


def variant_config(
    layout: BenchmarkLayout, work_dir: Path, variant: Variant, seed: int, iters: int, extra: list[str] | None = None
) -> Config:
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
    return load_config("demo", overrides + list(variant.overrides) + list(extra or []))


def all_synsets_file(layout: BenchmarkLayout, out: Path) -> Path:
    """A wnid file listing every synset folder of the benchmark's ``I22K/fall11_whole`` (stage 0 sees all):
    those of the demo's tag source first, in its order (so the head's rows follow the tag source's
    classes), then any other folder, sorted."""
    folders = sorted(p.name for p in layout.imagenet.iterdir() if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"{layout.imagenet}: no synset folders")
    listed = layout.wnid_file.read_text().split() if layout.wnid_file.is_file() else []
    wnids = [w for w in listed if w in set(folders)] + [w for w in folders if w not in set(listed)]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "all_synsets.txt"
    path.write_text("".join(f"{w}\n" for w in wnids))
    return path


def pretrain_config(layout: BenchmarkLayout, out: Path, iters: int, extra: list[str] | None = None) -> Config:
    """The ``demo`` config's ``pretrain`` stage over every synset folder of the benchmark."""
    work = out / "pretrain"
    overrides = [
        f"data.root={layout.root.resolve()}",
        f"data.tag_sources.0.classes={all_synsets_file(layout, work).resolve()}",
        f"pretrain.work_dir={work.resolve()}",
        f"pretrain.iters={iters}",
        f"train.log_interval={max(1, iters // 20)}",
        f"train.checkpoint_interval={max(1, iters // 4)}",
        # one worker process decodes and augments the next batches on the otherwise idle second core
        # while the model runs single-threaded (the stage is one process; docs/PERFORMANCE.md)
        f"data.num_workers={PRETRAIN_DATA_WORKERS}",
        f"train.threads={THREADS_PER_RUN}",
        # no colour jitter while classifying: a class of this benchmark *is* a colour and a pattern (colours
        # are shared on purpose), and a hue shift of up to 36 degrees turns red into yellow, so jittered crops
        # carry wrong labels (train top-1 36 % with it, 67 % without; docs/BASE_COLLAPSE.md). The segmentation
        # runs keep it.
        "data.photometric=false",
        # stage 0 is the backbone's classification pretraining (AugReg's crops zoom in too), not the image-level
        # loss: it keeps data.scale's zoomed crops, as when its recipe was measured (docs/BASE_COLLAPSE.md)
        "data.tag_sources.0.scale=[]",
    ]
    return load_config("demo", overrides + list(extra or []))


def run_pretraining(cfg: Config) -> tuple[Path, PretrainSummary]:
    """Stage 0 (resumes, or reuses a finished run, from its work dir) and the summary for the report."""
    from larvseg.train.logger import read_metrics
    from larvseg.train.pretrain import pretrain

    t0 = time.perf_counter()
    npz = pretrain(cfg, resume="auto")
    records = [r for r in read_metrics(Path(cfg.pretrain.work_dir) / "metrics.jsonl") if r["kind"] == "train"]
    return npz, PretrainSummary(
        path=str(npz),
        iters=cfg.pretrain.iters,
        batch_size=cfg.pretrain.batch_size,
        loss=cfg.pretrain.loss,
        lr=cfg.pretrain.lr,
        steps=[r["step"] for r in records],
        losses=[r["loss"] for r in records],
        top1=[100.0 * r["top1"] for r in records],
        seconds=time.perf_counter() - t0,
        photometric=cfg.data.photometric,
    )


def train_variant(cfg: Config) -> tuple[Segmenter, Vocabulary]:
    """Train with the real loop (from scratch) and return the final model, loaded from its exported
    weights, with the run's vocabulary."""
    vocab, segmenter, loader = build(cfg, distributed.init_from_env(cfg.train.device))
    # the demo config evaluates after training (demo_evaluator), not in the loop; one for eval_interval overrides
    work_dir = train(cfg, vocab, segmenter, loader, resume="none", evaluator=Evaluator(cfg, vocab))
    return load_segmenter(Path(work_dir) / FINAL_WEIGHTS).segmenter, vocab


def demo_evaluator(cfg: Config, vocab: Vocabulary) -> Evaluator:
    """``larvseg eval``'s evaluation of ``cfg``'s evaluation set, restricted to the benchmark's classes."""
    restricted = dataclasses.replace(
        cfg, eval=dataclasses.replace(cfg.eval, classes=",".join(c.name for c in DEMO_CLASSES))
    )
    return Evaluator(restricted, vocab)


def evaluate_variant(
    evaluator: Evaluator, segmenter: torch.nn.Module, panel_images: int
) -> tuple[dict, list[PanelRow]]:
    """mIoU (all / base / novel) over the benchmark's classes, per-class IoU in DEMO_CLASSES order, and
    the panel rows of the first images (labels and predictions as indices into DEMO_CLASSES)."""
    vocab = evaluator.vocab
    results = evaluator.run(segmenter, keep_predictions=panel_images, verbose=False)
    rows = {r["union_id"]: r for r in results["per_class"]}
    union_ids = vocab.ids([c.name for c in DEMO_CLASSES])
    roles = [("base" if rows[u]["base"] else "novel") for u in union_ids]
    if roles != [c.role for c in DEMO_CLASSES]:  # the config's seg sources decide base/novel in the Evaluator
        raise RuntimeError(f"base/novel split of the evaluation {roles} differs from the benchmark's")
    to_demo = np.full(len(vocab) + 1, -1, dtype=np.int64)  # union id -> demo class index (-1: none)
    to_demo[union_ids] = np.arange(len(DEMO_CLASSES))
    panel = []
    for item in results.get("predictions", []):
        lab = item["label"]
        shown = np.where(lab == IGNORE_INDEX, -1, to_demo[np.minimum(lab, len(vocab))])
        panel.append(PanelRow(Path(item["path"]).stem, item["image"], shown, {"": to_demo[item["prediction"]]}))
    metrics = {k: results[k] for k in ("mIoU", "mIoU_base", "mIoU_novel")}
    metrics["IoU"] = [rows[u]["IoU"] for u in union_ids]
    return metrics, panel


def describe_model(cfg: Config, segmenter: Segmenter) -> str:
    """The report's model line, from the config and the model actually trained."""
    backbone: VisionTransformer = segmenter.backbone
    init = (
        f"initialised from `{cfg.model.pretrained}` (`model.pretrained={Path(cfg.model.pretrained).name}`, "
        "loaded by the AugReg loader)"
        if cfg.model.pretrained
        else "**random initialisation**: no pretrained weights are used, so absolute numbers are far below "
        "what a pretrained backbone gives"
    )
    return (
        f"{cfg.model.arch} (ViT, {backbone.embed_dim}-d, {len(backbone.blocks)} blocks, patch "
        f"{backbone.patch_size}) with the cosine classifier, {init}"
    )


def trained_bank(cfg: Config) -> MemoryBank | None:
    """The CAC memory bank at the end of training (in the last training checkpoint; the exported weights
    leave it out), or None for a run without the CAC."""
    if not cfg.model.cac or cfg.model.oracle_attention:  # the oracle run never fills its bank
        return None
    path = latest_checkpoint(cfg.work_dir())
    if path is None:
        raise FileNotFoundError(f"{cfg.work_dir()}: no training checkpoint to read the CAC memory bank from")
    return memory_bank_from_weights(load_checkpoint(path)["model"])


@dataclass
class Job:
    variant: Variant
    seed: int
    cfg: Config
    panel_images: int
    layout: BenchmarkLayout


@dataclass
class JobOutput:
    result: RunResult
    rows: list[PanelRow]
    diagnostics: FeatureDiagnostics
    image_level: ImageLevelProbe | None = None  # runs with image-level data (checks P2 and M)
    log: str = ""


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ["LARVSEG_THREADS"] = str(threads)  # train() configures its threads from this (larvseg.threads)


def _init_worker_process(threads: int, console: bool, debug: bool) -> None:
    """A worker process is a fresh interpreter: it shows its status as this process does (``console``:
    this process has set up its console logging, larvseg.log)."""
    if console:
        setup_logging(debug)
    _init_worker(threads)


def run_job(job: Job) -> JobOutput:
    """Train, evaluate and diagnose one (variant, seed); runs in a worker process."""
    from larvseg.demo.diagnostics import feature_diagnostics
    from larvseg.models.attentive_classifier import BackgroundRule

    cfg = job.cfg
    t0 = time.perf_counter()
    segmenter, vocab = train_variant(cfg)
    t1 = time.perf_counter()
    evaluator = demo_evaluator(cfg, vocab)
    metrics, rows = evaluate_variant(evaluator, segmenter, job.panel_images)
    union_ids = np.array([vocab.index(c.name) for c in DEMO_CLASSES], dtype=np.int64)
    base_mask = np.array([c.role == "base" for c in DEMO_CLASSES])
    m = cfg.model
    bank, rule = trained_bank(cfg), BackgroundRule(m.bg_topk, m.bg_score_thresh, m.bg_mse_thresh)
    diag = feature_diagnostics(segmenter, evaluator.dataset, union_ids, base_mask, bank, rule)
    probe = probe_image_level(segmenter, cfg, job.layout, union_ids, bank, rule) if cfg.data.tag_sources else None
    t2 = time.perf_counter()
    result = RunResult(
        job.variant.label,
        job.seed,
        metrics["mIoU"],
        metrics["mIoU_base"],
        metrics["mIoU_novel"],
        [float(x) for x in metrics["IoU"]],
        t1 - t0,
        t2 - t1,
    )
    return JobOutput(result, rows, diag, probe)


def run_jobs(
    jobs: list[Any],
    workers: int,
    work: Callable[[Any], Any] = run_job,
    done: Callable[[int, int, Any], None] | None = None,
) -> list[Any]:
    """``work(job)`` for every job (default: :func:`run_job`) in its own single-threaded worker, ``workers`` at
    a time; ``done(i, total, output)`` reports each as it finishes (default: the demo's per-run line);
    outputs in job order. ``work`` must be a module-level function (the workers are spawned)."""
    done = done or _say_done
    outputs: list[Any] = [None] * len(jobs)
    if workers <= 1:  # in this process: its thread settings are restored afterwards
        threads_before, env_before = torch.get_num_threads(), os.environ.get("LARVSEG_THREADS")
        _init_worker(THREADS_PER_RUN)
        try:
            for i, job in enumerate(jobs):
                outputs[i] = work(job)
                done(i, len(jobs), outputs[i])
        finally:
            torch.set_num_threads(threads_before)
            if env_before is None:
                os.environ.pop("LARVSEG_THREADS", None)
            else:
                os.environ["LARVSEG_THREADS"] = env_before
        return outputs
    # spawn: a fresh interpreter per worker (no forked torch thread pools), each set to one thread
    logs = (has_console(), log.isEnabledFor(logging.DEBUG))
    with ProcessPoolExecutor(
        workers, mp_context=get_context("spawn"), initializer=_init_worker_process, initargs=(THREADS_PER_RUN, *logs)
    ) as pool:
        futures = {pool.submit(work, job): i for i, job in enumerate(jobs)}
        for fut in as_completed(futures):
            i = futures[fut]
            outputs[i] = fut.result()
            done(i, len(jobs), outputs[i])
    return outputs


def _say_done(i: int, total: int, out: JobOutput) -> None:
    r = out.result
    _say(
        f"[{i + 1}/{total}] {r.variant}, seed {r.seed}: mIoU {r.miou:.1f}, base {r.miou_base:.1f}, "
        f"novel {r.miou_novel:.1f} (train {r.train_seconds:.0f} s, eval {r.eval_seconds:.0f} s)"
    )


def default_jobs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def prepare_backbone(
    out: Path, data: Path, profile: Profile, extra: list[str] | None, benchmark: str
) -> tuple[BenchmarkLayout, Path, PretrainSummary]:
    """Stages 1-2: the mini benchmark under ``data`` (generated unless there) and the stage-0 backbone under
    ``<out>/pretrain`` (reused when finished); returns the layout, the backbone's ``.npz`` and its summary."""
    _say(f"mini benchmark ({benchmark} family): {data}")
    spec = BENCHMARKS[benchmark]
    if profile.benchmark_size:
        num_seg, per_class, num_eval = profile.benchmark_size
        spec = dataclasses.replace(spec, num_seg=num_seg, per_class=per_class, num_eval=num_eval)
    layout = ensure_benchmark(data, spec, progress=_say)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(THREADS_PER_RUN)
    try:
        pcfg = pretrain_config(layout, out, profile.pretrain_iters, extra)
        _say(
            f"stage 0: pretraining {pcfg.model.arch} on every synset of {layout.imagenet} "
            f"({pcfg.pretrain.iters} iterations) -> {pcfg.pretrain.work_dir}"
        )
        npz, pre = run_pretraining(pcfg)
    finally:
        torch.set_num_threads(threads_before)
    _say(f"stage 0: train top-1 {pre.top1[-1]:.1f} % at the end ({pre.seconds:.0f} s); backbone {npz}")
    return layout, npz, pre


def run_demo(
    out: Path,
    data: Path,
    profile: Profile,
    seeds: int,
    extra: list[str] | None = None,
    jobs: int | None = None,
    benchmark: str = "habitat",
) -> Path:
    start = time.perf_counter()
    layout, npz, pre = prepare_backbone(out, data, profile, extra, benchmark)

    seg_seeds = profile.seg_seed_count(seeds)
    variants = [v for v in VARIANTS if v != ORACLE or profile.oracle]
    job_list = []
    for seed in range(seeds):
        for variant in variants:
            if variant == SEG_ONLY and seed >= seg_seeds:
                continue
            work_dir = run_dir(out, seed, variant)
            cfg = variant_config(
                layout, work_dir, variant, seed, profile.iters, [f"model.pretrained={npz.resolve()}", *(extra or [])]
            )
            job_list.append(Job(variant, seed, cfg, profile.panel_images if seed == 0 else 0, layout))
    workers = max(1, min(jobs or default_jobs(), len(job_list)))
    _say(
        f"training {len(job_list)} runs ({', '.join(f'{v.label} x {sum(j.variant == v for j in job_list)}' for v in variants)}; "
        f"{job_list[0].cfg.train.iters} iterations each) in {workers} parallel single-threaded process(es)"
    )
    outputs = run_jobs(job_list, workers)

    results = [o.result for o in outputs]
    panel: list[PanelRow] = []
    for o in outputs:
        if not o.rows:
            continue
        if not panel:
            panel = [PanelRow(r.name, r.image, r.label, {}) for r in o.rows]
        for row, new in zip(panel, o.rows):
            row.predictions[o.result.variant] = new.predictions[""]
    cfg = job_list[-1].cfg
    elapsed = time.perf_counter() - start
    setup = {
        "benchmark": (
            f"{layout.root}, the **{benchmark}** family (C171-style masks for {sum(c.role == 'base' for c in DEMO_CLASSES)} base classes, "
            f"I22K-style folders for all {len(DEMO_CLASSES)} synsets, the only data of the "
            f"{sum(c.role == 'novel' for c in DEMO_CLASSES)} novel classes, "
            "A847-style 16-bit masks for all classes)"
        ),
        # the model line from the config and the model actually trained (the last run's exported weights)
        "model": describe_model(cfg, load_segmenter(Path(cfg.work_dir()) / FINAL_WEIGHTS).segmenter),
        "training": (
            f"{cfg.train.iters} iterations, {cfg.data.seg_batch_size} + {cfg.data.tag_batch_size} images per "
            f"step at {cfg.data.seg_sources[0].crop_size} px, SGD lr {cfg.train.lr}, poly; CPU"
        ),
        "evaluation": (
            f"`larvseg eval`'s code, {cfg.eval.mode} inference, restricted to the benchmark's "
            f"{len(DEMO_CLASSES)} classes (the other classes of the {cfg.data.eval.name}-style set have no "
            "training data in the demo); mIoU in the MMSegmentation convention"
        ),
        "seeds": (
            f"{seeds} paired (segmentation only: {seg_seeds}; profile {profile_name(profile)}); std is the sample std "
            "over seeds"
        ),
        "wall time": (
            f"{elapsed / 60:.1f} min: stage 0 single-threaded, then {len(job_list)} runs in {workers} "
            f"parallel process(es) of {THREADS_PER_RUN} thread each"
        ),
        "checkpoints": "; ".join(
            f"{variant.label}: "
            + ", ".join(f"`{run_dir(out, j.seed, variant) / FINAL_WEIGHTS}`" for j in job_list if j.variant == variant)
            for variant in variants
        ),
        # predict defaults to the classes with training data (the benchmark's 14)
        "predict with LarvSeg (from the folder the demo ran in)": (
            f"`larvseg predict {run_dir(out, 0, LARVSEG) / FINAL_WEIGHTS} {layout.eval_images} "
            f"--out {out / 'predictions'}`"
        ),
    }
    diagnostics = {(o.result.variant, o.result.seed): o.diagnostics for o in outputs}
    probes = {(o.result.variant, o.result.seed): o.image_level for o in outputs if o.image_level is not None}
    compared = (SEG_ONLY.label, BASELINE.label, LARVSEG.label)
    claim = ClaimInputs(diagnostics, probes, compared, ORACLE.label if profile.oracle else None, benchmark)
    return write_report(
        out,
        results,
        [c.name for c in DEMO_CLASSES],
        [c.role for c in DEMO_CLASSES],
        panel,
        setup,
        compared,
        pretraining=pre,
        diagnostics=diagnostics,
        claim=claim,
    )


def profile_name(profile: Profile) -> str:
    return next(name for name, p in PROFILES.items() if p == profile)


def demo_arguments(args: argparse.Namespace) -> tuple[Profile, int, Path, Path, int | None]:
    """``larvseg demo``'s arguments: (profile, seeds, out, data, jobs)."""
    profile = PROFILES["quick" if args.quick else "full" if getattr(args, "full", False) else "default"]
    seeds = args.seeds or profile.seeds
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    jobs = getattr(args, "jobs", None)
    if jobs is not None and jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    return profile, seeds, out, data, jobs


def main(args: argparse.Namespace) -> int:
    profile, seeds, out, data, jobs = demo_arguments(args)
    report = run_demo(
        out, data, profile, seeds, getattr(args, "overrides", None), jobs, getattr(args, "benchmark", "habitat")
    )
    _say(f"report: {report.resolve()}")
    _say(f"try the LarvSeg model in a browser: larvseg serve {(run_dir(out, 0, LARVSEG) / FINAL_WEIGHTS).resolve()}")
    return 0
