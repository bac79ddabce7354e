"""A saved LarvSeg model as a Hugging Face model repository: its files, and reading it (folder or ``hf-hub:``).

``larvseg hub save`` (larvseg.hub) writes the folder (``REPO_FILES``):

    model.safetensors   segmenter weights (no memory bank, which only matters for training)
    config.json         {"library_name": "larvseg", "format", "step", "num_classes", "config": the run's Config}
    classes.json        the vocabulary: class name by union id (label-map value)
    supervised.json     {"union_ids", "names"}: the classes that had masks or tags in training
    eval_results.json   the evaluation's results, when the checkpoint's folder has them (or --eval-results)
    README.md           the model card: vocabulary, training sources, metrics table, usage

``hf-hub:<owner>/<name>[@revision]`` is resolved by ``huggingface_hub.snapshot_download``: from its cache
(``$HF_HOME/hub``) when the files are there, downloaded there first when online; with ``HF_HUB_OFFLINE=1`` only
the cache is used. ``load_checkpoint`` reads both, so every command that reads a checkpoint (predict, serve,
eval, export) accepts a saved folder or an ``hf-hub:`` name. Optional dependency: ``pip install "larvseg[hub]"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch

from larvseg.errors import CheckpointError
from larvseg.models.hub import HF_HUB_PREFIX

WEIGHTS, CONFIG, CLASSES, SUPERVISED, EVAL_RESULTS, CARD = (
    "model.safetensors",
    "config.json",
    "classes.json",
    "supervised.json",
    "eval_results.json",
    "README.md",
)
REPO_FILES = (WEIGHTS, CONFIG, CLASSES, SUPERVISED, EVAL_RESULTS, CARD)
LIBRARY = "larvseg"


def is_model_repo(spec: str | os.PathLike[str]) -> bool:
    """An ``hf-hub:`` name, or a folder holding a saved model (model.safetensors and config.json)."""
    text = str(spec)
    if text.startswith(HF_HUB_PREFIX):
        return True
    path = Path(text)
    return path.is_dir() and (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def repo_folder(spec: str | os.PathLike[str]) -> Path:
    """The local folder of a saved model: the folder itself, or the Hub cache's snapshot of ``hf-hub:`` (downloaded
    when online and not cached). CheckpointError naming the repository when it cannot be had."""
    text = str(spec)
    if not text.startswith(HF_HUB_PREFIX):
        return Path(text)
    repo_id, _, revision = text[len(HF_HUB_PREFIX) :].partition("@")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:
        raise CheckpointError(f'{text}: needs huggingface_hub: pip install "larvseg[hub]" ({exc})') from None
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=list(REPO_FILES)))
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE=1: cache only)" if constants.HF_HUB_OFFLINE else ""
        raise CheckpointError(
            f"{text}: not in the Hugging Face cache {constants.HF_HUB_CACHE}{offline} and it "
            "could not be downloaded; run once with network access, or set HF_HOME to a cache "
            "that holds it"
        ) from None
    except (HfHubHTTPError, ValueError, OSError) as exc:  # unknown repo/revision, invalid name, network
        raise CheckpointError(f"{text}: cannot fetch {repo_id}: {exc}") from None


def load_model_repo(spec: str | os.PathLike[str]) -> dict[str, Any]:
    """A saved model (folder or ``hf-hub:`` name) as ``load_checkpoint`` returns checkpoints: model, config,
    vocab, step, supervised (when saved)."""
    folder = repo_folder(spec)
    missing = [f for f in (WEIGHTS, CONFIG, CLASSES) if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(
            f"{spec}: not a saved LarvSeg model: {folder} lacks {missing} (larvseg hub save writes them)"
        )
    try:
        config = json.loads((folder / CONFIG).read_text())
        names = json.loads((folder / CLASSES).read_text())
        supervised = (
            json.loads((folder / SUPERVISED).read_text())["union_ids"] if (folder / SUPERVISED).is_file() else None
        )
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{spec}: unreadable JSON in {folder}: {exc}") from None
    if config.get("library_name") != LIBRARY or "config" not in config:
        raise CheckpointError(f"{spec}: {folder / CONFIG} is not a LarvSeg model's config (library_name {LIBRARY!r})")
    try:
        model = safetensors.torch.load_file(str(folder / WEIGHTS), device="cpu")
    except (safetensors.SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{folder / WEIGHTS}: cannot read safetensors weights - truncated or corrupt? ({exc})"
        ) from None
    rows = model.get("classifier.class_embed")
    if rows is not None and rows.shape[0] != len(names):
        raise CheckpointError(f"{spec}: the weights hold {rows.shape[0]} classes but {CLASSES} lists {len(names)}")
    state = {"model": model, "config": config["config"], "vocab": names, "step": int(config.get("step", 0))}
    if supervised is not None:
        state["supervised"] = supervised
    return state
