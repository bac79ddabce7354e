"""Feature-resolution diagnostics of a trained demo model: does the CAC's bank know anything the
classifier does not, and where do base pixels go?

For every evaluation image, one forward pass at the model's feature resolution (the image padded to a
multiple of the patch size; each patch takes the ground-truth label at its centre). Over all labelled
patches of the set, per class l:

- ``auc_classifier``: ROC-AUC of the classifier's raw score s(., l) for "the patch is class l";
- ``auc_bank``: ROC-AUC of the bank's foreground score p . q̄_l (CAC runs only);
- ``auc_attention``: ROC-AUC of the final attention a = sigmoid(standardize(f - b)) the CAC would give
  the image if it were tagged l (single-tag background rule, as for ImageNet images; CAC runs only).

If ``auc_bank`` is not above ``auc_classifier``, the attention can only re-weight the classifier's own
guess: the CAC has nothing to add for that class.

``seed_confusion``: check P1's seed-point propagation over the same patches (one random ground-truth
point per segment, every patch labelled by its most similar seed feature; larvseg.demo.checks).

``base_to_novel``: the share of base-labelled patches whose argmax over the evaluated classes is a novel
class (the "novel classes painted over base backgrounds" failure), and per class the ratio of predicted
to ground-truth patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from larvseg.config import IGNORE_INDEX
from larvseg.data.transforms import to_chw
from larvseg.demo.checks import confusion, propagate_seeds, roc_auc
from larvseg.models.attentive_classifier import BackgroundRule, attention_scores
from larvseg.models.cosine_classifier import standardize
from larvseg.models.memory_bank import MemoryBank
from larvseg.models.segmenter import Segmenter


@dataclass
class FeatureDiagnostics:
    auc_classifier: list[float]  # per evaluated class (NaN: no positive or no negative patch)
    auc_bank: list[float] | None  # None: the model has no bank (CAC off)
    auc_attention: list[float] | None
    base_to_novel: float  # % of base-labelled patches predicted as a novel class
    pred_over_gt: list[float]  # per class: predicted patches / ground-truth patches (NaN: none in GT)
    seed_confusion: np.ndarray | None = None  # (n, n) seed-point propagation (check P1; larvseg.demo.checks)


def _patch_labels(label: np.ndarray, image_hw: tuple[int, int], grid_hw: tuple[int, int], patch: int) -> np.ndarray:
    """Ground truth at each patch centre of the (padded) resized image; IGNORE_INDEX outside the image."""
    (h, w), (gh, gw) = image_hw, grid_hw
    cy, cx = np.arange(gh) * patch + patch // 2, np.arange(gw) * patch + patch // 2
    inside = (cy[:, None] < h) & (cx[None, :] < w)
    ly = np.minimum((cy * label.shape[0]) // h, label.shape[0] - 1)
    lx = np.minimum((cx * label.shape[1]) // w, label.shape[1] - 1)
    out = label[ly[:, None], lx[None, :]].astype(np.int64)
    return np.where(inside, out, IGNORE_INDEX)


@torch.no_grad()
def feature_diagnostics(
    segmenter: Segmenter,
    dataset,
    union_ids: np.ndarray,
    base_mask: np.ndarray,
    bank: MemoryBank | None,
    rule: BackgroundRule,
) -> FeatureDiagnostics:
    """The diagnostics above over every item of ``dataset`` (items: image uint8 RGB resized for eval,
    label uint16 union ids). ``union_ids``: the evaluated classes; ``bank``: the CAC bank or None."""
    segmenter.eval()
    patch = segmenter.backbone.patch_size
    class_ids = torch.from_numpy(union_ids)
    n = len(union_ids)
    to_eval = np.full(int(union_ids.max()) + 2, -1, dtype=np.int64)
    to_eval[union_ids] = np.arange(n)
    single = torch.arange(n)[:, None]  # every class as the single tag of its own copy of the image
    scores, banks, atts, labels = [], [], [], []
    seed_conf = np.zeros((n, n), dtype=np.int64)
    for i in range(len(dataset)):
        item = dataset.load(i)
        image = segmenter.preprocess(torch.from_numpy(to_chw(np.asarray(item["image"]))))[None]
        h, w = image.shape[-2:]
        image = F.pad(image, (0, -w % patch, 0, -h % patch))  # after standardising: pads with the mean colour
        out = segmenter.classifier(segmenter.backbone(image), class_ids)
        gh, gw = out.scores.shape[-2:]
        lab = _patch_labels(np.asarray(item["label"]), (h, w), (gh, gw), patch).reshape(-1)
        keep = lab != IGNORE_INDEX
        lab = np.where(keep, to_eval[np.minimum(lab, to_eval.size - 1)], -1)
        keep &= lab >= 0
        grid = np.where(keep, lab, -1).reshape(gh, gw)
        seeded = propagate_seeds(out.features[0].numpy(), grid, np.random.default_rng(i))
        seed_conf += confusion(seeded.reshape(-1), grid.reshape(-1), n)
        s = out.scores.flatten(2)  # (1, N, hw)
        scores.append(s[0].T[keep].numpy())
        labels.append(lab[keep])
        if bank is not None:
            p = out.features.flatten(2)
            banks.append((bank.class_means(class_ids) @ p[0]).T[keep].numpy())
            # the CAC picks the background rule from the image's tag count: n one-tag copies (views)
            score = attention_scores(p.expand(n, -1, -1), s.expand(n, -1, -1), single, -1, class_ids, bank, rule)
            atts.append(torch.sigmoid(standardize(score[:, 0], dim=-1)).T[keep].numpy())
    s_all, lab_all = np.concatenate(scores), np.concatenate(labels)
    auc = lambda m: [roc_auc(m[:, k], lab_all == k) for k in range(n)]  # noqa: E731
    pred = s_all.argmax(1)
    base_pix = base_mask[lab_all]
    gt_count = np.bincount(lab_all, minlength=n).astype(np.float64)
    pred_count = np.bincount(pred, minlength=n).astype(np.float64)
    return FeatureDiagnostics(
        auc_classifier=auc(s_all),
        auc_bank=auc(np.concatenate(banks)) if banks else None,
        auc_attention=auc(np.concatenate(atts)) if atts else None,
        base_to_novel=float(100.0 * (~base_mask[pred[base_pix]]).mean()) if base_pix.any() else float("nan"),
        pred_over_gt=[float(p / g) if g > 0 else float("nan") for p, g in zip(pred_count, gt_count)],
        seed_confusion=seed_conf,
    )
