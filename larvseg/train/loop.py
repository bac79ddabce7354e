"""``larvseg train``: the explicit training loop.

    larvseg train CONFIG [key=value ...] [--work-dir DIR] [--resume auto|none|PATH]
    python -m torch.distributed.run --nproc_per_node N -m larvseg.cli train ...   (or tools/dist_train.sh)

One process per device; under torchrun every rank runs this same loop on its shard of each step's
global batch (larvseg.data.mixing.MixedLoader), and DDP averages gradients. The TrainingObjective
scales every rank's losses so that N processes give exactly the gradients of one process with the
same global batch; the loss values logged here are the sums over ranks divided by world_size, i.e.
the true losses of the step.

Per step, in order: seed the torch RNG from (seed, step, rank) (drop-path is the only consumer; this
makes resuming exact without replaying RNG streams), set the poly lr, forward under autocast, all-reduce
the loss terms (for logging and so that every rank agrees on a NaN/inf stop *before* any backward),
backward, SGD step, log; checkpoint every ``train.checkpoint_interval`` steps and at the end; evaluate
every ``train.eval_interval`` steps.

``train.amp``: "auto" = bf16 autocast where a forward + backward pass was measured faster in bf16 on this
machine (once, cached; larvseg.precision), float32 elsewhere; "bf16" forces it; "off" = float32. The
losses run in float32 either way.
``train.threads``: intra-op threads (0 = LARVSEG_THREADS, OMP_NUM_THREADS or a default from the model
size; larvseg.threads), printed at the start.
``train.eval_interval``: > 0 every N steps and at the end, 0 only at the end, < 0 never. The evaluation
is handed in (``train(..., evaluator=...)``; ``larvseg train`` hands ``larvseg eval``'s
larvseg.eval.evaluate.Evaluator), as big_vision hands its evaluators to the trainer: this layer does not
import the evaluation code.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from larvseg import distributed
from larvseg.config import Config, dump_config, load_config
from larvseg.data.batch import StepBatch
from larvseg.data.mixing import MixedLoader
from larvseg.data.sources import build_vocabulary
from larvseg.data.synthetic import ensure_smoke_data
from larvseg.data.vocabulary import Vocabulary
from larvseg.domains import require_writable
from larvseg.log import env_rank
from larvseg.models.amp_workload import vit_workload
from larvseg.models.model_repo import EVAL_RESULTS
from larvseg.models.objective import TrainingObjective
from larvseg.models.segmenter import Segmenter, build_segmenter
from larvseg.precision import bf16_autocast, choose
from larvseg.tensorboard import OVERLAY_IMAGES
from larvseg.threads import configure_threads
from larvseg.train.checkpoint import FINAL_WEIGHTS, Checkpointer, export_weights
from larvseg.train.logger import MetricLogger
from larvseg.train.schedule import poly_lr, set_lr

log = logging.getLogger(__name__)


class Evaluation(Protocol):
    """What ``train`` evaluates with, built by its caller (larvseg.eval.evaluate.Evaluator is one)."""

    def run(self, segmenter: Segmenter, *, out_dir: Path) -> dict[str, Any]:
        """Metrics of ``segmenter`` (call on every rank); rank 0 writes them to ``out_dir``, its
        ``EVAL_RESULTS`` file last."""
        ...

    def overlays(self, segmenter: Segmenter, count: int) -> list[np.ndarray]:
        """Predictions of the first ``count`` evaluation images drawn over them (for TensorBoard)."""
        ...


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; the run stops, the last good checkpoint stays on disk."""


def optimizer_step_or_stop(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    values: dict[str, float],
    step: int,
    lr: float,
    last_good: Path | str | None,
    work_dir: Path,
    close: Callable[[], None],
) -> None:
    """Backward ``loss`` and one optimizer step, unless a term of ``values`` is NaN or inf: then
    ``close()`` (the metric logger, the process group) and raise NonFiniteLossError naming the terms and
    the last good checkpoint. The check comes before backward, so the weights in memory and the last
    checkpoint on disk are both still good. (``larvseg train`` and ``larvseg pretrain``.)"""
    if not all(math.isfinite(v) for v in values.values()):
        close()
        raise NonFiniteLossError(
            f"non-finite loss at step {step} (lr {lr:.3e}): "
            + ", ".join(f"{k}={v}" for k, v in values.items())
            + f". Stopped; last good checkpoint: {last_good or 'none'} (work dir {work_dir})"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed for the torch RNG of one (step, rank)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seed_everything(seed: int) -> None:
    """The same seed on every rank, so every rank builds identical initial weights."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def reduce_terms(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sum of each term over ranks / world_size (the step's true loss); one collective for all terms."""
    keys = sorted(terms)
    values = torch.stack([terms[k].detach().float() for k in keys])
    values = distributed.all_reduce_sum(values) / distributed.world_size()
    return dict(zip(keys, values.tolist()))


def data_parallel(objective: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP around the objective, without buffer broadcasts.

    The buffers are the memory bank, which the objective keeps identical on all ranks itself (gathered
    enqueue; every rank starts from the same empty bank or the same checkpoint); broadcasting rank 0's
    copy every forward would only cost time. ``broadcast_buffers=False`` is the argument every supported
    torch release has (``forward_sync_buffers`` exists only from 2.13 on). 2.13 deprecates it with a
    FutureWarning on every run, which we silence: its one behavioural difference (no buffer sync at
    construction either) does not matter for identical banks.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )


def build(cfg: Config, device: torch.device) -> tuple[Vocabulary, Segmenter, MixedLoader]:
    """What ``train`` is handed for ``cfg``: the union vocabulary, a fresh segmenter (seeded, so every
    rank builds the same initial weights) and this rank's loader of the mixed per-step batches."""
    if distributed.is_main_process():
        ensure_smoke_data(cfg.data)  # data.demo_benchmark (tiny_cpu): a generated benchmark, before any listing
    distributed.barrier()
    seed_everything(cfg.train.seed)
    vocab = build_vocabulary(cfg)
    segmenter = build_segmenter(cfg.model, len(vocab))
    loader = MixedLoader(cfg, vocab, distributed.rank(), distributed.world_size(), pin_memory=device.type == "cuda")
    return vocab, segmenter, loader


def mark_supervised(seen: torch.Tensor, batch: StepBatch) -> None:
    """Set ``seen[c]`` for every union class with a labelled pixel or a tag in ``batch`` (vectorised)."""
    n = seen.numel()
    for b in batch.seg:
        labels = b.labels.reshape(-1)
        seen[labels[labels < n]] = True  # IGNORE_INDEX (and padding) is >= n
    for tb in batch.tag:
        tags = tb.tags.reshape(-1)
        seen[tags[(tags >= 0) & (tags < n)]] = True  # TAG_PAD = -1


def train(
    cfg: Config,
    vocab: Vocabulary,
    segmenter: Segmenter,
    loader: MixedLoader,
    resume: str | None = None,
    evaluator: Evaluation | None = None,
) -> Path:
    """Train ``segmenter`` on the batches of ``loader`` (in this process, or as one rank under torchrun);
    returns the work dir.

    ``vocab``: the union vocabulary (its names go into checkpoints); ``loader``: an iterable of
    StepBatch for this rank with ``start_at(step)`` (larvseg.data.mixing.MixedLoader; ``build`` makes
    all three from ``cfg``). ``resume``: None = ``cfg.train.resume`` ("" = auto: newest checkpoint in
    the work dir), "auto", "none" (start fresh) or a checkpoint path. ``evaluator``: what evaluates the
    segmenter every ``train.eval_interval`` steps (e.g. ``larvseg.eval.evaluate.Evaluator(cfg, vocab)``);
    required unless ``train.eval_interval`` < 0."""
    if cfg.train.eval_interval >= 0 and evaluator is None:
        raise ValueError(
            f"train.eval_interval={cfg.train.eval_interval} evaluates during training, but train() was "
            "handed no evaluator: pass evaluator=larvseg.eval.evaluate.Evaluator(cfg, vocab), or set "
            "train.eval_interval=-1"
        )
    device = distributed.init_from_env(cfg.train.device)
    rank, world = distributed.rank(), distributed.world_size()
    is_main = rank == 0
    t = cfg.train
    work_dir = cfg.work_dir()
    checkpointer = Checkpointer(work_dir, t.keep_last)
    if is_main:
        checkpointer.prepare(dump_config(cfg))
    distributed.barrier()

    segmenter = segmenter.to(device)
    if device.type == "cpu":
        configure_threads(segmenter, t.threads)
    # amp: rank 0 decides ("auto" is measured once per machine, larvseg.precision), every rank follows it
    amp = choose(t.amp, device, vit_workload(segmenter.backbone, "training")) if is_main else None
    if world > 1:
        amp = distributed.broadcast_object(amp)
    if amp is None:  # every rank has rank 0's choice
        raise RuntimeError("no precision choice was broadcast from rank 0")
    log.info("larvseg: %s", amp.line)
    objective = TrainingObjective(segmenter, cfg.model, t.seed)
    if world > 1:
        model: torch.nn.Module = data_parallel(objective, device)
    else:
        model = objective
    fused = {"fused": True} if device.type == "cuda" else {}  # one kernel for the whole update on a GPU
    optimizer = torch.optim.SGD(
        segmenter.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, **fused
    )

    # Resume: rank 0 picks the file (auto-resume must not race with a save; an unreadable newest one is
    # skipped with a message), every rank loads it.
    resume_arg = resume if resume is not None else t.resume
    state = None
    if is_main:
        resume_path, state = checkpointer.pick(resume_arg)
    resume_path = distributed.broadcast_object(resume_path if is_main else None)
    start_step = 0
    # classes that had any supervision (a labelled pixel or a tag) so far; stored in every checkpoint so
    # that predict can default to them and warn about the others
    supervised = torch.zeros(len(vocab), dtype=torch.bool)
    if resume_path is not None:
        start_step, state = checkpointer.restore(resume_path, state, vocab.names, segmenter, optimizer)
        supervised[torch.as_tensor(state.get("supervised", []), dtype=torch.long)] = True
        log.info("resumed from %s at step %d", resume_path, start_step)

    loader.start_at(start_step)
    images_per_step = cfg.data.seg_batch_size + cfg.data.tag_batch_size
    logger = MetricLogger(
        work_dir, t.iters, start_step, images_per_step, t.log_interval, enabled=is_main, tensorboard=t.tensorboard
    )
    last_good = resume_path

    def close_run() -> None:  # before a non-finite stop: the metric files, then the process group
        logger.close()
        distributed.cleanup()

    def supervised_ids() -> list[int]:  # a collective: call on every rank
        seen = distributed.all_reduce_sum(supervised.to(device, torch.int32)).cpu() > 0
        return seen.nonzero().flatten().tolist()

    def save(step: int) -> Path:
        seen = supervised_ids()
        if is_main:
            checkpointer.save(step, segmenter, optimizer, cfg.to_dict(), vocab.names, supervised=seen)
            logger.plot()
        distributed.barrier()
        return checkpointer.path(step)

    def run_eval(step: int) -> None:
        if evaluator is None:  # checked on entry: train.eval_interval >= 0 needs one
            raise ValueError("train() was handed no evaluator")
        results = evaluator.run(segmenter, out_dir=work_dir / f"eval_iter_{step}")
        logger.log_eval(step, results, images=lambda: evaluator.overlays(segmenter, OVERLAY_IMAGES))

    try:  # an error ends the progress bar's line first, so that its message starts a line of its own
        model.train()
        batches = iter(loader)
        for step in range(start_step, t.iters):
            batch = next(batches)
            if batch.step != step:
                raise RuntimeError(f"MixedLoader yielded step {batch.step}, the loop expected {step}")
            mark_supervised(supervised, batch)
            torch.manual_seed(step_seed(t.seed, step, rank))
            lr = poly_lr(step, t.iters, t.lr, t.poly_power, t.min_lr)
            set_lr(optimizer, lr)

            with bf16_autocast(amp.bf16, device):
                terms = model(batch.to(device))
            values = reduce_terms(terms)
            # every rank sees the same reduced values, so on a non-finite one all stop here together
            optimizer_step_or_stop(optimizer, terms["loss"], values, step, lr, last_good, work_dir, close=close_run)

            steps_done = step + 1
            logger.update(steps_done, lr, values)
            if steps_done % t.checkpoint_interval == 0 or steps_done == t.iters:
                last_good = save(steps_done)
            if t.eval_interval > 0 and steps_done % t.eval_interval == 0 and steps_done != t.iters:
                run_eval(steps_done)

        # The final evaluation runs at the end of training, and again on a restart of a finished run whose
        # final evaluation is missing (it failed, e.g. on a bad label, before data.eval.skip_bad=true).
        final_eval_missing = not (work_dir / f"eval_iter_{t.iters}" / EVAL_RESULTS).is_file()
        if t.eval_interval >= 0 and (start_step < t.iters or final_eval_missing):
            if start_step >= t.iters:
                log.info(
                    "resumed at step %d >= train.iters %d: running the missing final evaluation", start_step, t.iters
                )
            run_eval(t.iters)
        elif start_step >= t.iters:
            log.info("nothing to do: resumed at step %d >= train.iters %d", start_step, t.iters)
    except BaseException:
        logger.close()
        raise
    seen = supervised_ids()
    if is_main:
        export_weights(
            work_dir / FINAL_WEIGHTS, segmenter.state_dict(), cfg.to_dict(), list(vocab.names), t.iters, supervised=seen
        )
        logger.plot()
    logger.close()
    log.info("done: %s", work_dir)
    distributed.barrier()
    distributed.cleanup()
    return work_dir


def main(
    args: argparse.Namespace,
    build: Callable[[Config, torch.device], tuple] = build,
    *,
    make_evaluator: Callable[[Config, Vocabulary], Evaluation] | None = None,
) -> int:
    """``larvseg train``; ``build`` makes what ``train`` is handed (tests hand in synthetic data this way),
    ``make_evaluator(cfg, vocab)`` its evaluator (the command line hands in larvseg.eval.evaluate.Evaluator)."""
    cfg = load_config(args.config, args.overrides)
    if args.work_dir:
        cfg.train.work_dir = args.work_dir
    require_writable(cfg.work_dir(), "work dir (train.work_dir / --work-dir)")  # before data and model are built
    device = distributed.init_from_env(cfg.train.device)
    vocab, segmenter, loader = build(cfg, device)
    evaluator = make_evaluator(cfg, vocab) if make_evaluator is not None and cfg.train.eval_interval >= 0 else None
    try:
        train(cfg, vocab, segmenter, loader, resume=args.resume, evaluator=evaluator)
    except NonFiniteLossError as exc:
        if env_rank() == 0:  # the process group is gone; every rank raised the same
            print(f"larvseg train: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
