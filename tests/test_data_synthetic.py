"""The mini benchmark generator, both families: real on-disk formats, base-only masks in C171, determinism by
seed (the habitat family's stated properties: tests/test_data_synthetic_habitat.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from larvseg.data import synthetic as bm

CLASSLISTS = Path(bm.__file__).resolve().parent.parent / "classlists"
SMALL = dict(num_seg=6, per_class=2, num_eval=5)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module", params=["habitat", "uniform"])
def bench(request, tmp_path_factory) -> bm.BenchmarkLayout:
    return bm.ensure_benchmark(
        tmp_path_factory.mktemp("bench") / "data", bm.BenchmarkSpec(seed=3, family=request.param, **SMALL)
    )


def test_class_ids_come_from_the_real_class_lists():
    ade = {c["short_name"]: c["train_id"] for c in json.loads((CLASSLISTS / "ade847.json").read_text())["classes"]}
    coco = json.loads((CLASSLISTS / "coco_stuff171.json").read_text())["classes"]
    merged = {c["merged_name"] for c in coco}
    synsets = dict(
        line.split("\t", 1)
        for line in (CLASSLISTS / "imagenet21k_synsets.tsv").read_text().splitlines()
        if not line.startswith("#")
    )
    for c in bm.DEMO_CLASSES:
        assert ade[c.name] == c.ade_train_id
        assert c.wnid in synsets  # every class has an ImageNet-style folder (as IN585 covers base classes)
        if c.role == "base":
            assert any(x["raw_id"] == c.coco_raw_id and x["merged_name"] == c.name for x in coco)
        else:  # novel: no COCO-Stuff mask anywhere, a real synset whose first lemma is the class name
            assert c.name not in merged and c.coco_raw_id == -1
            assert synsets[c.wnid].split(",")[0].strip() == c.name
    # no single cue identifies a class: (colour, pattern) pairs are unique, and every novel class
    # shares its colour or its pattern with some base class
    assert len({(c.color, c.pattern) for c in bm.DEMO_CLASSES}) == len(bm.DEMO_CLASSES)
    for c in bm.NOVEL_CLASSES:
        assert any(b.color == c.color or b.pattern == c.pattern for b in bm.BASE_CLASSES)


def test_layout_and_formats(bench: bm.BenchmarkLayout):
    family = json.loads(bench.meta.read_text())["spec"]["family"]
    base_coco = {c.coco_raw_id for c in bm.BASE_CLASSES}
    all_ade = {c.ade_train_id for c in bm.DEMO_CLASSES}
    novel_ade = {c.ade_train_id for c in bm.NOVEL_CLASSES}

    # C171: JPEG + uint8 png of raw COCO-Stuff ids, base classes only, 255 unlabeled
    images = sorted(bench.seg_images.glob("*.jpg"))
    assert len(images) == SMALL["num_seg"]
    seen_unlabeled = False
    for img in images:
        mask_img = Image.open(bench.seg_annotations / f"{img.stem}.png")
        assert mask_img.mode == "L"
        mask = np.array(mask_img)
        assert mask.shape == np.array(Image.open(img)).shape[:2]
        values = set(np.unique(mask).tolist())
        assert values - {255} <= base_coco, f"{img.name}: non-base ids {values - {255} - base_coco}"
        assert len(values - {255}) >= 1
        seen_unlabeled |= 255 in values
    assert Image.open(images[0]).format == "JPEG"

    # I22K: fall11_whole/<wnid>/<wnid>_<n>.JPEG for every class's synset, listed in the wnid file
    wnids = bench.wnid_file.read_text().split()
    assert wnids == [c.wnid for c in bm.DEMO_CLASSES]
    assert sorted(p.name for p in bench.imagenet.iterdir()) == sorted(wnids)
    for w in wnids:
        files = sorted((bench.imagenet / w).iterdir())
        assert len(files) == SMALL["per_class"]
        assert all(f.suffix == ".JPEG" and f.name.startswith(w + "_") for f in files)
        assert Image.open(files[0]).format == "JPEG"

    # beside the ImageNet layout: the generator's label map and object mask of every image, and its scene record
    scenes = json.loads(bench.scenes.read_text())
    assert len(scenes) == SMALL["per_class"] * len(wnids)
    for k, w in enumerate(wnids):
        for f in sorted((bench.imagenet / w).iterdir()):
            label = tifffile.imread(bench.imagenet_labels / w / f"{f.stem}.tif")
            mask = np.array(Image.open(bench.object_masks / w / f"{f.stem}.png"))
            assert label.dtype == np.uint16 and mask.dtype == np.uint8
            assert label.shape == mask.shape == np.array(Image.open(f)).shape[:2]
            assert np.array_equal(mask == 1, label == bm.DEMO_CLASSES[k].ade_train_id) and set(np.unique(mask)) <= {
                0,
                1,
            }
            assert scenes[f"{w}/{f.stem}"]["tag"] == k

    # A847: uint16 tif with ADE-847 train ids for all classes, 65535 unlabeled; every (uniform) image has a novel class
    tifs = sorted(bench.eval_annotations.glob("*.tif"))
    assert len(tifs) == SMALL["num_eval"]
    union: set[int] = set()
    for t in tifs:
        label = tifffile.imread(t)
        assert label.dtype == np.uint16
        assert label.shape == np.array(Image.open(bench.eval_images / f"{t.stem}.jpg")).shape[:2]
        values = set(np.unique(label).tolist())
        assert values - {65535} <= all_ade
        assert values & novel_ade or family == "habitat"
        union |= values
    assert 65535 in union and union & novel_ade


def test_deterministic_by_seed(tmp_path: Path, bench: bm.BenchmarkLayout):
    family = json.loads(bench.meta.read_text())["spec"]["family"]
    again = bm.write_benchmark(tmp_path / "again", bm.BenchmarkSpec(seed=3, family=family, **SMALL))
    assert _digest(again.root) == _digest(bench.root)
    other = bm.write_benchmark(tmp_path / "other", bm.BenchmarkSpec(seed=4, family=family, **SMALL))
    a, b = _digest(other.root), _digest(bench.root)
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a) > len(a) // 2


def test_ensure_reuses_and_regenerates(tmp_path: Path):
    root = tmp_path / "data"
    spec = bm.BenchmarkSpec(seed=1, num_seg=2, per_class=1, num_eval=1)
    bm.ensure_benchmark(root, spec)
    stamp = bm.BenchmarkLayout(root).meta.stat().st_mtime_ns
    bm.ensure_benchmark(root, spec)  # same spec: untouched
    assert bm.BenchmarkLayout(root).meta.stat().st_mtime_ns == stamp
    bm.ensure_benchmark(root, bm.BenchmarkSpec(seed=1, num_seg=3, per_class=1, num_eval=1))  # other spec: rebuilt
    assert len(list(bm.BenchmarkLayout(root).seg_images.glob("*.jpg"))) == 3
    assert not (tmp_path / "data.partial").exists()


def test_imagenet_scene_has_one_dominant_object_on_other_base_classes():
    spec = bm.BenchmarkSpec()
    base = {bm.DEMO_CLASSES.index(c) for c in bm.BASE_CLASSES}
    for i, cls in enumerate(bm.DEMO_CLASSES * 2):
        scene = bm.imagenet_scene(np.random.default_rng(i), spec, cls)
        k = bm.DEMO_CLASSES.index(cls)
        ids, counts = np.unique(scene.labels, return_counts=True)
        area = dict(zip(ids.tolist(), counts.tolist()))
        # everything else is another base class (no other novel class, not the object's own class)
        assert set(area) - {k} <= base - {k}
        # the novel object is the largest single object and a substantial part of the image
        assert area[k] / scene.labels.size > 0.08
        assert scene.image.dtype == np.uint8 and scene.image.shape[:2] == scene.labels.shape


def test_textures_distinguish_classes():
    """Mean colour separates hues; the pattern's spectrum separates classes of the same colour."""
    rng = np.random.default_rng(0)
    feats = {}
    for c in bm.DEMO_CLASSES:
        tex = bm.render_texture(c, 64, 64, rng)
        grey = tex.mean(axis=2)
        spec = np.abs(np.fft.fft2(grey - grey.mean()))
        feats[c.name] = (tex.reshape(-1, 3).mean(axis=0), spec[0, 1:16].sum(), spec[1:16, 0].sum(), grey.std())
    # same colour, different pattern: sky (plain) vs water (horizontal stripes vary along y)
    assert feats["water"][2] > 3 * feats["water"][1]
    assert feats["grass"][1] > 3 * feats["grass"][2]  # vertical stripes vary along x
    assert feats["sky"][3] < 0.2 * feats["water"][3]
