"""The procedural mini benchmark of ``larvseg demo`` and of the ``tiny_cpu`` smoke config, written in the
original datasets' on-disk layouts (C171 masks, ImageNet-21K folders, A847 evaluation masks).

- appearance: the classes (real names and ids), their colours and textures, shapes, painting a scene;
- habitat: the default family (habitats, clutter, whole photos, ADE-like evaluation);
- uniform: the uniform-context control (the benchmark before the habitat family);
- spec: what a benchmark holds (stored in its benchmark.json);
- writer: the layout on disk, writing and reusing a benchmark.
"""

from larvseg.data.synthetic.appearance import (
    BASE_CLASSES,
    DEMO_CLASSES,
    NOVEL_CLASSES,
    PATTERNS,
    BenchmarkError,
    DemoClass,
    Scene,
    render_scene,
    render_texture,
)
from larvseg.data.synthetic.habitat import HabitatFamily, draw_habitats
from larvseg.data.synthetic.spec import FAMILY_NAMES
from larvseg.data.synthetic.uniform import UniformFamily, eval_scene, imagenet_scene, seg_scene
from larvseg.data.synthetic.writer import (
    A847_UNLABELED,
    COCO_UNLABELED,
    FAMILIES,
    FORMAT_VERSION,
    SMOKE_SPEC,
    BenchmarkLayout,
    BenchmarkSpec,
    ensure_benchmark,
    ensure_smoke_data,
    read_habitats,
    write_benchmark,
)

__all__ = [
    "A847_UNLABELED",
    "BASE_CLASSES",
    "COCO_UNLABELED",
    "DEMO_CLASSES",
    "FAMILIES",
    "FAMILY_NAMES",
    "FORMAT_VERSION",
    "NOVEL_CLASSES",
    "PATTERNS",
    "SMOKE_SPEC",
    "BenchmarkError",
    "BenchmarkLayout",
    "BenchmarkSpec",
    "DemoClass",
    "HabitatFamily",
    "Scene",
    "UniformFamily",
    "draw_habitats",
    "ensure_benchmark",
    "ensure_smoke_data",
    "eval_scene",
    "imagenet_scene",
    "read_habitats",
    "render_scene",
    "render_texture",
    "seg_scene",
    "write_benchmark",
]
