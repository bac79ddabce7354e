"""Category-wise Attentive Classifier (CAC, docs/METHOD.md section 3), vectorised over the images of a batch.

For every (image b, tag l) pair, with p the image's detached, L2-normalised pixel features and q̄_c the
mean of class c's bank features (= mean over its M*K stored pixels, see memory_bank.py):
  f(i)   = p_i . q̄_l                                        foreground score
  b(i)   = mean over kept background classes c of p_i . q̄_c  background score
           multi-tag sources: c = the image's other tags;
           single-tag sources: c with mean(top-5 raw scores s(., c)) > 0.35, c != l, kept only if
           mean_i (z(f)_i - z(b_c)_i)^2 > 2.0 (z: over pixels, unbiased std, no epsilon)
  score  = f - b, or f - (1 - f) when no background class is kept
  a      = sigmoid(standardize_over_pixels(score)), bilinearly upsampled to the loss resolution
  loss   = co-tag-masked CE of mean_i(a(i) * logits_i) over the loss-resolution pixels (logits
           bilinearly upsampled too), counted only when l's ring has warmed up. Both upsamplings are
           linear, so this mean is computed at feature resolution as z . (U^T U a) / L (losses.py):
           the same value and gradient without an N x Hl x Wl tensor per image.
The bank is then updated for every pair with the mean of p at the K pixels of highest s(., l).

Our choices, where the method leaves room or we differ from the original:
- "Attend before enqueue" holds at *batch* granularity: all attentions of a step (every tag source)
  use the bank as it was at the start of the step; all pairs are enqueued afterwards (the original
  enqueues image by image, so a later image of the same step could already see an earlier one).
- Background banks are used regardless of warm-up, averaging their *filled* slots; a background class
  whose bank is still empty is left out (it carries no information; the original's zero-initialised
  bank would give it b_c = 0).
- standardize_over_pixels for the attention uses the classifier's definition (biased var + 1e-5);
  the single-tag filter's z uses the unbiased std without epsilon as in the original (a constant map
  gives NaN there, which never passes the > 2.0 test, so such a candidate is dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from larvseg.models.cosine_classifier import standardize
from larvseg.models.losses import pooled_tag_ce, tag_pairs, upsampled_product_gram
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
    single_tag: bool,
    rule: BackgroundRule,
) -> Tensor:
    """score = f - b (or f - (1 - f)) for every (image, tag slot): (b, T, hw).

    features (b, D, hw) detached normalised p; scores (b, N, hw) raw cosine scores of the subset;
    tags (b, T) subset indices padded with ``pad``; class_ids (N,) union ids of the subset.
    Padded slots get a meaningless row; callers only read valid pairs.
    """
    b, d, hw = features.shape
    t = tags.shape[1]
    valid = tags != pad
    tag_union = class_ids[tags.clamp(min=0)]  # (b, T)
    f = torch.bmm(bank.class_means(tag_union.reshape(-1)).view(b, t, d), features)  # (b, T, hw)
    if not single_tag:
        usable = valid & (bank.num_filled(tag_union) > 0)  # (b, T')
        others = ~torch.eye(t, dtype=torch.bool, device=tags.device)
        keep = usable[:, None, :] & others[None]  # (b, T, T'): the other tags of the image
        bg_maps = f
    else:
        k = min(rule.bg_topk, hw)
        cand = scores.topk(k, dim=-1).values.mean(-1) > rule.score_thresh  # (b, N)
        cand_idx = cand.any(0).nonzero().squeeze(1)  # subset indices that are a candidate somewhere (C,)
        cand_union = class_ids[cand_idx]
        bg_maps = torch.einsum("cd,bdx->bcx", bank.class_means(cand_union), features)  # (b, C, hw)
        if cand_idx.numel() > 0:
            mse = (zscore_unbiased(f)[:, :, None, :] - zscore_unbiased(bg_maps)[:, None, :, :]).pow(2).mean(-1)
        else:
            mse = f.new_zeros(b, t, 0)
        keep = (
            cand[:, cand_idx][:, None, :]  # candidate in this image
            & (bank.num_filled(cand_union) > 0)[None, None, :]
            & (cand_idx[None, None, :] != tags[:, :, None])  # minus l
            & (mse > rule.mse_thresh)  # (b, T, C); NaN compares False
        )
    n_bg = keep.sum(-1, keepdim=True)  # (b, T, 1)
    bg = torch.bmm(keep.to(f.dtype), bg_maps) / n_bg.clamp(min=1)
    return torch.where(n_bg > 0, f - bg, f - (1.0 - f))


def bank_entries(features: Tensor, scores: Tensor, img: Tensor, tag_sub: Tensor, topk: int) -> Tensor:
    """(P, D) mean of p over the K pixels with the highest raw score s(., l) of each pair."""
    k = min(topk, scores.shape[-1])
    idx = scores[img, tag_sub].topk(k, dim=-1).indices  # (P, K)
    picked = features[img].gather(2, idx[:, None, :].expand(-1, features.shape[1], -1))  # (P, D, K)
    return picked.mean(-1)


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
    single_tag: bool,
    topk: int,
    warm_up: int,
    rule: BackgroundRule,
) -> CACResult:
    """CAC loss (sum over pairs) and the bank entries of every pair; the bank itself is not modified.

    logits (b, N, h, w) at feature resolution (with grad); loss_hw the loss resolution they and the
    attention are (conceptually) upsampled to; scores (b, N, h, w) and features (b, D, h, w) detached;
    tags (b, T) subset indices; class_ids (N,) union ids.
    """
    h, w = scores.shape[-2:]
    if tuple(logits.shape[-2:]) != (h, w):
        raise ValueError(f"cac_loss: logits {tuple(logits.shape)} must be at the feature resolution {(h, w)}")
    feats, s = features.flatten(2).float(), scores.flatten(2).float()
    score = attention_scores(feats, s, tags, pad, class_ids, bank, single_tag, rule)
    att = torch.sigmoid(standardize(score, dim=-1))  # (b, T, hw) at feature resolution
    gram = upsampled_product_gram((h, w), tuple(loss_hw), logits.device)  # (hw, hw) = U^T U / L
    pooled = torch.bmm(logits.float().flatten(2), (att @ gram).transpose(1, 2))  # (b, N, T)
    img, slot = tag_pairs(tags, pad)
    tag_sub = tags[img, slot]
    pair_classes = class_ids[tag_sub]
    warmed = bank.warmed_up(pair_classes, warm_up)
    loss_sum = pooled_tag_ce(pooled, tags, pad, weights=warmed.to(pooled.dtype))
    return CACResult(loss_sum, pair_classes, bank_entries(feats, s, img, tag_sub, topk), warmed)
