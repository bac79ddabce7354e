"""Training metrics: a tqdm progress bar, a text line every ``log_interval`` steps (logged at INFO), ``metrics.jsonl``,
a training-curve PNG and, when tensorboardX is installed, TensorBoard event files (larvseg.tensorboard)
in the work dir. Only rank 0 writes (``enabled``); the values it receives are
already averaged over ranks by the loop.

Each JSONL record is one of
    {"kind": "train", "step": s, "lr": ..., "loss": ..., "seg/C171": ..., ..., "images_per_s": ..., "eta_s": ...}
    {"kind": "eval", "step": s, "mIoU": ..., ...}
where train values are means over the steps since the previous record and ``step`` counts completed
iterations.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from larvseg.progress import progress_bar
from larvseg.tensorboard import TensorBoardLog, log_images, tensorboard_available

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "training_curve.png"

log = logging.getLogger(__name__)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{h:02d}:{m:02d}:{s:02d}"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricLogger:
    def __init__(
        self,
        work_dir: str | Path,
        total_iters: int,
        start_step: int,
        images_per_step: int,
        log_interval: int,
        enabled: bool,
        tensorboard: bool = True,
    ) -> None:
        self.path = Path(work_dir) / METRICS_FILE
        self.curve_path = Path(work_dir) / CURVE_FILE
        self.total_iters, self.images_per_step = total_iters, images_per_step
        self.log_interval = max(1, log_interval)
        self.enabled = enabled
        self._sums: dict[str, float] = {}
        self._count = 0
        self._window_start = time.perf_counter()
        self._last_step = start_step
        # on by default when tensorboardX is installed; the JSONL stays the source of truth
        self.tb = TensorBoardLog(work_dir, start_step) if enabled and tensorboard and tensorboard_available() else None
        if enabled:
            # A resumed run drops the records of steps that were logged after its checkpoint (they are
            # recomputed), so the file reads as one uninterrupted run.
            kept = [r for r in read_metrics(self.path) if r["step"] <= start_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.bar = progress_bar(
            total=total_iters, initial=start_step, desc="train", unit="it", dynamic_ncols=True, disable=not enabled
        )

    def update(self, step: int, lr: float, terms: dict[str, float]) -> None:
        """Record completed step ``step`` (1-based count) with its rank-averaged loss terms."""
        if not self.enabled:
            return
        for key, value in terms.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1
        self._last_step = step
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{terms['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
        if step % self.log_interval == 0 or step == self.total_iters:
            self._flush(step, lr)

    def _flush(self, step: int, lr: float) -> None:
        elapsed = time.perf_counter() - self._window_start
        sec_per_it = elapsed / max(self._count, 1)
        record: dict[str, Any] = {"kind": "train", "step": step, "lr": lr}
        record.update({k: v / self._count for k, v in self._sums.items()})
        record["images_per_s"] = self.images_per_step / sec_per_it if sec_per_it > 0 else float("nan")
        record["eta_s"] = (self.total_iters - step) * sec_per_it
        self._write(record)
        if self.tb is not None:
            self.tb.scalars("train/", step, {k: v for k, v in record.items() if k not in ("kind", "step", "eta_s")})
        terms = "  ".join(
            f"{k} {v:.4f}" for k, v in record.items() if k not in ("kind", "step", "lr", "images_per_s", "eta_s")
        )
        log.info(
            "[%d/%d] lr %.3e  %s  %.1f img/s  eta %s",
            step,
            self.total_iters,
            lr,
            terms,
            record["images_per_s"],
            format_eta(record["eta_s"]),
        )
        self._sums, self._count = {}, 0
        self._window_start = time.perf_counter()

    def log_eval(
        self, step: int, results: dict[str, Any], images: Callable[[], Sequence[np.ndarray]] | None = None
    ) -> None:
        """An eval record; ``images`` (called only when TensorBoard is on) gives prediction overlays."""
        if not self.enabled:
            return
        scalars = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._write({"kind": "eval", "step": step, **scalars})
        if self.tb is not None:
            self.tb.scalars("eval/", step, scalars)
            if images is not None:
                log_images(self.tb, "eval/prediction", step, images)
            self.tb.flush()

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self) -> Path | None:
        """Write the training curve (loss terms and lr per step; eval mIoU if any) next to the metrics."""
        if not self.enabled:
            return None
        path = plot_curve(self.path, self.curve_path)
        if self.tb is not None:
            from PIL import Image

            with Image.open(path) as im:
                self.tb.image("curve", self._last_step, np.asarray(im.convert("RGB")))
            self.tb.flush()
        return path

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def plot_curve(metrics_path: str | Path, out_path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval" and "mIoU" in r]
    loss_keys = [k for k in (train[0] if train else {}) if k == "loss" or "/" in k]
    panels = 3 if evals else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6))
    steps = [r["step"] for r in train]
    for key in loss_keys:
        axes[0].plot(steps, [r.get(key, float("nan")) for r in train], label=key)
    axes[0].set(xlabel="iteration", ylabel="loss", title="training losses")
    if loss_keys:
        axes[0].legend(fontsize=7)
    axes[1].plot(steps, [r["lr"] for r in train])
    axes[1].set(xlabel="iteration", ylabel="lr", title="learning rate")
    if evals:
        for key in ("mIoU", "mIoU_base", "mIoU_novel"):
            axes[2].plot([r["step"] for r in evals], [r.get(key, float("nan")) for r in evals], marker="o", label=key)
        axes[2].set(xlabel="iteration", ylabel="%", title="evaluation")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path
