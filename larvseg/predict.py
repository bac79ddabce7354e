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
image, perceptually distinct ones for the classes present, largest first, with a legend) and, for all
images, ``areas.json`` (fraction of pixels per class name; an image given twice gets a second entry
"<path> (#2)") and ``classes.json`` (the class name of every label value).

``--classes`` / ``classes=`` take class names, WordNet lemmas and wnids, and concepts ``dog*`` (the synset
and every class below it, one label after the vocabulary's; larvseg.data.class_query). ``--breakdown``
adds each concept's member areas to ``areas.json``. A folder written by ``larvseg hub save`` or an
``hf-hub:<org>/<name>`` works wherever a checkpoint does (``LarvSegPredictor.from_pretrained``).

Images are resized like the evaluation images, with the checkpoint's ``eval`` settings (short side
``eval.short_side``, long side at most ``eval.max_long_side``; ``--short-side`` / ``short_side=``
overrides the short side), segmented with ``segment_image`` and the same ``eval`` mode, crop and
stride (memory-bounded, so the 21K vocabulary works), and the label map is produced at the image's own
resolution: on the evaluation images, the label maps ``larvseg eval`` scores.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, overload

import cv2
import numpy as np
import torch
from PIL import Image

from larvseg import atomic
from larvseg.config import EvalConfig, check_amp
from larvseg.data import io as data_io
from larvseg.data.class_query import ClassQuery, ClassResolver
from larvseg.data.io import IMAGE_SUFFIXES
from larvseg.data.overlay import Prediction, class_areas, colours_by_area, label_png_dtype, render_overlay
from larvseg.data.transforms import eval_resize, rescale_size, to_chw
from larvseg.data.vocabulary import UnknownClassError as UnknownClassError  # re-exported: part of this API
from larvseg.data.vocabulary import class_terms
from larvseg.distributed import select_device
from larvseg.errors import UserError
from larvseg.models.inference import segment_image, slide_windows
from larvseg.models.io import load_segmenter
from larvseg.models.segmenter import Segmenter
from larvseg.progress import progress_bar
from larvseg.threads import configure_threads

log = logging.getLogger(__name__)


class ImageReadError(UserError, ValueError):
    """An input image that is missing, unreadable or of an unusable shape (the message names it)."""

    hint = "check the path, or convert the image to an 8-bit RGB JPEG or PNG"


# ----------------------------------------------------------------------------------------------
# Images in, label maps out


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


class LarvSegPredictor:
    """A trained segmenter that turns RGB images into label maps over (a subset of) its vocabulary."""

    def __init__(
        self,
        segmenter: Segmenter,
        class_names: Sequence[str],
        *,
        classes: str | Sequence[str] | None = None,
        eval_cfg: EvalConfig | None = None,
        amp: str = "auto",
        short_side: int | None = None,
        supervised: Sequence[int] | None = None,
    ) -> None:
        self.segmenter = segmenter.eval()
        self.class_names = list(class_names)
        self.device = next(segmenter.parameters()).device
        # amp "auto": bf16 where it is faster (larvseg.precision)
        e = eval_cfg or EvalConfig()
        self.eval_cfg = dataclasses.replace(
            e, amp=check_amp(amp), short_side=e.short_side if short_side is None else short_side
        )
        # supervised: union ids of the classes that had masks or tags in training (stored in checkpoints
        # since it exists; None = unknown, every class). The others' classifier rows never got a signal.
        self.supervised = None if supervised is None else np.unique(np.asarray(supervised, dtype=np.int64))
        self.query = self.resolve(classes)  # names, WordNet aliases, wnids, concepts "dog*"
        ids = None if self.query is None else self.query.class_ids
        if ids is None and self.supervised is not None and len(self.supervised):
            ids = self.supervised  # default vocabulary: what the model was trained on
        elif ids is not None and self.supervised is not None:
            untrained = [self.class_names[i] for i in ids if i not in set(self.supervised.tolist())]
            if untrained:
                warnings.warn(
                    f"{len(untrained)} of the requested classes had no training data in this checkpoint (no masks "
                    f"or tags): {untrained[:10]}{' ...' if len(untrained) > 10 else ''}; their scores are untrained "
                    f"and predictions of them are noise",
                    UserWarning,
                    stacklevel=2,
                )
        self.class_ids = None if ids is None else torch.from_numpy(ids).to(self.device)

    @overload
    def resolve(self, classes: None) -> None: ...
    @overload
    def resolve(self, classes: str | Sequence[str]) -> ClassQuery: ...
    def resolve(self, classes: str | Sequence[str] | None) -> ClassQuery | None:
        """A ``classes`` value resolved over this model's vocabulary (larvseg.data.class_query); None = default.
        Ambiguous words take the sense among the trained classes; concepts hold trained classes only."""
        terms = class_terms(classes)
        return None if terms is None else self.resolver.resolve(terms)

    @property
    def resolver(self) -> ClassResolver:
        """Resolves class queries over this model's vocabulary (built on first use: 0.5 s for 21K classes)."""
        if getattr(self, "_resolver", None) is None:
            self._resolver = ClassResolver(self.class_names, self.supervised)
        return self._resolver

    @property
    def output_names(self) -> list[str]:
        """The name of every label value of this predictor's label maps (concepts of the query appended)."""
        return self.class_names if self.query is None else self.query.output_names

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        classes: str | Sequence[str] | None = None,
        device: str = "auto",
        amp: str = "auto",
        short_side: int | None = None,
    ) -> LarvSegPredictor:
        loaded = load_segmenter(path, select_device(device))
        return cls(
            loaded.segmenter,
            loaded.class_names,
            classes=classes,
            eval_cfg=loaded.config.eval,
            amp=amp,
            short_side=short_side,
            supervised=loaded.supervised,
        )

    @classmethod
    def from_pretrained(
        cls,
        name: str | Path,
        classes: str | Sequence[str] | None = None,
        device: str = "auto",
        amp: str = "auto",
        short_side: int | None = None,
    ) -> LarvSegPredictor:
        """A model saved by ``larvseg hub save``: its folder, or ``hf-hub:<owner>/<name>[@revision]`` (from the
        Hugging Face cache, downloaded when online; larvseg.models.model_repo). Checkpoint files work too."""
        return cls.from_checkpoint(name, classes=classes, device=device, amp=amp, short_side=short_side)

    def windows(self, image_hw: tuple[int, int]) -> int:
        """Windows the segmentation of an image of this size runs (1 in whole mode)."""
        e = self.eval_cfg
        if e.mode != "slide":
            return 1
        h, w = rescale_size(*image_hw, e.max_long_side, e.short_side) if e.short_side > 0 else image_hw
        return len(slide_windows(h, w, e.crop_size, e.stride))

    def __call__(
        self,
        image: np.ndarray | Image.Image,
        progress: Callable[[int, int], object] | None = None,
        classes: str | Sequence[str] | None = None,
    ) -> Prediction:
        """``progress(done, total)`` is called after every window (sliding-window mode). ``classes``: this
        call's vocabulary (names, WordNet lemmas, wnids, concepts ``dog*``; comma-separated or a file, as the
        constructor's); None = the predictor's."""
        query = self.resolve(classes)  # None when classes is None
        if query is None:
            return self.segment(as_rgb_array(image), self.class_ids, progress, self.query)
        return self.segment(as_rgb_array(image), torch.from_numpy(query.class_ids), progress, query)

    @torch.inference_mode()
    def segment(
        self,
        rgb: np.ndarray,
        class_ids: torch.Tensor | None,
        progress: Callable[[int, int], object] | None = None,
        query: ClassQuery | None = None,
    ) -> Prediction:
        """Segment an HxWx3 uint8 RGB array, scoring the union ids ``class_ids`` (None = every class).
        ``query``: the resolved class query the ids come from (its names, aliases and concepts label the
        result); None = the model's own class names."""
        resized = eval_resize(rgb, self.eval_cfg.short_side, self.eval_cfg.max_long_side)
        label_map = (
            segment_image(
                self.segmenter,
                torch.from_numpy(to_chw(resized)),
                self.eval_cfg,
                class_ids=None if class_ids is None else class_ids.to(self.device),
                out_size=rgb.shape[:2],
                progress=progress,
            )
            .cpu()
            .numpy()
            .astype(np.int64)
        )
        if query is not None:  # aliases renamed, concepts' member classes mapped to the concept's label
            return query.prediction(label_map)
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
    paths = expand_images(args.images)  # before loading the model: a typo fails fast
    predictor = LarvSegPredictor.from_checkpoint(
        args.checkpoint, classes=args.classes, device=args.device, amp=args.amp, short_side=args.short_side
    )
    if predictor.device.type == "cpu":
        configure_threads(predictor.segmenter, predictor.eval_cfg.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for note in [] if predictor.query is None else predictor.query.notes:
        log.info("note: %s", note)
    names = predictor.output_names
    dtype = label_png_dtype(len(names))
    atomic.write_text(out / "classes.json", json.dumps(names, indent=0, ensure_ascii=False))
    summary: dict[str, Any] = {}
    failed: list[str] = []
    used: set[str] = set()
    given: collections.Counter[str] = collections.Counter()
    bar = progress_bar(paths, desc="predict", unit="img", dynamic_ncols=True)
    for path in bar:
        bar.set_postfix_str(path.name)
        try:
            image = read_image(path)
        except ImageReadError as exc:
            failed.append(str(exc))
            log.warning("skipped %s", exc)
            continue
        windows = predictor.windows(image.shape[:2])
        with progress_bar(
            total=windows, desc=f"  {path.name}", unit="window", leave=False, dynamic_ncols=True, disable=windows < 2
        ) as window_bar:  # large images: progress inside the image too
            pred = predictor(image, progress=lambda done, total: window_bar.update(int(done - window_bar.n)))
        stem = _unique_stem(path, used)
        _write_png(out / f"{stem}_labels.png", pred.label_map.astype(dtype))
        _write_png(
            out / f"{stem}_overlay.png",
            cv2.cvtColor(render_overlay(image, pred, colours_by_area(pred)), cv2.COLOR_RGB2BGR),
        )
        given[str(path)] += 1  # the same file given twice: a second entry, "<path> (#2)", for its second outputs
        key = str(path) if given[str(path)] == 1 else f"{path} (#{given[str(path)]})"
        summary[key] = {"labels": f"{stem}_labels.png", "overlay": f"{stem}_overlay.png", "areas": pred.areas}
        if getattr(args, "breakdown", False) and pred.breakdown:  # the member classes of each concept
            summary[key]["breakdown"] = pred.breakdown
    atomic.write_text(out / "areas.json", json.dumps(summary, indent=1, ensure_ascii=False))
    print(f"wrote label maps ({np.dtype(dtype).name}), overlays and areas.json for {len(summary)} image(s) to {out}")
    if failed:
        print(
            f"larvseg predict: {len(failed)} of {len(paths)} image(s) could not be read and were skipped:",
            file=sys.stderr,
        )
        for line in failed:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0
