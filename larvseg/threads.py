"""How many intra-op threads torch uses, chosen on purpose and printed at the start of a run.

Order: the ``threads`` config key (train.threads for training, eval.threads for eval and predict) when
> 0, else the environment variable ``LARVSEG_THREADS``, else ``OMP_NUM_THREADS`` when set, else a default
from the model size: one thread per ``PARAMS_PER_THREAD`` parameters, at least 1, at most the cores this
process may run on. A ViT-Tiny (5.7 M parameters) gets 1 thread: its matmuls are too small to split
usefully, and with more threads than free cores every parallel region waits for a descheduled thread
(the demo ran 15x slower on 2 shared cores with torch's default of one thread per core). A ViT-B/16
(86 M) gets up to 5.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping

import torch
from torch import nn

from larvseg.domains import DomainError

log = logging.getLogger(__name__)

PARAMS_PER_THREAD = 20_000_000


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; os.cpu_count() where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(num_params: int, cores: int | None = None) -> int:
    cores = available_cores() if cores is None else cores
    return max(1, min(cores, math.ceil(num_params / PARAMS_PER_THREAD)))


def choose_threads(model: nn.Module | int, requested: int = 0, env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """(threads, where the number comes from) for ``model`` (a module or its parameter count)."""
    env = os.environ if env is None else env
    if requested > 0:
        return requested, "config"
    for name in ("LARVSEG_THREADS", "OMP_NUM_THREADS"):
        value = env.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise DomainError(f"{name}={value!r}: expected a positive integer (an environment variable)")
            return int(value), name
    params = model if isinstance(model, int) else sum(p.numel() for p in model.parameters())
    return default_threads(params), f"default for {params / 1e6:.1f} M parameters on {available_cores()} cores"


def configure_threads(model: nn.Module | int, requested: int = 0) -> int:
    """Set torch's intra-op thread count (see the module doc) and log it (INFO); returns it."""
    threads, source = choose_threads(model, requested)
    torch.set_num_threads(threads)
    log.info("larvseg: %d intra-op thread%s (%s)", threads, "s" if threads > 1 else "", source)
    return threads
