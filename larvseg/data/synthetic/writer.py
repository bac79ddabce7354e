"""Writing a mini benchmark in the original datasets' on-disk layouts, and reusing a cached one.

Three parts, each in the layout the real loaders read (larvseg.data.datasets):

- ``C171/``: a segmentation source like COCO-Stuff-164k: JPEG images and uint8 PNG masks holding
  *raw* COCO-Stuff ids (255 = unlabeled). Its masks contain the **base** classes only.
- ``I22K/fall11_whole/<wnid>/<wnid>_<n>.JPEG``: an ImageNet-21K-style source with a synset for every
  class, the only source of the **novel** ones: every image shows one dominant object of its synset,
  like a real ImageNet photo; the only label the loaders read is the folder. ``I22K/demo_wnids.txt``
  lists the synsets. As in the paper's IN585, which holds synsets of base classes too, so that the
  image-level softmax weighs novel classes against base ones and the single-tag background rule of the
  CAC has base classes to find.
  Beside it, what the generator knows and a real ImageNet does not, for the demo's checks (never read by
  training, except ``object_masks`` by the oracle-attention run): ``I22K/labels/<wnid>/<stem>.tif`` (every
  pixel's class as an ADE-847 train id, uint16, 65535 unlabeled), ``I22K/object_masks/<wnid>/<stem>.png``
  (uint8, 1 = the tagged object) and ``I22K/scenes.json`` (per image: tag, habitat, background, clutter).
- ``A847/``: an evaluation set like ADE20K-Full: JPEG images and uint16 TIFF masks holding ADE-847
  train ids for **all** classes (65535 = unlabeled); ``A847/scenes.json`` records each image's background,
  objects and their visible areas (habitat family).

What the scenes hold is the family's (``spec.family``, a key of FAMILIES): ``habitat`` (the default:
larvseg.data.synthetic.habitat) or ``uniform`` (the control: larvseg.data.synthetic.uniform).
Everything is a function of ``(seed, part, index)`` only, so the benchmark is identical whatever the
order or the number of processes that write it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile
from PIL import Image

from larvseg.data.synthetic.appearance import DEMO_CLASSES, NOVEL_CLASSES, BenchmarkError
from larvseg.data.synthetic.habitat import HabitatFamily
from larvseg.data.synthetic.spec import FORMAT_VERSION, BenchmarkSpec
from larvseg.data.synthetic.uniform import UniformFamily

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from larvseg.config import DataConfig

A847_UNLABELED = 65535
COCO_UNLABELED = 255
# spec.family -> its scenes
FAMILIES: dict[str, type[HabitatFamily | UniformFamily]] = {"habitat": HabitatFamily, "uniform": UniformFamily}


# ----------------------------------------------------------------------------------------------
# Writing the layouts


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
    def imagenet_labels(self) -> Path:
        return self.root / "I22K" / "labels"

    @property
    def object_masks(self) -> Path:
        return self.root / "I22K" / "object_masks"

    @property
    def scenes(self) -> Path:
        return self.root / "I22K" / "scenes.json"

    @property
    def eval_scenes(self) -> Path:
        return self.root / "A847" / "scenes.json"

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


def write_benchmark(
    root: str | os.PathLike, spec: BenchmarkSpec | None = None, progress: Callable[[str], None] | None = None
) -> BenchmarkLayout:
    """Generate the benchmark into ``root`` (which must not exist yet or be empty)."""
    spec = spec or BenchmarkSpec()
    lay = BenchmarkLayout(Path(root))
    for d in (lay.seg_images, lay.seg_annotations, lay.eval_images, lay.eval_annotations):
        d.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda msg: None)
    family = FAMILIES[spec.family](spec)

    say(f"C171: {spec.num_seg} images with base-class masks")
    for i in range(spec.num_seg):
        scene = family.seg_scene(_rng(spec.seed, _SEG, i))
        if np.isin(scene.labels, [DEMO_CLASSES.index(c) for c in NOVEL_CLASSES]).any():
            raise BenchmarkError("internal error: a novel class in a C171 mask")  # cannot happen by construction
        stem = f"{i + 1:012d}"
        _write_jpeg(lay.seg_images / f"{stem}.jpg", scene.image, spec.jpeg_quality)
        Image.fromarray(_COCO_OF[scene.labels].astype(np.uint8)).save(lay.seg_annotations / f"{stem}.png")

    say(f"I22K: {spec.per_class} images for each of {len(DEMO_CLASSES)} synsets ({len(NOVEL_CLASSES)} novel)")
    scenes = {}
    for k, cls in enumerate(DEMO_CLASSES):
        for d in (lay.imagenet, lay.imagenet_labels, lay.object_masks):
            (d / cls.wnid).mkdir(parents=True, exist_ok=True)
        for i in range(spec.per_class):
            scene = family.imagenet_scene(_rng(spec.seed, _IMAGENET, k * 1_000_000 + i), cls)
            stem = f"{cls.wnid}_{i + 1}"
            _write_jpeg(lay.imagenet / cls.wnid / f"{stem}.JPEG", scene.image, spec.jpeg_quality)
            tifffile.imwrite(lay.imagenet_labels / cls.wnid / f"{stem}.tif", _ADE_OF[scene.labels].astype(np.uint16))
            Image.fromarray((scene.labels == k).astype(np.uint8)).save(lay.object_masks / cls.wnid / f"{stem}.png")
            scenes[f"{cls.wnid}/{stem}"] = scene.info
    lay.wnid_file.write_text("".join(f"{c.wnid}\n" for c in DEMO_CLASSES))
    lay.scenes.write_text(json.dumps(scenes))

    say(f"A847: {spec.num_eval} evaluation images with masks for all classes")
    eval_scenes = {}
    for i in range(spec.num_eval):
        scene = family.eval_scene(_rng(spec.seed, _EVAL, i))
        stem = f"ADE_val_{i + 1:08d}"
        eval_scenes[stem] = scene.info
        _write_jpeg(lay.eval_images / f"{stem}.jpg", scene.image, spec.jpeg_quality)
        tifffile.imwrite(lay.eval_annotations / f"{stem}.tif", _ADE_OF[scene.labels].astype(np.uint16))

    lay.eval_scenes.write_text(json.dumps(eval_scenes))
    meta = {
        "spec": asdict(spec),
        "classes": [asdict(c) for c in DEMO_CLASSES],
        # class name -> its habitat (base class names); empty for the uniform family
        "habitats": {
            DEMO_CLASSES[k].name: [DEMO_CLASSES[b].name for b in hab] for k, hab in enumerate(family.habitats)
        },
    }
    lay.meta.write_text(json.dumps(meta, indent=1))  # written last: its presence marks a complete benchmark
    return lay


SMOKE_SPEC = BenchmarkSpec(num_seg=8, per_class=2, num_eval=4)  # ~1 s: what `data.demo_benchmark` writes


def read_habitats(layout: BenchmarkLayout) -> list[tuple[int, ...]]:
    """Class index (DEMO_CLASSES) -> its habitat's class indices, from a written benchmark's benchmark.json."""
    index = {c.name: k for k, c in enumerate(DEMO_CLASSES)}
    table = json.loads(layout.meta.read_text()).get("habitats", {})
    return [tuple(index[b] for b in table.get(c.name, [])) for c in DEMO_CLASSES]


def ensure_smoke_data(data_cfg: DataConfig) -> BenchmarkLayout | None:
    """With ``data.demo_benchmark`` set and ``data.root`` missing, write the small benchmark there (so
    the packaged smoke config ``tiny_cpu`` runs as is); an existing folder is never touched."""
    root = data_cfg.resolved_root()
    if not data_cfg.demo_benchmark or root.exists():
        return None
    log.info("data.demo_benchmark: writing a small mini benchmark to %s", root)
    return ensure_benchmark(root, SMOKE_SPEC)


def ensure_benchmark(
    root: str | os.PathLike, spec: BenchmarkSpec | None = None, progress: Callable[[str], None] | None = None
) -> BenchmarkLayout:
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
    "A847_UNLABELED",
    "COCO_UNLABELED",
    "FAMILIES",
    "FORMAT_VERSION",
    "SMOKE_SPEC",
    "BenchmarkLayout",
    "BenchmarkSpec",
    "ensure_benchmark",
    "ensure_smoke_data",
    "read_habitats",
    "write_benchmark",
]
