"""Every benchmark script runs at its tiny size and prints its one summary line (no timing asserts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py"))


def test_every_benchmark_is_listed_in_performance_doc():
    doc = (BENCH.parent / "docs" / "PERFORMANCE.md").read_text()
    missing = [s for s in SCRIPTS if s not in doc]
    assert not missing, f"benchmarks not documented in docs/PERFORMANCE.md: {missing}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_runs_tiny(script):
    # the repository root too: the scripts must import this checkout's larvseg, not an installed copy
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(BENCH), str(BENCH.parent)]))
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--tiny"], capture_output=True, text=True, env=env, timeout=240, cwd=BENCH
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = script[len("bench_") : -len(".py")]
    lines = [l for l in proc.stdout.splitlines() if l.startswith(f"{name}:")]
    assert len(lines) == 1, proc.stdout
    assert "=" in lines[0]


def test_inference_benchmark_bf16_labels_of_a_checkpoint(tmp_path):
    """--checkpoint: larvseg eval's evaluation with amp off and bf16, compared label map to label map."""
    import torch

    from larvseg.config import Config, EvalConfig, ModelConfig
    from larvseg.data import testing as T
    from larvseg.data.sources import build_vocabulary
    from larvseg.models.segmenter import build_segmenter
    from larvseg.train.checkpoint import save_checkpoint

    T.write_ade847(tmp_path / "data" / "A847", n=3, size=(24, 32), values=[5, 300, 65535], split="validation")
    cfg = T.make_config(tmp_path / "moved")  # the checkpoint's data.root is replaced by --data-root
    cfg = Config(
        **{
            **cfg.__dict__,
            "model": ModelConfig(arch="vit_mini", drop_path=0.0, cac=False),
            "eval": EvalConfig(mode="whole", crop_size=32, stride=32, short_side=32, max_long_side=64),
        }
    )
    torch.manual_seed(0)
    names = list(build_vocabulary(cfg).names)  # the A847 classes
    segmenter = build_segmenter(cfg.model, len(names))
    save_checkpoint(tmp_path / "ckpt.pth", {"model": segmenter.state_dict(), "config": cfg.to_dict(), "vocab": names})
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(BENCH), str(BENCH.parent)]))
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_inference.py"),
            "--checkpoint",
            str(tmp_path / "ckpt.pth"),
            "--data-root",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        cwd=BENCH,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("inference_checkpoint:"))
    fields = dict(kv.split("=") for kv in line.split(": ", 1)[1].split())
    assert fields["images"] == "3"
    assert 0.0 <= float(fields["bf16_pixel_agreement"]) <= 1.0 and 0.0 <= float(fields["bf16_miou_vs_fp32"]) <= 1.0
    assert float(fields["fp32_eval_s"]) > 0 and float(fields["bf16_eval_s"]) > 0
