"""``larvseg hub save`` / ``larvseg hub push``: share a trained model as a Hugging Face model repository.

    larvseg hub save work_dirs/c171_in21k/final.safetensors my-model     # a folder in the Hub's layout
    larvseg hub push my-model org/larvseg-c171-in21k                     # uploads it (huggingface_hub)
    larvseg predict hf-hub:org/larvseg-c171-in21k photo.jpg --out out     # from the Hub cache, downloaded if needed
    LarvSegPredictor.from_pretrained("hf-hub:org/larvseg-c171-in21k")    # or a local folder: from_pretrained("my-model")

The folder's files and how it is read: larvseg.models.model_repo.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import safetensors.torch

from larvseg import atomic
from larvseg.errors import CheckpointError
from larvseg.models.io import load_checkpoint
from larvseg.models.model_repo import (
    CARD,
    CLASSES,
    CONFIG,
    EVAL_RESULTS,
    LIBRARY,
    REPO_FILES,
    SUPERVISED,
    WEIGHTS,
    is_model_repo,
)
from larvseg.models.segmenter import segmenter_weights
from larvseg.train.checkpoint import CHECKPOINT_FORMAT

SUMMARY_ROWS = ("mIoU", "mAcc", "aAcc")


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


def save_model_repo(
    checkpoint: str | Path,
    out_dir: str | Path,
    eval_results: str | Path | None = None,
    title: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write the model repository of ``checkpoint`` (.pth, .safetensors + .json, or a saved folder) to
    ``out_dir``; every file atomically. ``eval_results``: an eval_results.json (default: found next to
    the checkpoint, see ``find_eval_results``; none = no metrics table). Returns ``out_dir``."""
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
    tensors = {k: v.detach().cpu().contiguous() for k, v in segmenter_weights(ckpt["model"]).items()}
    atomic.atomic_write(out / WEIGHTS, lambda f: f.write(safetensors.torch.save(tensors, metadata={"format": "pt"})))
    config = {
        "library_name": LIBRARY,
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "num_classes": len(names),
        "config": ckpt["config"],
    }
    atomic.write_text(out / CONFIG, json.dumps(config, indent=1, ensure_ascii=False))
    atomic.write_text(out / CLASSES, json.dumps(names, indent=0, ensure_ascii=False))
    if supervised is not None:
        atomic.write_text(
            out / SUPERVISED,
            json.dumps(
                {"union_ids": supervised, "names": [names[i] for i in supervised]}, indent=0, ensure_ascii=False
            ),
        )
    else:
        (out / SUPERVISED).unlink(missing_ok=True)
    if results is not None:
        atomic.write_text(out / EVAL_RESULTS, json.dumps(results, indent=1, ensure_ascii=False))
    else:
        (out / EVAL_RESULTS).unlink(missing_ok=True)
    card = model_card(
        title or out.resolve().name,
        ckpt["config"],
        names,
        supervised,
        results,
        step,
        repo_id or f"ORG/{out.resolve().name}",
    )
    atomic.write_text(out / CARD, card)
    return out


def _metric(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.2f}"


def model_card(
    title: str,
    config: dict[str, Any],
    names: list[str],
    supervised: list[int] | None,
    results: dict[str, Any] | None,
    step: int,
    repo_id: str = "ORG/NAME",
) -> str:
    """The README.md of the repository: Hub metadata, vocabulary, training sources, metrics and usage."""
    model, data = config.get("model", {}), config.get("data", {})
    trained = (
        f"{len(supervised):,} of them had masks or tags in training"
        if supervised is not None
        else "which of them had training data was not recorded"
    )
    lines = [
        "---",
        f"library_name: {LIBRARY}",
        "pipeline_tag: image-segmentation",
        "tags:",
        "- semantic-segmentation",
        "- large-vocabulary",
        "- larvseg",
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
        lines.append(
            f"| evaluation | {eval_source.get('name') or '–'} | {eval_source.get('format')} | "
            f"{eval_source.get('classes') or 'all'} |"
        )
    lines += ["", "## Metrics", ""]
    if results:
        lines += [
            f"On the evaluation set above ({results.get('num_images', '?')} images, MMSegmentation convention, %):",
            "",
            "| metric | all | base | novel |",
            "|---|---|---|---|",
        ]
        for key in SUMMARY_ROWS:
            lines.append(
                f"| {key} | {_metric(results.get(key))} | {_metric(results.get(key + '_base'))} | "
                f"{_metric(results.get(key + '_novel'))} |"
            )
        lines += ["", "Per-class results: `eval_results.json`."]
    else:
        lines.append("No evaluation results were saved with this model.")
    lines += [
        "",
        "## Usage",
        "",
        "```bash",
        'pip install "larvseg[hub]"',
        f'larvseg predict hf-hub:{repo_id} photo.jpg --out predictions --classes "person, car, dog*"',
        "```",
        "",
        "```python",
        "from larvseg.predict import LarvSegPredictor",
        "",
        f'predictor = LarvSegPredictor.from_pretrained("hf-hub:{repo_id}", classes="person, car, dog*")',
        "result = predictor(image)  # NumPy HxWx3 uint8 RGB or a PIL image",
        "result.label_map, result.class_names, result.areas",
        "```",
        "",
        '`dog*` asks for every dog breed in the vocabulary as one class "dog" (WordNet concepts; see LarvSeg\'s README).',
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Push


def push_model_repo(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    message: str = "Upload LarvSeg model",
) -> str:
    """Create ``repo_id`` on the Hub if needed and upload the saved model's files (``REPO_FILES`` present in
    ``folder``) with ``huggingface_hub.HfApi.upload_folder``. Returns the commit URL."""
    folder = Path(folder)
    if not is_model_repo(folder):
        raise CheckpointError(
            f"{folder}: not a saved model folder (no {WEIGHTS} and {CONFIG}); run larvseg hub save first"
        )
    try:
        from huggingface_hub import HfApi
    except ImportError as exc:
        raise CheckpointError(f'larvseg hub push needs huggingface_hub: pip install "larvseg[hub]" ({exc})') from None
    files = [f for f in REPO_FILES if (folder / f).is_file()]
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        revision=revision,
        allow_patterns=files,
        commit_message=message,
    )
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
