"""The uniform-context family: today's mini benchmark, kept as the control of the habitat family.

Every background is drawn uniformly over the base classes, whatever the image shows, and the clutter
of an image-level photo is base-only. So the background is the *same* evidence for every tag: nothing
in the image-level data ties a class to its context, and a bank of other images' features can know
nothing the pooled classifier does not (docs/BASE_COLLAPSE.md, docs/CLAIM.md). ``larvseg demo
--benchmark uniform`` runs on it. Its output is byte-identical to the generator before the habitat
family existed (same draws in the same order).
"""

from __future__ import annotations

import numpy as np

from larvseg.data.synthetic.appearance import (
    BASE_CLASSES,
    DEMO_CLASSES,
    NOVEL_CLASSES,
    DemoClass,
    Scene,
    draw_size,
    render_scene,
)
from larvseg.data.synthetic.spec import BenchmarkSpec


def seg_scene(rng: np.random.Generator, spec: BenchmarkSpec) -> Scene:
    """C171-style training image: base classes only, all of them annotated."""
    base_ids = [DEMO_CLASSES.index(c) for c in BASE_CLASSES]
    n = int(rng.integers(1, 4))
    objects = [int(i) for i in rng.choice(base_ids, size=n)]
    return render_scene(rng, draw_size(rng, spec.sizes), objects, [(0.04, 0.2)] * n, boundary_unlabeled=0.3)


def imagenet_scene(rng: np.random.Generator, spec: BenchmarkSpec, cls: DemoClass) -> Scene:
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
    scene = render_scene(rng, draw_size(rng, spec.sizes), objects, fracs, background=others)
    scene.info = {"tag": k, "habitat": -1, "clutter": objects[:-1]}
    return scene


def eval_scene(rng: np.random.Generator, spec: BenchmarkSpec) -> Scene:
    """A847-style evaluation image: base background, one or two novel objects and maybe a base one."""
    base_ids = [DEMO_CLASSES.index(c) for c in BASE_CLASSES]
    novel_ids = [DEMO_CLASSES.index(c) for c in NOVEL_CLASSES]
    objects = [int(i) for i in rng.choice(novel_ids, size=int(rng.integers(1, 3)), replace=False)]
    if rng.uniform() < 0.5:
        objects.insert(0, int(rng.choice(base_ids)))
    return render_scene(rng, draw_size(rng, spec.sizes), objects, [(0.06, 0.2)] * len(objects), boundary_unlabeled=0.3)


class UniformFamily:
    """Scenes of the uniform-context family (the functions above) for one spec."""

    habitats: tuple[tuple[int, ...], ...] = ()  # no class has a habitat

    def __init__(self, spec: BenchmarkSpec) -> None:
        self.spec = spec

    def seg_scene(self, rng: np.random.Generator) -> Scene:
        return seg_scene(rng, self.spec)

    def imagenet_scene(self, rng: np.random.Generator, cls: DemoClass) -> Scene:
        return imagenet_scene(rng, self.spec, cls)

    def eval_scene(self, rng: np.random.Generator) -> Scene:
        return eval_scene(rng, self.spec)
