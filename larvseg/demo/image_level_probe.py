"""A trained demo model on the image-level *training* images, where the CAC acts (checks P2 and M).

Every I22K image is shown as in training at ratio 1 (rescaled to the tag source's ``scale``, padded to
its crop with the mean colour), without augmentation; the generator's own label map of the image
(``I22K/labels``, never read by training) gives every patch's class at its centre. Per image, tagged l:

- P2: habitat / other-background patches (by the tag's habitat in benchmark.json) and how many of each
  the model predicts as l (argmax over the benchmark's classes);
- M: within-image ROC-AUC, object vs the rest of the labelled patches, of the classifier's raw score
  s(., l) and (CAC runs) of the attention score the CAC would give the image as tagged l with the
  trained bank (single-tag background rule; the sigmoid and standardising are monotone, so the AUC of
  the attention equals that of its score).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tifffile
import torch

from larvseg.config import Config
from larvseg.data.io import read_image
from larvseg.data.synthetic import A847_UNLABELED, DEMO_CLASSES, BenchmarkLayout, read_habitats
from larvseg.data.transforms import pad_to, rescale_size, resize_image, resize_label, source_scale, to_chw
from larvseg.demo.checks import habitat_counts, per_class_mean, within_image_auc
from larvseg.models.attentive_classifier import BackgroundRule, attention_scores
from larvseg.models.memory_bank import MemoryBank
from larvseg.models.segmenter import Segmenter

_DEMO_OF_ADE = np.full(A847_UNLABELED + 1, -1, dtype=np.int64)  # ADE-847 train id -> demo class index
_DEMO_OF_ADE[[c.ade_train_id for c in DEMO_CLASSES]] = np.arange(len(DEMO_CLASSES))


@dataclass
class ImageLevelProbe:
    habitat: list[int]  # summed habitat_counts over the images of novel tags
    auc_classifier: list[float]  # per class: mean within-image AUC of s(., l)
    auc_attention: list[float] | None  # per class, CAC runs only


def _patch_grid(label: np.ndarray, patch: int) -> np.ndarray:
    """Class at each patch centre of a (H, W) map whose sides are multiples of ``patch``."""
    c = patch // 2
    return label[c::patch, c::patch]


@torch.no_grad()
def probe_image_level(
    segmenter: Segmenter,
    cfg: Config,
    layout: BenchmarkLayout,
    union_ids: np.ndarray,
    bank: MemoryBank | None,
    rule: BackgroundRule,
) -> ImageLevelProbe:
    """P2 counts and M AUCs of one trained model over every I22K image of the benchmark (one batch per class)."""
    segmenter.eval()
    source = cfg.data.tag_sources[0]
    long_side, short_side = source_scale(source, cfg.data)
    crop, patch = source.crop_size, segmenter.backbone.patch_size
    habitats = read_habitats(layout)
    class_ids = torch.from_numpy(union_ids)
    n = len(DEMO_CLASSES)
    counts = np.zeros(4, dtype=np.int64)
    auc_cls, auc_att, image_class = [], [], []
    for k, cls in enumerate(DEMO_CLASSES):
        images, grids = [], []
        for path in sorted((layout.imagenet / cls.wnid).glob("*.JPEG")):
            image = read_image(path)
            label = _DEMO_OF_ADE[tifffile.imread(layout.imagenet_labels / cls.wnid / f"{path.stem}.tif")]
            hw = rescale_size(image.shape[0], image.shape[1], long_side, short_side)
            chw, _ = pad_to(to_chw(resize_image(image, hw), np.float32), None, crop)
            padded = np.full((crop, crop), -1, dtype=np.int64)
            small = resize_label(label.astype(np.int32), hw)[:crop, :crop]
            padded[: small.shape[0], : small.shape[1]] = small
            images.append(chw)
            grids.append(_patch_grid(padded, patch))
        if not images:
            continue
        out = segmenter(torch.from_numpy(np.stack(images)), class_ids)
        b, _, gh, gw = out.scores.shape
        s = out.scores.flatten(2)  # (b, N, hw)
        pred = s.argmax(1).numpy()
        if bank is not None:
            tags = torch.full((b, 1), k, dtype=torch.long)
            att = attention_scores(out.features.flatten(2), s, tags, -1, class_ids, bank, rule)[:, 0].numpy()
        for i, grid in enumerate(grids):
            lab = grid.reshape(-1)
            if cls.role == "novel":
                counts += habitat_counts(pred[i], lab, k, habitats[k])
            labelled = lab >= 0
            auc_cls.append(within_image_auc(s[i, k].numpy()[labelled], lab[labelled] == k))
            if bank is not None:
                auc_att.append(within_image_auc(att[i][labelled], lab[labelled] == k))
            image_class.append(k)
    return ImageLevelProbe(
        habitat=counts.tolist(),
        auc_classifier=per_class_mean(auc_cls, image_class, n).tolist(),
        auc_attention=per_class_mean(auc_att, image_class, n).tolist() if bank is not None else None,
    )


__all__ = ["ImageLevelProbe", "probe_image_level"]
