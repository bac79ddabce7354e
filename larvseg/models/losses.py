"""Losses of the baseline (spec section 2). They return *sums*; the objective divides by global counts.

- pixel CE: logits bilinearly resized to 1/loss_downsample of the label resolution, labels nearest-resized;
  summed over all pixels (ignored ones contribute 0) -> divide by global_images * Hl * Wl.
- pooled tag CE: for every (image, tag) pair, the image's *other* tags are dropped from the softmax,
  the (optionally attended) logits are averaged over the pixels, CE with the tag; summed over pairs
  -> divide by the global pair count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from larvseg.config import IGNORE_INDEX


def loss_size(label_hw: tuple[int, int], downsample: int) -> tuple[int, int]:
    return (label_hw[0] // downsample, label_hw[1] // downsample)


def resize_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def pixel_ce_sum(logits: Tensor, labels: Tensor, downsample: int) -> Tensor:
    """Sum of per-pixel CE at 1/downsample of the label resolution. ``labels`` (b, H, W) are subset
    indices with IGNORE_INDEX; ``logits`` (b, N, h, w)."""
    size = loss_size(tuple(labels.shape[-2:]), downsample)
    logits = resize_logits(logits.float(), size)
    small = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()  # exact below 2^24
    return F.cross_entropy(logits, small, ignore_index=IGNORE_INDEX, reduction="sum")


def tag_pairs(tags: Tensor, pad: int) -> tuple[Tensor, Tensor]:
    """(image index, tag slot) of every valid (image, tag) pair, in image-then-slot order."""
    img, slot = (tags != pad).nonzero(as_tuple=True)
    return img, slot


def pooled_tag_ce(pooled: Tensor, tags: Tensor, pad: int, weights: Tensor | None = None) -> Tensor:
    """Co-tag-masked CE of pooled logits.

    pooled: (b, N, T) — pooled logits of image b for pair slot t (the same column for every t in the
    baseline; attention-weighted per pair for the CAC). tags: (b, T) subset indices, ``pad``-padded.
    weights: optional (P,) per-pair weights in pair order (CAC warm-up: 0 or 1). Returns the sum over pairs.
    """
    b, n, _ = pooled.shape
    img, slot = tag_pairs(tags, pad)
    if img.numel() == 0:
        return pooled.sum() * 0.0
    target = tags[img, slot]
    image_tags = torch.zeros(b, n, dtype=torch.bool, device=pooled.device)
    valid = tags != pad
    image_tags[valid.nonzero(as_tuple=True)[0], tags[valid]] = True
    drop = image_tags[img]  # (P, N): the image's tags ...
    drop[torch.arange(img.numel(), device=drop.device), target] = False  # ... except the pair's own
    logits = pooled[img, :, slot].float().masked_fill(drop, float("-inf"))
    loss = F.cross_entropy(logits, target, reduction="none")
    if weights is not None:
        loss = loss * weights
    return loss.sum()


def image_level_ce_sum(logits: Tensor, tags: Tensor, pad: int, downsample: int, crop_hw: tuple[int, int]) -> Tensor:
    """Baseline image-level loss: logits at the loss resolution averaged over all pixels, co-tag-masked CE."""
    logits = resize_logits(logits.float(), loss_size(crop_hw, downsample))
    pooled = logits.mean((2, 3))[:, :, None].expand(-1, -1, tags.shape[1])
    return pooled_tag_ce(pooled, tags, pad)
