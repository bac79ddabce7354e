"""Per-step class subsets for large vocabularies (docs/METHOD.md, section 2, "Class sampling").

Each step and source the classifier scores the classes present in the *global* batch (all ranks) plus
``num_sampled`` random classes of the source's vocabulary, and labels/tags are remapped to subset
indices. The random draw uses a torch Generator seeded from (seed, step, source index) only, so every
rank (and any number of processes) uses the same subset.

Our choices (the method: 100 randomly chosen classes of the source's vocabulary ∪ the classes present):
- the random classes are drawn from the source's vocabulary *minus* the present classes, so the subset
  always has exactly |present| + min(num_sampled, |pool \\ present|) classes (a stable size; the
  difference to drawing from the whole pool is at most a few classes per step);
- ``num_sampled == 0`` means the whole vocabulary *of the source* (plus the present classes, which
  are in it anyway), not the union vocabulary of the experiment;
- the subset is sorted by union id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from larvseg import distributed
from larvseg.config import IGNORE_INDEX


@dataclass
class ClassSubset:
    class_ids: Tensor  # (N,) int64 union ids, sorted
    lut: Tensor  # (V,) int64: union id -> index in class_ids, -1 when not in the subset

    def remap(self, ids: Tensor, pad: int) -> Tensor:
        """Union ids -> subset indices; entries equal to ``pad`` stay ``pad``. Raises on ids outside the subset."""
        keep = ids != pad
        out = torch.full_like(ids, pad)
        mapped = self.lut[ids[keep]]
        if (mapped < 0).any():
            bad = ids[keep][mapped < 0].unique()[:10].tolist()
            raise ValueError(f"class ids {bad} are not in the sampled class subset")
        out[keep] = mapped
        return out


def step_generator(seed: int, step: int, source_index: int) -> torch.Generator:
    """CPU generator whose state depends only on (seed, step, source_index)."""
    state = np.random.SeedSequence([seed, step, source_index]).generate_state(2, dtype=np.uint32)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)  # 62 bits
    return g


def global_presence(present_ids: Tensor, vocab_size: int) -> Tensor:
    """Bool (V,) vector of classes present on any rank (all_reduce of the per-rank presence)."""
    hits = torch.zeros(vocab_size, dtype=torch.int32, device=present_ids.device)
    hits[present_ids] = 1
    return distributed.all_reduce_sum(hits) > 0


def sample_classes(
    pool: Tensor, present: Tensor, num_sampled: int, generator: torch.Generator, vocab_size: int
) -> ClassSubset:
    """``present`` (bool (V,), already global) ∪ ``num_sampled`` random classes of ``pool`` (union ids)."""
    device = present.device
    pool = pool.to(device)
    chosen = present.clone()
    if num_sampled <= 0:
        chosen[pool] = True
    else:
        rest = pool[~present[pool]]  # pool order is the source's order: deterministic on every rank
        pick = torch.randperm(rest.numel(), generator=generator)[:num_sampled].to(device)
        chosen[rest[pick]] = True
    class_ids = chosen.nonzero().squeeze(1)
    lut = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
    lut[class_ids] = torch.arange(class_ids.numel(), device=device)
    return ClassSubset(class_ids=class_ids, lut=lut)


def present_in_labels(labels: Tensor) -> Tensor:
    """Union ids present in a label batch (IGNORE_INDEX excluded)."""
    ids = labels.unique()
    return ids[ids != IGNORE_INDEX]


def present_in_tags(tags: Tensor, pad: int) -> Tensor:
    ids = tags.unique()
    return ids[ids != pad]
