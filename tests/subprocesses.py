"""Helpers for tests that run `larvseg` in a child process (imported by the test modules beside it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# torchrun / multi-node variables of an outer launcher would turn the child into a rank of that job
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PORT", "NNODES", "NODE_RANK")


def clean_env() -> dict[str, str]:
    """This process's environment for a child: one thread, unbuffered, this Python, no GPU, no launcher."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    for key in LAUNCHER_VARS:
        env.pop(key, None)
    return env


def kill_when_written(cmd: list[str], path: Path, timeout: float) -> subprocess.Popen:
    """Run ``cmd``, SIGKILL it as soon as ``path`` exists, and return the reaped process. Fails the test
    (with the child's stderr) if the child exits first or ``path`` does not appear within ``timeout`` s."""
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, f"no {path.name} after {timeout:.0f} s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return proc
