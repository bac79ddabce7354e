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
    proc = subprocess.run([sys.executable, str(BENCH / script), "--tiny"], capture_output=True, text=True,
                          env=env, timeout=240, cwd=BENCH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = script[len("bench_"):-len(".py")]
    lines = [l for l in proc.stdout.splitlines() if l.startswith(f"{name}:")]
    assert len(lines) == 1, proc.stdout
    assert "=" in lines[0]
