"""The CAC with an oracle attention: the tagged object's true mask in place of the bank's attention.

The demo's upper bound U (docs/CLAIM.md): what a perfect memory bank could give the attentive loss. For
every (image, tag) pair of single-tag images the attention is a = the object's mask (1 on the tagged
object, 0 elsewhere and in the padding) at the loss resolution, and the loss is the CAC's: co-tag-masked
CE of mean_i(a(i) * logits_i) over the loss-resolution pixels (logits bilinearly upsampled, pooled
through the adjoint as in larvseg.models.losses). No bank, no warm-up, no background rule.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from larvseg.models.losses import attention_mean_weights, pooled_tag_ce, tag_pairs


def oracle_attention_loss(
    logits: Tensor, object_masks: Tensor, tags: Tensor, pad: int, loss_hw: tuple[int, int]
) -> Tensor:
    """Sum over pairs of the attended pooled CE with the object masks as the attention.

    logits (b, N, h, w) at feature resolution; object_masks (b, H, W) bool at the crop resolution;
    tags (b, T) subset indices padded with ``pad``: one valid tag per image (whose object the mask is).
    """
    if bool(((tags != pad).sum(1) > 1).any()):
        raise ValueError("oracle attention: an image has several tags, but an object mask marks one tagged object")
    b, _, h, w = logits.shape
    img, slot = tag_pairs(tags, pad)
    att = F.interpolate(object_masks[:, None].float(), size=tuple(loss_hw), mode="nearest")[:, 0]  # (b, Hl, Wl)
    weights = logits.new_zeros(b, tags.shape[1], h * w, dtype=att.dtype)  # padded slots pool nothing
    weights[img, slot] = attention_mean_weights(att[img], (h, w))
    pooled = logits.float().flatten(2) @ weights.transpose(1, 2)  # (b, N, T)
    return pooled_tag_ce(pooled, tags, pad)
