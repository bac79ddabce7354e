"""Label maps shown over images: the fraction of pixels per class, a fixed colour per class id, and the
overlay with a legend that ``larvseg predict``, ``larvseg serve`` and the TensorBoard eval images draw.
NumPy and OpenCV only."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

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
    return {names[i]: float(counts[i] / label_map.size) for i in ids.tolist()}


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 RGB colours, fixed per class id (the same in every image and run): the
    perceptually spaced sequence (``distinct_colours``) repeated over the ids."""
    seq = distinct_colours()
    return seq[np.arange(num_classes) % len(seq)]


def _srgb_to_oklab(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 sRGB -> (N, 3) OKLab (Ottosson 2020), where distances follow perceived differences."""
    c = rgb.astype(np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    lms = (
        linear
        @ np.array(
            [
                [0.4122214708, 0.5363325363, 0.0514459929],
                [0.2119034982, 0.6806995451, 0.1073969566],
                [0.0883024619, 0.2817188376, 0.6299787005],
            ]
        ).T
    )
    return (
        np.cbrt(lms)
        @ np.array(
            [
                [0.2104542553, 0.7936177850, -0.0040720468],
                [1.9779984951, -2.4285922050, 0.4505937099],
                [0.0259040371, 0.7827717662, -0.8086757660],
            ]
        ).T
    )


_DISTINCT: np.ndarray | None = None
DISTINCT_COLOURS = 40  # beyond about 40, no set of colours stays distinguishable at a glance


def distinct_colours() -> np.ndarray:
    """(DISTINCT_COLOURS, 3) uint8 RGB, each as far as possible (in OKLab) from all before it: greedy
    farthest-point sampling over an sRGB grid, without near-black and near-white (overlay and text
    colours). Deterministic; consecutive colours are the most different, so the k largest classes of
    an image get the k most different colours."""
    global _DISTINCT
    if _DISTINCT is None:
        axis = np.arange(0, 256, 17, dtype=np.uint8)
        grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        lab = _srgb_to_oklab(grid)
        keep = (lab[:, 0] > 0.4) & (lab[:, 0] < 0.93)
        grid, lab = grid[keep], lab[keep]
        chosen = [int(np.argmax(np.hypot(lab[:, 1], lab[:, 2])))]  # the most saturated colour first
        dist = np.linalg.norm(lab - lab[chosen[0]], axis=1)
        for _ in range(DISTINCT_COLOURS - 1):
            chosen.append(int(np.argmax(dist)))
            dist = np.minimum(dist, np.linalg.norm(lab - lab[chosen[-1]], axis=1))
        _DISTINCT = grid[chosen]
    return _DISTINCT


def colours_by_area(pred: Prediction) -> np.ndarray:
    """(num_classes, 3) uint8 RGB for one image's overlay: the classes present get the distinct colours in
    order of area (largest first), so that the classes shown together differ as much as possible;
    absent classes keep ``palette``'s colour. The label map itself is not affected."""
    colours = palette(len(pred.class_names)).copy()
    seq = distinct_colours()
    present = np.asarray(pred.present, dtype=np.int64)
    colours[present] = seq[np.arange(len(present)) % len(seq)]
    return colours


def label_png_dtype(num_classes: int) -> type:
    return np.uint8 if num_classes < 255 else np.uint16


def _ascii(text: str) -> str:
    """cv2's fonts draw ASCII only."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode() or "?"


def render_overlay(
    image: np.ndarray, pred: Prediction, colours: np.ndarray, alpha: float = 0.5, max_legend: int = 25
) -> np.ndarray:
    """RGB image blended with the class colours, and a legend panel on the right (largest class first)."""
    h, w = image.shape[:2]
    blend = (image.astype(np.float32) * (1 - alpha) + colours[pred.label_map].astype(np.float32) * alpha).astype(
        np.uint8
    )
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
        canvas[y + 2 : y + 2 + swatch, x : x + swatch] = colours[index[name]]
        cv2.putText(
            canvas,
            f"{_ascii(name)[:26]} {100 * area:.1f}%",
            (x + swatch + 5, y + swatch),
            font,
            0.4,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
    if len(entries) > len(shown):
        cv2.putText(
            canvas,
            f"... and {len(entries) - len(shown)} more",
            (w + pad, pad + len(shown) * row + swatch),
            font,
            0.4,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
    return canvas
