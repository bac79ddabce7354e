"""The LarvSeg segmenter: ViT backbone + cosine classifier (no decoder) + the CAC memory bank."""

from __future__ import annotations

import logging

from torch import Tensor, nn

from larvseg.config import ModelConfig
from larvseg.models.augreg import load_pretrained
from larvseg.models.cosine_classifier import ClassifierOutput, CosineClassifier
from larvseg.models.memory_bank import MemoryBank
from larvseg.models.vit import VisionTransformer, build_vit

log = logging.getLogger(__name__)


class Segmenter(nn.Module):
    def __init__(self, backbone: VisionTransformer, classifier: CosineClassifier, bank: MemoryBank | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.bank = bank

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def forward(self, images: Tensor, class_ids: Tensor | None = None) -> ClassifierOutput:
        """images (B, 3, H, W) normalised, H and W multiples of 16; class_ids (N,) union ids or None = all.

        Returns logits (B, N, H/16, W/16), raw scores (detached) and L2-normalised features (detached)."""
        return self.classifier(self.backbone(images), class_ids)


def build_segmenter(model_cfg: ModelConfig, num_classes: int) -> Segmenter:
    """Backbone from ``model_cfg.arch`` (initialised from ``model_cfg.pretrained`` when set), a cosine
    classifier over ``num_classes`` union classes and, when ``model_cfg.cac``, the memory bank."""
    backbone = build_vit(model_cfg.arch, drop_path=model_cfg.drop_path)
    if model_cfg.pretrained:
        load_pretrained(backbone, model_cfg.pretrained)
    classifier = CosineClassifier(num_classes, backbone.embed_dim)
    bank = MemoryBank(num_classes, model_cfg.memory_bank_size, backbone.embed_dim) if model_cfg.cac else None
    return Segmenter(backbone, classifier, bank)
