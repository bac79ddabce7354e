"""``larvseg pretrain``: AugReg-style classification pretraining of the ViT backbone on tagged images.

    larvseg pretrain CONFIG [key=value ...] [--work-dir DIR] [--resume auto|none|PATH]

The paper's backbone is AugReg ViT-B/16, pretrained by image classification on ImageNet-21K, the very
images that later serve as image-level supervision. This command does the same for any config: it
trains the config's ViT (``model.arch``, optionally starting from ``model.pretrained``) to classify the
images of its image-level sources (``data.tag_sources``: ImageNet-style folders, custom tag folders, or
segmentation sets used for tags) and writes the backbone as an ``.npz`` in the exact AugReg key layout,
``head/*`` included (larvseg.models.pretrained_weights.augreg_state), so ``model.pretrained=<it>`` loads it through
the same loader as Google's file. A user with a new domain (aerial, medical) and many tagged images
pretrains their own backbone this way.

As AugReg: the class token after the final norm feeds a linear head over the classes of all tag sources
(zero-initialised weights); softmax cross-entropy (an image with several tags gets the target spread
evenly over them) or sigmoid cross-entropy (a binary CE per class, summed over classes); Adam with
decoupled weight decay on the matrices only (AdamW). Ours: the project's training augmentation and the
MixedLoader (deterministic per step, each source's ``crop_size``), a poly schedule after an optional
linear warm-up, one process (no DDP).

Checkpoints are those of ``larvseg train``: ``<work_dir>/iter_<step>.pth`` written atomically every
``train.checkpoint_interval`` steps and at the end, ``latest.pth``, ``train.keep_last``, auto-resume;
resuming continues exactly (the data and the drop-path RNG are functions of (seed, step), the schedule is
a function of the step, and AdamW's moments are in the checkpoint). ``metrics.jsonl`` logs ``loss`` and
``top1`` (the share of the step's images whose highest-scoring class is one of their tags, on the
augmented training crops).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from larvseg import distributed
from larvseg.config import Config, ConfigError, dump_config, load_config
from larvseg.data.batch import TAG_PAD, TagBatch
from larvseg.data.mixing import MixedLoader
from larvseg.data.sources import source_class_names
from larvseg.data.vocabulary import Vocabulary
from larvseg.domains import require_writable
from larvseg.models.amp_workload import vit_workload
from larvseg.models.pretrained_weights import augreg_state, load_pretrained, save_augreg_npz
from larvseg.models.segmenter import register_pixel_stats, standardize_pixels
from larvseg.models.vit import VisionTransformer, build_vit
from larvseg.precision import bf16_autocast, choose
from larvseg.threads import configure_threads
from larvseg.train.checkpoint import Checkpointer, CheckpointError
from larvseg.train.logger import MetricLogger
from larvseg.train.loop import NonFiniteLossError, optimizer_step_or_stop, seed_everything, step_seed
from larvseg.train.schedule import poly_lr, set_lr

log = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.npz"
CLASSES_FILE = "classes.txt"  # the head's classes, one per line, in head order


class ImageClassifier(nn.Module):
    """ViT + a linear head on the class token (AugReg's classification model)."""

    pixel_mean: Tensor  # buffers of register_pixel_stats, declared for the type checker
    pixel_std: Tensor

    def __init__(self, backbone: VisionTransformer, num_classes: int, loss: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.zeros_(self.head.weight)  # AugReg's head starts at zero
        # sigmoid: start every class near probability 1/C instead of 1/2, so the C-1 negatives of an image
        # do not swamp the first steps (zero for softmax, where a constant bias changes nothing)
        nn.init.constant_(self.head.bias, -math.log(num_classes) if loss == "sigmoid" else 0.0)
        register_pixel_stats(self)  # the data layer hands RGB pixel values, as to the Segmenter

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) RGB pixel values -> class logits (B, C)."""
        x = standardize_pixels(images, self.pixel_mean, self.pixel_std)
        return self.head(self.backbone.tokens(x)[:, 0])


def pretrain_vocabulary(cfg: Config) -> Vocabulary:
    """The classes of the head: the union of the tag sources' class lists, in source order."""
    if not cfg.data.tag_sources:
        raise ConfigError("larvseg pretrain needs image-level sources: data.tag_sources is empty")
    root = cfg.data.resolved_root()
    return Vocabulary.union(*(source_class_names(s, root) for s in cfg.data.tag_sources))


def loader_config(cfg: Config) -> Config:
    """The config the MixedLoader sees: the tag sources only, ``pretrain.batch_size`` images per step."""
    data = dataclasses.replace(cfg.data, seg_sources=[], seg_batch_size=0, tag_batch_size=cfg.pretrain.batch_size)
    return dataclasses.replace(cfg, data=data)


def multi_hot(tags: Tensor, num_classes: int) -> Tensor:
    """(b, T) TAG_PAD-padded class ids -> (b, C) float 0/1."""
    out = torch.zeros(tags.shape[0], num_classes + 1, device=tags.device)
    out.scatter_(1, torch.where(tags == TAG_PAD, num_classes, tags), 1.0)  # pads go to a dropped column
    return out[:, :num_classes]


def classification_loss_sum(logits: Tensor, target: Tensor, loss: str) -> Tensor:
    """Sum over images. softmax: CE against the target spread evenly over the image's tags;
    sigmoid: binary CE summed over classes (big_vision's sigmoid_xent)."""
    logits = logits.float()
    if loss == "softmax":
        return -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum()
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum")


def lr_at(step: int, cfg: Config) -> float:
    p, t = cfg.pretrain, cfg.train
    warm = min(1.0, (step + 1) / p.warmup_iters) if p.warmup_iters > 0 else 1.0
    return poly_lr(step, p.iters, p.lr, t.poly_power, t.min_lr) * warm


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (kernels, position grid, class token), not on biases and norms."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.pretrain.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.pretrain.lr)


def step_terms(model: ImageClassifier, batches: list[TagBatch], num_classes: int, loss: str) -> dict[str, Tensor]:
    """Mean loss over the step's images (all sources) and the top-1 tag accuracy."""
    total = sum(b.images.shape[0] for b in batches)
    loss_sum, hits = torch.zeros(()), torch.zeros(())
    for b in batches:
        if b.images.shape[0] == 0:
            continue
        logits = model(b.images)
        target = multi_hot(b.tags, num_classes)
        loss_sum = loss_sum + classification_loss_sum(logits, target, loss)
        hits = hits + target.gather(1, logits.detach().argmax(1, keepdim=True)).sum()
    return {"loss": loss_sum / max(total, 1), "top1": hits / max(total, 1)}


def pretrain(cfg: Config, resume: str | None = None) -> Path:
    """Pretrain ``cfg``'s backbone on its tag sources; returns the written AugReg ``.npz``.

    ``resume``: None = auto (newest checkpoint in the work dir), "auto", "none" or a checkpoint path."""
    p, t = cfg.pretrain, cfg.train
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("larvseg pretrain runs in one process; launch it without torchrun")
    if p.iters <= 0 or p.batch_size <= 0:
        raise ConfigError(f"pretrain.iters and pretrain.batch_size must be > 0, got {p.iters} and {p.batch_size}")
    device = distributed.select_device(t.device)
    work_dir = Path(p.work_dir or f"work_dirs/{cfg.name or 'default'}_pretrain")
    checkpointer = Checkpointer(work_dir, t.keep_last)
    checkpointer.prepare(dump_config(cfg))
    out_path = Path(p.out) if p.out else work_dir / BACKBONE_FILE

    seed_everything(t.seed)
    vocab = pretrain_vocabulary(cfg)
    backbone = build_vit(cfg.model.arch, drop_path=cfg.model.drop_path)
    if cfg.model.pretrained:
        load_pretrained(backbone, cfg.model.pretrained)
    model = ImageClassifier(backbone, len(vocab), p.loss).to(device)
    if device.type == "cpu":
        configure_threads(model, t.threads)  # train.threads, else LARVSEG_THREADS / OMP_NUM_THREADS, else by size
    amp = choose(t.amp, device, vit_workload(backbone, "training"))  # "auto": measured once per machine
    log.info("larvseg: %s", amp.line)
    optimizer = build_optimizer(model, cfg)

    start_step = 0
    resume_path, state = checkpointer.pick(resume if resume is not None else "auto")
    if resume_path is not None and state is not None:  # pick() gives both or neither
        if state.get("kind") != "pretrain":
            raise CheckpointError(f"{resume_path}: not a `larvseg pretrain` checkpoint")
        start_step, _ = checkpointer.restore(resume_path, state, vocab.names, model, optimizer)
        log.info("resumed from %s at step %d", resume_path, start_step)

    loader = MixedLoader(loader_config(cfg), vocab, 0, 1, start_step=start_step, pin_memory=device.type == "cuda")
    logger = MetricLogger(work_dir, p.iters, start_step, p.batch_size, t.log_interval, enabled=True)

    model.train()
    batches = iter(loader)
    for step in range(start_step, p.iters):
        batch = next(batches)
        torch.manual_seed(step_seed(t.seed, step, 0))  # drop-path: a function of (seed, step), exact on resume
        lr = lr_at(step, cfg)
        set_lr(optimizer, lr)
        with bf16_autocast(amp.bf16, device):
            terms = step_terms(model, batch.to(device).tag, len(vocab), p.loss)
        values = {k: float(v.detach()) for k, v in terms.items()}
        optimizer_step_or_stop(
            optimizer, terms["loss"], values, step, lr, checkpointer.latest(), work_dir, close=logger.close
        )
        steps_done = step + 1
        logger.update(steps_done, lr, values)
        if steps_done % t.checkpoint_interval == 0 or steps_done == p.iters:
            checkpointer.save(steps_done, model, optimizer, cfg.to_dict(), vocab.names, kind="pretrain")
    logger.plot()
    logger.close()

    save_augreg_npz(out_path, augreg_state(model.backbone, model.head.weight, model.head.bias))
    (work_dir / CLASSES_FILE).write_text("".join(f"{n}\n" for n in vocab.names))
    log.info("done: backbone %s (%d-class head; load it with model.pretrained=%s)", out_path, len(vocab), out_path)
    return out_path


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.work_dir:
        cfg.pretrain.work_dir = args.work_dir
    require_writable(
        cfg.pretrain.work_dir or f"work_dirs/{cfg.name or 'default'}_pretrain",
        "work dir (pretrain.work_dir / --work-dir)",
    )  # before any data is read
    try:
        pretrain(cfg, resume=args.resume)
    except NonFiniteLossError as exc:
        print(f"larvseg pretrain: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
