"""``larvseg demo --compare OPTION [OPTION ...]``: options of the image-level loss against the paper's, paired by seed.

    larvseg demo [--quick] [--benchmark habitat|uniform] [--out DIR] [key=value ...] \\
        --compare model.image_loss.pooling=region "region+conf: model.image_loss.pooling=region model.image_loss.confident_base=0.5"

Each OPTION is one argument: config overrides separated by spaces (quote it when it has several), with an
optional ``LABEL:`` in front; without one, the label is the overrides with ``model.image_loss.`` left out
(``pooling=region``). On the demo's benchmark and stage-0 backbone (larvseg.demo.run), with the profile's
paired seeds, it trains segmentation only (on the profile's segmentation seeds, as the demo), the paper's
loss and every option, each as the baseline (CAC off) and LarvSeg (CAC on), evaluates each with the demo's
evaluation and writes ``<out>/compare.md`` and ``<out>/compare.json`` (printed too): per loss and variant,
base and novel mIoU, the paired difference against the paper's loss with its 95 % Student-t interval
(larvseg.demo.checks.t_interval), the seeds it improved, base mIoU against segmentation only, the share of
the paper's novel gain kept, and the base -> novel and novel -> base leakage from the evaluation's confusion
matrix (:func:`leakage`).

Runs live where the demo puts them (``<out>/runs/seed<k>/<variant>``: the paper's loss and segmentation
only, shared with ``larvseg demo --out`` the same folder) and, per option, under
``<out>/runs/seed<k>/<option folder>/<variant>``. A finished run is **reused** (neither trained nor evaluated
again) when its ``compare_run.json`` was written for the identical key: the fully resolved config, the
SHA-256 of the stage-0 backbone and of the benchmark's ``benchmark.json``. So the paper's runs are trained
once for any number of compare invocations on the same ``--out``, and a killed compare resumes with the runs
it had not finished.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from larvseg import atomic
from larvseg.config import Config, load_config
from larvseg.data.synthetic import DEMO_CLASSES
from larvseg.demo.checks import BASE_TOLERANCE, CONFIDENCE, Interval, t_interval
from larvseg.demo.run import (
    BASELINE,
    LARVSEG,
    SEG_ONLY,
    Profile,
    Variant,
    _say,
    default_jobs,
    demo_arguments,
    demo_evaluator,
    prepare_backbone,
    profile_name,
    run_dir,
    run_jobs,
    train_variant,
    variant_config,
)
from larvseg.demo.run import main as demo_main
from larvseg.domains import split_compare_option
from larvseg.errors import UserError
from larvseg.models.image_loss import is_paper

log = logging.getLogger(__name__)

PAPER = "paper"  # the label of the paper's loss (model.image_loss at its defaults)
COMPARED = (BASELINE, LARVSEG)  # the variants trained with every loss
NOVEL_GAIN_KEPT = 90.0  # % of the paper's novel gain over segmentation only an option must keep (issue 25's bar)
RUN_RECORD = "compare_run.json"  # in each run's work dir: the key it was trained for and its evaluation


_FOLDER_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


class CompareOptionError(UserError, ValueError):
    """A malformed ``--compare`` OPTION, or two OPTIONs that would share a label or a run folder."""

    hint = "see larvseg demo --help"


@dataclass(frozen=True)
class LossOption:
    """One compared option: its label in the table, its config overrides, its run folder under ``seed<k>``."""

    label: str
    overrides: tuple[str, ...]

    @property
    def folder(self) -> str:
        return _FOLDER_UNSAFE.sub("_", "+".join(o.removeprefix("model.image_loss.") for o in self.overrides))


def parse_option(text: str) -> LossOption:
    """``[LABEL:] KEY=VALUE [KEY=VALUE ...]`` (larvseg.domains.split_compare_option) -> LossOption; without a
    label, the overrides with ``model.image_loss.`` left out (CompareOptionError naming the option when malformed)."""
    try:
        label, overrides = split_compare_option(text)
    except ValueError as exc:
        raise CompareOptionError(f"--compare {text!r}: {exc}") from None
    return LossOption(label or " ".join(o.removeprefix("model.image_loss.") for o in overrides), tuple(overrides))


def parse_options(texts: list[str]) -> list[LossOption]:
    """Every OPTION of ``--compare`` (syntax: larvseg.domains.split_compare_option). Labels must be distinct and
    differ from the reference rows'; overrides (which name the run folder) must be distinct."""
    options = [parse_option(t) for t in texts]
    labels: dict[str, str] = {PAPER: "the paper's loss", SEG_ONLY.label: "segmentation only"}
    folders: dict[str, str] = {}
    for o in options:
        if o.label in labels:
            raise CompareOptionError(
                f"--compare: the label {o.label!r} is taken by {labels[o.label]}; give another LABEL:"
            )
        if o.folder in folders:
            raise CompareOptionError(
                f"--compare: {folders[o.folder]!r} and {o.label!r} have the same overrides; compare each option once"
            )
        labels[o.label], folders[o.folder] = "another OPTION", o.label
    return options


# ----------------------------------------------------------------------------------------------
# Leakage from the confusion matrix


def leakage(matrix: np.ndarray, base_mask: np.ndarray) -> tuple[float, float]:
    """(base -> novel, novel -> base), in %: the share of base-class ground-truth pixels predicted as some novel
    class, and of novel-class ground-truth pixels predicted as some base class. ``matrix`` is the evaluation's
    (E + 1) x (E + 1) confusion matrix (rows ground truth, columns prediction, the last of each "other",
    larvseg.eval.confusion); the denominators are the classes' whole rows, "other" predictions included.
    NaN where a group has no ground-truth pixel."""
    m = np.asarray(matrix, dtype=np.float64)
    base = np.asarray(base_mask, dtype=bool)
    e = base.size
    if m.shape != (e + 1, e + 1):
        raise ValueError(f"leakage: a confusion matrix of {e} classes must be {(e + 1, e + 1)}, got {m.shape}")
    novel = ~base

    def share(gt: np.ndarray, pred: np.ndarray) -> float:
        rows = m[:e][gt]
        total = rows.sum()
        return float(100.0 * rows[:, :e][:, pred].sum() / total) if total > 0 else float("nan")

    return share(base, novel), share(novel, base)


# ----------------------------------------------------------------------------------------------
# One run: reuse or train, then evaluate


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_key(cfg: Config, backbone_sha256: str, benchmark_sha256: str) -> dict[str, Any]:
    """What identifies a run: the resolved config (JSON-normalised), the backbone's and the benchmark's hashes."""
    return {
        "config": json.loads(json.dumps(cfg.to_dict())),
        "backbone_sha256": backbone_sha256,
        "benchmark_sha256": benchmark_sha256,
    }


def finished_record(cfg: Config, key: dict[str, Any]) -> dict[str, Any] | None:
    """The run record in ``cfg``'s work dir if it was written for ``key`` (a finished run), else None."""
    path = Path(cfg.work_dir()) / RUN_RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("key") == key else None


@dataclass
class CompareJob:
    loss: str  # PAPER or an option's label
    variant: Variant
    seed: int
    cfg: Config
    key: dict[str, Any]


def run_compare_job(job: CompareJob) -> dict[str, Any]:
    """Train ``job`` from scratch (the demo's training), evaluate it with the demo's evaluation, and write its
    run record (atomically, last: its presence means the run finished); runs in a worker process."""
    t0 = time.perf_counter()
    segmenter, vocab = train_variant(job.cfg)
    t1 = time.perf_counter()
    evaluator = demo_evaluator(job.cfg, vocab)
    eval_dir = Path(job.cfg.work_dir()) / "compare_eval"
    results = evaluator.run(segmenter, out_dir=eval_dir, verbose=False)
    matrix = np.load(eval_dir / "confusion.npy")
    base_to_novel, novel_to_base = leakage(matrix, evaluator.classes[1])
    record = {
        "key": job.key,
        "loss": job.loss,
        "variant": job.variant.label,
        "seed": job.seed,
        "mIoU": results["mIoU"],
        "mIoU_base": results["mIoU_base"],
        "mIoU_novel": results["mIoU_novel"],
        "base_to_novel": base_to_novel,
        "novel_to_base": novel_to_base,
        "IoU": {c["class"]: c["IoU"] for c in results["per_class"]},
        "train_seconds": t1 - t0,
        "eval_seconds": time.perf_counter() - t1,
    }
    path = Path(job.cfg.work_dir()) / RUN_RECORD
    atomic.atomic_write(path, lambda f: f.write(json.dumps(record, indent=1).encode()))
    return record


def _say_run(i: int, total: int, record: dict[str, Any]) -> None:
    _say(
        f"[{i + 1}/{total}] {record['loss']}, {record['variant']}, seed {record['seed']}: base {record['mIoU_base']:.1f}, "
        f"novel {record['mIoU_novel']:.1f}, base -> novel {record['base_to_novel']:.1f} % "
        f"(train {record['train_seconds']:.0f} s, eval {record['eval_seconds']:.0f} s)"
    )


# ----------------------------------------------------------------------------------------------
# The table


@dataclass
class Row:
    loss: str
    variant: str
    base: dict[int, float]  # per seed
    novel: dict[int, float]
    base_to_novel: dict[int, float]
    novel_to_base: dict[int, float]
    vs_paper: dict[str, Interval] = field(default_factory=dict)  # "base" / "novel": paired differences
    improved: dict[str, int] = field(default_factory=dict)  # seeds where the difference is > 0
    base_vs_seg: float = float("nan")
    novel_gain_kept: float = float("nan")  # % of the paper's novel gain over segmentation only (same variant)

    @property
    def meets_bar(self) -> bool:
        return self.base_vs_seg >= -BASE_TOLERANCE and self.novel_gain_kept >= NOVEL_GAIN_KEPT


def _mean(values: dict[int, float]) -> float:
    return float(np.mean(list(values.values()))) if values else float("nan")


def build_rows(records: list[dict[str, Any]], losses: list[str]) -> list[Row]:
    """Segmentation only, then per loss (paper first) the baseline and LarvSeg rows, with the paired
    differences against the paper's loss on the seeds both have."""

    def row(loss: str, variant: str) -> Row:
        mine = [r for r in records if r["loss"] == loss and r["variant"] == variant]

        def per_seed(k: str) -> dict[int, float]:
            return {r["seed"]: r[k] for r in mine}

        return Row(
            loss,
            variant,
            per_seed("mIoU_base"),
            per_seed("mIoU_novel"),
            per_seed("base_to_novel"),
            per_seed("novel_to_base"),
        )

    seg = row(SEG_ONLY.label, SEG_ONLY.label)
    rows = [seg]
    paper = {v.label: row(PAPER, v.label) for v in COMPARED}
    for loss in losses:
        for v in COMPARED:
            r = paper[v.label] if loss == PAPER else row(loss, v.label)
            ref = paper[v.label]
            r.base_vs_seg = _mean(r.base) - _mean(seg.base)
            paper_gain = _mean(ref.novel) - _mean(seg.novel)
            r.novel_gain_kept = (
                100.0 * (_mean(r.novel) - _mean(seg.novel)) / paper_gain if paper_gain > 0 else float("nan")
            )
            if loss != PAPER:
                for metric in ("base", "novel"):
                    mine, theirs = getattr(r, metric), getattr(ref, metric)
                    diffs = [mine[s] - theirs[s] for s in sorted(mine) if s in theirs]
                    r.vs_paper[metric] = t_interval(diffs)
                    r.improved[metric] = sum(d > 0 for d in diffs)
            rows.append(r)
    return rows


def _cell(interval: Interval | None) -> str:
    if interval is None:
        return "—"
    if interval.n < 2:
        return f"{interval.mean:+.1f} (n = {interval.n})"
    return f"{interval.mean:+.1f} [{interval.lo:+.1f}, {interval.hi:+.1f}]"


def _pct(value: float) -> str:
    return "—" if np.isnan(value) else f"{value:.1f}"


def format_table(rows: list[Row]) -> str:
    """The markdown table of :func:`build_rows`."""
    lines = [
        (
            f"| loss | variant | base mIoU | novel mIoU | base − paper [{CONFIDENCE:.0%} CI] | novel − paper [{CONFIDENCE:.0%} CI] "
            "| seeds improved (base / novel) | base − seg. only | novel gain kept | base → novel % | novel → base % | bar |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        n = len(r.base)
        improved = f"{r.improved['base']}/{n} / {r.improved['novel']}/{n}" if r.improved else "—"
        is_seg = r.variant == SEG_ONLY.label
        lines.append(
            f"| {r.loss if not is_seg else '—'} | {r.variant} | {_mean(r.base):.1f} | {_mean(r.novel):.1f} | "
            f"{_cell(r.vs_paper.get('base'))} | {_cell(r.vs_paper.get('novel'))} | {improved} | "
            f"{'—' if is_seg else f'{r.base_vs_seg:+.1f}'} | {'—' if is_seg or np.isnan(r.novel_gain_kept) else f'{r.novel_gain_kept:.0f} %'} | "
            f"{_pct(_mean(r.base_to_novel))} | {_pct(_mean(r.novel_to_base))} | "
            f"{'—' if is_seg else ('yes' if r.meets_bar else 'no')} |"
        )
    return "\n".join(lines)


BAR_RULE = (
    f"bar: base mIoU at most {BASE_TOLERANCE:.0f} points below segmentation only (base − seg. only >= "
    f"−{BASE_TOLERANCE:.0f}) and novel gain kept >= {NOVEL_GAIN_KEPT:.0f} %, where the novel gain kept is "
    "(novel − segmentation only's novel) / (the paper's novel − segmentation only's novel) of the same variant"
)


def write_comparison(out: Path, rows: list[Row], header: dict[str, str], options: list[LossOption]) -> Path:
    """``<out>/compare.md`` (header lines, the table, how to read it) and ``<out>/compare.json``; returns the .md."""
    md = ["# Image-level loss options against the paper's loss (paired seeds)", ""]
    md += [f"- **{k}**: {v}" for k, v in header.items()]
    md += [
        "",
        format_table(rows),
        "",
        (
            f"Means over seeds; differences against the paper's loss are paired by seed, with their {CONFIDENCE:.0%} "
            "Student-t interval. Leakage (→) is the share of a group's ground-truth pixels predicted as a class of "
            f"the other group, from the evaluation's confusion matrix, mean over seeds. {BAR_RULE}."
        ),
        "",
    ]
    path = out / "compare.md"
    atomic.atomic_write(path, lambda f: f.write("\n".join(md).encode()))

    def interval(i: Interval) -> dict[str, Any]:
        return {
            "mean": i.mean,
            "lo": None if np.isnan(i.lo) else i.lo,
            "hi": None if np.isnan(i.hi) else i.hi,
            "n": i.n,
            "values": i.values,
        }

    def finite(x: float) -> float | None:
        return None if np.isnan(x) else x

    data = {
        "header": header,
        "options": [{"label": o.label, "overrides": list(o.overrides), "folder": o.folder} for o in options],
        "bar": BAR_RULE,
        "rows": [
            {
                "loss": r.loss,
                "variant": r.variant,
                "base": {str(s): v for s, v in r.base.items()},
                "novel": {str(s): v for s, v in r.novel.items()},
                "base_to_novel": {str(s): v for s, v in r.base_to_novel.items()},
                "novel_to_base": {str(s): v for s, v in r.novel_to_base.items()},
                "mean": {
                    "base": _mean(r.base),
                    "novel": _mean(r.novel),
                    "base_to_novel": _mean(r.base_to_novel),
                    "novel_to_base": _mean(r.novel_to_base),
                },
                "vs_paper": {k: interval(i) for k, i in r.vs_paper.items()},
                "improved": r.improved,
                "base_vs_segmentation_only": finite(r.base_vs_seg),
                "novel_gain_kept": finite(r.novel_gain_kept),
                "meets_bar": None if r.variant == SEG_ONLY.label else r.meets_bar,
            }
            for r in rows
        ],
    }
    atomic.atomic_write(out / "compare.json", lambda f: f.write(json.dumps(data, indent=1).encode()))
    return path


# ----------------------------------------------------------------------------------------------
# The command


def compare_jobs(
    out: Path,
    layout: Any,
    npz: Path,
    profile: Profile,
    seeds: int,
    extra: list[str] | None,
    options: list[LossOption],
    key_hashes: tuple[str, str],
) -> list[CompareJob]:
    """Every run of the comparison, segmentation only first, then per seed the paper's loss and each option."""
    seg_seeds = profile.seg_seed_count(seeds)
    common = [f"model.pretrained={npz.resolve()}", *(extra or [])]

    def job(loss: str, variant: Variant, seed: int, work_dir: Path, overrides: tuple[str, ...] = ()) -> CompareJob:
        cfg = variant_config(layout, work_dir, variant, seed, profile.iters, [*common, *overrides])
        return CompareJob(loss, variant, seed, cfg, run_key(cfg, *key_hashes))

    jobs = [job(SEG_ONLY.label, SEG_ONLY, s, run_dir(out, s, SEG_ONLY)) for s in range(seg_seeds)]
    for seed in range(seeds):
        jobs += [job(PAPER, v, seed, run_dir(out, seed, v)) for v in COMPARED]
        for o in options:
            jobs += [
                job(o.label, v, seed, run_dir(out, seed, v).parent / o.folder / v.directory, o.overrides)
                for v in COMPARED
            ]
    return jobs


def run_compare(
    out: Path,
    data: Path,
    profile: Profile,
    seeds: int,
    options: list[LossOption],
    extra: list[str] | None = None,
    jobs: int | None = None,
    benchmark: str = "habitat",
    command: str = "",
) -> Path:
    """The comparison (module docstring); returns ``<out>/compare.md``."""
    start = time.perf_counter()
    if not is_paper(load_config("demo", list(extra or [])).model.image_loss):
        raise CompareOptionError(
            "--compare: the overrides before --compare change model.image_loss, so the reference "
            "would not be the paper's loss; give image-loss overrides as an OPTION"
        )
    for o in options:  # a misspelt key fails now, not after stage 0
        load_config("demo", [*(extra or []), *o.overrides])
    layout, npz, _ = prepare_backbone(out, data, profile, extra, benchmark)
    hashes = (file_sha256(npz), file_sha256(layout.root / "benchmark.json"))
    job_list = compare_jobs(out, layout, npz, profile, seeds, extra, options, hashes)
    records: list[dict[str, Any] | None] = [finished_record(j.cfg, j.key) for j in job_list]
    todo = [j for j, r in zip(job_list, records) if r is None]
    workers = max(1, min(jobs or default_jobs(), len(todo) or 1))
    _say(
        f"compare on the {benchmark} family: {len(job_list)} runs ({len(job_list) - len(todo)} finished ones reused), "
        f"training {len(todo)} in {workers} parallel single-threaded process(es)"
    )
    fresh = iter(run_jobs(todo, workers, run_compare_job, _say_run) if todo else [])
    done = [r if r is not None else next(fresh) for r in records]

    rows = build_rows(done, [PAPER, *(o.label for o in options)])
    seg_seeds = sorted({r["seed"] for r in done if r["loss"] == SEG_ONLY.label})
    header = {
        "command": f"`{command}`" if command else "—",
        "benchmark": f"the {benchmark} family, {layout.root}",
        "profile": (
            f"{profile_name(profile)}: {job_list[-1].cfg.train.iters} iterations per run, {seeds} paired seed(s), "
            f"segmentation only on seed(s) {', '.join(map(str, seg_seeds))}, stage 0 `{npz}`"
        ),
        "losses": "; ".join(
            [f"{PAPER}: model.image_loss at its defaults (mean pooling)"]
            + [f"{o.label}: `{' '.join(o.overrides)}`" for o in options]
        ),
        "evaluation": f"the demo's (its {len(DEMO_CLASSES)} classes)",
        "runs": f"{len(job_list)} ({len(job_list) - len(todo)} reused), {(time.perf_counter() - start) / 60:.1f} min",
    }
    path = write_comparison(out, rows, header, options)
    log.info(format_table(rows))
    _say(f"comparison: {path.resolve()} (and compare.json)")
    return path


def main(args: argparse.Namespace) -> int:
    """``larvseg demo``: the comparison with ``--compare``, else the claim check (larvseg.demo.run.main)."""
    if not getattr(args, "compare", None):
        return demo_main(args)
    profile, seeds, out, data, jobs = demo_arguments(args)
    command = "larvseg demo " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["demo"] else ""
    run_compare(
        out,
        data,
        profile,
        seeds,
        parse_options(args.compare),
        getattr(args, "overrides", None),
        jobs,
        getattr(args, "benchmark", "habitat"),
        command,
    )
    return 0


__all__ = [
    "BAR_RULE",
    "CompareOptionError",
    "LossOption",
    "Row",
    "build_rows",
    "compare_jobs",
    "finished_record",
    "format_table",
    "leakage",
    "main",
    "parse_option",
    "parse_options",
    "run_compare",
    "run_key",
    "write_comparison",
]
