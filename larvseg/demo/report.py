"""The demo's report: a markdown page with the mIoU table, a prediction panel and a per-class IoU chart.

Numbers are reported as they come out: mean +/- sample standard deviation over seeds, every seed's
value listed as well, and the comparison sentences are derived from the numbers (never written in
advance), including the plain statement when LarvSeg does not beat the baseline.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

METRIC_COLUMNS = (("miou", "mIoU (all)"), ("miou_base", "mIoU base"), ("miou_novel", "mIoU novel"))


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


def write_panel(path: Path, rows: Sequence[PanelRow], variants: Sequence[str], class_names: Sequence[str],
                class_roles: Sequence[str]) -> None:
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
    handles = [Patch(color=palette[i] / 255, label=f"{n} ({role})") for i, (n, role) in enumerate(zip(class_names, class_roles))]
    handles.append(Patch(color="black", label="unlabeled"))
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_class_chart(path: Path, results: Sequence[RunResult], class_names: Sequence[str],
                      class_roles: Sequence[str]) -> None:
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
        out.append(f"The baseline image-level loss reaches {b.text()} novel mIoU, {rel} segmentation only "
                   f"({b.mean - s.mean:+.1f}).")
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


def write_report(out_dir: str | os.PathLike, results: Sequence[RunResult], class_names: Sequence[str],
                 class_roles: Sequence[str], panel_rows: Sequence[PanelRow], setup: dict[str, str],
                 variant_roles: tuple[str, str, str], notes: Sequence[str] = ()) -> Path:
    """Write ``report.md``, ``panel.png`` and ``per_class_iou.png`` into ``out_dir``; return the markdown path.

    ``variant_roles``: the names of the (segmentation-only, baseline, LarvSeg) variants, for the findings.
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
    lines += ["", f"## mIoU on the evaluation set (%, mean ± std over {len(seeds)} seed{'s' if len(seeds) > 1 else ''})", ""]
    lines.append("| variant | " + " | ".join(title for _, title in METRIC_COLUMNS) + " |")
    lines.append("|---|" + "---:|" * len(METRIC_COLUMNS))
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(summary[v][key].text() for key, _ in METRIC_COLUMNS) + " |")
    lines += ["", "## Findings", ""]
    lines += [f"- {s}" for s in findings(summary, *variant_roles)]
    lines += [f"- {s}" for s in notes]
    lines += ["", "## Every run", "", "| variant | seed | mIoU (all) | mIoU base | mIoU novel | train s | eval s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.variant} | {r.seed} | {r.miou:.1f} | {r.miou_base:.1f} | {r.miou_novel:.1f} | "
                     f"{r.train_seconds:.0f} | {r.eval_seconds:.0f} |")
    lines += ["", "## Per-class IoU (%, mean over seeds)", "",
              "| class | role | " + " | ".join(variants) + " |", "|---|---|" + "---:|" * len(variants)]
    for k, (name, role) in enumerate(zip(class_names, class_roles)):
        cells = []
        for v in variants:
            vals = [r.class_iou[k] for r in results if r.variant == v and not math.isnan(r.class_iou[k])]
            cells.append(f"{np.mean(vals):.1f}" if vals else "n/a")
        lines.append(f"| {name} | {role} | " + " | ".join(cells) + " |")
    lines += ["", "## Figures", "",
              "Predictions on evaluation images (columns: image, ground truth, each variant; first seed's models):", "",
              "![predictions](panel.png)", "", "Per-class IoU:", "", "![per-class IoU](per_class_iou.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


__all__ = ["PanelRow", "RunResult", "Summary", "class_palette", "findings", "summarise", "summarise_results",
           "write_class_chart", "write_panel", "write_report"]
