"""The demo's report: a markdown page with the mIoU table, a prediction panel and a per-class IoU chart.

Numbers are reported as they come out: mean +/- sample standard deviation over seeds, every seed's
value listed as well, and the comparison sentences are derived from the numbers (never written in
advance), including the plain statement when LarvSeg does not beat the baseline.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from larvseg.demo.checks import (
    BASE_TOLERANCE,
    CLAIM_RULE,
    P1_MIN_RATIO,
    Interval,
    claim_verdict,
    premise,
    t_interval,
    target_failure,
)

METRIC_COLUMNS = (("miou", "mIoU (all)"), ("miou_base", "mIoU base"), ("miou_novel", "mIoU novel"))


@dataclass
class PretrainSummary:
    """Stage 0: the classification pretraining of the backbone (its own loss and accuracy curve)."""

    path: str
    iters: int
    batch_size: int
    loss: str
    lr: float
    steps: list[int]
    losses: list[float]
    top1: list[float]  # % of training images (augmented crops) whose top class is their tag, per log window
    seconds: float = 0.0
    photometric: bool = True  # colour jitter of the pretraining crops


@dataclass
class RunResult:
    """One trained and evaluated model."""

    variant: str
    seed: int
    miou: float
    miou_base: float
    miou_novel: float
    class_iou: list[float]  # per demo class, in the report's class order; NaN = not in ground truth nor predicted
    train_seconds: float = 0.0
    eval_seconds: float = 0.0


@dataclass
class PanelRow:
    """One evaluation image with its ground truth and each variant's prediction (indices into the class list)."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8
    label: np.ndarray  # (H, W) int, -1 = unlabeled
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # variant -> (H, W) int


@dataclass
class Summary:
    mean: float
    std: float  # sample std (ddof=1); 0 for a single seed
    values: list[float]

    def text(self) -> str:
        return f"{self.mean:.1f} ± {self.std:.1f}"


def summarise(values: Sequence[float]) -> Summary:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return Summary(float(arr.mean()), std, [float(v) for v in arr])


def variant_order(results: Sequence[RunResult]) -> list[str]:
    """Variants in their first-appearance order."""
    return list(dict.fromkeys(r.variant for r in results))


def summarise_results(results: Sequence[RunResult]) -> dict[str, dict[str, Summary]]:
    """variant -> metric key -> Summary over that variant's seeds."""
    return {
        v: {key: summarise([getattr(r, key) for r in results if r.variant == v]) for key, _ in METRIC_COLUMNS}
        for v in variant_order(results)
    }


def class_palette(n: int) -> np.ndarray:
    """(n + 1, 3) uint8 colours: one per class, and black for unlabeled (index -1 -> last row)."""
    cmap = plt.get_cmap("tab20")
    colours = [np.array(cmap(i % 20)[:3]) * 255 for i in range(n)]
    return np.array(colours + [[0, 0, 0]], dtype=np.uint8)


def colourise(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    return palette[labels]  # -1 indexes the last row: black


# ----------------------------------------------------------------------------------------------
# Figures


def write_panel(
    path: Path,
    rows: Sequence[PanelRow],
    variants: Sequence[str],
    class_names: Sequence[str],
    class_roles: Sequence[str],
) -> None:
    """Grid: one row per image; columns image, ground truth, one per variant; a class legend below."""
    palette = class_palette(len(class_names))
    cols = 2 + len(variants)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.1 * cols, 2.1 * len(rows) + 1.2), squeeze=False)
    for r, row in enumerate(rows):
        panels = [("image", row.image), ("ground truth", colourise(row.label, palette))]
        panels += [(v, colourise(row.predictions[v], palette)) for v in variants]
        for c, (title, picture) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
        axes[r, 0].set_ylabel(row.name, fontsize=7)
    handles = [
        Patch(color=palette[i] / 255, label=f"{n} ({role})")
        for i, (n, role) in enumerate(zip(class_names, class_roles))
    ]
    handles.append(Patch(color="black", label="unlabeled"))
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_class_chart(
    path: Path, results: Sequence[RunResult], class_names: Sequence[str], class_roles: Sequence[str]
) -> None:
    """Grouped bars: per class, each variant's IoU (mean over seeds, error bar = std); novel classes shaded."""
    variants = variant_order(results)
    n = len(class_names)
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * n + 2), 3.6))
    for k, role in enumerate(class_roles):
        if role == "novel":
            ax.axvspan(k - 0.5, k + 0.5, color="0.92", zorder=0)
    for j, v in enumerate(variants):
        per_seed = np.array([r.class_iou for r in results if r.variant == v], dtype=np.float64)  # (seeds, n)
        has = ~np.isnan(per_seed)
        counts = has.sum(axis=0)
        mean = np.where(counts > 0, np.nansum(per_seed, axis=0) / np.maximum(counts, 1), 0.0)
        std = np.zeros(n)
        if per_seed.shape[0] > 1:
            sq = np.where(has, (per_seed - mean) ** 2, 0.0).sum(axis=0)
            std = np.sqrt(sq / np.maximum(counts - 1, 1))
        ax.bar(np.arange(n) - 0.4 + width * (j + 0.5), mean, width, yerr=std, label=v, capsize=2, zorder=2)
    ax.set_xticks(np.arange(n))
    ax.set_xticklabels([f"{c}\n({r})" for c, r in zip(class_names, class_roles)], fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_title("Per-class IoU on the evaluation set (novel classes shaded; mean ± std over seeds)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Markdown


def findings(summary: dict[str, dict[str, Summary]], seg_only: str, baseline: str, larvseg: str) -> list[str]:
    """Plain sentences comparing the variants on novel mIoU, derived from the numbers."""
    nov = {v: summary[v]["miou_novel"] for v in (seg_only, baseline, larvseg) if v in summary}
    out = []
    if seg_only in nov:
        s = nov[seg_only]
        verdict = "about 0, as expected: novel classes never get a mask" if s.mean < 2.0 else "unexpectedly above 0"
        out.append(f"Segmentation only scores {s.text()} novel mIoU: {verdict}.")
    if baseline in nov and seg_only in nov:
        b, s = nov[baseline], nov[seg_only]
        rel = "more than" if b.mean > s.mean else "NOT more than"
        out.append(
            f"The baseline image-level loss reaches {b.text()} novel mIoU, {rel} segmentation only "
            f"({b.mean - s.mean:+.1f})."
        )
    if larvseg in nov and baseline in nov:
        l, b = nov[larvseg], nov[baseline]
        diff = l.mean - b.mean
        noise = max(l.std, b.std)
        paired = [lv - bv for lv, bv in zip(l.values, b.values)]
        wins = sum(d > 0 for d in paired)
        if diff > 0:
            head = f"LarvSeg (CAC) beats the baseline on novel mIoU by {diff:+.2f} ({l.text()} vs {b.text()})"
        else:
            head = f"LarvSeg (CAC) does NOT beat the baseline on novel mIoU: {diff:+.2f} ({l.text()} vs {b.text()})"
        detail = f"; it is higher in {wins} of {len(paired)} seeds"
        if len(paired) > 1 and abs(diff) <= noise:
            detail += f", and the difference is within the seed-to-seed standard deviation ({noise:.1f}), so it is not conclusive"
        out.append(head + detail + ".")
    return out


def paired_differences(results: Sequence[RunResult], baseline: str, larvseg: str) -> dict[str, Summary]:
    """Per seed LarvSeg - baseline on novel and base mIoU (seeds both variants have), summarised."""
    by = {(r.variant, r.seed): r for r in results}
    seeds = sorted(s for v, s in by if v == larvseg and (baseline, s) in by)
    return {
        key: summarise([getattr(by[(larvseg, s)], key) - getattr(by[(baseline, s)], key) for s in seeds])
        for key in ("miou_novel", "miou_base")
    }


def base_gaps(summary: dict[str, dict[str, Summary]], seg_only: str) -> dict[str, float]:
    """Mean base mIoU of every other variant minus segmentation only's (NaN where that is missing)."""
    seg_base = summary[seg_only]["miou_base"].mean if seg_only in summary else float("nan")
    return {v: summary[v]["miou_base"].mean - seg_base for v in summary if v != seg_only}


@dataclass
class ClaimInputs:
    """What the claim check reads besides the mIoU results (larvseg.demo.checks has the rule)."""

    diagnostics: dict  # (variant, seed) -> FeatureDiagnostics (P1 from the segmentation-only runs)
    probes: dict  # (variant, seed) -> ImageLevelProbe (P2 from the baseline, M from LarvSeg)
    roles: tuple[str, str, str]  # (segmentation only, baseline, LarvSeg)
    oracle: str | None = None  # the oracle-attention variant (U), if trained
    benchmark: str = "habitat"


def paired_interval(results: Sequence[RunResult], baseline: str, other: str) -> Interval:
    """Per seed ``other`` - ``baseline`` novel mIoU, with its t-interval."""
    return t_interval(paired_differences(results, baseline, other)["miou_novel"].values)


def claim_section(results: Sequence[RunResult], claim: ClaimInputs, class_roles: Sequence[str]) -> list[str]:
    """The pre-registered checks: the rule first, then each check's number and verdict, then the claim's."""
    seg_only, baseline, larvseg = claim.roles
    base_mask = np.array([r == "base" for r in class_roles])
    novel = ~base_mask
    lines = [
        "## The claim check (pre-registered)",
        "",
        f"**Rule.** {CLAIM_RULE}",
        "",
        "| check | what | value | holds |",
        "|---|---|---|---|",
    ]
    confs = [
        d.seed_confusion for (v, _), d in claim.diagnostics.items() if v == seg_only and d.seed_confusion is not None
    ]
    p1 = premise(np.sum(confs, axis=0), base_mask) if confs else None
    p1_holds = p1 is not None and p1.ratio >= P1_MIN_RATIO
    lines.append(
        f"| P1 premise | seed-point propagation on segmentation only ({len(confs)} seed(s)): novel / base mIoU | "
        + (
            f"{p1.miou_novel:.1f} / {p1.miou_base:.1f} = **{p1.ratio:.2f}** | {'yes' if p1_holds else 'no'} |"
            if p1
            else "n/a | no |"
        )
    )
    counts = [np.asarray(p.habitat) for (v, _), p in claim.probes.items() if v == baseline]
    p2 = target_failure(np.sum(counts, axis=0)) if counts else None
    p2_holds = p2 is not None and p2.holds
    lines.append(
        "| P2 target failure | baseline, image-level training images of novel tags: habitat patches predicted "
        "as the tag vs other background patches | "
        + (
            f"**{_fmt(p2.habitat_share)} % vs {_fmt(p2.other_share)} %** | {'yes' if p2_holds else 'no'} |"
            if p2
            else "n/a | no |"
        )
    )
    m_runs = [p for (v, _), p in claim.probes.items() if v == larvseg and p.auc_attention is not None]
    if m_runs:
        att = np.nanmean([np.asarray(p.auc_attention)[novel] for p in m_runs], axis=0)
        cls = np.nanmean([np.asarray(p.auc_classifier)[novel] for p in m_runs], axis=0)
        gap = float(np.nanmean(att - cls))
        lines.append(
            f"| M mechanism | LarvSeg, within-image AUC on image-level training images, novel classes: attention "
            f"vs classifier | {np.nanmean(att):.3f} vs {np.nanmean(cls):.3f}: **{gap:+.3f}** | "
            f"{'yes' if gap > 0 else 'no'} |"
        )
    delta = paired_interval(results, baseline, larvseg)
    lines.append(f"| Δ | LarvSeg − baseline novel mIoU, paired by seed | **{delta.text()}** | see the verdict |")
    if claim.oracle:
        u = paired_interval(results, baseline, claim.oracle)
        lines.append(
            f"| U upper bound | oracle attention − baseline novel mIoU, paired by seed | **{u.text()}** | "
            f"{'beats the baseline' if u.n >= 2 and u.lo > 0 else 'does not beat the baseline' if u.n >= 2 else 'n/a'} |"
        )
    verdict, reason = claim_verdict(delta, p1_holds, p2_holds)
    gaps = base_gaps(summarise_results(results), seg_only)
    kept = all(abs(g) <= BASE_TOLERANCE for g in gaps.values()) and bool(gaps)
    lines += [
        "",
        f"**Verdict ({claim.benchmark} benchmark): {verdict}** ({reason}).",
        "",
        "Base mIoU vs segmentation only: "
        + ", ".join(f"{v} {g:+.1f}" for v, g in gaps.items() if v != claim.oracle)
        + f" ({'within' if kept else 'NOT within'} the ±{BASE_TOLERANCE:.0f}-point tolerance).",
    ]
    if claim.oracle:
        lines[-1] += f" {claim.oracle}: {gaps.get(claim.oracle, float('nan')):+.1f}."
    return lines + [""]


def write_pretrain_curve(path: Path, pre: PretrainSummary) -> None:
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(pre.steps, pre.losses, marker=".")
    ax[0].set(xlabel="iteration", ylabel=f"{pre.loss} CE", title="stage 0: classification loss")
    ax[1].plot(pre.steps, pre.top1, marker=".", color="tab:green")
    ax[1].set(xlabel="iteration", ylabel="top-1 (%)", title="stage 0: training top-1 accuracy", ylim=(0, 100))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _fmt(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.2f}"


def diagnostics_lines(
    diagnostics: dict,
    variants: Sequence[str],
    class_names: Sequence[str],
    class_roles: Sequence[str],
    larvseg: str,
    gaps: dict[str, float] | None = None,
) -> list[str]:
    """Markdown: base patches predicted as novel per variant; per-class AUCs of the LarvSeg runs.
    ``gaps``: base mIoU of each image-level variant minus segmentation only (explains any drop)."""
    lines = [
        "## Diagnostics at feature resolution",
        "",
        "Base-labelled patches predicted as a novel class (%, mean over seeds), and per novel class the ratio "
        "of predicted to ground-truth patches (1.0 = as many as in the ground truth):",
        "",
        "| variant | base → novel % | "
        + " | ".join(n for n, r in zip(class_names, class_roles) if r == "novel")
        + " |",
        "|---|---:|" + "---:|" * sum(r == "novel" for r in class_roles),
    ]
    novel_idx = [k for k, r in enumerate(class_roles) if r == "novel"]
    for v in variants:
        ds = [d for (vv, _), d in diagnostics.items() if vv == v]
        if not ds:
            continue
        leak = np.nanmean([d.base_to_novel for d in ds])
        ratios = [np.nanmean([d.pred_over_gt[k] for d in ds]) for k in novel_idx]
        lines.append(f"| {v} | {leak:.1f} | " + " | ".join(f"{x:.2f}" for x in ratios) + " |")
    leaks = {
        v: float(np.nanmean([d.base_to_novel for (vv, _), d in diagnostics.items() if vv == v]))
        for v in variants
        if any(vv == v for vv, _ in diagnostics)
    }
    dropped = {v: g for v, g in (gaps or {}).items() if g < -BASE_TOLERANCE}
    if dropped:
        worst = min(dropped, key=lambda v: dropped[v])
        lines += [
            "",
            f"- Base mIoU drops with image-level data ({worst}: {dropped[worst]:+.1f} vs segmentation only; "
            f"{leaks.get(worst, float('nan')):.1f} % of the base-labelled patches predicted as a novel class). Cause: "
            "the image-level loss pools the logits of single-tag images whose tagged object is a minority of "
            "the pixels and whose background is always base classes, and so raises the tag on the background; "
            "a weakly pretrained backbone cannot resist it (docs/BASE_COLLAPSE.md has the measurements).",
        ]
    elif gaps:
        lines += [
            "",
            "- Base mIoU is kept with image-level data: "
            + ", ".join(f"{v} {g:+.1f}" for v, g in gaps.items())
            + f" vs segmentation only (tolerance ±{BASE_TOLERANCE:.0f}); "
            "the base → novel share above still counts base patches now predicted as a novel class, a cost that "
            "stays within the tolerance (docs/BASE_COLLAPSE.md).",
        ]
    cac = [d for (vv, _), d in diagnostics.items() if vv == larvseg and d.auc_bank is not None]
    if cac:
        lines += [
            "",
            f'ROC-AUC of three scores for "this patch is class l" ({larvseg} runs, mean over seeds): the bank\'s '
            "foreground score p·q̄_l, the classifier's raw score s(·, l), and the final CAC attention for an image "
            "tagged l. The CAC can only add information where the bank separates a class better than the "
            "classifier does.",
            "",
            "| class | role | AUC bank | AUC classifier | AUC attention | bank − classifier |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for k, (name, role) in enumerate(zip(class_names, class_roles)):
            b = float(np.nanmean([d.auc_bank[k] for d in cac]))
            c = float(np.nanmean([d.auc_classifier[k] for d in cac]))
            a = float(np.nanmean([d.auc_attention[k] for d in cac]))
            lines.append(f"| {name} | {role} | {_fmt(b)} | {_fmt(c)} | {_fmt(a)} | {b - c:+.2f} |")
        auc_gaps = [float(np.nanmean([d.auc_bank[k] - d.auc_classifier[k] for d in cac])) for k in novel_idx]
        better = sum(g > 0.02 for g in auc_gaps)
        lines += [
            "",
            f"- On {better} of {len(novel_idx)} novel classes the bank separates the class better than the "
            f"classifier by more than 0.02 AUC (mean bank − classifier over novel classes {np.mean(auc_gaps):+.3f}).",
        ]
    return lines + [""]


def write_report(
    out_dir: str | os.PathLike,
    results: Sequence[RunResult],
    class_names: Sequence[str],
    class_roles: Sequence[str],
    panel_rows: Sequence[PanelRow],
    setup: dict[str, str],
    variant_roles: tuple[str, str, str],
    notes: Sequence[str] = (),
    pretraining: PretrainSummary | None = None,
    diagnostics: dict | None = None,
    claim: ClaimInputs | None = None,
) -> Path:
    """Write ``report.md``, ``panel.png`` and ``per_class_iou.png`` (and ``pretraining.png``) into ``out_dir``;
    return the markdown path.

    ``variant_roles``: the names of the (segmentation-only, baseline, LarvSeg) variants, for the findings.
    ``pretraining``: stage 0's summary; ``diagnostics``: (variant, seed) -> FeatureDiagnostics; ``claim``: the
    inputs of the pre-registered claim check (its section comes right after the mIoU table).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not results:
        raise ValueError("write_report: no results to report")
    variants = variant_order(results)
    summary = summarise_results(results)
    seeds = sorted({r.seed for r in results})

    write_panel(out / "panel.png", panel_rows, variants, class_names, class_roles)
    write_class_chart(out / "per_class_iou.png", results, class_names, class_roles)

    lines = ["# LarvSeg demo: the mini benchmark", ""]
    lines += [f"- **{k}**: {v}" for k, v in setup.items()]
    if pretraining is not None:
        write_pretrain_curve(out / "pretraining.png", pretraining)
        p = pretraining
        lines += [
            "",
            "## Stage 0: classification pretraining of the backbone",
            "",
            f"`larvseg pretrain`'s code on every synset folder of the benchmark's I22K/fall11_whole: class token + "
            f"linear head, {p.loss} cross-entropy, AdamW lr {p.lr:g}, batch {p.batch_size}, {p.iters} iterations, "
            f"the project's augmentation{'' if p.photometric else ' without colour jitter'}; written as an AugReg .npz ({Path(p.path).name}) that every variant "
            f"below loads with `model.pretrained=` ({p.seconds:.0f} s).",
            "",
            f"- training top-1 accuracy (augmented crops) over the last logged window: **{p.top1[-1]:.1f} %** "
            f"(first window {p.top1[0]:.1f} %; chance {100.0 / len(class_names):.1f} %); loss {p.losses[0]:.3f} → "
            f"{p.losses[-1]:.3f}",
            "",
            "![pretraining curve](pretraining.png)",
        ]
    lines += [
        "",
        f"## mIoU on the evaluation set (%, mean ± std over {len(seeds)} seed{'s' if len(seeds) > 1 else ''})",
        "",
    ]
    lines.append("| variant | " + " | ".join(title for _, title in METRIC_COLUMNS) + " |")
    lines.append("|---|" + "---:|" * len(METRIC_COLUMNS))
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(summary[v][key].text() for key, _ in METRIC_COLUMNS) + " |")
    if claim is not None:
        lines += [""] + claim_section(results, claim, class_roles)
    lines += ["", "## Findings", ""]
    lines += [f"- {s}" for s in findings(summary, *variant_roles)]
    lines += [f"- {s}" for s in notes]
    seg_only, baseline, larvseg = variant_roles
    if baseline in summary and larvseg in summary:
        paired = paired_differences(results, baseline, larvseg)
        by = {(r.variant, r.seed): r for r in results}
        lines += [
            "",
            f"## Paired differences, {larvseg} − {baseline} (same seed)",
            "",
            "| seed | Δ novel mIoU | Δ base mIoU |",
            "|---:|---:|---:|",
        ]
        for seed in seeds:
            if (larvseg, seed) in by and (baseline, seed) in by:
                lv, bv = by[(larvseg, seed)], by[(baseline, seed)]
                lines.append(f"| {seed} | {lv.miou_novel - bv.miou_novel:+.2f} | {lv.miou_base - bv.miou_base:+.2f} |")
        lines.append(
            f"| mean ± std | {paired['miou_novel'].mean:+.2f} ± {paired['miou_novel'].std:.2f} | "
            f"{paired['miou_base'].mean:+.2f} ± {paired['miou_base'].std:.2f} |"
        )
    if diagnostics:
        gaps = base_gaps(summary, seg_only) if seg_only in summary else {}
        lines += [""] + diagnostics_lines(diagnostics, variants, class_names, class_roles, larvseg, gaps)
    lines += [
        "",
        "## Every run",
        "",
        "| variant | seed | mIoU (all) | mIoU base | mIoU novel | train s | eval s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.variant} | {r.seed} | {r.miou:.1f} | {r.miou_base:.1f} | {r.miou_novel:.1f} | "
            f"{r.train_seconds:.0f} | {r.eval_seconds:.0f} |"
        )
    lines += [
        "",
        "## Per-class IoU (%, mean over seeds)",
        "",
        "| class | role | " + " | ".join(variants) + " |",
        "|---|---|" + "---:|" * len(variants),
    ]
    for k, (name, role) in enumerate(zip(class_names, class_roles)):
        cells = []
        for v in variants:
            vals = [r.class_iou[k] for r in results if r.variant == v and not math.isnan(r.class_iou[k])]
            cells.append(f"{np.mean(vals):.1f}" if vals else "n/a")
        lines.append(f"| {name} | {role} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Figures",
        "",
        "Predictions on evaluation images (columns: image, ground truth, each variant; first seed's models):",
        "",
        "![predictions](panel.png)",
        "",
        "Per-class IoU:",
        "",
        "![per-class IoU](per_class_iou.png)",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


__all__ = [
    "ClaimInputs",
    "PanelRow",
    "PretrainSummary",
    "RunResult",
    "Summary",
    "base_gaps",
    "claim_section",
    "class_palette",
    "findings",
    "paired_differences",
    "summarise",
    "summarise_results",
    "write_class_chart",
    "write_panel",
    "write_report",
]
