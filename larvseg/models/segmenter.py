"""The LarvSeg segmenter: ViT backbone + cosine classifier (no decoder) + the CAC memory bank.

``build_segmenter`` makes one from a model config (for training); ``segmenter_from_checkpoint`` makes
one from a loaded checkpoint (for evaluation, prediction and the demo).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from larvseg.config import PIXEL_MEAN, PIXEL_STD, Config, ModelConfig, config_from_dict
from larvseg.errors import CheckpointError
from larvseg.models.cosine_classifier import ClassifierOutput, CosineClassifier
from larvseg.models.memory_bank import MemoryBank
from larvseg.models.pretrained_weights import load_pretrained
from larvseg.models.vit import VisionTransformer, build_vit

BANK_PREFIX = "bank."  # state-dict keys of the CAC memory bank (Segmenter.bank): training state, left out of exports


def register_pixel_stats(module: nn.Module) -> None:
    """Give ``module`` the method's pixel mean/std as buffers (``pixel_mean``, ``pixel_std``), not
    persistent: constants of the method, not learned, and checkpoints stay as they were."""
    module.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(3, 1, 1), persistent=False)
    module.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(3, 1, 1), persistent=False)


def standardize_pixels(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """RGB pixel values (..., 3, H, W), uint8 or float in 0..255 -> float32 (x - mean) / std."""
    return (images.to(mean.device, torch.float32) - mean) / std


class Segmenter(nn.Module):
    """Takes RGB pixel values (0..255, any dtype) and standardises them itself (``preprocess``), so
    every caller (training, evaluation, prediction) hands it the same thing: images as decoded."""

    pixel_mean: Tensor  # buffers of register_pixel_stats, declared for the type checker
    pixel_std: Tensor

    def __init__(
        self, backbone: VisionTransformer, classifier: CosineClassifier, bank: MemoryBank | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.bank = bank
        register_pixel_stats(self)

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def preprocess(self, images: Tensor) -> Tensor:
        """RGB pixel values (..., 3, H, W), uint8 or float in 0..255 -> float32 (x - mean) / std."""
        return standardize_pixels(images, self.pixel_mean, self.pixel_std)

    def forward(self, images: Tensor, class_ids: Tensor | None = None) -> ClassifierOutput:
        """images (B, 3, H, W) RGB pixel values, H and W multiples of 16; class_ids (N,) union ids or None = all.

        Returns logits (B, N, H/16, W/16), raw scores (detached) and L2-normalised features (detached)."""
        return self.classifier(self.backbone(self.preprocess(images)), class_ids)


def build_segmenter(model_cfg: ModelConfig, num_classes: int) -> Segmenter:
    """Backbone from ``model_cfg.arch`` (initialised from ``model_cfg.pretrained`` when set), a cosine
    classifier over ``num_classes`` union classes and, when ``model_cfg.cac``, the memory bank."""
    backbone = build_vit(model_cfg.arch, drop_path=model_cfg.drop_path)
    if model_cfg.pretrained:
        load_pretrained(backbone, model_cfg.pretrained)
    classifier = CosineClassifier(num_classes, backbone.embed_dim)
    bank = MemoryBank(num_classes, model_cfg.memory_bank_size, backbone.embed_dim) if model_cfg.cac else None
    return Segmenter(backbone, classifier, bank)


def segmenter_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The segmenter's weights from a checkpoint's 'model' entry, without the CAC memory bank.

    Accepts a Segmenter state dict, or one of a wrapper (DDP ``module.``, TrainingObjective
    ``segmenter.``). The bank only matters for training; dropping it saves 1.3 GB at 21K classes.
    """
    for prefix in ("module.", "segmenter."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith(BANK_PREFIX)}


def memory_bank_from_weights(state: dict[str, torch.Tensor]) -> MemoryBank:
    """The CAC memory bank in a training checkpoint's 'model' entry (exports leave it out)."""
    entries = {k[len(BANK_PREFIX) :]: v for k, v in state.items() if k.startswith(BANK_PREFIX)}
    if "slots" not in entries:
        raise CheckpointError(
            f"no memory bank in these weights (no {BANK_PREFIX}slots entry): trained without the CAC?"
        )
    bank = MemoryBank(*entries["slots"].shape[:3])
    bank.load_state_dict(entries)
    return bank


def segmenter_from_checkpoint(
    ckpt: dict[str, Any],
    device: torch.device | str = "cpu",
    model_cfg: ModelConfig | None = None,
    source: str = "checkpoint",
) -> tuple[Segmenter, list[str], Config]:
    """Build the segmenter of a loaded checkpoint (``larvseg.models.io.load_checkpoint``) for inference.

    Returns (segmenter in eval mode on ``device``, class names by union id, the checkpoint's Config).
    The architecture comes from the checkpoint's config unless ``model_cfg`` is given; the backbone is
    not re-initialised from ``model.pretrained`` (the checkpoint holds every weight) and no memory bank
    is built. ``source`` (the file) names the checkpoint in a :class:`CheckpointError` when the entries
    or the weights do not fit.
    """
    for key in ("model", "vocab"):
        if key not in ckpt:
            raise CheckpointError(
                f"{source}: no {key!r} entry (entries: {sorted(ckpt)}); not a larvseg train checkpoint"
            )
    names = [str(n) for n in ckpt["vocab"]]
    cfg = config_from_dict(ckpt["config"]) if "config" in ckpt else Config()
    model_cfg = dataclasses.replace(model_cfg or cfg.model, pretrained="", cac=False)
    segmenter = build_segmenter(model_cfg, len(names))
    state = segmenter_weights(ckpt["model"])
    own = segmenter.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or reshaped:
        raise CheckpointError(
            f"{source}: weights do not fit model.arch={model_cfg.arch!r} with {len(names)} classes: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"other shape {reshaped[:3]}{'...' if len(reshaped) > 3 else ''}"
        )
    segmenter.load_state_dict(state)
    return segmenter.to(device).eval(), names, cfg
