"""Mixed precision: whether bf16 autocast is used, decided for ``amp: auto`` by measuring it here.

``amp`` (train.amp, eval.amp, predict --amp): "off" = float32, "bf16" = torch.autocast(bfloat16) on the
device, "auto" = bf16 only where it was *measured* faster on this machine for this workload.

Why measure instead of reading CPU flags: bf16 speed depends on the part and on the workload, and no
flag table predicts it. Measured with ViT-B/16 (docs/PERFORMANCE.md): AVX2-only EPYC inference 0.18x,
training step 0.03x; a Xeon with AVX-512-BF16 and no AMX inference 0.58x; a Zen 4 EPYC with AVX-512-BF16
and no AMX inference 2.62x but training 0.99x; AMX Xeons 1.8-3.3x for both; CUDA GPUs 1.45-1.55x.

How: on the first use of a (machine, software, workload) key, ``Workload.build(device)`` makes one
representative pass (for the ViT, a copy of one of the model's own blocks on a 512 x 512 crop's 1,025
tokens: forward for inference, forward + backward for training; ``larvseg.models.amp_workload``), and
``measure`` times it in float32 and under bf16 autocast, interleaved: a warm-up of each, then
``CALIBRATION_ROUNDS`` rounds, the fastest time of each. bf16 is chosen only if float32 / bf16 >=
``MIN_SPEEDUP``. A small probe of the same pass (65 tokens) runs first: bf16 ``EARLY_STOP_SLOWDOWN`` x
slower than float32 there (if its bf16 pass took over ``PROBE_MIN_SECONDS``) or in the full pass's
warm-up ends the calibration at once (CPUs without bf16 arithmetic, where one bf16 ViT-B forward +
backward of the full size takes ~30 s).

The decision is cached in ``amp_calibration.json`` under the cache folder (``$XDG_CACHE_HOME/larvseg``,
default ``~/.cache/larvseg``), one entry per key: device (CPU model and its vector/matrix flags, or the
GPU name), torch version, intra-op threads, workload (kind and shapes) and ``CALIBRATION_VERSION``; any
change is a new key, measured again. Delete the file to measure again. The line ``amp=auto: bf16
(measured 2.6x faster here for inference, ...)`` says what was chosen and why.

``LARVSEG_AMP_CALIBRATION=off`` disables the measurement: "auto" is then float32 (the test suite sets it,
tests/conftest.py). CUDA without bf16 support (pre-Ampere) is float32 without measuring.

Losses and the classifier stage stay float32 under autocast: they run on ``.float()`` inputs
(larvseg.models.losses, inference), so only the backbone's matmuls run in bf16.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from pathlib import Path

import torch

from larvseg.atomic import write_text
from larvseg.cache_dir import default_cache_dir
from larvseg.config import check_amp

log = logging.getLogger(__name__)

MIN_SPEEDUP = 1.10  # bf16 must be at least this much faster: it costs some accuracy, noise must not pick it
CALIBRATION_ROUNDS = 3  # timed rounds (float32, bf16 interleaved) after one warm-up of each
EARLY_STOP_SLOWDOWN = 4.0  # a bf16 warm-up this many times slower than the float32 one ends the calibration
PROBE_MIN_SECONDS = 0.05  # the probe decides only when its bf16 pass took this long: below, bf16's fixed
# costs (casting the weights at every call) dominate a small model's probe and say nothing of the full pass
CALIBRATION_VERSION = 1  # bump when the measurement changes: old cache entries are then ignored
CACHE_NAME = "amp_calibration.json"
CALIBRATION_ENV = "LARVSEG_AMP_CALIBRATION"  # "off" / "0": amp=auto is float32 without measuring


@dataclass(frozen=True)
class Workload:
    """What ``amp: auto`` is decided for. ``kind``: "inference" | "training"; ``shape``: the
    representative pass, in words (part of the cache key); ``build(device)`` returns ``run(bf16)``, one
    pass (bf16: under autocast), and is only called to measure."""

    kind: str
    shape: str
    build: Callable[[torch.device], Callable[[bool], object]]
    # the same pass at a fraction of the size: run first, so that a bf16 far slower than float32 (CPUs
    # without bf16 arithmetic) is seen in well under a second instead of after one full bf16 pass
    build_probe: Callable[[torch.device], Callable[[bool], object]] | None = None


@dataclass(frozen=True)
class Timing:
    fp32_s: float  # fastest float32 pass
    bf16_s: float  # fastest bf16 pass
    seconds: float  # what the whole calibration took
    early_stop: bool  # the bf16 warm-up alone decided it


@dataclass(frozen=True)
class AmpChoice:
    bf16: bool
    line: str  # "amp=auto: bf16 (measured 2.6x faster here for inference, ...)"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where the file does not exist)."""
    path = Path(cpuinfo)
    if not path.is_file():
        return set()
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` says."""
    path = Path(cpuinfo)
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def speed_flags() -> list[str]:
    """The vector / matrix extensions that decide bf16 speed (VM model names are often generic)."""
    return sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "asimd", "sve", "bf16")))


@cache
def _cpu_description() -> str:
    return f"cpu {cpu_model()} [{' '.join(speed_flags())}]"


def device_description(device: torch.device) -> str:
    """The machine part of the cache key: the GPU's name, or the CPU model and its speed flags."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return _cpu_description()


def calibration_key(device: torch.device, workload: Workload) -> str:
    """Machine, software, threads and workload: what a cached decision is valid for."""
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return (
        f"v{CALIBRATION_VERSION} | {device_description(device)} | torch {torch.__version__} | "
        f"threads {threads} | {workload.kind} | {workload.shape}"
    )


def cache_path() -> Path:
    return default_cache_dir() / CACHE_NAME


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timer(run: Callable[[bool], object], device: torch.device) -> Callable[[bool], float]:
    def timed(bf16: bool) -> float:
        _sync(device)
        t0 = time.perf_counter()
        run(bf16)
        _sync(device)
        return time.perf_counter() - t0

    return timed


def measure(workload: Workload, device: torch.device) -> Timing:
    """Time ``workload``'s pass in float32 and in bf16, interleaved (see the module doc). The probe (if
    any), then the pass itself, stop early where bf16 is EARLY_STOP_SLOWDOWN x slower after a warm-up."""
    start = time.perf_counter()
    if workload.build_probe is not None:
        probe = _timer(workload.build_probe(device), device)
        probe(False), probe(True)  # warm-ups
        fp32_s, bf16_s = probe(False), probe(True)
        if bf16_s > max(EARLY_STOP_SLOWDOWN * fp32_s, PROBE_MIN_SECONDS):
            return Timing(fp32_s, bf16_s, time.perf_counter() - start, True)
    timed = _timer(workload.build(device), device)
    fp32, bf16 = [timed(False)], [timed(True)]  # warm-ups: first-call costs (allocation, kernel choice)
    if bf16[0] > EARLY_STOP_SLOWDOWN * fp32[0]:
        return Timing(fp32[0], bf16[0], time.perf_counter() - start, True)
    fp32, bf16 = [], []
    for _ in range(CALIBRATION_ROUNDS):
        fp32.append(timed(False))
        bf16.append(timed(True))
    return Timing(min(fp32), min(bf16), time.perf_counter() - start, False)


def decide(timing: Timing) -> bool:
    """bf16 only where measured at least MIN_SPEEDUP x faster."""
    return timing.fp32_s / timing.bf16_s >= MIN_SPEEDUP


def _read_cache(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable amp calibration cache (%s); measuring again", path, exc)
        return {}
    if not isinstance(entries, dict):
        log.warning("%s: not a JSON object; measuring again", path)
        return {}
    return entries


def cached_entry(device: torch.device, workload: Workload) -> dict | None:
    """The cache's entry for this machine and workload (timings, decision, date), or None."""
    return _read_cache(cache_path()).get(calibration_key(device, workload))


def _calibrate(key: str, workload: Workload, device: torch.device, path: Path) -> dict:
    log.info(
        "larvseg: amp=auto: timing float32 vs bf16 once on this machine for %s (%s)", workload.kind, workload.shape
    )
    timing = measure(workload, device)
    entry = {
        "bf16": decide(timing),
        "fp32_s": timing.fp32_s,
        "bf16_s": timing.bf16_s,
        "speedup": timing.fp32_s / timing.bf16_s,
        "early_stop": timing.early_stop,
        "calibration_s": timing.seconds,
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    entries = _read_cache(path)  # again: another process may have added its entries meanwhile
    entries[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(entries, indent=1, sort_keys=True) + "\n")
    except OSError as exc:
        log.warning("%s: could not save the amp calibration (%s); it holds for this process only", path, exc)
    return entry


# decisions of this process by key: each is looked up (or measured) once, then reused every step
_DECIDED: dict[str, AmpChoice] = {}


def choose(amp: str, device: torch.device, workload: Workload | None = None, *, announce: bool = False) -> AmpChoice:
    """What ``amp`` ("auto" | "bf16" | "off") means here for ``workload``. "auto" reads the cached
    calibration or measures it (``workload`` is required then). ``announce``: log the decision's line
    (INFO) the first time this process makes it."""
    check_amp(amp)
    if amp != "auto":
        return AmpChoice(amp == "bf16", f"amp={amp}: {'bf16' if amp == 'bf16' else 'float32'}")
    if device.type == "cuda" and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        return AmpChoice(False, "amp=auto: float32 (CUDA bf16 not supported)")
    if device.type not in ("cpu", "cuda"):
        return AmpChoice(False, f"amp=auto: float32 (no bf16 calibration on {device.type})")
    if os.environ.get(CALIBRATION_ENV, "").strip().lower() in ("off", "0", "false", "no"):
        return AmpChoice(False, f"amp=auto: float32 (calibration disabled by {CALIBRATION_ENV})")
    if workload is None:
        raise ValueError("amp='auto' needs the workload to measure (larvseg.models.amp_workload.vit_workload)")
    key = calibration_key(device, workload)
    if key in _DECIDED:
        return _DECIDED[key]
    path = cache_path()
    entry = _read_cache(path).get(key)
    where = f"cached in {path}"
    if not isinstance(entry, dict) or not {"bf16", "speedup"} <= entry.keys():
        entry = _calibrate(key, workload, device, path)
        where = f"calibration took {entry['calibration_s']:.1f} s, cached in {path}"
    speed = f"{entry['speedup']:.2f}x"
    if entry["bf16"]:
        why = f"measured {speed} faster here for {workload.kind}"
    else:
        why = f"bf16 measured {speed} the float32 speed here for {workload.kind}, needs >= {MIN_SPEEDUP:.2f}x"
    choice = AmpChoice(bool(entry["bf16"]), f"amp=auto: {'bf16' if entry['bf16'] else 'float32'} ({why}; {where})")
    _DECIDED[key] = choice
    if announce:
        log.info("larvseg: %s", choice.line)
    return choice


def use_bf16(amp: str, device: torch.device, workload: Workload | None = None) -> bool:
    """Whether ``amp`` means bf16 autocast here (see ``choose``)."""
    return choose(amp, device, workload).bf16


def bf16_autocast(enabled: bool, device: torch.device):
    """torch.autocast(bfloat16) on ``device`` when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def autocast_context(amp: str, device: torch.device, workload: Workload | None = None):
    """``bf16_autocast`` of what ``amp`` means here (see ``choose``)."""
    return bf16_autocast(use_bf16(amp, device, workload), device)


def describe(amp: str, device: torch.device, workload: Workload | None = None) -> str:
    """One line for the start of a run: what amp resolves to here, and why."""
    return choose(amp, device, workload).line
