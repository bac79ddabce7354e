"""Segment your own images with a trained checkpoint: ``larvseg predict`` and the Python API.

    from larvseg.predict import LarvSegPredictor
    predictor = LarvSegPredictor.from_checkpoint("work_dirs/c171_a847w/latest.pth")
    result = predictor(image)        # NumPy HxWx3 uint8 RGB, or a PIL image
    result.label_map, result.class_names, result.areas

By default the vocabulary is the classes that had training data (masks or tags; stored in checkpoints
as ``supervised``); naming a class without any warns. The command shows progress per image and per
window of large images, reports and skips unreadable images (exit code 1 at the end, with the list),
and writes every file atomically. It writes, per image, ``<stem>_labels.png`` (union class ids; 8-bit
when the vocabulary has fewer than 255 classes, else 16-bit), ``<stem>_overlay.png`` (colours over the
image, with a legend of the classes present, largest first) and, for all images, ``areas.json``
(fraction of pixels per class name) and ``classes.json`` (the class name of every label value).

Images are resized like the evaluation images, with the checkpoint's ``eval`` settings (short side
``eval.short_side``, long side at most ``eval.max_long_side``; ``--short-side`` / ``short_side=``
overrides the short side), segmented with ``segment_image`` and the same ``eval`` mode, crop and
stride (memory-bounded, so the 21K vocabulary works), and the label map is produced at the image's own
resolution: on the evaluation images, the label maps ``larvseg eval`` scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from larvseg import atomic
from larvseg.config import Config, EvalConfig, config_from_dict
from larvseg.data import io as data_io
from larvseg.data.transforms import eval_resize, rescale_size
from larvseg.data.vocabulary import normalize_name
from larvseg.errors import UserError
from larvseg.models.inference import segment_image, slide_windows
from larvseg.models.segmenter import Segmenter, build_segmenter
from larvseg.train.checkpoint import load_checkpoint

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# the spec's normalisation (section 4), RGB order
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class ImageReadError(UserError, ValueError):
    """An input image that is missing, unreadable or of an unusable shape (the message names it)."""

    hint = "check the path, or convert the image to an 8-bit RGB JPEG or PNG"


class UnknownClassError(UserError, KeyError):
    """A class name given to ``--classes`` / ``classes=`` that is not in the checkpoint's vocabulary."""

    hint = "check the spelling; the checkpoint's classes are listed in classes.json of any predict output"

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


# ----------------------------------------------------------------------------------------------
# Checkpoint -> segmenter (shared with larvseg eval)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch.cuda.is_available() is False")
    return torch.device(device)


def _segmenter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The segmenter's weights from a checkpoint's 'model' entry, without the CAC memory bank.

    Accepts a Segmenter state dict, or one of a wrapper (DDP ``module.``, TrainingObjective
    ``segmenter.``). The bank only matters for training; dropping it saves 1.3 GB at 21K classes.
    """
    for prefix in ("module.", "segmenter."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("bank.")}


def segmenter_from_checkpoint(ckpt: dict[str, Any], device: torch.device | str = "cpu",
                              model_cfg: Any | None = None) -> tuple[Segmenter, list[str], Config]:
    """Build the segmenter of a loaded checkpoint (``larvseg.train.checkpoint.load_checkpoint``) for inference.

    Returns (segmenter in eval mode on ``device``, class names by union id, the checkpoint's Config).
    The architecture comes from the checkpoint's config unless ``model_cfg`` is given; the backbone is
    not re-initialised from ``model.pretrained`` (the checkpoint holds every weight) and no memory bank
    is built.
    """
    for key in ("model", "vocab"):
        if key not in ckpt:
            raise KeyError(f"checkpoint has no {key!r} entry (keys: {sorted(ckpt)})")
    names = [str(n) for n in ckpt["vocab"]]
    cfg = config_from_dict(ckpt["config"]) if "config" in ckpt else Config()
    model_cfg = dataclasses.replace(model_cfg or cfg.model, pretrained="", cac=False)
    segmenter = build_segmenter(model_cfg, len(names))
    state = _segmenter_state(ckpt["model"])
    missing, unexpected = segmenter.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint weights do not fit model.arch={model_cfg.arch!r} with {len(names)} classes: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    return segmenter.to(device).eval(), names, cfg


# ----------------------------------------------------------------------------------------------
# Images in, label maps out


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 RGB -> float32 (3, H, W), normalised with the spec's mean/std."""
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)  # astype copies: input may be read-only
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    return (x - mean) / std


def as_rgb_array(image: Any, name: str = "image") -> np.ndarray:
    """A PIL image or a NumPy HxWx3 uint8 RGB array (HxW grey and HxWx4 RGBA are converted)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise ImageReadError(f"{name}: expected a NumPy array or a PIL image, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageReadError(f"{name}: expected a uint8 array, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ImageReadError(f"{name}: expected an HxWx3 RGB array, got shape {image.shape}")
    return image


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 HxWx3 RGB (the data layer's reader); ImageReadError naming the file."""
    try:
        return data_io.read_image(path)
    except data_io.CorruptImageError as exc:
        raise ImageReadError(str(exc)) from None


def resolve_classes(classes: str | Sequence[str] | None, names: Sequence[str],
                    what: str = "the checkpoint's vocabulary") -> np.ndarray | None:
    """Positions in ``names`` of the requested classes (sorted): None (all), a list of names, a
    comma-separated string, or a file with one name per line. Names match after normalisation (case,
    '-', '_', spaces); an unknown name is an UnknownClassError that says it is not in ``what``."""
    if classes is None:
        return None
    if isinstance(classes, str):
        path = Path(classes)
        if path.is_file():
            wanted = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        else:
            wanted = [c.strip() for c in classes.split(",") if c.strip()]
    else:
        wanted = list(classes)
    if not wanted:
        raise UnknownClassError(f"no class names in {classes!r}")
    index = {normalize_name(n): i for i, n in enumerate(names)}
    unknown = [w for w in wanted if normalize_name(w) not in index]
    if unknown:
        raise UnknownClassError(f"classes not in {what} of {len(names)}: {unknown[:10]}")
    return np.array(sorted({index[normalize_name(w)] for w in wanted}), dtype=np.int64)


@dataclass
class Prediction:
    label_map: np.ndarray  # (H, W) int64 union class ids, at the input image's resolution
    class_names: list[str]  # name of every union id (class_names[label_map[y, x]])
    areas: dict[str, float]  # fraction of the pixels per class present, largest first; sums to 1

    @property
    def present(self) -> list[int]:
        """Union ids present in the label map, largest area first."""
        index = {n: i for i, n in enumerate(self.class_names)}
        return [index[n] for n in self.areas]


def class_areas(label_map: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    counts = np.bincount(label_map.ravel(), minlength=len(names))
    ids = np.flatnonzero(counts)
    ids = ids[np.argsort(-counts[ids], kind="stable")]
    return {names[i]: float(counts[i] / label_map.size) for i in ids}


class LarvSegPredictor:
    """A trained segmenter that turns RGB images into label maps over (a subset of) its vocabulary."""

    def __init__(self, segmenter: Segmenter, class_names: Sequence[str], *, classes: str | Sequence[str] | None = None,
                 eval_cfg: EvalConfig | None = None, amp: str = "auto", short_side: int | None = None,
                 supervised: Sequence[int] | None = None) -> None:
        self.segmenter = segmenter.eval()
        self.class_names = list(class_names)
        self.device = next(segmenter.parameters()).device
        if amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be auto, bf16 or off, got {amp!r}")
        self.amp = amp  # "auto": bf16 on a GPU that supports it (larvseg.models.inference.autocast_context)
        self.eval_cfg = eval_cfg or EvalConfig()
        self.short_side = self.eval_cfg.short_side if short_side is None else short_side
        # supervised: union ids of the classes that had masks or tags in training (stored in checkpoints
        # since it exists; None = unknown, every class). The others' classifier rows never got a signal.
        self.supervised = None if supervised is None else np.unique(np.asarray(supervised, dtype=np.int64))
        ids = resolve_classes(classes, self.class_names)
        if ids is None and self.supervised is not None and len(self.supervised):
            ids = self.supervised  # default vocabulary: what the model was trained on
        elif ids is not None and self.supervised is not None:
            untrained = [self.class_names[i] for i in ids if i not in set(self.supervised.tolist())]
            if untrained:
                warnings.warn(
                    f"{len(untrained)} of the requested classes had no training data in this checkpoint (no masks "
                    f"or tags): {untrained[:10]}{' ...' if len(untrained) > 10 else ''}; their scores are untrained "
                    f"and predictions of them are noise", UserWarning, stacklevel=2)
        self.class_ids = None if ids is None else torch.from_numpy(ids).to(self.device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, classes: str | Sequence[str] | None = None, device: str = "auto",
                        amp: str = "auto", short_side: int | None = None) -> "LarvSegPredictor":
        ckpt = load_checkpoint(path)
        segmenter, names, cfg = segmenter_from_checkpoint(ckpt, resolve_device(device))
        return cls(segmenter, names, classes=classes, eval_cfg=cfg.eval, amp=amp, short_side=short_side,
                   supervised=ckpt.get("supervised"))

    def windows(self, image_hw: tuple[int, int]) -> int:
        """Windows the segmentation of an image of this size runs (1 in whole mode)."""
        if self.eval_cfg.mode != "slide":
            return 1
        h, w = rescale_size(*image_hw, self.eval_cfg.max_long_side, self.short_side) if self.short_side > 0 else image_hw
        return len(slide_windows(h, w, self.eval_cfg.crop_size, self.eval_cfg.stride))

    @torch.inference_mode()
    def __call__(self, image: np.ndarray | Image.Image, progress: Callable[[int, int], None] | None = None) -> Prediction:
        """``progress(done, total)`` is called after every window (sliding-window mode)."""
        rgb = as_rgb_array(image)
        resized = eval_resize(rgb, self.short_side, self.eval_cfg.max_long_side)
        e = self.eval_cfg
        label_map = segment_image(
            self.segmenter, image_to_tensor(resized).to(self.device), class_ids=self.class_ids, mode=e.mode,
            crop_size=e.crop_size, stride=e.stride, out_size=rgb.shape[:2], amp=self.amp, progress=progress,
        ).cpu().numpy().astype(np.int64)
        return Prediction(label_map, self.class_names, class_areas(label_map, self.class_names))


# ----------------------------------------------------------------------------------------------
# Files: label maps, overlays with a legend


def expand_images(items: Sequence[str]) -> list[Path]:
    """Files as given; folders replaced by their image files (sorted, not recursive)."""
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ImageReadError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise ImageReadError(f"{path}: no such file or folder")
    return out


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 RGB colours, fixed per class id (the same in every image and run)."""
    return np.random.default_rng(12345).integers(40, 256, size=(num_classes, 3), dtype=np.uint8)


def label_png_dtype(num_classes: int) -> type:
    return np.uint8 if num_classes < 255 else np.uint16


def _ascii(text: str) -> str:
    """cv2's fonts draw ASCII only."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode() or "?"


def render_overlay(image: np.ndarray, pred: Prediction, colours: np.ndarray, alpha: float = 0.5,
                   max_legend: int = 25) -> np.ndarray:
    """RGB image blended with the class colours, and a legend panel on the right (largest class first)."""
    h, w = image.shape[:2]
    blend = (image.astype(np.float32) * (1 - alpha) + colours[pred.label_map].astype(np.float32) * alpha).astype(np.uint8)
    entries = list(pred.areas.items())
    shown = entries[:max_legend]
    row, pad, swatch, panel_w = 18, 6, 12, 240
    lines = len(shown) + (1 if len(entries) > len(shown) else 0)
    canvas = np.full((max(h, pad * 2 + row * lines), w + panel_w, 3), 255, dtype=np.uint8)
    canvas[:h, :w] = blend
    index = {n: i for i, n in enumerate(pred.class_names)}
    font = cv2.FONT_HERSHEY_SIMPLEX
    for k, (name, area) in enumerate(shown):
        y = pad + k * row
        x = w + pad
        canvas[y + 2: y + 2 + swatch, x: x + swatch] = colours[index[name]]
        cv2.putText(canvas, f"{_ascii(name)[:26]} {100 * area:.1f}%", (x + swatch + 5, y + swatch),
                    font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    if len(entries) > len(shown):
        cv2.putText(canvas, f"... and {len(entries) - len(shown)} more", (w + pad, pad + len(shown) * row + swatch),
                    font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, k = path.stem, 1
    while stem in used:
        stem, k = f"{path.stem}_{k}", k + 1
    used.add(stem)
    return stem


def _write_png(path: Path, array: np.ndarray) -> None:
    """Encode in memory, then write atomically: a full disk never leaves a truncated PNG."""
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"{path}: could not be encoded as PNG")
    atomic.write_bytes(path, data.tobytes())


def main(args: argparse.Namespace) -> int:
    """Segment every image; an unreadable one is reported and skipped, the others are written, and the
    exit code is 1 if any was skipped (the list is printed at the end). Outputs are written atomically."""
    from tqdm import tqdm

    paths = expand_images(args.images)  # before loading the model: a typo fails fast
    predictor = LarvSegPredictor.from_checkpoint(args.checkpoint, classes=args.classes, device=args.device,
                                                 amp=args.amp, short_side=args.short_side)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = predictor.class_names
    colours = palette(len(names))
    dtype = label_png_dtype(len(names))
    atomic.write_text(out / "classes.json", json.dumps(names, indent=0, ensure_ascii=False))
    summary: dict[str, Any] = {}
    failed: list[str] = []
    used: set[str] = set()
    bar = tqdm(paths, desc="predict", unit="img", dynamic_ncols=True)
    for path in bar:
        bar.set_postfix_str(path.name)
        try:
            image = read_image(path)
        except ImageReadError as exc:
            failed.append(str(exc))
            tqdm.write(f"skipped: {exc}", file=sys.stderr)
            continue
        windows = predictor.windows(image.shape[:2])
        with tqdm(total=windows, desc=f"  {path.name}", unit="window", leave=False, dynamic_ncols=True,
                  disable=windows < 2) as window_bar:  # large images: progress inside the image too
            pred = predictor(image, progress=lambda done, total: window_bar.update(done - window_bar.n))
        stem = _unique_stem(path, used)
        _write_png(out / f"{stem}_labels.png", pred.label_map.astype(dtype))
        _write_png(out / f"{stem}_overlay.png", cv2.cvtColor(render_overlay(image, pred, colours), cv2.COLOR_RGB2BGR))
        summary[str(path)] = {"labels": f"{stem}_labels.png", "overlay": f"{stem}_overlay.png", "areas": pred.areas}
    atomic.write_text(out / "areas.json", json.dumps(summary, indent=1, ensure_ascii=False))
    print(f"wrote label maps ({np.dtype(dtype).name}), overlays and areas.json for {len(summary)} image(s) to {out}")
    if failed:
        print(f"larvseg predict: {len(failed)} of {len(paths)} image(s) could not be read and were skipped:",
              file=sys.stderr)
        for line in failed:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0
