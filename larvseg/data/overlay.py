"""Label maps shown over images: the fraction of pixels per class, a fixed colour per class id, and the
overlay with a legend that ``larvseg predict``, ``larvseg serve`` and the TensorBoard eval images draw.
NumPy and OpenCV only."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np


@dataclass
class Prediction:
    label_map: np.ndarray  # (H, W) int64 union class ids, at the input image's resolution
    class_names: list[str]  # name of every union id (class_names[label_map[y, x]])
    areas: dict[str, float]  # fraction of the pixels per class present, largest first; sums to 1
    # per concept of a query (larvseg.data.class_query): the fraction of the image of each member class
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def present(self) -> list[int]:
        """Union ids present in the label map, largest area first (larvseg serve's legend)."""
        index = {n: i for i, n in enumerate(self.class_names)}
        return [index[n] for n in self.areas]


def class_areas(label_map: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    counts = np.bincount(label_map.ravel(), minlength=len(names))
    ids = np.flatnonzero(counts)
    ids = ids[np.argsort(-counts[ids], kind="stable")]
    return {names[i]: float(counts[i] / label_map.size) for i in ids}


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
