"""TrainingObjective: the weighted per-step losses of a StepBatch (the module DDP wraps).

Per source of the step (segmentation sources first, then tag sources; the source index used for class
sampling is that position): sample the class subset (global presence, seeded by (seed, step, index)),
run the segmenter, compute the loss sums, divide by the *global* count (images * Hl * Wl, or
(image, tag) pairs) and multiply by world_size (DDP averages gradients, so N processes give the
gradients of one). Every rank produces every term and makes the same collective calls in the same
order, also when it holds 0 images of a source (the term is then an exact zero that still reaches
every parameter), so DDP never hangs. The CAC bank is updated once, after all sources' attentions.

Returned values are these per-rank terms; their sum over ranks / world_size is the true loss, so a
logger should all_reduce-mean them (or, equivalently here, read rank 0's value only in 1 process).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from larvseg import distributed
from larvseg.config import IGNORE_INDEX, ModelConfig
from larvseg.data.batch import TAG_PAD, SegBatch, StepBatch, TagBatch
from larvseg.models.attentive_classifier import BackgroundRule, cac_loss
from larvseg.models.class_sampling import (
    ClassSubset,
    global_presence,
    present_in_labels,
    present_in_tags,
    sample_classes,
    step_generator,
)
from larvseg.models.image_loss import image_level_loss, needs_base
from larvseg.models.losses import loss_size, pixel_ce_sum
from larvseg.models.memory_bank import MemoryBank
from larvseg.models.oracle_attention import oracle_attention_loss
from larvseg.models.segmenter import Segmenter


class TrainingObjective(nn.Module):
    def __init__(self, segmenter: Segmenter, model_cfg: ModelConfig, seed: int) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.cfg = model_cfg
        self.seed = seed
        self.use_cac = bool(model_cfg.cac)
        if self.use_cac and segmenter.bank is None:
            raise ValueError("model.cac is on but the segmenter has no memory bank (build it with cac=True)")
        self.rule = BackgroundRule(model_cfg.bg_topk, model_cfg.bg_score_thresh, model_cfg.bg_mse_thresh)

    @property
    def _bank(self) -> MemoryBank:
        """The segmenter's memory bank, which model.cac needs (checked in __init__)."""
        if self.segmenter.bank is None:
            raise ValueError("model.cac is on but the segmenter has no memory bank (build it with cac=True)")
        return self.segmenter.bank

    def _zero(self) -> Tensor:
        """An exact zero connected to every trainable parameter (for a rank without images of a source)."""
        zeros = [(p.view(-1)[:1] * 0.0).sum() for p in self.segmenter.parameters() if p.requires_grad]
        return cast(Tensor, sum(zeros))  # a tensor: the segmenter has trainable parameters, never the start 0

    def _subset(self, present: Tensor, pool: Tensor, step: int, index: int) -> ClassSubset:
        vocab = self.segmenter.num_classes
        presence = global_presence(present, vocab)  # collective: every rank, every source
        gen = step_generator(self.seed, step, index)
        return sample_classes(pool, presence, self.cfg.num_sampled_classes, gen, vocab)

    def _seg_term(self, batch: SegBatch, step: int, index: int, pool: Tensor) -> Tensor:
        device = batch.images.device
        subset = self._subset(present_in_labels(batch.labels).to(device), pool, step, index)
        hl, wl = loss_size(tuple(batch.labels.shape[-2:]), self.cfg.loss_downsample)
        norm = float(batch.global_size * hl * wl)
        if batch.images.shape[0] == 0 or norm == 0:
            return self._zero()
        out = self.segmenter(batch.images, subset.class_ids)
        labels = subset.remap(batch.labels, pad=IGNORE_INDEX)
        loss = pixel_ce_sum(out.logits, labels, self.cfg.loss_downsample)
        return loss / norm * distributed.world_size() * batch.loss_weight

    def _tag_terms(
        self, batch: TagBatch, step: int, index: int, entries: list, mask_classes: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        device = batch.images.device
        subset = self._subset(present_in_tags(batch.tags, TAG_PAD).to(device), batch.class_ids, step, index)
        # model.image_loss options that need them: which scored classes have pixel masks (union ids of the
        # step's segmentation sources)
        base = None if mask_classes is None else torch.isin(subset.class_ids, mask_classes)
        # the pair count stays on the device: no host sync in the step (a rank whose images carry no
        # valid tag computes an exact zero through the normal path)
        local_pairs = (batch.tags != TAG_PAD).sum().to(torch.float32).reshape(1)
        global_pairs = distributed.all_reduce_sum(local_pairs)  # collective
        scale = distributed.world_size() / global_pairs.clamp(min=1.0)[0]  # 0-d, like the other terms
        if batch.images.shape[0] == 0 or batch.tags.shape[1] == 0:
            if self.use_cac:
                d = self._bank.dim
                entries.append((torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, d, device=device)))
            zero = self._zero()
            return zero, zero
        out = self.segmenter(batch.images, subset.class_ids)
        tags = subset.remap(batch.tags, pad=TAG_PAD)
        crop_hw = (batch.images.shape[-2], batch.images.shape[-1])
        cls = image_level_loss(out.logits, tags, TAG_PAD, self.cfg.loss_downsample, crop_hw, self.cfg.image_loss, base)
        cls = cls * scale * batch.loss_weight
        if not self.use_cac:
            return cls, out.logits.sum() * 0.0
        if self.cfg.oracle_attention:
            if batch.object_masks is None:
                raise ValueError(f"model.oracle_attention: tag source {batch.source} has no object_masks")
            oracle = oracle_attention_loss(
                out.logits, batch.object_masks, tags, TAG_PAD, loss_size(crop_hw, self.cfg.loss_downsample)
            )
            return cls, oracle * scale * batch.cac_weight
        res = cac_loss(
            out.logits,
            out.scores,
            out.features,
            tags,
            TAG_PAD,
            subset.class_ids,
            self._bank,
            loss_hw=loss_size(crop_hw, self.cfg.loss_downsample),
            topk=batch.cac_topk,
            warm_up=self.cfg.warm_up,
            rule=self.rule,
            options=self.cfg.image_loss,
            base=base,
        )
        entries.append((res.pair_classes, res.pair_features))
        return cls, res.loss_sum * scale * batch.cac_weight

    def forward(self, batch: StepBatch) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        entries: list[tuple[Tensor, Tensor]] = []
        every_class = torch.cat(
            [b.class_ids for b in batch.seg] + [b.class_ids for b in batch.tag]
        ).unique()  # sorted: same on every rank
        for index, seg in enumerate(batch.seg):
            pool = seg.class_ids if self.cfg.seg_class_pool == "source" else every_class
            terms[f"seg/{seg.source}"] = self._seg_term(seg, batch.step, index, pool)
        mask_classes = None
        if needs_base(self.cfg.image_loss):
            mask_classes = torch.cat(
                [torch.zeros(0, dtype=torch.long, device=every_class.device), *[s.class_ids for s in batch.seg]]
            )
        for j, tag in enumerate(batch.tag):
            cls, cac = self._tag_terms(tag, batch.step, len(batch.seg) + j, entries, mask_classes)
            terms[f"cls/{tag.source}"] = cls
            if self.use_cac:
                terms[f"cac/{tag.source}"] = cac
        if self.use_cac and entries:
            # Attend before enqueue, at step granularity: every attention above used the bank as it was at
            # the start of the step. One gathered enqueue for all sources, in the order one process with the
            # whole batch enqueues: source by source, each source's entries in rank order (its batch order),
            # so that a class tagged in two sources fills the same slots with any number of processes.
            # The source index rides in the class id (one gather for ids, one for features).
            vocab = self._bank.num_classes
            keyed = distributed.all_gather_cat(torch.cat([c + j * vocab for j, (c, _) in enumerate(entries)]))
            feats = distributed.all_gather_cat(torch.cat([f for _, f in entries]).contiguous())
            order = torch.sort(torch.div(keyed, vocab, rounding_mode="floor"), stable=True).indices
            self._bank.enqueue(keyed[order] % vocab, feats[order], gather=False)
        if not terms:
            raise ValueError(f"step {batch.step}: the StepBatch holds no source")
        terms = {"loss": cast(Tensor, sum(terms.values())), **terms}  # cast: terms is not empty (checked above)
        return terms
