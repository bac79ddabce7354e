"""A procedural mini benchmark written in the original datasets' on-disk layouts.

Three parts, each in the layout the real loaders read (larvseg.data.datasets):

- ``C171/``: a segmentation source like COCO-Stuff-164k: JPEG images and uint8 PNG masks holding
  *raw* COCO-Stuff ids (255 = unlabeled). Its masks contain the **base** classes only.
- ``I22K/fall11_whole/<wnid>/<wnid>_<n>.JPEG``: an ImageNet-21K-style source with a synset for every
  class, the only source of the **novel** ones: every image shows one dominant object of its synset on a
  background of (other) base classes, like a real ImageNet photo; the only label is the folder.
  ``I22K/demo_wnids.txt`` lists the synsets. As in the paper's IN585, which holds synsets of base
  classes too, so that the image-level softmax weighs novel classes against base ones and the
  single-tag background rule of the CAC has base classes to find.
- ``A847/``: an evaluation set like ADE20K-Full: JPEG images and uint16 TIFF masks holding ADE-847
  train ids for **all** classes (65535 = unlabeled).

Classes are real ADE-847 / COCO-Stuff names and real wnids (looked up in the packaged class lists),
so the union vocabulary joins them exactly as in the paper's C171 + IN585 -> A847 experiment.
A class's appearance is a colour and a texture pattern; the palette is built so that no single cue
identifies a novel class (each novel class shares its colour or its pattern with some base class),
and shapes are random blobs, ellipses and polygons for every class.

Everything is a function of ``(seed, part, index)`` only, so the benchmark is identical whatever the
order or the number of processes that write it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import cv2
import numpy as np
import tifffile
from PIL import Image

if TYPE_CHECKING:
    from larvseg.config import DataConfig

CLASSLIST_DIR = Path(__file__).resolve().parent.parent / "data" / "classlists"
FORMAT_VERSION = 1  # bump when the generator's output changes, so cached benchmarks are rebuilt
A847_UNLABELED = 65535
COCO_UNLABELED = 255


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
    wnids = {c["name"]: c["wnid"] for c in json.loads((CLASSLIST_DIR / "imagenet_for_ade847.json").read_text())["classes"]}
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
                name, role, color, pattern, ade_train_id=ade[name],
                coco_raw_id=coco[name] if role == "base" else -1, wnid=wnids[name],
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
    return (((np.floor((u + phase[0]) / period) + np.floor((v + phase[1]) / period)) % 2) * 0.8 + 0.1).astype(np.float32)


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


def _object_mask(h: int, w: int, rng: np.random.Generator, area_frac: tuple[float, float]) -> np.ndarray:
    """A random shape covering roughly ``area_frac`` of the image, fully or mostly inside it."""
    r = math.sqrt(rng.uniform(*area_frac) * h * w / math.pi)
    cy, cx = rng.uniform(0.25 * h, 0.75 * h), rng.uniform(0.25 * w, 0.75 * w)
    shape = list(SHAPES)[int(rng.integers(len(SHAPES)))]
    return SHAPES[shape](h, w, rng, cy, cx, r)


def _background_split(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A wavy 'horizon': True above it. Roughly horizontal, as in outdoor photos."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tilt = math.tan(math.radians(rng.uniform(-20, 20)))
    line = rng.uniform(0.3, 0.7) * h + tilt * (xx - w / 2) + rng.uniform(0, 0.06 * h) * np.sin(xx / rng.uniform(6, 20) + rng.uniform(0, 6.3))
    return yy < line


# ----------------------------------------------------------------------------------------------
# Scenes


@dataclass
class Scene:
    image: np.ndarray  # (h, w, 3) uint8 RGB
    labels: np.ndarray  # (h, w) int32 index into DEMO_CLASSES, -1 = unlabeled


def _size(rng: np.random.Generator, sizes: list[list[int]]) -> tuple[int, int]:
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
    labels = np.empty((h, w), np.int32)
    image = np.empty((h, w, 3), np.float32)
    top, bottom = rng.choice(background, size=2, replace=False)
    upper = _background_split(h, w, rng) if rng.uniform() < 0.75 else np.ones((h, w), bool)
    regions = [(int(top), upper), (int(bottom), ~upper)]
    for cls_index, frac in zip(objects, area_frac):
        regions.append((cls_index, _object_mask(h, w, rng, frac)))
    unlabeled = np.zeros((h, w), bool)
    for k, (cls_index, mask) in enumerate(regions):  # later regions paint over earlier ones
        image[mask] = render_texture(DEMO_CLASSES[cls_index], h, w, rng)[mask]
        labels[mask] = cls_index
        unlabeled &= ~mask
        is_object = k >= 2
        if is_object and rng.uniform() < boundary_unlabeled and mask.any():
            outline = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
            unlabeled |= outline
    labels[unlabeled] = -1
    image += rng.normal(0.0, 5.0, size=image.shape).astype(np.float32)  # sensor noise
    return Scene(np.clip(image, 0, 255).round().astype(np.uint8), labels)


def seg_scene(rng: np.random.Generator, spec: "BenchmarkSpec") -> Scene:
    """C171-style training image: base classes only, all of them annotated."""
    base_ids = [DEMO_CLASSES.index(c) for c in BASE_CLASSES]
    n = int(rng.integers(1, 4))
    objects = [int(i) for i in rng.choice(base_ids, size=n)]
    return render_scene(rng, _size(rng, spec.sizes), objects, [(0.04, 0.2)] * n, boundary_unlabeled=0.3)


def imagenet_scene(rng: np.random.Generator, spec: "BenchmarkSpec", cls: DemoClass) -> Scene:
    """ImageNet-style photo: one dominant object of ``cls`` on a background of other base classes (+ maybe
    a small base object)."""
    k = DEMO_CLASSES.index(cls)
    others = [DEMO_CLASSES.index(c) for c in BASE_CLASSES if c is not cls]
    objects, fracs = [], []
    if rng.uniform() < 0.4:
        objects.append(int(rng.choice(others)))
        fracs.append((0.03, 0.08))
    objects.append(k)  # drawn last: the dominant object is never occluded
    fracs.append((0.2, 0.45))
    return render_scene(rng, _size(rng, spec.sizes), objects, fracs, background=others)


def eval_scene(rng: np.random.Generator, spec: "BenchmarkSpec") -> Scene:
    """A847-style evaluation image: base background, one or two novel objects and maybe a base one."""
    base_ids = [DEMO_CLASSES.index(c) for c in BASE_CLASSES]
    novel_ids = [DEMO_CLASSES.index(c) for c in NOVEL_CLASSES]
    objects = [int(i) for i in rng.choice(novel_ids, size=int(rng.integers(1, 3)), replace=False)]
    if rng.uniform() < 0.5:
        objects.insert(0, int(rng.choice(base_ids)))
    return render_scene(rng, _size(rng, spec.sizes), objects, [(0.06, 0.2)] * len(objects), boundary_unlabeled=0.3)


# ----------------------------------------------------------------------------------------------
# Writing the layouts


@dataclass
class BenchmarkSpec:
    """What to generate. Stored in ``benchmark.json``; a cached benchmark is reused only if it matches."""

    seed: int = 0
    num_seg: int = 400  # C171 training images
    per_class: int = 40  # I22K images per synset
    num_eval: int = 60  # A847 validation images
    sizes: list[list[int]] = field(default_factory=lambda: [[128, 128], [112, 144], [144, 112]])  # (h, w) choices
    jpeg_quality: int = 92
    version: int = FORMAT_VERSION


@dataclass
class BenchmarkLayout:
    """Paths of a generated benchmark (what a config's data section points at)."""

    root: Path

    @property
    def seg_images(self) -> Path:
        return self.root / "C171" / "images" / "train2017"

    @property
    def seg_annotations(self) -> Path:
        return self.root / "C171" / "annotations" / "train2017"

    @property
    def imagenet(self) -> Path:
        return self.root / "I22K" / "fall11_whole"

    @property
    def wnid_file(self) -> Path:
        return self.root / "I22K" / "demo_wnids.txt"

    @property
    def eval_images(self) -> Path:
        return self.root / "A847" / "images" / "validation"

    @property
    def eval_annotations(self) -> Path:
        return self.root / "A847" / "annotations" / "validation"

    @property
    def meta(self) -> Path:
        return self.root / "benchmark.json"


def _rng(seed: int, part: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, part, index])


_SEG, _IMAGENET, _EVAL = 0, 1, 2  # part ids in the RNG seed
_COCO_OF = np.array([c.coco_raw_id for c in DEMO_CLASSES] + [COCO_UNLABELED], np.int32)  # index -1 -> unlabeled
_ADE_OF = np.array([c.ade_train_id for c in DEMO_CLASSES] + [A847_UNLABELED], np.int32)


def _write_jpeg(path: Path, image: np.ndarray, quality: int) -> None:
    Image.fromarray(image).save(path, quality=quality)


def write_benchmark(root: str | os.PathLike, spec: BenchmarkSpec | None = None,
                    progress: Callable[[str], None] | None = None) -> BenchmarkLayout:
    """Generate the benchmark into ``root`` (which must not exist yet or be empty)."""
    spec = spec or BenchmarkSpec()
    lay = BenchmarkLayout(Path(root))
    for d in (lay.seg_images, lay.seg_annotations, lay.eval_images, lay.eval_annotations):
        d.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda msg: None)

    say(f"C171: {spec.num_seg} images with base-class masks")
    for i in range(spec.num_seg):
        scene = seg_scene(_rng(spec.seed, _SEG, i), spec)
        if np.isin(scene.labels, [DEMO_CLASSES.index(c) for c in NOVEL_CLASSES]).any():
            raise BenchmarkError("internal error: a novel class in a C171 mask")  # cannot happen by construction
        stem = f"{i + 1:012d}"
        _write_jpeg(lay.seg_images / f"{stem}.jpg", scene.image, spec.jpeg_quality)
        Image.fromarray(_COCO_OF[scene.labels].astype(np.uint8)).save(lay.seg_annotations / f"{stem}.png")

    say(f"I22K: {spec.per_class} images for each of {len(DEMO_CLASSES)} synsets ({len(NOVEL_CLASSES)} novel)")
    for k, cls in enumerate(DEMO_CLASSES):
        folder = lay.imagenet / cls.wnid
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(spec.per_class):
            scene = imagenet_scene(_rng(spec.seed, _IMAGENET, k * 1_000_000 + i), spec, cls)
            _write_jpeg(folder / f"{cls.wnid}_{i + 1}.JPEG", scene.image, spec.jpeg_quality)
    lay.wnid_file.write_text("".join(f"{c.wnid}\n" for c in DEMO_CLASSES))

    say(f"A847: {spec.num_eval} evaluation images with masks for all classes")
    for i in range(spec.num_eval):
        scene = eval_scene(_rng(spec.seed, _EVAL, i), spec)
        stem = f"ADE_val_{i + 1:08d}"
        _write_jpeg(lay.eval_images / f"{stem}.jpg", scene.image, spec.jpeg_quality)
        tifffile.imwrite(lay.eval_annotations / f"{stem}.tif", _ADE_OF[scene.labels].astype(np.uint16))

    meta = {"spec": asdict(spec), "classes": [asdict(c) for c in DEMO_CLASSES]}
    lay.meta.write_text(json.dumps(meta, indent=1))  # written last: its presence marks a complete benchmark
    return lay


SMOKE_SPEC = BenchmarkSpec(num_seg=8, per_class=2, num_eval=4)  # ~1 s: what `data.demo_benchmark` writes


def ensure_smoke_data(data_cfg: "DataConfig") -> BenchmarkLayout | None:
    """With ``data.demo_benchmark`` set and ``data.root`` missing, write the small benchmark there (so
    the packaged smoke config ``tiny_cpu`` runs as is); an existing folder is never touched."""
    root = data_cfg.resolved_root()
    if not data_cfg.demo_benchmark or root.exists():
        return None
    print(f"data.demo_benchmark: writing a small mini benchmark to {root}", flush=True)
    return ensure_benchmark(root, SMOKE_SPEC)


def ensure_benchmark(root: str | os.PathLike, spec: BenchmarkSpec | None = None,
                     progress: Callable[[str], None] | None = None) -> BenchmarkLayout:
    """Reuse the benchmark in ``root`` if it was generated with ``spec``; otherwise (re)generate it.

    Generation goes to a sibling temp folder that is renamed into place, so an interrupted run never
    leaves a half-written benchmark that looks complete.
    """
    spec = spec or BenchmarkSpec()
    root = Path(root)
    lay = BenchmarkLayout(root)
    if lay.meta.is_file():
        stored = json.loads(lay.meta.read_text())
        if stored.get("spec") == json.loads(json.dumps(asdict(spec))):
            return lay
        (progress or (lambda m: None))(f"{lay.meta} was written with other settings: regenerating")
    start = time.perf_counter()
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    write_benchmark(tmp, spec, progress)
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    (progress or (lambda m: None))(f"mini benchmark written to {root} in {time.perf_counter() - start:.1f} s")
    return lay


__all__ = [
    "BASE_CLASSES", "BenchmarkError", "BenchmarkLayout", "BenchmarkSpec", "DEMO_CLASSES", "DemoClass",
    "NOVEL_CLASSES", "PATTERNS", "SMOKE_SPEC", "ensure_benchmark", "ensure_smoke_data", "render_scene",
    "render_texture", "write_benchmark",
]
