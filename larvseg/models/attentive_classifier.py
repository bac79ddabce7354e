"""Category-wise Attentive Classifier (CAC, docs/METHOD.md section 3), vectorised over the images of a batch.

For every (image b, tag l) pair, with p the image's detached, L2-normalised pixel features and q̄_c the
mean of class c's bank features (= mean over its M*K stored pixels, see memory_bank.py):
  f(i)   = p_i . q̄_l                                        foreground score
  b(i)   = mean over kept background classes c of p_i . q̄_c  background score, rule chosen per PAIR:
           the image has other tags: c = those other tags;
           l is the image's only tag (every ImageNet image, and a tag-source crop holding one class):
           c with mean(top-5 raw scores s(., c)) > 0.35, c != l, kept only if
           mean_i (z(f)_i - z(b_c)_i)^2 > 2.0 (z: over pixels, unbiased std, no epsilon)
  score  = f - b, or f - (1 - f) when no background class is kept
  a      = sigmoid(up(standardize_over_pixels(score))): standardized at feature resolution, bilinearly
           upsampled to the loss resolution, *then* the sigmoid (the original's order)
  loss   = co-tag-masked CE of mean_i(a(i) * logits_i) over the loss-resolution pixels (logits
           bilinearly upsampled too), counted only when l's ring has warmed up. The logits' upsampling is
           linear (U), so this mean is z . U^T a / L, computed at feature resolution through the adjoint
           (losses.attended_mean_weights): the same value and gradient without an N x Hl x Wl tensor per
           image; only the (Hl, Wl) attention map of each pair is built at the loss resolution.
The bank is then updated for every pair with the mean of p at the K pixels of highest s(., l).
One batch may mix both kinds of pair (tag-source crops with one or several classes): the other-tags
rule is a masked tensor op over all pairs, the top-k rule runs batched on the rows of the single-tag
images (index selection), and neither loops over images or tags.

Our choices, where the method leaves room or we differ from the original:
- "Attend before enqueue" holds at *batch* granularity: all attentions of a step (every tag source)
  use the bank as it was at the start of the step; all pairs are enqueued afterwards (the original
  enqueues image by image, so a later image of the same step could already see an earlier one).
- Background banks are used regardless of warm-up, averaging their *filled* slots; a background class
  whose ring has never been filled is left out. The original initialises every ring with L2-normalised
  random vectors, so such a class's map there is p . (mean of M*K random unit vectors): noise of
  std ~ 1/sqrt(D*M*K) (0.002 at D=768, M=K=20) that says nothing about the class and depends on the
  random initialisation. Averaged in as another tag's background it only dilutes b towards 0; as a
  single-tag candidate its standardized map is uncorrelated with f, so the > 2.0 filter keeps it about
  half the time, by chance. Leaving it out makes the score depend only on observed features.
- standardize_over_pixels for the attention uses the classifier's definition (biased var + 1e-5);
  the single-tag filter's z uses the unbiased std without epsilon as in the original (a constant map
  gives NaN there, which never passes the > 2.0 test, so such a candidate is dropped).
- The filter's mean squared difference is expanded as mean(z_f^2) + mean(z_c^2) - 2 mean(z_f z_c), one
  batched matmul instead of a (pairs x candidates x pixels) tensor; it equals the direct form up to
  float rounding (a candidate within ~1e-6 of the 2.0 threshold could fall on either side).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from larvseg.config import ImageLossConfig
from larvseg.models.cosine_classifier import standardize
from larvseg.models.image_loss import is_paper, pooled_pairs_ce
from larvseg.models.losses import attended_mean_weights, pooled_tag_ce, tag_pairs
from larvseg.models.memory_bank import MemoryBank


@dataclass
class BackgroundRule:
    bg_topk: int = 5
    score_thresh: float = 0.35
    mse_thresh: float = 2.0


@dataclass
class CACResult:
    loss_sum: Tensor  # sum over warmed-up pairs of the attended pooled CE
    pair_classes: Tensor  # (P,) union ids, pair order (image, then tag slot)
    pair_features: Tensor  # (P, D) mean of the K top-scoring pixel features: the bank entries
    warmed: Tensor  # (P,) bool


def zscore_unbiased(x: Tensor, dim: int = -1) -> Tensor:
    """(x - mean) / std with the unbiased std and no epsilon (the original's filter)."""
    return (x - x.mean(dim, keepdim=True)) / x.std(dim, unbiased=True, keepdim=True)


def attention_scores(
    features: Tensor,
    scores: Tensor,
    tags: Tensor,
    pad: int,
    class_ids: Tensor,
    bank: MemoryBank,
    rule: BackgroundRule,
) -> Tensor:
    """score = f - b (or f - (1 - f)) for every (image, tag slot): (b, T, hw).

    features (b, D, hw) detached normalised p; scores (b, N, hw) raw cosine scores of the subset;
    tags (b, T) subset indices padded with ``pad``; class_ids (N,) union ids of the subset.
    The background rule of each pair follows from its image's tag count (see the module docstring).
    Padded slots get a meaningless row; callers only read valid pairs.
    """
    b, d, hw = features.shape
    t = tags.shape[1]
    valid = tags != pad
    tag_union = class_ids[tags.clamp(min=0)]  # (b, T)
    f = torch.bmm(bank.class_means(tag_union.reshape(-1)).view(b, t, d), features)  # (b, T, hw)

    # Rule of images with several tags: the other tags (for an image with one tag this mask is empty).
    usable = valid & (bank.num_filled(tag_union) > 0)  # (b, T')
    others = ~torch.eye(t, dtype=torch.bool, device=tags.device)
    keep = usable[:, None, :] & others[None]  # (b, T, T')
    n_bg = keep.sum(-1, keepdim=True)  # (b, T, 1)
    bg = torch.bmm(keep.to(f.dtype), f)  # (b, T, hw) sum of the kept maps

    # Rule of images with a single tag, computed on those images only (b' of them; their rows above are 0).
    lone = (valid.sum(1) == 1).nonzero().squeeze(1)  # (b',)
    cand = candidates(scores[lone], rule)  # (b', N)
    cand_idx = cand.any(0).nonzero().squeeze(1)  # subset indices that are a candidate somewhere (C,)
    if cand_idx.numel() > 0:
        cand_union = class_ids[cand_idx]
        maps = torch.einsum("cd,bdx->bcx", bank.class_means(cand_union), features[lone])  # (b', C, hw)
        zf, zc = zscore_unbiased(f[lone]), zscore_unbiased(maps)
        mse = (
            zf.pow(2).mean(-1)[:, :, None]
            + zc.pow(2).mean(-1)[:, None, :]
            - 2.0 / hw * torch.bmm(zf, zc.transpose(1, 2))
        )  # (b', T, C) = mean_i (zf_i - zc_i)^2
        keep_cand = (
            cand[:, cand_idx][:, None, :]  # candidate in this image
            & (bank.num_filled(cand_union) > 0)[None, None, :]
            & (cand_idx[None, None, :] != tags[lone][:, :, None])  # minus l
            & (mse > rule.mse_thresh)  # NaN compares False
        )
        n_bg[lone] = keep_cand.sum(-1, keepdim=True)
        bg[lone] = torch.bmm(keep_cand.to(f.dtype), maps)
    bg = bg / n_bg.clamp(min=1)
    return torch.where(n_bg > 0, f - bg, f - (1.0 - f))


def candidates(scores: Tensor, rule: BackgroundRule) -> Tensor:
    """(b, N) bool: mean of the top-k raw scores over the pixels > score_thresh, for scores (b, N, hw).

    The top-k runs only on the (image, class) rows whose maximum exceeds the threshold: a row below it
    cannot pass (its top-k mean is at most its maximum), and on a trained model most of N are below."""
    k = min(rule.bg_topk, scores.shape[-1])
    out = scores.amax(-1) > rule.score_thresh  # necessary condition
    rows = out.nonzero(as_tuple=True)
    out[rows] = scores[rows].topk(k, dim=-1).values.mean(-1) > rule.score_thresh
    return out


def bank_entries(features: Tensor, scores: Tensor, img: Tensor, tag_sub: Tensor, topk: int) -> Tensor:
    """(P, D) mean of p over the K pixels with the highest raw score s(., l) of each pair."""
    k = min(int(topk), scores.shape[-1])
    idx = scores[img, tag_sub].topk(k, dim=-1).indices  # (P, K)
    return features.transpose(1, 2)[img[:, None], idx].mean(1)  # (P, K, D) picked rows -> (P, D)


def cac_loss(
    logits: Tensor,
    scores: Tensor,
    features: Tensor,
    tags: Tensor,
    pad: int,
    class_ids: Tensor,
    bank: MemoryBank,
    *,
    loss_hw: tuple[int, int],
    topk: int,
    warm_up: int,
    rule: BackgroundRule,
    options: ImageLossConfig | None = None,
    base: Tensor | None = None,
) -> CACResult:
    """CAC loss (sum over pairs) and the bank entries of every pair; the bank itself is not modified.

    logits (b, N, h, w) at feature resolution (with grad); loss_hw the loss resolution they and the
    attention are (conceptually) upsampled to; scores (b, N, h, w) and features (b, D, h, w) detached;
    tags (b, T) subset indices; class_ids (N,) union ids. ``options`` (model.image_loss) and ``base``
    ((N,) bool, the classes with pixel masks) change the pooled CE as for L_cls (image_loss.py); None or
    all options off: the paper's.
    """
    b, _, h, w = scores.shape
    if tuple(logits.shape[-2:]) != (h, w):
        raise ValueError(f"cac_loss: logits {tuple(logits.shape)} must be at the feature resolution {(h, w)}")
    feats, s = features.flatten(2).float(), scores.flatten(2).float()
    score = attention_scores(feats, s, tags, pad, class_ids, bank, rule)
    img, slot = tag_pairs(tags, pad)
    z = standardize(score[img, slot], dim=-1).view(-1, h, w)  # (P, h, w), feature resolution
    weights = feats.new_zeros(
        b, tags.shape[1], h * w
    )  # float32 (score may be bf16 under autocast); padded slots pool nothing
    weights[img, slot] = attended_mean_weights(z, tuple(loss_hw))  # U^T sigmoid(U z) / L
    pooled = torch.bmm(logits.float().flatten(2), weights.transpose(1, 2))  # (b, N, T)
    tag_sub = tags[img, slot]
    pair_classes = class_ids[tag_sub]
    warmed = bank.warmed_up(pair_classes, warm_up)
    if options is None or is_paper(options):
        loss_sum = pooled_tag_ce(pooled, tags, pad, weights=warmed.to(pooled.dtype))
    else:  # the same attention weights, pooled as the options say
        loss_sum = pooled_pairs_ce(logits, weights[img, slot], tags, pad, options, base, pair_weights=warmed)
    return CACResult(loss_sum, pair_classes, bank_entries(feats, s, img, tag_sub, topk), warmed)
