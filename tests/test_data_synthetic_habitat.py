"""The habitat family's stated properties, checked on generated files (larvseg/data/synthetic/habitat.py):
habitats drawn from a seed, their frequency, clutter counts and classes, object sizes, whole photos in the
crop, tokens per evaluation image."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import tifffile
from PIL import Image

from larvseg.config import IGNORE_INDEX, load_config
from larvseg.data import synthetic as bm
from larvseg.data.synthetic.habitat import CLUTTER_AREA, DOMINANT_AREA
from larvseg.data.transforms import TrainTransform, source_scale

SPEC = bm.BenchmarkSpec(seed=5, num_seg=6, per_class=24, num_eval=24)  # 336 image-level photos
ADE_TO_DEMO = {c.ade_train_id: k for k, c in enumerate(bm.DEMO_CLASSES)}
BASE = {bm.DEMO_CLASSES.index(c) for c in bm.BASE_CLASSES}
NOVEL = {bm.DEMO_CLASSES.index(c) for c in bm.NOVEL_CLASSES}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> bm.BenchmarkLayout:
    return bm.write_benchmark(tmp_path_factory.mktemp("habitat") / "data", SPEC)


def _labels(bench: bm.BenchmarkLayout, key: str) -> np.ndarray:
    ade = tifffile.imread(bench.imagenet_labels / f"{key}.tif")
    out = np.full(ade.shape, -1, dtype=np.int64)
    for value, k in ADE_TO_DEMO.items():
        out[ade == value] = k
    return out


def test_habitats_are_drawn_from_the_recorded_seed(bench):
    table = bm.read_habitats(bench)
    assert table == list(bm.draw_habitats(SPEC.habitat_seed, SPEC.habitats_per_class))
    assert json.loads(bench.meta.read_text())["spec"]["habitat_seed"] == SPEC.habitat_seed
    for k, habitat in enumerate(table):
        assert len(set(habitat)) == SPEC.habitats_per_class and set(habitat) <= BASE - {k}
    assert bm.draw_habitats(1, 2) != bm.draw_habitats(0, 2)  # a different seed, a different table
    assert bm.draw_habitats(0, 2) == bm.draw_habitats(0, 2)


def test_habitat_frequency_and_clutter(bench):
    scenes = json.loads(bench.scenes.read_text())
    table = bm.read_habitats(bench)
    n = len(scenes)
    assert n == SPEC.per_class * len(bm.DEMO_CLASSES)
    in_habitat = [s for s in scenes.values() if s["habitat"] >= 0]
    # p_habitat = 0.7: within 3 binomial standard deviations
    assert abs(len(in_habitat) / n - SPEC.p_habitat) < 3 * np.sqrt(0.21 / n)
    clutter_counts = Counter(len(s["clutter"]) for s in scenes.values())
    assert set(clutter_counts) == {0, 1, 2}  # 0..max_clutter, each about a third
    assert all(abs(c / n - 1 / 3) < 0.1 for c in clutter_counts.values())
    clutter_classes = Counter(c for s in scenes.values() for c in s["clutter"])
    assert set(clutter_classes) & NOVEL  # clutter of any class, novel ones included
    for key, s in scenes.items():
        tag, labels = s["tag"], _labels(bench, key)
        present = set(np.unique(labels).tolist()) - {-1}
        assert tag not in s["clutter"] and tag not in s["background"]
        if s["habitat"] >= 0:  # the habitat is one of the tag's and is in the picture
            assert s["habitat"] in table[tag] and s["habitat"] in present
        assert present <= {tag, *s["background"], *s["clutter"]}
        assert set(s["background"]) <= BASE


def test_object_sizes(bench):
    scenes = json.loads(bench.scenes.read_text())
    tagged = np.array([(_labels(bench, key) == s["tag"]).mean() for key, s in scenes.items()])
    # never occluded; an ellipse may cover down to ~0.4x the drawn area (axes 0.7-1.3 x 0.6-1.1 of the radius)
    assert tagged.min() > 0.4 * DOMINANT_AREA[0] and tagged.max() < 1.6 * DOMINANT_AREA[1]
    assert DOMINANT_AREA[0] < np.median(tagged) < DOMINANT_AREA[1]
    assert CLUTTER_AREA[1] < DOMINANT_AREA[0]  # clutter is small next to the tagged object
    evals = json.loads(bench.eval_scenes.read_text())
    assert len(evals) == SPEC.num_eval
    lo, hi = SPEC.eval_objects
    areas = []
    for s in evals.values():
        assert lo <= len(s["objects"]) <= hi
        assert 2 <= len(s["background"]) <= 3 and set(s["background"]) <= BASE
        areas += s["visible_area"]
    a_lo, a_hi = SPEC.eval_object_area
    assert a_lo * 0.5 < np.median(areas) < a_hi and np.percentile(areas, 90) < 1.5 * a_hi
    placed = [p for s in evals.values() for p in s["in_habitat"]]
    assert 0.3 < np.mean(placed) <= SPEC.p_habitat  # the habitat rule, where a present background is someone's habitat


def test_tokens_per_image_and_whole_photos_in_the_crop(bench):
    for path in sorted(bench.eval_images.glob("*.jpg")):  # evaluated at their own size (demo: eval.short_side=0)
        with Image.open(path) as im:
            assert im.height // 16 >= 12 and im.width // 16 >= 12
    assert load_config("demo").eval.short_side == 0
    # the demo's tag source at ratio 1: the whole photo (every object pixel) is inside the crop
    cfg = load_config("demo")
    source = cfg.data.tag_sources[0]
    transform = TrainTransform(
        source.crop_size, source_scale(source, cfg.data), (1.0, 1.0), 1.0, flip_prob=0.0, photometric=False
    )
    rng = np.random.default_rng(0)
    for path in sorted(bench.imagenet.rglob("*.JPEG"))[::40]:
        image = np.array(Image.open(path).convert("RGB"))
        mask = np.array(Image.open(bench.object_masks / path.parent.name / f"{path.stem}.png")).astype(np.uint16)
        _, crop = transform(image, mask, rng)
        kept = crop != IGNORE_INDEX
        scale = kept.sum() / mask.size  # the whole photo, rescaled, and only padding around it
        assert kept.any(axis=1).sum() * kept.any(axis=0).sum() == kept.sum()
        assert max(kept.any(axis=1).sum(), kept.any(axis=0).sum()) == source.crop_size
        assert abs((crop == 1).sum() / (scale * mask.size) - (mask == 1).mean()) < 0.03
