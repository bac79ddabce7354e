"""Shared helpers for the benchmark scripts: timing, machine description, matmul peak.

Every benchmark prints ONE summary line (prefixed with its name) and, with --record, appends a row to
docs/PERFORMANCE.md's raw log. Timings are compared as ratios measured side by side in one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from larvseg.log import setup_logging

REPO = Path(__file__).resolve().parents[1]


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="smallest sizes: checks the script runs (used by tests)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Threads (printed), seed, device, LarvSeg's console logging (larvseg.log: the library's status lines
    are shown, as under the larvseg command). --device cuda needs a visible GPU: a clear error otherwise."""
    setup_logging()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {machine()}; cpu flags: {' '.join(interesting_cpu_flags()) or 'unknown'}", flush=True)
    torch.manual_seed(0)
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds, after warm-up calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_side_by_side(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median times of several functions, interleaved round-robin so machine noise hits all alike."""
    for fn in fns.values():
        fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_peak_gflops(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5
) -> float:
    """Achieved GFLOP/s of a square matmul: the practical peak this machine reaches."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_it(lambda: a @ b, device, repeats)
    return 2 * n**3 / seconds / 1e9


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of common GPUs, by a substring of the device name.
# A GPU not listed is measured (a large bf16 matmul) and the line says so.
GPU_BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def interesting_cpu_flags() -> list[str]:
    """The vector / matrix extensions of this CPU that decide bf16 speed (from /proc/cpuinfo)."""
    from larvseg.precision import speed_flags

    return speed_flags()


def peak_gflops(device: torch.device, tiny: bool = False) -> tuple[float, str]:
    """(peak GFLOP/s, what it is): on CUDA the device's dense bf16 peak (table, else a measured bf16
    matmul); on CPU the measured float32 matmul peak of this run."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_BF16_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e3, f"bf16 peak of {key}"
        return matmul_peak_gflops(device, torch.bfloat16, n=8192), "measured bf16 matmul"
    return matmul_peak_gflops(device, n=512 if tiny else 2048), "measured fp32 matmul"


def efficiency(flops: float, seconds: float, peak: float, peak_kind: str, device: torch.device) -> dict[str, object]:
    """Achieved GFLOP/s and its fraction of the peak: "mfu" (vs the bf16 peak) on CUDA, else
    "fraction_of_matmul_peak"."""
    achieved = flops / seconds / 1e9
    key = "mfu" if device.type == "cuda" else "fraction_of_matmul_peak"
    return {"gflops": achieved, "peak_gflops": peak, "peak": peak_kind.replace(" ", "_"), key: achieved / peak}


def vit_flops(tokens: int, dim: int, depth: int) -> float:
    """Forward FLOPs of the transformer blocks for one image (patch embedding and head excluded)."""
    per_block = 2 * tokens * 12 * dim * dim + 2 * 2 * tokens * tokens * dim
    return depth * per_block


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def report(name: str, **fields: object) -> str:
    """Print and return the one summary line of a benchmark."""
    parts = []
    for k, v in fields.items():
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    line = f"{name}: " + " ".join(parts)
    print(line, flush=True)
    return line
