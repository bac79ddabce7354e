"""The habitat family, the default benchmark of ``larvseg demo``: image-level photos with the context
bias and the clutter of real single-label photos, shown whole in the crop, and an ADE-like evaluation set.

Each property stands for something measured on real data (none was chosen by looking at a result; the
numbers are fixed in :class:`~larvseg.data.synthetic.writer.BenchmarkSpec` and recorded in benchmark.json):

- **Habitats.** Real classes have typical contexts: boats on water, planes in sky, cows on grass. In
  COCO-Stuff, things co-occur with a few stuff classes far more often than with others (Caesar et al.,
  CVPR 2018, built the stuff annotations to study exactly this), and an ImageNet classifier can name many
  classes from the background alone, with the object removed, well above chance (Xiao et al., ICLR 2021,
  "Noise or Signal: The Role of Image Backgrounds in Object Recognition"). Here every class gets
  ``habitats_per_class`` base (stuff) classes, drawn once from the recorded ``habitat_seed``, not chosen by
  hand; an image-level photo of a class shows one of its habitats as a background region with
  probability ``p_habitat`` (else a uniform background). The same rule places the objects of the C171 and
  the evaluation images (a class of a present background's habitat is picked with probability
  ``p_habitat``, and centred in that region), as real scenes follow one world's statistics.
- **Clutter.** A single-label photo often holds other objects: relabelling the ImageNet validation set
  with every class present found many images with more than one (Beyer et al. 2020, "Are we done with
  ImageNet?"; Shankar et al., ICML 2020). Here an image-level photo holds 0 to ``max_clutter`` small untagged
  objects of *any* class but its tag, novel classes included, so the pooled loss credits them to the tag.
- **Whole photos.** The original's ImageNet pipeline rescales a photo to fit (320, 320) before its 320
  crop, so at ratio 1 the whole photo, background included, is in the crop; the demo config sets the
  tag source's ``scale`` to its crop the same way (the generator only draws photos of ``sizes``).
- **ADE-like evaluation.** ADE20K scenes hold many objects, most of them small, over several stuff
  regions (Zhou et al., CVPR 2017). Here evaluation images are larger (``eval_sizes``: at least 12 x 12
  tokens of 16 px), with two or three background regions and ``eval_objects`` objects of
  ``eval_object_area`` of the image each (below ~2 % an object would cover under one token).

Appearance, shapes and the sizes of the tagged, clutter and C171 objects are the uniform family's, so
the two families differ in where things are, not in what they look like.
"""

from __future__ import annotations

import numpy as np

from larvseg.data.synthetic.appearance import (
    BASE_CLASSES,
    DEMO_CLASSES,
    DemoClass,
    Scene,
    background_split,
    draw_size,
    object_mask,
    paint,
)
from larvseg.data.synthetic.spec import BenchmarkSpec

BASE_IDS = tuple(DEMO_CLASSES.index(c) for c in BASE_CLASSES)
ALL_IDS = tuple(range(len(DEMO_CLASSES)))
DOMINANT_AREA = (0.2, 0.45)  # the tagged object of an image-level photo (as the uniform family's)
CLUTTER_AREA = (0.03, 0.08)  # a small untagged object (as the uniform family's base clutter)
SEG_OBJECT_AREA = (0.04, 0.2)  # a C171 object (as the uniform family's)
BOUNDARY_UNLABELED = 0.3  # share of annotated objects with an unlabeled outline band (as the uniform family's)
_HABITAT_STREAM = 0x4AB1  # second word of the habitat table's RNG seed


def draw_habitats(seed: int, per_class: int) -> tuple[tuple[int, ...], ...]:
    """Class index -> its habitat: ``per_class`` base classes other than itself, drawn at random from ``seed``."""
    rng = np.random.default_rng([seed, _HABITAT_STREAM])
    table = []
    for k in ALL_IDS:
        pool = [b for b in BASE_IDS if b != k]
        table.append(tuple(sorted(int(x) for x in rng.choice(pool, size=per_class, replace=False))))
    return tuple(table)


def _anywhere(rng: np.random.Generator, h: int, w: int) -> tuple[float, float]:
    return rng.uniform(0.1 * h, 0.9 * h), rng.uniform(0.1 * w, 0.9 * w)


class HabitatFamily:
    """Scenes of the habitat family for one spec (see the module docstring)."""

    def __init__(self, spec: BenchmarkSpec) -> None:
        self.spec = spec
        self.habitats = draw_habitats(spec.habitat_seed, spec.habitats_per_class)

    def _place(
        self,
        rng: np.random.Generator,
        size: tuple[int, int],
        background: list[tuple[int, np.ndarray]],
        pool: tuple[int, ...],
        area: tuple[float, float],
    ) -> tuple[int, np.ndarray, bool]:
        """One object by the habitat rule: (class, mask, placed in its habitat). Never a class of the background."""
        h, w = size
        allowed = [c for c in pool if c not in {b for b, _ in background}]
        if rng.uniform() < self.spec.p_habitat:
            region, mask = background[int(rng.integers(len(background)))]
            fits = [c for c in allowed if region in self.habitats[c]]
            if fits and mask.any():
                ys, xs = np.nonzero(mask)
                i = int(rng.integers(ys.size))
                return int(rng.choice(fits)), object_mask(h, w, rng, area, (float(ys[i]), float(xs[i]))), True
        return int(rng.choice(allowed)), object_mask(h, w, rng, area, _anywhere(rng, h, w)), False

    def seg_scene(self, rng: np.random.Generator) -> Scene:
        """C171-style training image: two base backgrounds, 1-3 base objects by the habitat rule, all annotated."""
        h, w = size = draw_size(rng, self.spec.sizes)
        first, second = (int(x) for x in rng.choice(BASE_IDS, size=2, replace=False))
        upper = background_split(h, w, rng)
        background = [(first, upper), (second, ~upper)]
        objects = [
            self._place(rng, size, background, BASE_IDS, SEG_OBJECT_AREA)[:2] for _ in range(int(rng.integers(1, 4)))
        ]
        return paint(rng, size, background + objects, len(background), BOUNDARY_UNLABELED)

    def imagenet_scene(self, rng: np.random.Generator, cls: DemoClass) -> Scene:
        """ImageNet-style photo of ``cls``: one dominant object (never occluded) on a background that is its
        habitat with probability p_habitat, with 0..max_clutter small untagged objects of other classes."""
        k = DEMO_CLASSES.index(cls)
        h, w = size = draw_size(rng, self.spec.sizes)
        pool = [b for b in BASE_IDS if b != k]
        if rng.uniform() < self.spec.p_habitat:
            habitat = int(rng.choice(self.habitats[k]))
            classes = [habitat, int(rng.choice([b for b in pool if b != habitat]))]
        else:
            habitat = -1
            classes = [int(x) for x in rng.choice(pool, size=2, replace=False)]
        if rng.uniform() < 0.75:  # two regions, the habitat above or below; else the habitat alone
            upper = background_split(h, w, rng)
            if rng.uniform() < 0.5:
                classes = classes[::-1]
            background = [(classes[0], upper), (classes[1], ~upper)]
        else:
            background = [(classes[0], np.ones(size, bool))]
        clutter = [
            int(c)
            for c in rng.choice(
                [c for c in ALL_IDS if c != k], size=int(rng.integers(0, self.spec.max_clutter + 1)), replace=False
            )
        ]
        objects = [(c, object_mask(h, w, rng, CLUTTER_AREA, _anywhere(rng, h, w))) for c in clutter]
        objects.append((k, object_mask(h, w, rng, DOMINANT_AREA)))
        scene = paint(rng, size, background + objects, len(background))
        scene.info = {"tag": k, "habitat": habitat, "background": [b for b, _ in background], "clutter": clutter}
        return scene

    def eval_scene(self, rng: np.random.Generator) -> Scene:
        """A847-style evaluation image: 2-3 base background regions and eval_objects objects of any class
        (eval_object_area each) placed by the habitat rule."""
        h, w = size = draw_size(rng, self.spec.eval_sizes)
        n_background = int(rng.integers(2, 4))
        classes = [int(x) for x in rng.choice(BASE_IDS, size=n_background, replace=False)]
        upper = background_split(h, w, rng)
        background = [(classes[0], upper), (classes[1], ~upper)]
        if n_background == 3:  # the lower part split again, left and right of a slanted line
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            left = xx < rng.uniform(0.3, 0.7) * w + np.tan(np.radians(rng.uniform(-25, 25))) * (yy - h / 2)
            background = [(classes[0], upper), (classes[1], ~upper & ~left), (classes[2], ~upper & left)]
        lo, hi = self.spec.eval_objects
        area = (self.spec.eval_object_area[0], self.spec.eval_object_area[1])
        objects, placed = [], []
        for _ in range(int(rng.integers(lo, hi + 1))):
            c, mask, in_habitat = self._place(rng, size, background, ALL_IDS, area)
            objects.append((c, mask))
            placed.append(in_habitat)
        scene = paint(rng, size, background + objects, len(background), BOUNDARY_UNLABELED)
        scene.info = {
            "background": [b for b, _ in background],
            "objects": [c for c, _ in objects],
            "in_habitat": placed,
            # share of the image where each object is visible (occlusion and the image border cut it)
            "visible_area": [round(float(((scene.labels == c) & m).mean()), 5) for c, m in objects],
        }
        return scene


__all__ = ["HabitatFamily", "draw_habitats"]
