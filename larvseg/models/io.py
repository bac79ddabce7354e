"""Reading checkpoint files: the one place a checkpoint is opened, for every command and the Python API.

``load_checkpoint(path)`` reads a training checkpoint (``iter_*.pth``: ``torch.load(weights_only=True)``),
an export (``final.safetensors`` with its ``final.json``) or a saved model (a folder or ``hf-hub:<org>/<name>``,
larvseg.models.model_repo) to a dict with at least ``model``,
``config`` and ``vocab``. Whatever the file holds instead - text, random bytes, an empty or truncated
file, a pickle of other objects, a checkpoint of another program - is a
:class:`~larvseg.errors.CheckpointError` whose one-line message names the file and what it is.
``load_segmenter(path, device)`` also builds the segmenter (larvseg.models.segmenter) from it: what
predict, eval, export, serve and the demo call.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from larvseg.config import Config
from larvseg.errors import CheckpointError
from larvseg.models.model_repo import is_model_repo, load_model_repo
from larvseg.models.segmenter import Segmenter, segmenter_from_checkpoint

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
LEGACY_MAGIC = b"\x80\x02\x8a"  # torch.save's older format: a pickled magic number first


def _first_line(exc: BaseException, limit: int = 160) -> str:
    """The first sentence of an exception's message (torch's weights_only messages are paragraphs)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    first = text.split(". ")[0]
    return first if len(first) <= limit else first[: limit - 3] + "..."


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint (.pth, ``torch.load(weights_only=True)``) or an export (.safetensors + .json),
    on the CPU. Raises CheckpointError naming the file when it is missing, empty, truncated, corrupt,
    not a PyTorch file or a pickle of anything but tensors and plain data. A saved model folder or an
    ``hf-hub:`` name (larvseg.models.model_repo) is read too."""
    if is_model_repo(path):
        return load_model_repo(path)
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found" + (" (a folder)" if path.is_dir() else ""))
    if path.suffix == ".safetensors":
        return _load_export(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    if size == 0:
        raise CheckpointError(f"{path}: the checkpoint file is empty (0 bytes) - a save that never completed?")
    if not head.startswith((ZIP_MAGIC, LEGACY_MAGIC)):
        kind = "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "binary data"
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({size} bytes of {kind}, starting {head!r})")
    try:
        with warnings.catch_warnings():  # the weights-only unpickler warns about foreign pickle protocols
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to decode these bytes means the file is unreadable
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({size} bytes) - truncated or corrupt, or holding objects other "
            f"than tensors and plain data? ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a LarvSeg checkpoint (a {type(state).__name__}, expected a dict)")
    return state


@dataclass
class LoadedSegmenter:
    """A checkpoint's segmenter (eval mode, on its device) with what it was trained on."""

    segmenter: Segmenter
    class_names: list[str]  # by union id
    config: Config  # the run's config (architecture, eval settings)
    step: int
    supervised: list[int] | None  # union ids that had masks or tags in training; None = not recorded
    path: Path


def load_segmenter(path: str | os.PathLike, device: torch.device | str = "cpu") -> LoadedSegmenter:
    """Read the checkpoint at ``path`` and build its segmenter on ``device``; CheckpointError naming the
    file when it cannot be read or its weights do not fit its config."""
    ckpt = load_checkpoint(path)
    segmenter, names, cfg = segmenter_from_checkpoint(ckpt, device, source=str(path))
    return LoadedSegmenter(segmenter, names, cfg, int(ckpt.get("step", 0)), ckpt.get("supervised"), Path(path))


def _load_export(path: Path) -> dict[str, Any]:
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: the export needs its config/vocabulary file {meta_path.name} next to it")
    try:
        model = safetensors.torch.load_file(str(path), device="cpu")
    except (safetensors.SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors weights - truncated or corrupt? ({exc})") from exc
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON ({exc})") from exc
    for key in ("config", "vocab"):
        if key not in meta:
            raise CheckpointError(f"{meta_path}: missing {key!r}")
    # weights and vocabulary of different runs would fail deep in load_state_dict without a file name
    rows = {k: v.shape[0] for k, v in model.items() if k.endswith("class_embed") and v.ndim >= 1}
    for key, n in rows.items():
        if n != len(meta["vocab"]):
            raise CheckpointError(
                f"{path}: the weights hold {n} classes ({key}) but {meta_path.name} lists {len(meta['vocab'])}: "
                f"the two files come from different runs; keep the .json written with these weights next to them"
            )
    out = {"model": model, "config": meta["config"], "vocab": meta["vocab"], "step": meta.get("step", 0)}
    if "supervised" in meta:
        out["supervised"] = meta["supervised"]
    return out
