"""Losses of the baseline (docs/METHOD.md, section 2). They return *sums*; the objective divides by global counts.

- pixel CE: logits bilinearly resized to 1/loss_downsample of the label resolution, labels nearest-resized;
  summed over all pixels (ignored ones contribute 0) -> divide by global_images * Hl * Wl. Computed in
  row chunks with the gradient formed in the forward pass (_UpsampledPixelCE): the full-resolution
  logits are never stored.
- pooled tag CE: for every (image, tag) pair, the image's *other* tags are dropped from the softmax,
  the (optionally attended) logits are averaged over the pixels, CE with the tag; summed over pairs
  -> divide by the global pair count.

Pooling without upsampling: bilinear resizing is a linear map U (loss pixels x feature pixels), so the
plain mean of U z over the L loss pixels equals z . (U^T 1) / L, and the mean of (U z) * a for any
loss-resolution map a (the CAC's a = sigmoid(U s)) equals z . (U^T a) / L.
``upsampled_mean_weights`` / ``attended_mean_weights`` build those feature-resolution weights; the
image-level losses then never materialise logits at the loss resolution (N x Hl x Wl per image), with
the same value and the same gradient up to float rounding. This is what makes the CAC and the baseline
loss cheap at 913 or 21K classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from larvseg.config import IGNORE_INDEX
from larvseg.models.bilinear import resize_matrix


def loss_size(label_hw: Sequence[int], downsample: int) -> tuple[int, int]:
    return (label_hw[0] // downsample, label_hw[1] // downsample)


def attended_mean_weights(z: Tensor, loss_hw: Sequence[int]) -> Tensor:
    """(P, h, w) attention logits at feature resolution -> (P, h*w) weights W = U^T sigmoid(U z) / L.

    So that mean_loss_pixels((U x) * sigmoid(U z)) = x . W for any feature-resolution map x: the
    attention is upsampled *before* its sigmoid (the original's order), and the product with the
    upsampled logits is pooled through the adjoint U^T. Only the (P, Hl, Wl) attention maps exist at the
    loss resolution, never the (N, Hl, Wl) logits. Four small matmuls, in float32 (autocast off).
    """
    p, h, w = z.shape
    big_h, big_w = loss_hw
    uh = resize_matrix(h, big_h, z.device, torch.float32)
    uw = resize_matrix(w, big_w, z.device, torch.float32)
    with torch.autocast(device_type=z.device.type, enabled=False):
        att = torch.sigmoid(torch.matmul(torch.matmul(uh, z.float()), uw.T))  # (P, Hl, Wl)
    return attention_mean_weights(att, (h, w))


def attention_mean_weights(att: Tensor, feat_hw: tuple[int, int]) -> Tensor:
    """(P, Hl, Wl) attention maps at the loss resolution -> (P, h*w) weights W = U^T a / L, so that
    mean_loss_pixels((U x) * a) = x . W for any (h, w) feature-resolution map x."""
    p, big_h, big_w = att.shape
    uh = resize_matrix(feat_hw[0], big_h, att.device, torch.float32)
    uw = resize_matrix(feat_hw[1], big_w, att.device, torch.float32)
    with torch.autocast(device_type=att.device.type, enabled=False):
        pooled = torch.matmul(torch.matmul(uh.T, att.float()), uw)  # (P, h, w) = U^T a
    return pooled.reshape(p, feat_hw[0] * feat_hw[1]) / float(big_h * big_w)


def upsampled_mean_weights(feat_hw: Sequence[int], loss_hw: Sequence[int], device: torch.device) -> Tensor:
    """(hw,) w = U^T 1 / L, so that mean_loss_pixels(U z) = z . w."""
    uh = resize_matrix(feat_hw[0], loss_hw[0], dtype=torch.float64)  # float64: summed over many rows
    uw = resize_matrix(feat_hw[1], loss_hw[1], dtype=torch.float64)
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
    def forward(ctx, z: Tensor, labels: Tensor, uh: Tensor, uw: Tensor, ignore_index: int) -> Tensor:
        b, n = z.shape[:2]
        big_h, big_w = labels.shape[-2:]
        need_grad = ctx.needs_input_grad[0]
        zw = torch.matmul(z, uw.T)  # (b, N, h, Wl): width upsampled, rows still at feature resolution
        grad_zw = torch.zeros_like(zw) if need_grad else None
        rows = max(1, (1 << 21) // max(1, b * n * big_w))  # ~8 MB of fp32 per chunk
        total = z.new_zeros(())
        for r0 in range(0, big_h, rows):
            uh_r = uh[r0 : r0 + rows]  # (R, h)
            x = torch.matmul(uh_r, zw)  # (b, N, R, Wl)
            lab = labels[:, r0 : r0 + rows]
            valid = lab != ignore_index
            safe = torch.where(valid, lab, torch.zeros_like(lab))[:, None]
            lse = torch.logsumexp(x, dim=1)
            total = total + ((lse - x.gather(1, safe)[:, 0]) * valid).sum()
            if grad_zw is not None:
                prob = x.sub_(lse[:, None]).exp_()  # softmax, in place
                prob.scatter_add_(1, safe, -valid[:, None].to(prob.dtype))
                prob.mul_(valid[:, None])
                grad_zw += torch.matmul(uh_r.T, prob)
        if grad_zw is not None:
            ctx.save_for_backward(torch.matmul(grad_zw, uw))
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
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


def softmax_classes(
    tags: Tensor, pad: int, num_classes: int, img: Tensor, target: Tensor, base: Tensor | None = None
) -> Tensor:
    """(P, N) bool: the classes in the softmax of each pair (image ``img``, tag ``target``): every class
    but the image's *other* tags. With ``base`` ((N,) bool, the classes that have pixel masks), a pair
    of a single-tag image also leaves out the base classes (docs/METHOD.md section 6); the pair's own
    tag always stays."""
    valid = tags != pad
    image_tags = torch.zeros(tags.shape[0], num_classes, dtype=torch.bool, device=tags.device)
    image_tags[valid.nonzero(as_tuple=True)[0], tags[valid]] = True
    drop = image_tags[img]  # (P, N): the image's tags ...
    if base is not None:
        drop |= base[None, :] & (valid.sum(1) == 1)[img][:, None]
    drop[torch.arange(img.numel(), device=drop.device), target] = False  # ... except the pair's own
    return ~drop


def pooled_tag_ce(pooled: Tensor, tags: Tensor, pad: int, weights: Tensor | None = None) -> Tensor:
    """Co-tag-masked CE of pooled logits.

    pooled: (b, N, T) — pooled logits of image b for pair slot t (the same column for every t in the
    baseline; attention-weighted per pair for the CAC). tags: (b, T) subset indices, ``pad``-padded.
    weights: optional (P,) per-pair weights in pair order (CAC warm-up: 0 or 1). Returns the sum over pairs.
    """
    n = pooled.shape[1]
    img, slot = tag_pairs(tags, pad)
    if img.numel() == 0:
        return pooled.sum() * 0.0
    target = tags[img, slot]
    logits = pooled[img, :, slot].float().masked_fill(~softmax_classes(tags, pad, n, img, target), float("-inf"))
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
