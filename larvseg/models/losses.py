"""Losses of the baseline (docs/METHOD.md, section 2). They return *sums*; the objective divides by global counts.

- pixel CE: logits bilinearly resized to 1/loss_downsample of the label resolution, labels nearest-resized;
  summed over all pixels (ignored ones contribute 0) -> divide by global_images * Hl * Wl. Computed in
  row chunks with the gradient formed in the forward pass (_UpsampledPixelCE): the full-resolution
  logits are never stored.
- pooled tag CE: for every (image, tag) pair, the image's *other* tags are dropped from the softmax,
  the (optionally attended) logits are averaged over the pixels, CE with the tag; summed over pairs
  -> divide by the global pair count.

Pooling without upsampling: bilinear resizing is a linear map U (loss pixels x feature pixels), so the
mean over loss pixels of (U z) * (U a) equals z . (U^T U a) / L and the plain mean of U z equals
z . (U^T 1) / L. ``upsampled_mean_weights`` / ``upsampled_product_gram`` build those small
(feature-resolution) operators once per size pair; the image-level losses then never materialise
logits at the loss resolution (N x Hl x Wl per image), with the same value and the same gradient up to
float rounding. This is what makes the CAC and the baseline loss cheap at 913 or 21K classes.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from larvseg.config import IGNORE_INDEX
from larvseg.models.bilinear import resize_matrix


def loss_size(label_hw: tuple[int, int], downsample: int) -> tuple[int, int]:
    return (label_hw[0] // downsample, label_hw[1] // downsample)


def _resize_pair_f64(feat_hw: tuple[int, int], loss_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The (Hl, h) and (Wl, w) resize matrices, float64 for building the pooled operators below."""
    return (resize_matrix(feat_hw[0], loss_hw[0], dtype=torch.float64),
            resize_matrix(feat_hw[1], loss_hw[1], dtype=torch.float64))


@lru_cache(maxsize=32)
def _gram_cpu(feat_hw: tuple[int, int], loss_hw: tuple[int, int]) -> Tensor:
    uh, uw = _resize_pair_f64(feat_hw, loss_hw)
    return torch.kron(uh.T @ uh, uw.T @ uw).float()


def upsampled_product_gram(feat_hw: tuple[int, int], loss_hw: tuple[int, int], device: torch.device) -> Tensor:
    """(hw, hw) G = U^T U / L, so that mean_loss_pixels((U z) * (U a)) = z . (G a)."""
    g = _gram_cpu(tuple(feat_hw), tuple(loss_hw))
    return (g / float(loss_hw[0] * loss_hw[1])).to(device)


def upsampled_mean_weights(feat_hw: tuple[int, int], loss_hw: tuple[int, int], device: torch.device) -> Tensor:
    """(hw,) w = U^T 1 / L, so that mean_loss_pixels(U z) = z . w."""
    uh, uw = _resize_pair_f64(feat_hw, loss_hw)
    w = torch.outer(uh.sum(0), uw.sum(0)).flatten() / float(loss_hw[0] * loss_hw[1])
    return w.float().to(device)


class _UpsampledPixelCE(torch.autograd.Function):
    """Sum of pixel CE of bilinearly upsampled logits, computed in row chunks at the loss resolution.

    Forward produces the loss and, chunk by chunk, the gradient with respect to the *feature-resolution*
    logits (U^T (softmax - onehot)); only that small gradient is saved. The (b, N, Hl, Wl) upsampled
    logits never exist whole: no large activations kept for backward, no large allocations (on CPU each
    fresh 80 MB buffer costs page faults) and the same value and gradient as
    F.cross_entropy(F.interpolate(z), y, reduction="sum") up to float rounding.
    """

    @staticmethod
    def forward(ctx, z: Tensor, labels: Tensor, uh: Tensor, uw: Tensor, ignore_index: int) -> Tensor:  # type: ignore[override]
        b, n = z.shape[:2]
        big_h, big_w = labels.shape[-2:]
        need_grad = ctx.needs_input_grad[0]
        zw = torch.matmul(z, uw.T)  # (b, N, h, Wl): width upsampled, rows still at feature resolution
        grad_zw = torch.zeros_like(zw) if need_grad else None
        rows = max(1, (1 << 21) // max(1, b * n * big_w))  # ~8 MB of fp32 per chunk
        total = z.new_zeros(())
        for r0 in range(0, big_h, rows):
            uh_r = uh[r0:r0 + rows]  # (R, h)
            x = torch.matmul(uh_r, zw)  # (b, N, R, Wl)
            lab = labels[:, r0:r0 + rows]
            valid = lab != ignore_index
            safe = torch.where(valid, lab, torch.zeros_like(lab))[:, None]
            lse = torch.logsumexp(x, dim=1)
            total = total + ((lse - x.gather(1, safe)[:, 0]) * valid).sum()
            if need_grad:
                prob = x.sub_(lse[:, None]).exp_()  # softmax, in place
                prob.scatter_add_(1, safe, -valid[:, None].to(prob.dtype))
                prob.mul_(valid[:, None])
                grad_zw += torch.matmul(uh_r.T, prob)
        if need_grad:
            ctx.save_for_backward(torch.matmul(grad_zw, uw))
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (grad_z,) = ctx.saved_tensors
        return grad_z * grad_out, None, None, None, None


def pixel_ce_sum(logits: Tensor, labels: Tensor, downsample: int) -> Tensor:
    """Sum of per-pixel CE at 1/downsample of the label resolution. ``labels`` (b, H, W) are subset
    indices with IGNORE_INDEX; ``logits`` (b, N, h, w) at feature resolution, bilinearly upsampled
    (inside _UpsampledPixelCE, chunk by chunk)."""
    size = loss_size(tuple(labels.shape[-2:]), downsample)
    small = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()  # exact below 2^24
    z = logits.float()
    h, w = z.shape[-2:]
    uh = resize_matrix(h, size[0], z.device, z.dtype)
    uw = resize_matrix(w, size[1], z.device, z.dtype)
    with torch.autocast(device_type=z.device.type, enabled=False):
        return _UpsampledPixelCE.apply(z, small, uh, uw, IGNORE_INDEX)


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
    """Baseline image-level loss: logits at the loss resolution averaged over all pixels, co-tag-masked CE.

    ``logits`` (b, N, h, w) at feature resolution; the mean of their bilinear upsampling to the loss
    resolution is taken through ``upsampled_mean_weights`` (no upsampled tensor is built)."""
    weights = upsampled_mean_weights(tuple(logits.shape[-2:]), loss_size(crop_hw, downsample), logits.device)
    pooled = (logits.float().flatten(2) @ weights)[:, :, None].expand(-1, -1, tags.shape[1])
    return pooled_tag_ce(pooled, tags, pad)
