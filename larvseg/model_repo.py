"""Share a trained model as a Hugging Face model repository: ``larvseg hub save`` / ``hub push``, and loading.

    larvseg hub save work_dirs/c171_in21k/final.safetensors my-model     # a folder in the Hub's layout
    larvseg hub push my-model org/larvseg-c171-in21k                     # uploads it (huggingface_hub)
    larvseg predict hf-hub:org/larvseg-c171-in21k photo.jpg --out out     # from the Hub cache, downloaded if needed
    LarvSegPredictor.from_pretrained("hf-hub:org/larvseg-c171-in21k")    # or a local folder: from_pretrained("my-model")

The folder (``REPO_FILES``):

    model.safetensors   segmenter weights (no memory bank, which only matters for training)
    config.json         {"library_name": "larvseg", "format", "step", "num_classes", "config": the run's Config}
    classes.json        the vocabulary: class name by union id (label-map value)
    supervised.json     {"union_ids", "names"}: the classes that had masks or tags in training
    eval_results.json   the evaluation's results, when the checkpoint's folder has them (or --eval-results)
    README.md           the model card: vocabulary, training sources, metrics table, usage

``hf-hub:<owner>/<name>[@revision]`` is resolved by ``huggingface_hub.snapshot_download``: from its cache
(``$HF_HOME/hub``) when the files are there, downloaded there first when online; with ``HF_HUB_OFFLINE=1`` only
the cache is used. Every command that reads a checkpoint (predict, serve, eval, export) accepts a saved folder
or an ``hf-hub:`` name. Optional dependency for the Hub: ``pip install "larvseg[hub]"``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch

from larvseg import atomic
from larvseg.errors import CheckpointError
from larvseg.models.hub import HF_HUB_PREFIX

WEIGHTS, CONFIG, CLASSES, SUPERVISED, EVAL_RESULTS, CARD = (
    "model.safetensors", "config.json", "classes.json", "supervised.json", "eval_results.json", "README.md")
REPO_FILES = (WEIGHTS, CONFIG, CLASSES, SUPERVISED, EVAL_RESULTS, CARD)
LIBRARY = "larvseg"
SUMMARY_ROWS = ("mIoU", "mAcc", "aAcc")


def is_model_repo(spec: str | Path) -> bool:
    """An ``hf-hub:`` name, or a folder holding a saved model (model.safetensors and config.json)."""
    text = str(spec)
    if text.startswith(HF_HUB_PREFIX):
        return True
    path = Path(text)
    return path.is_dir() and (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


# ----------------------------------------------------------------------------------------------
# Save


def find_eval_results(checkpoint: Path, step: int) -> Path | None:
    """``eval_results.json`` of this checkpoint: ``larvseg eval``'s ``eval_<stem>/`` next to it, else the
    training run's final evaluation ``eval_iter_<step>/`` in its folder."""
    for folder in (f"eval_{checkpoint.stem}", f"eval_iter_{step}"):
        candidate = checkpoint.parent / folder / EVAL_RESULTS
        if candidate.is_file():
            return candidate
    return None


def save_model_repo(checkpoint: str | Path, out_dir: str | Path, eval_results: str | Path | None = None,
                    title: str | None = None, repo_id: str | None = None) -> Path:
    """Write the model repository of ``checkpoint`` (.pth, .safetensors + .json, or a saved folder) to
    ``out_dir``; every file atomically. ``eval_results``: an eval_results.json (default: found next to
    the checkpoint, see ``find_eval_results``; none = no metrics table). Returns ``out_dir``."""
    from larvseg.models.segmenter import _segmenter_state
    from larvseg.train.checkpoint import CHECKPOINT_FORMAT, load_checkpoint

    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    for key in ("model", "vocab", "config"):
        if key not in ckpt:
            raise CheckpointError(f"{checkpoint}: no {key!r} entry; not a LarvSeg checkpoint")
    names = [str(n) for n in ckpt["vocab"]]
    step = int(ckpt.get("step", 0))
    supervised = None if ckpt.get("supervised") is None else sorted({int(i) for i in ckpt["supervised"]})
    results_path = Path(eval_results) if eval_results else find_eval_results(checkpoint, step)
    results = None
    if results_path is not None:
        try:
            results = json.loads(results_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{results_path}: cannot read the evaluation results ({exc})") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in _segmenter_state(ckpt["model"]).items()}
    atomic.atomic_write(out / WEIGHTS, lambda f: f.write(safetensors.torch.save(tensors, metadata={"format": "pt"})))
    config = {"library_name": LIBRARY, "format": CHECKPOINT_FORMAT, "step": step, "num_classes": len(names),
              "config": ckpt["config"]}
    atomic.write_text(out / CONFIG, json.dumps(config, indent=1, ensure_ascii=False))
    atomic.write_text(out / CLASSES, json.dumps(names, indent=0, ensure_ascii=False))
    if supervised is not None:
        atomic.write_text(out / SUPERVISED, json.dumps({"union_ids": supervised, "names": [names[i] for i in supervised]},
                                                       indent=0, ensure_ascii=False))
    else:
        (out / SUPERVISED).unlink(missing_ok=True)
    if results is not None:
        atomic.write_text(out / EVAL_RESULTS, json.dumps(results, indent=1, ensure_ascii=False))
    else:
        (out / EVAL_RESULTS).unlink(missing_ok=True)
    card = model_card(title or out.resolve().name, ckpt["config"], names, supervised, results, step,
                      repo_id or f"ORG/{out.resolve().name}")
    atomic.write_text(out / CARD, card)
    return out


def _metric(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.2f}"


def model_card(title: str, config: dict[str, Any], names: list[str], supervised: list[int] | None,
               results: dict[str, Any] | None, step: int, repo_id: str = "ORG/NAME") -> str:
    """The README.md of the repository: Hub metadata, vocabulary, training sources, metrics and usage."""
    model, data = config.get("model", {}), config.get("data", {})
    trained = f"{len(supervised):,} of them had masks or tags in training" if supervised is not None else \
        "which of them had training data was not recorded"
    lines = [
        "---",
        f"library_name: {LIBRARY}",
        "pipeline_tag: image-segmentation",
        "tags:", "- semantic-segmentation", "- large-vocabulary", "- larvseg",
        "---",
        "",
        f"# {title}",
        "",
        f"A [LarvSeg](https://github.com/HaojunYu1998/LarvSeg) large-vocabulary semantic segmenter: "
        f"{model.get('arch', '?')} backbone with a cosine classifier over {len(names):,} classes, trained for "
        f"{step:,} iterations on pixel masks and image-level tags.",
        "",
        "## Vocabulary",
        "",
        f"{len(names):,} classes (`classes.json`: the class name of every label-map value); {trained} "
        "(`supervised.json`). By default predictions use the trained classes.",
        "",
        "First classes: " + ", ".join(f"`{n}`" for n in names[:12]) + (" ..." if len(names) > 12 else ""),
        "",
        "## Training sources",
        "",
        "| role | name | format | classes |",
        "|---|---|---|---|",
    ]
    for role, key in (("masks", "seg_sources"), ("tags", "tag_sources")):
        for s in data.get(key, []):
            lines.append(f"| {role} | {s.get('name') or '–'} | {s.get('format', '?')} | {s.get('classes') or 'all'} |")
    eval_source = data.get("eval", {})
    if eval_source.get("format"):
        lines.append(f"| evaluation | {eval_source.get('name') or '–'} | {eval_source.get('format')} | "
                     f"{eval_source.get('classes') or 'all'} |")
    lines += ["", "## Metrics", ""]
    if results:
        lines += [f"On the evaluation set above ({results.get('num_images', '?')} images, MMSegmentation convention, %):",
                  "", "| metric | all | base | novel |", "|---|---|---|---|"]
        for key in SUMMARY_ROWS:
            lines.append(f"| {key} | {_metric(results.get(key))} | {_metric(results.get(key + '_base'))} | "
                         f"{_metric(results.get(key + '_novel'))} |")
        lines += ["", "Per-class results: `eval_results.json`."]
    else:
        lines.append("No evaluation results were saved with this model.")
    lines += [
        "", "## Usage", "",
        "```bash",
        'pip install "larvseg[hub]"',
        f"larvseg predict hf-hub:{repo_id} photo.jpg --out predictions --classes \"person, car, dog*\"",
        "```", "",
        "```python",
        "from larvseg.predict import LarvSegPredictor",
        "",
        f'predictor = LarvSegPredictor.from_pretrained("hf-hub:{repo_id}", classes="person, car, dog*")',
        "result = predictor(image)  # NumPy HxWx3 uint8 RGB or a PIL image",
        "result.label_map, result.class_names, result.areas",
        "```", "",
        "`dog*` asks for every dog breed in the vocabulary as one class \"dog\" (WordNet concepts; see LarvSeg's README).",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Load


def repo_folder(spec: str | Path) -> Path:
    """The local folder of a saved model: the folder itself, or the Hub cache's snapshot of ``hf-hub:`` (downloaded
    when online and not cached). CheckpointError naming the repository when it cannot be had."""
    text = str(spec)
    if not text.startswith(HF_HUB_PREFIX):
        return Path(text)
    repo_id, _, revision = text[len(HF_HUB_PREFIX):].partition("@")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:
        raise CheckpointError(f"{text}: needs huggingface_hub: pip install \"larvseg[hub]\" ({exc})") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=list(REPO_FILES)))
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE=1: cache only)" if constants.HF_HUB_OFFLINE else ""
        raise CheckpointError(f"{text}: not in the Hugging Face cache {constants.HF_HUB_CACHE}{offline} and it "
                              "could not be downloaded; run once with network access, or set HF_HOME to a cache "
                              "that holds it") from None
    except (HfHubHTTPError, ValueError, OSError) as exc:  # unknown repo/revision, invalid name, network
        raise CheckpointError(f"{text}: cannot fetch {repo_id}: {exc}") from None


def load_model_repo(spec: str | Path) -> dict[str, Any]:
    """A saved model (folder or ``hf-hub:`` name) as ``load_checkpoint`` returns checkpoints: model, config,
    vocab, step, supervised (when saved)."""
    folder = repo_folder(spec)
    missing = [f for f in (WEIGHTS, CONFIG, CLASSES) if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"{spec}: not a saved LarvSeg model: {folder} lacks {missing} (larvseg hub save writes them)")
    try:
        config = json.loads((folder / CONFIG).read_text())
        names = json.loads((folder / CLASSES).read_text())
        supervised = json.loads((folder / SUPERVISED).read_text())["union_ids"] if (folder / SUPERVISED).is_file() else None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{spec}: unreadable JSON in {folder}: {exc}") from None
    if config.get("library_name") != LIBRARY or "config" not in config:
        raise CheckpointError(f"{spec}: {folder / CONFIG} is not a LarvSeg model's config (library_name {LIBRARY!r})")
    try:
        model = safetensors.torch.load_file(str(folder / WEIGHTS), device="cpu")
    except (safetensors.SafetensorError, OSError) as exc:
        raise CheckpointError(f"{folder / WEIGHTS}: cannot read safetensors weights - truncated or corrupt? ({exc})") from None
    rows = model.get("classifier.class_embed")
    if rows is not None and rows.shape[0] != len(names):
        raise CheckpointError(f"{spec}: the weights hold {rows.shape[0]} classes but {CLASSES} lists {len(names)}")
    state = {"model": model, "config": config["config"], "vocab": names, "step": int(config.get("step", 0))}
    if supervised is not None:
        state["supervised"] = supervised
    return state


# ----------------------------------------------------------------------------------------------
# Push


def push_model_repo(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
                    message: str = "Upload LarvSeg model") -> str:
    """Create ``repo_id`` on the Hub if needed and upload the saved model's files (``REPO_FILES`` present in
    ``folder``) with ``huggingface_hub.HfApi.upload_folder``. Returns the commit URL."""
    folder = Path(folder)
    if not is_model_repo(folder):
        raise CheckpointError(f"{folder}: not a saved model folder (no {WEIGHTS} and {CONFIG}); run larvseg hub save first")
    try:
        from huggingface_hub import HfApi
    except ImportError as exc:
        raise CheckpointError(f"larvseg hub push needs huggingface_hub: pip install \"larvseg[hub]\" ({exc})") from None
    files = [f for f in REPO_FILES if (folder / f).is_file()]
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                               allow_patterns=files, commit_message=message)
    return str(getattr(commit, "commit_url", commit))


# ----------------------------------------------------------------------------------------------
# Commands


def main_save(args: argparse.Namespace) -> int:
    out = save_model_repo(args.checkpoint, args.out_dir, args.eval_results, args.title, args.repo_id)
    files = [f for f in REPO_FILES if (out / f).is_file()]
    print(f"wrote {', '.join(files)} to {out}")
    if EVAL_RESULTS not in files:
        print(f"note: no {EVAL_RESULTS} found next to {args.checkpoint} (pass --eval-results); the card has no metrics")
    return 0


def main_push(args: argparse.Namespace) -> int:
    url = push_model_repo(args.folder, args.repo_id, private=args.private, revision=args.revision)
    print(f"uploaded {args.folder} to https://huggingface.co/{args.repo_id} ({url})")
    return 0
