"""The mini benchmark's classes and how a scene is drawn: appearance (colour x texture), shapes, painting.

Classes are real ADE-847 / COCO-Stuff names and real wnids (looked up in the packaged class lists),
so the union vocabulary joins them exactly as in the paper's C171 + IN585 -> A847 experiment.
A class's appearance is a colour and a texture pattern; the palette is built so that no single cue
identifies a novel class (each novel class shares its colour or its pattern with some base class),
and shapes are random blobs, ellipses and polygons for every class.

What a scene holds (which classes, where) is decided by a benchmark family (larvseg.data.synthetic.habitat,
larvseg.data.synthetic.uniform); how it is written to disk by larvseg.data.synthetic.writer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

CLASSLIST_DIR = Path(__file__).resolve().parent.parent / "classlists"


class BenchmarkError(RuntimeError):
    """The mini benchmark cannot be generated or does not match what was asked for."""


# ----------------------------------------------------------------------------------------------
# Classes


@dataclass(frozen=True)
class DemoClass:
    name: str  # ADE-847 short name (== COCO-Stuff merged name for base classes, == synset lemma for novel)
    role: str  # "base" (has masks in C171) | "novel" (image-level only, from I22K)
    color: tuple[int, int, int]  # mean RGB
    pattern: str  # key of PATTERNS
    ade_train_id: int = -1  # value in the A847 .tif masks
    coco_raw_id: int = -1  # value in the C171 .png masks (base classes)
    wnid: str = ""  # ImageNet-21K folder


# Colours and patterns are shared on purpose: each novel class has the colour of some base class or
# the pattern of another one, so a model must combine both cues (no single-cue shortcut).
_BLUE, _GREEN, _GREY, _YELLOW, _RED = (70, 110, 210), (70, 160, 70), (135, 135, 135), (215, 185, 70), (200, 65, 55)
_APPEARANCE: dict[str, tuple[str, tuple[int, int, int], str]] = {
    # name: (role, colour, pattern)
    "sky": ("base", _BLUE, "plain"),
    "water": ("base", _BLUE, "hstripes"),
    "grass": ("base", _GREEN, "vstripes"),
    "tree": ("base", _GREEN, "blotches"),
    "road": ("base", _GREY, "plain"),
    "building": ("base", _GREY, "checker"),
    "wall": ("base", _YELLOW, "hstripes"),
    "sand": ("base", _YELLOW, "dots"),
    "ball": ("novel", _RED, "dots"),
    "helicopter": ("novel", _RED, "vstripes"),
    "basket": ("novel", _YELLOW, "blotches"),
    "tower": ("novel", _GREY, "hstripes"),
    "windmill": ("novel", _BLUE, "checker"),
    "arch": ("novel", _GREEN, "dots"),
}


def _load_classes() -> tuple[DemoClass, ...]:
    """Attach the real ids of every demo class from the packaged class lists (fails loudly if absent)."""
    ade = {c["short_name"]: c["train_id"] for c in json.loads((CLASSLIST_DIR / "ade847.json").read_text())["classes"]}
    coco: dict[str, int] = {}
    for c in json.loads((CLASSLIST_DIR / "coco_stuff171.json").read_text())["classes"]:
        # Prefer the raw id whose own name is the merged name (e.g. plain "wall" over "wall-brick").
        if c["merged_name"] not in coco or c["name"] == c["merged_name"]:
            coco[c["merged_name"]] = c["raw_id"]
    wnids = {
        c["name"]: c["wnid"] for c in json.loads((CLASSLIST_DIR / "imagenet_for_ade847.json").read_text())["classes"]
    }
    classes = []
    for name, (role, color, pattern) in _APPEARANCE.items():
        if name not in ade:
            raise BenchmarkError(f"demo class {name!r} is not an ADE-847 short name in {CLASSLIST_DIR / 'ade847.json'}")
        if role == "base" and name not in coco:
            raise BenchmarkError(f"base demo class {name!r} is not a COCO-Stuff merged name")
        if name not in wnids:
            raise BenchmarkError(f"demo class {name!r} has no ImageNet wnid in imagenet_for_ade847.json")
        if role == "novel" and name in coco:
            raise BenchmarkError(f"novel demo class {name!r} must not be a COCO-Stuff class (it would have masks)")
        classes.append(
            DemoClass(
                name,
                role,
                color,
                pattern,
                ade_train_id=ade[name],
                coco_raw_id=coco[name] if role == "base" else -1,
                wnid=wnids[name],
            )
        )
    return tuple(classes)


DEMO_CLASSES: tuple[DemoClass, ...] = _load_classes()
BASE_CLASSES = tuple(c for c in DEMO_CLASSES if c.role == "base")
NOVEL_CLASSES = tuple(c for c in DEMO_CLASSES if c.role == "novel")


# ----------------------------------------------------------------------------------------------
# Textures: float32 maps in [0, 1] over the whole image; a region takes its class's map under its mask.


def _coords(h: int, w: int, rng: np.random.Generator, angle_jitter: float = 0.0, base_angle: float = 0.0):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = math.radians(base_angle + rng.uniform(-angle_jitter, angle_jitter))
    return xx * math.cos(a) + yy * math.sin(a), -xx * math.sin(a) + yy * math.cos(a)


def _stripes(h: int, w: int, rng: np.random.Generator, angle: float) -> np.ndarray:
    u, _ = _coords(h, w, rng, 12.0, angle)
    period = rng.uniform(5.0, 8.0)
    return (0.5 + 0.5 * np.sin(2 * math.pi * u / period + rng.uniform(0, 2 * math.pi))).astype(np.float32)


def _plain(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    return np.full((h, w), rng.uniform(0.6, 0.9), np.float32)


def _checker(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _coords(h, w, rng, 10.0)
    period = rng.uniform(8.0, 12.0)
    phase = rng.uniform(0, period, size=2)
    return (((np.floor((u + phase[0]) / period) + np.floor((v + phase[1]) / period)) % 2) * 0.8 + 0.1).astype(
        np.float32
    )


def _dots(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _coords(h, w, rng, 20.0)
    period = rng.uniform(7.0, 10.0)
    du = (u + rng.uniform(0, period)) % period - period / 2
    dv = (v + rng.uniform(0, period)) % period - period / 2
    radius = period * rng.uniform(0.25, 0.35)
    return np.where(du**2 + dv**2 < radius**2, 0.1, 0.9).astype(np.float32)


def _blotches(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    coarse = rng.uniform(0.0, 1.0, size=(max(2, h // 10), max(2, w // 10))).astype(np.float32)
    smooth = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip((smooth - 0.5) * 1.6 + 0.5, 0.0, 1.0)


PATTERNS: dict[str, Callable[[int, int, np.random.Generator], np.ndarray]] = {
    "plain": _plain,
    "hstripes": lambda h, w, rng: _stripes(h, w, rng, 90.0),  # bands run horizontally
    "vstripes": lambda h, w, rng: _stripes(h, w, rng, 0.0),
    "checker": _checker,
    "dots": _dots,
    "blotches": _blotches,
}


def render_texture(cls: DemoClass, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """An (h, w, 3) float32 RGB texture of one instance of ``cls`` (colour and pattern jittered)."""
    t = PATTERNS[cls.pattern](h, w, rng)
    color = np.clip(np.asarray(cls.color, np.float32) + rng.normal(0.0, 12.0, size=3), 0, 255)
    shade = 0.45 + 0.55 * t  # the pattern modulates brightness
    return color[None, None, :] * shade[..., None]


# ----------------------------------------------------------------------------------------------
# Shapes: boolean masks


def _blob(h: int, w: int, rng: np.random.Generator, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = np.arctan2(yy - cy, xx - cx)
    radius = np.full_like(theta, r)
    for k in (2, 3, 4):
        radius *= 1.0 + rng.uniform(0.0, 0.18) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    return (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2


def _ellipse(h: int, w: int, rng: np.random.Generator, cy: float, cx: float, r: float) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    axes = (max(2, int(r * rng.uniform(0.7, 1.3))), max(2, int(r * rng.uniform(0.6, 1.1))))
    cv2.ellipse(mask, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask.astype(bool)


def _polygon(h: int, w: int, rng: np.random.Generator, cy: float, cx: float, r: float) -> np.ndarray:
    n = int(rng.integers(4, 8))
    # evenly spread corners (jittered), so the polygon's area stays close to pi r^2
    angles = rng.uniform(0, 2 * math.pi) + (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * (2 * math.pi / n)
    radii = r * rng.uniform(0.7, 1.25, n)
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1).round().astype(np.int32)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [pts], 1)
    return mask.astype(bool)


SHAPES: dict[str, Callable[..., np.ndarray]] = {"blob": _blob, "ellipse": _ellipse, "polygon": _polygon}


def object_mask(
    h: int, w: int, rng: np.random.Generator, area_frac: tuple[float, float], centre: tuple[float, float] | None = None
) -> np.ndarray:
    """A random shape covering roughly ``area_frac`` of the image, centred at ``centre`` (y, x) or, by
    default, somewhere in the middle half of the image (then fully or mostly inside it)."""
    r = math.sqrt(rng.uniform(*area_frac) * h * w / math.pi)
    cy, cx = centre if centre is not None else (rng.uniform(0.25 * h, 0.75 * h), rng.uniform(0.25 * w, 0.75 * w))
    shape = list(SHAPES)[int(rng.integers(len(SHAPES)))]
    return SHAPES[shape](h, w, rng, cy, cx, r)


def background_split(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A wavy 'horizon': True above it. Roughly horizontal, as in outdoor photos."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tilt = math.tan(math.radians(rng.uniform(-20, 20)))
    line = (
        rng.uniform(0.3, 0.7) * h
        + tilt * (xx - w / 2)
        + rng.uniform(0, 0.06 * h) * np.sin(xx / rng.uniform(6, 20) + rng.uniform(0, 6.3))
    )
    return yy < line


# ----------------------------------------------------------------------------------------------
# Scenes


@dataclass
class Scene:
    image: np.ndarray  # (h, w, 3) uint8 RGB
    labels: np.ndarray  # (h, w) int32 index into DEMO_CLASSES, -1 = unlabeled
    info: dict[str, Any] = field(default_factory=dict)  # what the family decided (tag, habitat, clutter ...)


def draw_size(rng: np.random.Generator, sizes: list[list[int]]) -> tuple[int, int]:
    h, w = sizes[int(rng.integers(len(sizes)))]
    return int(h), int(w)


def render_scene(
    rng: np.random.Generator,
    size: tuple[int, int],
    objects: list[int],
    area_frac: list[tuple[float, float]],
    boundary_unlabeled: float = 0.0,
    background: list[int] | None = None,
) -> Scene:
    """A background of one or two classes of ``background`` (default: the base classes) with ``objects`` (indices into DEMO_CLASSES) on top.

    With probability ``boundary_unlabeled`` an object gets a thin unlabeled band around its outline,
    like real annotations that leave boundaries unlabeled.
    """
    h, w = size
    background = background or [DEMO_CLASSES.index(c) for c in BASE_CLASSES]
    top, bottom = rng.choice(background, size=2, replace=False)
    upper = background_split(h, w, rng) if rng.uniform() < 0.75 else np.ones((h, w), bool)
    regions = [(int(top), upper), (int(bottom), ~upper)]
    for cls_index, frac in zip(objects, area_frac):
        regions.append((cls_index, object_mask(h, w, rng, frac)))
    return paint(rng, (h, w), regions, 2, boundary_unlabeled)


def paint(
    rng: np.random.Generator,
    size: tuple[int, int],
    regions: list[tuple[int, np.ndarray]],
    num_background: int,
    boundary_unlabeled: float = 0.0,
) -> Scene:
    """Paint ``regions`` (class index into DEMO_CLASSES, boolean mask) in order, later ones over earlier ones;
    the first ``num_background`` are the background, the rest objects (which may get an unlabeled outline
    band with probability ``boundary_unlabeled``), then add sensor noise."""
    h, w = size
    labels = np.empty((h, w), np.int32)
    image = np.empty((h, w, 3), np.float32)
    unlabeled = np.zeros((h, w), bool)
    for k, (cls_index, mask) in enumerate(regions):
        image[mask] = render_texture(DEMO_CLASSES[cls_index], h, w, rng)[mask]
        labels[mask] = cls_index
        unlabeled &= ~mask
        is_object = k >= num_background
        if is_object and rng.uniform() < boundary_unlabeled and mask.any():
            outline = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(
                bool
            )
            unlabeled |= outline
    labels[unlabeled] = -1
    image += rng.normal(0.0, 5.0, size=image.shape).astype(np.float32)  # sensor noise
    return Scene(np.clip(image, 0, 255).round().astype(np.uint8), labels)
