"""The poly learning-rate schedule (docs/METHOD.md, section 4), a pure function of the iteration.

    lr(t) = (base_lr - min_lr) * (1 - t / max_iters) ** power + min_lr

as MMSegmentation's ``PolyLrUpdaterHook`` (by_epoch=False, no warm-up). ``t`` is the number of
completed iterations, so step 0 trains at ``base_lr``. Being stateless, the schedule resumes exactly
from the step stored in a checkpoint.
"""

from __future__ import annotations

import torch


def poly_lr(step: int, max_iters: int, base_lr: float, power: float = 0.9, min_lr: float = 0.0) -> float:
    if max_iters <= 0:
        raise ValueError(f"max_iters must be > 0, got {max_iters}")
    progress = min(max(step, 0), max_iters) / max_iters
    return (base_lr - min_lr) * (1.0 - progress) ** power + min_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
