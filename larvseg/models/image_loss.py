"""Options of the image-level losses beyond the paper (``model.image_loss``, docs/METHOD.md section 6).

All off by default: then L_cls is losses.image_level_ce_sum and L_cac the CAC's pooled_tag_ce, the
paper's loss, and this module only dispatches to them. The options address the mechanism of
docs/BASE_COLLAPSE.md: a single-tag image whose tagged object is a minority of its pixels, pooled by
the mean over all pixels, raises the tag on the background and lowers the background's (base) classes
on their own pixels.

Common form. Both image-level losses pool the feature-resolution logits z (b, N, hw) of a pair p =
(image b, tag l) with pixel weights ω_p (hw,) such that Σ_i ω_p,i z_c,i is the paper's pooled logit:
ω = U^T 1 / L for L_cls (the mean of the bilinearly upsampled logits) and ω = U^T sigmoid(U s) / L for
the CAC (the attended mean; losses.py explains U and L). With x_c,i = hw · ω_p,i · z_c,i, the paper's
pooled logit is the mean of x_c,i over all hw pixels; the options change the pixels S it is the mean
over, and the softmax's classes:

- ``confident_base = τ > 0``: the pool's pixels are A = {i : max over base classes c != l of
  softmax_N(z_i)_c < τ} (softmax over the step's N scored classes): pixels the head already assigns
  confidently to another base class get no image-level gradient. A pair with A empty contributes 0.
  Otherwise A = all pixels.
- ``pooling = "mean"``: S = A (the paper's pool when A is every pixel).
- ``pooling = "topk"``: per class c, S_c = the k = max(1, ceil(topk_fraction · |A|)) pixels of A with
  the highest x_c,i (ties: the lower pixel index first); every class of the softmax, the tag included,
  is pooled over its own top k.
- ``pooling = "region"``: S = {i in A : m_i >= min(0, max_{j in A} m_j)} with the tag's margin
  m_i = z_l,i - max over the softmax's other classes c of z_c,i: the pixels where the tag currently
  wins, or where it wins nowhere, the pixel(s) where it comes closest. One set for every class.
- ``drop_base_negatives``: a single-tag pair's softmax leaves out the base classes (other than l):
  losses.softmax_classes.

pooled_c = mean_{i in S(_c)} x_c,i; CE over the softmax's classes with target l; times the pair's
weight (the CAC's warm-up gate, the confident_base gate); summed over pairs. The sets are chosen on
detached logits (they are piecewise constant in z: no gradient flows through a choice).
Everything is a tensor op over pairs, classes and pixels (a torch.topk for the k-th value and a mask
for top-k, one bmm otherwise); what pairs of one image share (L_cls's top-k, the region's rivals, the
base probabilities) is computed once per image. Memory: the CAC's top-k, and L_cls's top-k with
confident_base, build (pairs, N, hw) tensors (~40 K floats per pair at 100 sampled classes and
20 x 20 features); the rest (b, N, hw) ones, as the logits themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from larvseg.config import ImageLossConfig
from larvseg.models.losses import (
    image_level_ce_sum,
    loss_size,
    softmax_classes,
    tag_pairs,
    upsampled_mean_weights,
)

POOLINGS = ("mean", "topk", "region")


def is_paper(options: ImageLossConfig | None) -> bool:
    """Whether ``options`` select the paper's loss (every option off)."""
    return options is None or (
        options.pooling == "mean" and not options.drop_base_negatives and options.confident_base == 0
    )


def needs_base(options: ImageLossConfig | None) -> bool:
    """Whether ``options`` need to know which classes have pixel masks (the ``base`` argument)."""
    return options is not None and (options.drop_base_negatives or options.confident_base > 0)


def topk_count(fraction: float, pixels: Tensor) -> Tensor:
    """k = max(1, ceil(fraction * pixels)) per pair; a product within 1e-9 of an integer is that integer
    (so 0.1 * 400 is 40, not 41 through float rounding)."""
    return torch.ceil(pixels.double() * fraction - 1e-9).clamp(min=1).long()


def topk_mask(x: Tensor, k: Tensor) -> Tensor:
    """(R, hw) bool: the k[r] largest entries of each row of x (R, hw), ties taken from the lower index
    first, so that exactly k[r] are chosen; k[r] must not exceed the row's entries above -inf. One
    torch.topk for the k-th value, then comparisons and a cumsum (no sort, no gather in the backward)."""
    kth = x.topk(int(k.max()), dim=-1).values.gather(-1, (k - 1)[:, None])  # (R, 1)
    above = x > kth
    tied = x == kth
    missing = k[:, None] - above.sum(-1, keepdim=True)  # how many of the tied values to take
    crowded = (tied.sum(-1, keepdim=True) > missing).squeeze(1).nonzero().squeeze(1)  # rows with ties to break
    if crowded.numel():
        tied[crowded] &= tied[crowded].cumsum(-1) <= missing[crowded]
    return above | tied


@torch.no_grad()
def pool_pixels(
    z: Tensor, img: Tensor, target: Tensor, kept: Tensor, options: ImageLossConfig, base: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(P, hw) bool pixels each pair may pool over (A, or the region S within A) and (P,) bool: the
    pair has such pixels. z (b, N, hw) feature-resolution logits; kept (P, N) the softmax's classes.
    Per-image work where pairs share it: no (P, N, hw) tensor is built here."""
    b, n, hw = z.shape
    p = img.numel()
    rows = torch.arange(p, device=z.device)
    allowed = torch.ones(p, hw, dtype=torch.bool, device=z.device)
    if options.confident_base > 0:
        if base is None:
            raise ValueError("model.image_loss.confident_base needs the base classes (base=None)")
        # the two most probable base classes of each pixel: the pair's "base class other than l" is the
        # first, or the second where the first is l (a zero row stands in for a missing second)
        prob = z.float().softmax(1).masked_fill(~base[None, :, None], 0.0)  # (b, N, hw)
        first, first_class = prob.max(1)  # (b, hw)
        second = prob.scatter(1, first_class[:, None], 0.0).amax(1)
        conf = torch.where(first_class[img] == target[:, None], second[img], first[img])  # (P, hw)
        allowed = conf < options.confident_base
    has_pixels = allowed.any(1)
    allowed[~has_pixels] = True  # such a pair's loss is computed on every pixel, then weighted by 0
    if options.pooling == "region":
        # the rivals of a pair (its softmax's classes but l) are the same for every pair of an image
        rivals = kept.clone()
        rivals[rows, target] = False
        image_rivals = torch.zeros(b, n, dtype=torch.bool, device=z.device)
        image_rivals[img] = rivals  # identical rows for the pairs of one image
        best_rival = z.float().masked_fill(~image_rivals[:, :, None], float("-inf")).amax(1)  # (b, hw); -inf: none
        margin = (z.float()[img, target] - best_rival[img]).masked_fill(~allowed, float("-inf"))
        allowed &= margin >= margin.amax(1, keepdim=True).clamp(max=0.0)
    return allowed, has_pixels


def pooled_pairs_ce(
    logits: Tensor,
    omega: Tensor,
    tags: Tensor,
    pad: int,
    options: ImageLossConfig,
    base: Tensor | None = None,
    pair_weights: Tensor | None = None,
) -> Tensor:
    """Sum over pairs of the image-level CE under ``options`` (module docstring).

    logits (b, N, h, w) at feature resolution (with grad); omega the pixel weights (Σ_i ω_i z_i = the
    paper's pooled logit): (P, h*w), one row per valid pair in tag_pairs order (the CAC), or (h*w,), the
    same for every pair (L_cls: top-k then runs once per image, not per pair, when every pixel is
    allowed); tags (b, T) subset indices, ``pad``-padded; base (N,) bool, the scored classes that have
    pixel masks (needed by drop_base_negatives and confident_base); pair_weights (P,) optional (the
    CAC's warm-up gate)."""
    z = logits.float().flatten(2)  # (b, N, hw)
    b, n, hw = z.shape
    img, slot = tag_pairs(tags, pad)
    if img.numel() == 0:
        return z.sum() * 0.0
    if options.pooling not in POOLINGS:
        raise ValueError(f"model.image_loss.pooling must be one of {POOLINGS}, got {options.pooling!r}")
    if options.drop_base_negatives and base is None:
        raise ValueError("model.image_loss.drop_base_negatives needs the base classes (base=None)")
    target = tags[img, slot]
    kept = softmax_classes(tags, pad, n, img, target, base if options.drop_base_negatives else None)
    allowed, has_pixels = pool_pixels(z.detach(), img, target, kept, options, base)
    shared = omega.dim() == 1
    omega = omega.float().expand(img.numel(), hw)
    count = allowed.sum(1)  # (P,) >= 1
    if options.pooling == "topk":
        k = topk_count(options.topk_fraction, count)
        if shared and options.confident_base == 0:  # every pair of an image pools the same pixels
            x = z * (omega[0] * hw)  # (b, N, hw)
            chosen = topk_mask(x.detach().flatten(0, 1), k[:1].expand(b * n)).view(b, n, hw)
            pooled = ((x * chosen).sum(-1) / k[0])[img]  # (P, N)
        else:
            x = (z[img] * (omega * hw)[:, None, :]).masked_fill(~allowed[:, None, :], float("-inf"))  # (P, N, hw)
            chosen = topk_mask(x.detach().flatten(0, 1), k.repeat_interleave(n)).view(-1, n, hw)
            pooled = torch.where(chosen, x, torch.zeros_like(x)).sum(-1) / k[:, None]
    else:  # mean over S of x = Σ_{i in S} ω_i z_i * hw / |S|: one bmm, as the paper's pool
        w = omega * allowed * (hw / count.to(omega.dtype))[:, None]  # (P, hw)
        per_slot = z.new_zeros(b, tags.shape[1], hw)
        per_slot[img, slot] = w
        pooled = torch.bmm(z, per_slot.transpose(1, 2))[img, :, slot]  # (P, N)
    loss = F.cross_entropy(pooled.masked_fill(~kept, float("-inf")), target, reduction="none")
    weight = has_pixels.to(loss.dtype)
    if pair_weights is not None:
        weight = weight * pair_weights.to(loss.dtype)
    return (loss * weight).sum()


def image_level_loss(
    logits: Tensor,
    tags: Tensor,
    pad: int,
    downsample: int,
    crop_hw: tuple[int, int],
    options: ImageLossConfig | None = None,
    base: Tensor | None = None,
) -> Tensor:
    """L_cls's sum over pairs: the paper's (losses.image_level_ce_sum) when every option is off, else
    pooled_pairs_ce with the paper's pixel weights ω = U^T 1 / L."""
    if options is None or is_paper(options):
        return image_level_ce_sum(logits, tags, pad, downsample, crop_hw)
    weights = upsampled_mean_weights(tuple(logits.shape[-2:]), loss_size(crop_hw, downsample), logits.device)
    return pooled_pairs_ce(logits, weights, tags, pad, options, base)


__all__ = [
    "POOLINGS",
    "image_level_loss",
    "is_paper",
    "needs_base",
    "pool_pixels",
    "pooled_pairs_ce",
    "topk_count",
    "topk_mask",
]
