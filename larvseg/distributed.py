"""Thin helpers over torch.distributed that are no-ops in a single process.

Everything in LarvSeg that talks across ranks goes through here, so the same code runs on 1 CPU,
1 GPU or many GPUs under torchrun (nccl on GPU, gloo on CPU).
"""

from __future__ import annotations

import datetime
import os
from typing import TypeVar

import torch
import torch.distributed as dist

from larvseg.domains import DEVICE

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def select_device(device: str = "auto", index: int = 0) -> torch.device:
    """``device``: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N"; ``index`` is the
    CUDA device of a bare "cuda"/"auto" (the local rank under torchrun). Asking for CUDA without one is
    an error (larvseg.domains.DomainError), not a silent fall-back to the CPU."""
    DEVICE.check(device, "device")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", index)
    return dev


def init_from_env(device: str = "auto") -> torch.device:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); pick the device.

    ``device``: see :func:`select_device` (a bare "cuda" means this rank's LOCAL_RANK device).
    Returns the device this rank computes on.
    """
    dev = select_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30)
        )
    return dev


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of all ranks, in rank order; sizes along dim 0 may differ."""
    if not is_distributed():
        return tensor
    n = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes_list = [int(s.item()) for s in sizes]
    max_n = max(sizes_list)
    padded = tensor.new_zeros((max_n, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:s] for g, s in zip(gathered, sizes_list)], dim=0)


def broadcast_object(obj: T, src: int = 0) -> T:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
