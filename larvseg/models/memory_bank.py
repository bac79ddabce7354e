"""Per-class FIFO memory bank of the CAC (docs/METHOD.md, section 3), storing per-slot MEAN features.

The original keeps, per class, M slots x K features (the K top-scoring pixels of one image tagged with
the class) and scores a pixel by the mean of its dot products with all M*K features. Since
mean_q(p . q) = p . mean_q(q), and every slot holds exactly K features, storing the mean of each slot's
K features gives identical foreground/background scores with K times less memory: (V, M, D) instead of
(V, M, K, D) — 1.3 GB in float32 for 21,843 classes, M=20, D=768 (the original would need 27 GB at K=20
and had to switch the CAC off for its 11K-class model). The slot means are *not* re-normalised.

State (buffers, so the bank is in the state_dict and therefore in checkpoints):
  slots (V, M, D) float32; ptr (V,) next slot to write; wraps (V,) completed passes over the ring.
Under DDP ``enqueue`` gathers the entries of all ranks in rank order first, so every rank holds the same bank.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from larvseg import distributed


class MemoryBank(nn.Module):
    slots: Tensor  # buffers (register_buffer), declared for the type checker
    ptr: Tensor
    wraps: Tensor

    def __init__(self, num_classes: int, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"memory bank size must be >= 1, got {size}")
        self.num_classes, self.size, self.dim = num_classes, size, dim
        self.register_buffer("slots", torch.zeros(num_classes, size, dim))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("wraps", torch.zeros(num_classes, dtype=torch.long))

    def num_filled(self, class_ids: Tensor) -> Tensor:
        """Number of slots holding an entry, per class."""
        return torch.where(
            self.wraps[class_ids] > 0, torch.full_like(self.ptr[class_ids], self.size), self.ptr[class_ids]
        )

    def warmed_up(self, class_ids: Tensor, warm_up: int) -> Tensor:
        """True where the class's ring has wrapped at least ``warm_up`` times."""
        return self.wraps[class_ids] >= warm_up

    def class_means(self, class_ids: Tensor) -> Tensor:
        """(n, D) mean over the filled slots of each class (= mean over its M*K stored pixel features once
        full); zeros for an empty class. Unfilled slots are zero, so the sum over all slots is the sum over
        the filled ones."""
        filled = self.num_filled(class_ids).clamp(min=1).to(self.slots.dtype)
        return self.slots[class_ids].sum(1) / filled[:, None]

    @torch.no_grad()
    def enqueue(self, class_ids: Tensor, features: Tensor, gather: bool = True) -> None:
        """Write ``features`` (P, D) into the rings of ``class_ids`` (P,), in order (several entries of one
        class go to consecutive slots; with more than M of one class only the last M survive, as in a
        sequential FIFO). ``gather``: first concatenate all ranks' entries in rank order."""
        if gather:
            class_ids = distributed.all_gather_cat(class_ids.contiguous())
            features = distributed.all_gather_cat(features.contiguous())
        if class_ids.numel() == 0:
            return
        class_ids = class_ids.to(self.ptr.device)
        features = features.to(self.slots.device, self.slots.dtype)
        # Rank of each entry among the entries of its class in this call (stable: keeps call order).
        order = torch.sort(class_ids, stable=True).indices
        sorted_ids = class_ids[order]
        counts = torch.bincount(sorted_ids, minlength=self.num_classes)
        first = torch.cumsum(counts, 0) - counts  # start of each class's run in the sorted order
        rank_sorted = torch.arange(order.numel(), device=order.device) - first[sorted_ids]
        rank = torch.empty_like(rank_sorted)
        rank[order] = rank_sorted
        n_cls = counts[class_ids]
        keep = rank >= n_cls - self.size  # older entries would be overwritten within this call anyway
        pos = self.ptr[class_ids] + rank
        slot = pos % self.size
        self.slots[class_ids[keep], slot[keep]] = features[keep]
        total = self.ptr + counts
        self.wraps += total // self.size
        self.ptr.copy_(total % self.size)
