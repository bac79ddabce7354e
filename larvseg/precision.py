"""Mixed precision: when bf16 autocast is used, and the autocast context of every forward.

``amp`` (train.amp, eval.amp, predict --amp): "off" = float32, "bf16" = torch.autocast(bfloat16) on the
device, "auto" = bf16 where it is the faster choice, float32 elsewhere:

- CUDA: bf16 when the GPU supports it (``torch.cuda.is_bf16_supported()``, Ampere and newer);
- CPU: bf16 only with AMX tiles for bf16 (Sapphire Rapids and newer Xeons). Without AMX, bf16 matmuls
  are emulated or run on AVX-512-BF16 dot products that are no faster than float32 FMA, plus the casts:
  measured 0.58x (avx512_bf16, no AMX) and slower still on AVX2-only CPUs: ViT-B/16 inference 0.18x,
  the full training step (forward + backward) 0.03x (docs/PERFORMANCE.md, rows 1b and 4a).
  AMX is read from torch's own CPU capability query (``torch.cpu._is_amx_tile_supported``, which
  asks cpuinfo), falling back to the ``amx_bf16`` / ``amx_tile`` flags of /proc/cpuinfo.

Losses and the classifier stage stay float32 under autocast: they run on ``.float()`` inputs
(larvseg.models.losses, inference), so only the backbone's matmuls run in bf16.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from larvseg.config import check_amp


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where the file does not exist)."""
    path = Path(cpuinfo)
    if not path.is_file():
        return set()
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX tiles with bf16 support (torch's query first, then /proc/cpuinfo)."""
    query = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if query is not None and query():
        return True
    flags = cpu_flags()
    return {"amx_bf16", "amx_tile"} <= flags


def bf16_is_faster(device: torch.device) -> bool:
    """What amp="auto" chooses: bf16 on CUDA with bf16 support and on CPUs with AMX, else float32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_amx_bf16()
    return False


def use_bf16(amp: str, device: torch.device) -> bool:
    """Whether ``amp`` ("auto" | "bf16" | "off", ``larvseg.config.AMP_MODES``) means bf16 autocast here."""
    check_amp(amp)
    return amp == "bf16" or (amp == "auto" and bf16_is_faster(device))


def autocast_context(amp: str, device: torch.device):
    """torch.autocast(bfloat16) when ``use_bf16(amp, device)``, else a no-op context."""
    if not use_bf16(amp, device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def describe(amp: str, device: torch.device) -> str:
    """One line for the start of a run: what amp resolves to here, and why."""
    chosen = "bf16" if use_bf16(amp, device) else "float32"
    if amp != "auto":
        return f"amp={amp}: {chosen}"
    why = (("CUDA bf16 " + ("supported" if bf16_is_faster(device) else "not supported")) if device.type == "cuda"
           else ("CPU with AMX" if bf16_is_faster(device) else "CPU without AMX"))
    return f"amp=auto: {chosen} ({why})"
