"""Checkpoints: atomic save, safe load, keep-last-k, auto-resume, and the safetensors export for predict.

``Checkpointer(work_dir, keep_last)`` is what both training commands (``larvseg train``, ``larvseg
pretrain``) use: ``prepare`` (work dir, config.yaml, killed saves' temp files), ``pick`` + ``restore``
(resume), ``save`` (atomic write, latest link, pruning); the functions below are its parts.

A training checkpoint ``<work_dir>/iter_<step:08d>.pth`` is a plain dict that ``torch.load(...,
weights_only=True)`` accepts (tensors, numbers, strings, lists, dicts only):

    format      CHECKPOINT_FORMAT
    step        iterations completed (= the data position: training resumes at this step)
    model       Segmenter.state_dict(), memory-bank buffers included (the bank is identical on every rank)
    optimizer   SGD state_dict (momentum buffers)
    config      Config.to_dict() of the run
    vocab       union vocabulary names, by union id
    rng         RNG states of rank 0: torch, cuda, numpy (as tensors), python
    supervised  union ids of the classes that had a labelled pixel or a tag in the steps trained so far

The schedule is a pure function of ``step`` (larvseg.train.schedule), so it needs no state of its own.
``latest.pth`` is a relative symlink to the newest checkpoint (as in the original's work dirs).

The final export is ``<work_dir>/final.safetensors`` (segmenter weights without the memory bank, which
only matters for training) plus ``<work_dir>/final.json`` ({"config", "vocab", "step", "supervised"}).
Auto-resume skips an unreadable newest checkpoint (saying which and why) and takes the previous one;
temp files of killed saves (``.iter_N.pth.tmp-PID`` of a process that no longer runs) are removed
when training starts and whenever old checkpoints are pruned.
``load_checkpoint`` (larvseg.models.io) reads either kind and returns a dict with at least ``model``,
``config``, ``vocab``; any file it cannot read (text, random bytes, a foreign pickle, a truncated or
empty file) is a CheckpointError naming it, which auto-resume skips like any other unreadable file.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from larvseg.atomic import atomic_write, remove_stale_temps, temp_path
from larvseg.errors import CheckpointError  # defined there so the model layer can raise it too
from larvseg.models.io import load_checkpoint  # the one reader of checkpoint files (re-exported here)
from larvseg.models.segmenter import BANK_PREFIX

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
CHECKPOINT_PATTERN = re.compile(r"^iter_(\d+)\.pth$")
LATEST_LINK = "latest.pth"
FINAL_WEIGHTS = "final.safetensors"


def checkpoint_name(step: int) -> str:
    return f"iter_{step:08d}.pth"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors and plain data only) to ``path`` atomically (temp file + os.replace)."""
    atomic_write(Path(path), lambda f: torch.save(state, f))


# ----------------------------------------------------------------------------------------------
# Work-dir bookkeeping


def list_checkpoints(work_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the ``iter_*.pth`` files in ``work_dir``, oldest first."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return []
    found = []
    for p in work_dir.iterdir():
        m = CHECKPOINT_PATTERN.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(work_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(work_dir)
    return found[-1][1] if found else None


def prune_checkpoints(work_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (keep_last <= 0 keeps all) and the temp files of
    dead writers (a save killed mid-write leaves ``.iter_N.pth.tmp-PID``); returns the deleted."""
    stale = remove_stale_temps(work_dir)
    if keep_last <= 0:
        return stale
    old = [p for _, p in list_checkpoints(work_dir)[:-keep_last]]
    for p in old:
        p.unlink()
    return stale + old


def update_latest_link(path: Path) -> None:
    """Point ``latest.pth`` next to ``path`` at it (relative symlink, replaced atomically)."""
    link = path.parent / LATEST_LINK
    tmp = temp_path(link)
    tmp.unlink(missing_ok=True)
    os.symlink(path.name, tmp)
    os.replace(tmp, link)


def resolve_resume(resume: str | None, work_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: ``None``/""/"auto" = newest ``iter_*.pth`` in ``work_dir`` (None if
    there is none), "none" = start fresh, anything else = that file (which must exist)."""
    if resume is None or resume in ("", "auto"):
        return latest_checkpoint(work_dir)
    if resume == "none":
        return None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"{path}: --resume checkpoint not found")
    return path


RESUME_KEYS = ("step", "model", "optimizer", "vocab", "rng")


def load_resumable(path: Path) -> dict[str, Any]:
    """A training checkpoint with everything resuming needs; CheckpointError naming the file otherwise."""
    state = load_checkpoint(path)
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: cannot resume from it: no {missing} entries (not a training checkpoint)")
    return state


def load_resume(
    resume: str | None, work_dir: str | os.PathLike, say: Callable[[str], None] = log.warning
) -> tuple[Path | None, dict[str, Any] | None]:
    """(path, state) to resume from, as ``resolve_resume`` picks it, loaded; (None, None) to start fresh.

    Auto-resume falls back: an unreadable newest checkpoint (a kill or a full disk while it was written
    by other means than ``save_checkpoint``, a damaged disk) is skipped with a message naming the file
    and why, and the next older one is tried. An explicitly given file must load."""
    if resume is None or resume in ("", "auto"):
        for _, path in reversed(list_checkpoints(work_dir)):
            try:
                return path, load_resumable(path)
            except CheckpointError as exc:
                say(f"skipping checkpoint {path.name} for auto-resume: {exc}")
        return None, None
    given = resolve_resume(resume, work_dir)
    return (given, load_resumable(given)) if given is not None else (None, None)


# ----------------------------------------------------------------------------------------------
# The checkpointer of a training run (``larvseg train`` and ``larvseg pretrain``)


class Checkpointer:
    """The checkpoints of one work dir: atomic saves of the training state, the ``latest.pth`` link,
    keep-last-k, resuming, and the temp files of killed saves. ``larvseg train`` (rank 0 saves, every
    rank resumes) and ``larvseg pretrain`` both checkpoint through one of these."""

    def __init__(self, work_dir: str | os.PathLike, keep_last: int) -> None:
        self.work_dir, self.keep_last = Path(work_dir), keep_last

    def path(self, step: int) -> Path:
        """Where the checkpoint of ``step`` is (or will be) written."""
        return self.work_dir / checkpoint_name(step)

    def latest(self) -> Path | None:
        """The newest ``iter_*.pth`` in the work dir (None if there is none)."""
        return latest_checkpoint(self.work_dir)

    def prepare(self, config_text: str) -> None:
        """Create the work dir, write the run's ``config.yaml`` and remove the temp files of killed saves."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "config.yaml").write_text(config_text)
        for p in remove_stale_temps(self.work_dir):  # a save killed mid-write leaves .iter_N.pth.tmp-PID
            log.info("removed %s: temp file of a killed save", p.name)

    def pick(self, resume: str | None) -> tuple[Path | None, dict[str, Any] | None]:
        """(path, state) of the checkpoint to resume from, or (None, None) to start fresh: ``load_resume``
        ("auto" = the newest readable one, an unreadable newer one skipped with a warning)."""
        return load_resume(resume, self.work_dir)

    def restore(
        self,
        path: Path,
        state: dict[str, Any] | None,
        class_names: list[str],
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> tuple[int, dict[str, Any]]:
        """Load the checkpoint at ``path`` (``state``: read already, or None) into ``model`` and ``optimizer``
        and restore the RNG states; returns (the step to continue from, the state)."""
        if state is None:
            state = load_checkpoint(path)
        return restore_training_state(state, path, class_names, model, optimizer), state

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: dict[str, Any],
        class_names: list[str],
        **extra: Any,
    ) -> Path:
        """Write ``iter_<step>.pth`` atomically (format, step, model, optimizer, config, vocabulary, RNG
        states and ``extra`` entries), point ``latest.pth`` at it, keep the newest ``keep_last``."""
        path = self.path(step)
        save_checkpoint(
            path,
            {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "config": config,
                "vocab": list(class_names),
                "rng": rng_state(),
                **extra,
            },
        )
        update_latest_link(path)
        prune_checkpoints(self.work_dir, self.keep_last)
        return path


# ----------------------------------------------------------------------------------------------
# RNG states as tensors and plain data (so weights_only loading accepts them)


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def restore_training_state(
    state: dict[str, Any],
    path: str | os.PathLike,
    class_names: list[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> int:
    """Resume from a loaded checkpoint: check that it was trained on ``class_names`` (else a
    CheckpointError naming ``path``), load model, optimizer and RNG states; returns its step."""
    if list(state["vocab"]) != list(class_names):
        raise CheckpointError(
            f"{path}: its vocabulary ({len(state['vocab'])} classes) differs from the config's "
            f"({len(class_names)}): resume with the config it was trained with, or start fresh "
            "with --resume none"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return int(state["step"])


# ----------------------------------------------------------------------------------------------
# Export for predict / eval: safetensors weights + a JSON of config and vocabulary


def export_weights(
    path: str | os.PathLike,
    model_state: dict[str, torch.Tensor],
    config: dict[str, Any],
    vocab: list[str],
    step: int,
    supervised: list[int] | None = None,
) -> Path:
    """Write ``path`` (.safetensors: the segmenter weights, memory bank left out) and ``path`` with suffix
    .json ({"config", "vocab", "step"} and, when given, "supervised": the union ids of the classes that
    had masks or tags in training), both atomically. Returns the .safetensors path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the export must end in .safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model_state.items() if not k.startswith(BANK_PREFIX)}
    meta = {"config": config, "vocab": list(vocab), "step": int(step), "format": CHECKPOINT_FORMAT}
    if supervised is not None:
        meta["supervised"] = [int(i) for i in supervised]
    atomic_write(path, lambda f: f.write(safetensors.torch.save(tensors)))
    atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(meta).encode()))
    return path
