"""Datasets in the exact on-disk layouts, the cached file index, and every kind of bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from larvseg.config import IGNORE_INDEX, SourceConfig
from larvseg.data import file_index
from larvseg.data import testing as T
from larvseg.data.file_index import FolderIndex
from larvseg.data.io import (
    AnnotationError,
    CorruptImageError,
    DataError,
    DatasetRootError,
    EmptyDatasetError,
    LabelValueError,
    read_label,
)
from larvseg.data.sources import build_source_checked, build_vocabulary
from larvseg.data.vocabulary import (
    VocabularyError,
    imagenet_names,
    imagenet_subset,
    load_class_names,
)

WNIDS = imagenet_subset("ade847")[:3]


def png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def expected_labels(raw: np.ndarray, raw_to_name: dict[int, str], vocab, ignore: set[int]) -> np.ndarray:
    """Reference mapping, one raw value at a time."""
    out = np.full(raw.shape, -1, dtype=np.int64)
    for v in np.unique(raw).tolist():
        out[raw == v] = IGNORE_INDEX if v in ignore else vocab.index(raw_to_name[v])
    return out


def build(source, data_cfg, vocab, role="seg"):
    return build_source_checked(source, data_cfg, vocab, role).dataset


def test_ade150_png_values(tmp_path):
    T.write_ade150(tmp_path / "A150", n=2, size=(32, 40), values=[0, 1, 13, 150])
    cfg = T.make_config(
        tmp_path,
        seg=[SourceConfig(name="C171", format="coco171")],
        eval_source=SourceConfig(name="A150", format="ade150", split="training"),
    )
    vocab = build_vocabulary(cfg)  # union ids differ from ADE-150 train ids here
    ds = build(cfg.data.eval, cfg.data, vocab, "eval")
    names = load_class_names("ade150")
    assert len(ds) == 2 and ds.class_names == names and ds.class_ids.tolist() == vocab.ids(names).tolist()
    for i in range(2):
        item = ds.load(i)
        raw = png(ds.pairs[i][1])
        assert item["image"].shape == (32, 40, 3) and item["image"].dtype == np.uint8
        assert item["label"].dtype == np.uint16 and item["tags"] is None
        ref = expected_labels(raw, {v: names[v - 1] for v in range(1, 151)}, vocab, {0})
        assert np.array_equal(item["label"], ref)


def test_ade847_tif_keeps_16_bits(tmp_path):
    T.write_ade847(tmp_path / "A847", n=2, size=(32, 32), values=[0, 5, 300, 846, 65535])
    cfg = T.make_config(
        tmp_path, seg=[SourceConfig(name="C171", format="coco171")], tag=[SourceConfig(name="A847w", format="ade847")]
    )
    vocab = build_vocabulary(cfg)
    ds = build(cfg.data.tag_sources[0], cfg.data, vocab, "tag")
    names = load_class_names("ade847")
    for i in range(2):
        raw = tifffile.imread(ds.pairs[i][1])
        assert raw.dtype == np.uint16 and raw.max() > 255
        label = ds.load(i)["label"]
        assert np.array_equal(label, expected_labels(raw, dict(enumerate(names)), vocab, {65535}))
    assert read_label(ds.pairs[0][1]).dtype == np.uint16


def test_coco171_raw_ids_and_converted_train_ids(tmp_path):
    T.write_coco171(tmp_path / "C171", n=2, size=(32, 32), values=[0, 11, 12, 181, 255])
    T.write_coco171(tmp_path / "C171", n=1, size=(32, 32), split="conv", values=[0, 170, 255], train_ids=True)
    cfg = T.make_config(tmp_path, seg=[SourceConfig(name="C171", format="coco171", split="train2017")])
    vocab = build_vocabulary(cfg)
    import json

    from larvseg.data.vocabulary import CLASSLIST_DIR

    classes = json.loads((CLASSLIST_DIR / "coco_stuff171.json").read_text())["classes"]
    raw_to_name = {c["raw_id"]: c["merged_name"] for c in classes}
    unlisted = set(range(182)) - set(raw_to_name)
    assert 11 in unlisted and len(unlisted) == 11
    ds = build(cfg.data.seg_sources[0], cfg.data, vocab)
    for i in range(2):
        raw = png(ds.pairs[i][1])
        assert np.array_equal(ds.load(i)["label"], expected_labels(raw, raw_to_name, vocab, unlisted | {255}))
    conv = build(SourceConfig(name="C", format="coco171", split="conv"), cfg.data, vocab)
    assert conv.pairs[0][1].name.endswith("_labelTrainIds.png")
    raw = png(conv.pairs[0][1])
    train_to_name = {c["train_id"]: c["merged_name"] for c in classes}
    assert np.array_equal(conv.load(0)["label"], expected_labels(raw, train_to_name, vocab, {255}))
    # 182..254 are no COCO-Stuff id at all: an error, not ignore
    Image.fromarray(np.full((32, 32), 200, np.uint8)).save(ds.pairs[1][1])
    with pytest.raises(LabelValueError, match=rf"{ds.pairs[1][1].name}.*200"):
        ds.load(1)


def test_imagenet_folders_default_root_and_tags(tmp_path):
    T.write_imagenet(tmp_path / "I22K", WNIDS, per_class=2, size=(24, 32))
    (tmp_path / "I22K/fall11_whole" / WNIDS[0] / "notes.txt").write_text("not an image")
    wf = tmp_path / "w.txt"
    wf.write_text("\n".join(WNIDS))
    src = SourceConfig(name="IN3", format="imagenet", classes=str(wf))
    cfg = T.make_config(tmp_path, tag=[src])
    vocab = build_vocabulary(cfg)
    ds = build(src, cfg.data, vocab, "tag")
    assert len(ds) == 6 and ds.class_names == imagenet_names(str(wf))
    for i in range(6):
        item = ds.load(i)
        wnid = os.path.basename(os.path.dirname(item["path"]))
        assert item["path"].startswith(str(tmp_path / "I22K" / "fall11_whole"))
        assert item["tags"].tolist() == [vocab.index(ds.class_names[WNIDS.index(wnid)])]
        assert item["label"] is None and item["image"].shape == (24, 32, 3)
    with pytest.raises(ValueError, match="only be a tag source"):
        build(src, cfg.data, vocab, "seg")
    with pytest.raises(DatasetRootError, match="fall11_whole"):
        build(SourceConfig(name="x", format="imagenet", classes=str(wf), root="elsewhere"), cfg.data, vocab, "tag")


def test_custom_segmentation_and_tag_folders(tmp_path):
    T.write_custom_seg(tmp_path / "myseg", ["red thing", "blue thing", "wall"], n=2, size=(24, 24))
    T.write_custom_tags(tmp_path / "mytags", ["green thing", "red thing"], per_class=2, size=(24, 24))
    cfg = T.make_config(
        tmp_path,
        seg=[SourceConfig(name="mine", format="custom_seg", root="myseg")],
        tag=[SourceConfig(name="tags", format="custom_tags", root=str(tmp_path / "mytags"))],
    )
    vocab = build_vocabulary(cfg)
    assert vocab.names[:4] == ["red thing", "blue thing", "wall", "green thing"]
    seg = build(cfg.data.seg_sources[0], cfg.data, vocab)
    for i in range(2):
        raw = png(seg.pairs[i][1])
        ref = expected_labels(raw, {0: "red thing", 1: "blue thing", 2: "wall"}, vocab, {255})
        assert np.array_equal(seg.load(i)["label"], ref)
    tags = build(cfg.data.tag_sources[0], cfg.data, vocab, "tag")
    got = [tags.load(i)["tags"].tolist() for i in range(len(tags))]
    assert got == [[vocab.index("green thing")]] * 2 + [[vocab.index("red thing")]] * 2
    # a label value beyond the class file is an error naming the file
    Image.fromarray(np.full((24, 24), 3, np.uint8)).save(seg.pairs[0][1])
    with pytest.raises(LabelValueError, match=seg.pairs[0][1].name):
        seg.load(0)
    # an empty class folder
    (tmp_path / "mytags" / "empty one").mkdir()
    with pytest.raises(EmptyDatasetError, match="empty one"):
        build(
            SourceConfig(name="tags", format="custom_tags", root="mytags"),
            cfg.data,
            build_vocabulary(T.make_config(tmp_path, tag=[SourceConfig(format="custom_tags", root="mytags")])),
            "tag",
        )


def test_file_index_reused_and_rebuilt(tmp_path, monkeypatch):
    T.write_imagenet(tmp_path / "I22K", WNIDS, per_class=2, size=(8, 8))
    root = tmp_path / "I22K" / "fall11_whole"
    listed: list[str] = []
    real = file_index.list_folder
    monkeypatch.setattr(file_index, "list_folder", lambda folder: listed.append(folder.name) or real(folder))
    first = FolderIndex(root, tmp_path / "cache", progress=False).table(WNIDS)
    assert sorted(listed) == sorted(WNIDS) and len(first) == 6
    assert [first.path(i) for i in range(6)] == [root / w / f"{w}_{k}.JPEG" for w in WNIDS for k in range(2)]
    listed.clear()
    again = FolderIndex(root, tmp_path / "cache", progress=False)
    table = again.table(WNIDS)
    assert listed == [] and again.stats == {"listed": 0, "reused": 3}  # no re-listing at the next start
    assert [table.path(i) for i in range(6)] == [first.path(i) for i in range(6)]
    # a new file changes its folder's mtime: only that folder is listed again
    T.write_jpeg(root / WNIDS[1] / "zz_new.JPEG", np.zeros((8, 8, 3), np.uint8))
    os.utime(root / WNIDS[1], ns=(1, 1))  # whatever the file system's mtime granularity
    third = FolderIndex(root, tmp_path / "cache", progress=False)
    table = third.table(WNIDS)
    assert listed == [WNIDS[1]] and third.stats == {"listed": 1, "reused": 2}
    assert len(table) == 7 and table.path(4) == root / WNIDS[1] / "zz_new.JPEG"
    assert table.counts().tolist() == [2, 3, 2] and table.missing == []
    # a subset, a missing folder, and another root with its own cache file
    sub = FolderIndex(root, tmp_path / "cache", progress=False).table([WNIDS[2], "n00000000"])
    assert sub.missing == ["n00000000"] and sub.counts().tolist() == [2, 0]
    other = tmp_path / "other"
    T.write_imagenet(other, WNIDS[:1], per_class=1, size=(8, 8))
    assert len(FolderIndex(other / "fall11_whole", tmp_path / "cache", progress=False).table(WNIDS[:1])) == 1
    assert len(list((tmp_path / "cache").glob("file_index_*.npz"))) == 2
    # a damaged cache is rebuilt
    for f in (tmp_path / "cache").glob("*.npz"):
        f.write_bytes(b"garbage")
    listed.clear()
    assert len(FolderIndex(root, tmp_path / "cache", progress=False).table(WNIDS)) == 7 and len(listed) == 3


def test_the_imagenet_dataset_uses_the_index_cache(tmp_path, monkeypatch):
    T.write_imagenet(tmp_path / "I22K", WNIDS, per_class=1, size=(8, 8))
    wf = tmp_path / "w.txt"
    wf.write_text("\n".join(WNIDS))
    src = SourceConfig(name="IN", format="imagenet", classes=str(wf))
    cfg = T.make_config(tmp_path, tag=[src], index_cache_dir=str(tmp_path / "idx"))
    vocab = build_vocabulary(cfg)
    build(src, cfg.data, vocab, "tag")
    assert list((tmp_path / "idx").glob("*.npz"))
    monkeypatch.setattr(file_index, "list_folder", lambda folder: pytest.fail(f"re-listed {folder}"))
    assert len(build(src, cfg.data, vocab, "tag")) == 3


def test_bad_segmentation_inputs(tmp_path):
    T.write_ade847(tmp_path / "A847", n=5, size=(32, 32), values=[1, 2, 300])
    src = SourceConfig(name="A847", format="ade847")
    cfg = T.make_config(tmp_path, seg=[src])
    vocab = build_vocabulary(cfg)
    images = sorted((tmp_path / "A847/images/training").glob("*.jpg"))
    labels = sorted((tmp_path / "A847/annotations/training").glob("*.tif"))
    ds = build(src, cfg.data, vocab)
    data = images[0].read_bytes()
    images[0].write_bytes(data[: len(data) // 2])  # truncated JPEG
    with pytest.raises(CorruptImageError, match=rf"{images[0].name}.*cannot decode"):
        ds.load(0)
    images[1].write_bytes(b"definitely not a jpeg")
    with pytest.raises(CorruptImageError, match=images[1].name):
        ds.load(1)
    tifffile.imwrite(labels[2], np.ones((16, 32), np.uint16))
    with pytest.raises(AnnotationError, match=rf"{labels[2].name}.*32x16.*32x32"):
        ds.load(2)
    tifffile.imwrite(labels[3], np.full((32, 32), 847, np.uint16))  # 847 is not an ADE-847 class
    with pytest.raises(LabelValueError, match=rf"{labels[3].name}.*847"):
        ds.load(3)
    tifffile.imwrite(labels[4], np.zeros((32, 32, 3), np.uint16))  # an RGB map
    with pytest.raises(AnnotationError, match=labels[4].name):
        ds.load(4)
    labels[4].write_bytes(b"corrupt")
    with pytest.raises(CorruptImageError, match=labels[4].name):
        ds.load(4)
    # a missing annotation: an error, or with skip_bad a counted skip
    labels[0].unlink()
    with pytest.raises(AnnotationError, match=rf"{images[0].name} is missing"):
        build(src, cfg.data, vocab)
    built = build_source_checked(SourceConfig(name="A847", format="ade847", skip_bad=True), cfg.data, vocab, "seg")
    skipping, problems = built.dataset, built.problems
    assert len(skipping) == 4 and len(problems) == 1 and images[0].name in problems[0]
    # every problem is a DataError naming its path
    with pytest.raises(DataError) as info:
        skipping.load(0)
    assert info.value.path == str(images[1])


def test_wrong_root_and_empty_datasets(tmp_path):
    cfg = T.make_config(tmp_path, seg=[SourceConfig(format="ade150")])
    vocab = build_vocabulary(cfg)
    with pytest.raises(DatasetRootError, match=r"nowhere.*not found"):
        build(SourceConfig(name="x", format="ade150", root="nowhere"), cfg.data, vocab)
    with pytest.raises(DatasetRootError, match=str(tmp_path / "A847" / "images" / "training")):
        build(SourceConfig(name="x", format="ade847"), cfg.data, vocab)  # default root A847
    (tmp_path / "E/images/training").mkdir(parents=True)
    (tmp_path / "E/annotations/training").mkdir(parents=True)
    with pytest.raises(EmptyDatasetError, match="no images"):
        build(SourceConfig(name="e", format="ade847", root="E"), cfg.data, vocab)
    # ImageNet: unknown wnid, an empty and a missing class folder; with skip_bad, all folders empty
    T.write_imagenet(tmp_path / "I22K", WNIDS[:1], per_class=1, size=(8, 8))
    (tmp_path / "I22K/fall11_whole" / WNIDS[1]).mkdir()
    wf = tmp_path / "w.txt"
    wf.write_text("\n".join(WNIDS))
    src = SourceConfig(name="IN", format="imagenet", classes=str(wf))
    v2 = build_vocabulary(T.make_config(tmp_path, tag=[src]))
    with pytest.raises(EmptyDatasetError, match=rf"{WNIDS[1]}.*no image"):
        build(src, cfg.data, v2, "tag")
    built = build_source_checked(
        SourceConfig(name="IN", format="imagenet", classes=str(wf), skip_bad=True), cfg.data, v2, "tag"
    )
    skipping, problems = built.dataset, built.problems
    assert len(skipping) == 1 and len(problems) == 2
    assert "no image" in problems[0] and "class folder not found" in problems[1]
    (tmp_path / "I22K/fall11_whole" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG").unlink()
    with pytest.raises(EmptyDatasetError, match="no image in any"):
        build(SourceConfig(name="IN", format="imagenet", classes=str(wf), skip_bad=True), cfg.data, v2, "tag")
    wf.write_text("n12345678\n")
    with pytest.raises(VocabularyError, match="n12345678"):
        build(SourceConfig(name="IN", format="imagenet", classes=str(wf)), cfg.data, v2, "tag")
    with pytest.raises(ValueError, match="unknown format"):
        build(SourceConfig(name="IN", format="pascal"), cfg.data, v2, "tag")


def test_split_folder_detected_in_either_spelling_and_an_explicit_split_wins(tmp_path):
    """COCO-Stuff as the original README lays it out (images/{training,validation}) and as COCO names it
    (train2017/val2017): with split left empty the existing folder is found, per role; a set split is
    used as given."""
    seed = tmp_path / "seed"
    T.write_coco171(seed / "C171", n=2, size=(16, 16), split="training")
    T.write_coco171(seed / "C171", n=1, size=(16, 16), split="validation")
    cfg = T.make_config(seed, seg=[SourceConfig(name="C171", format="coco171")])
    vocab = build_vocabulary(cfg)
    src = cfg.data.seg_sources[0]
    built = build_source_checked(src, cfg.data, vocab, "seg")
    assert built.split.folder == "training" and built.split.detected and len(built.dataset) == 2
    assert {p.parent.name for pair in built.dataset.pairs for p in pair} == {"training"}
    assert built.split.describe() == "training (detected; looked for train2017, training)"
    evaluated = build_source_checked(src, cfg.data, vocab, "eval")  # the evaluation source: validation split
    assert evaluated.split.folder == "validation" and len(evaluated.dataset) == 1

    coco = tmp_path / "coco"
    T.write_coco171(coco / "C171", n=3, size=(16, 16), split="train2017")
    T.write_coco171(coco / "C171", n=1, size=(16, 16), split="training")  # both spellings: COCO's is preferred
    cfg2 = T.make_config(coco, seg=[SourceConfig(name="C171", format="coco171")])
    assert len(build(cfg2.data.seg_sources[0], cfg2.data, vocab)) == 3
    given = build_source_checked(SourceConfig(name="C171", format="coco171", split="training"), cfg2.data, vocab, "seg")
    assert len(given.dataset) == 1 and given.split.describe() == "training (as configured)"
    # a configured split that is absent while another spelling exists: the error says which
    with pytest.raises(DatasetRootError, match="train2017") as err:
        build(SourceConfig(name="C171", format="coco171", split="train2017"), cfg.data, vocab)
    assert "training" in str(err.value) and str(seed / "C171" / "images" / "train2017") in str(err.value)
    # no accepted spelling at all: the error lists them
    (tmp_path / "odd" / "C171" / "images" / "trn").mkdir(parents=True)
    cfg3 = T.make_config(tmp_path / "odd", seg=[SourceConfig(name="C171", format="coco171")])
    with pytest.raises(DatasetRootError, match="looked for train2017, training"):
        build(cfg3.data.seg_sources[0], cfg3.data, vocab)
    # ADE's spellings agree everywhere; an empty split finds them too
    T.write_ade150(seed / "A150", n=2, size=(16, 16), split="validation")
    cfg4 = T.make_config(seed, eval_source=SourceConfig(name="A150", format="ade150"))
    ade = build_source_checked(cfg4.data.eval, cfg4.data, build_vocabulary(cfg4), "eval")
    assert ade.split.folder == "validation" and len(ade.dataset) == 2


def test_a847_refuses_8bit_label_maps(tmp_path):
    T.write_ade847(tmp_path / "A847", n=2, size=(16, 16), values=[5, 65535])
    label = sorted((tmp_path / "A847" / "annotations" / "training").glob("*.tif"))[0]
    tifffile.imwrite(label, np.full((16, 16), 255, dtype=np.uint8))  # all "unlabeled" in 8 bits
    cfg = T.make_config(tmp_path)
    vocab = build_vocabulary(cfg)
    ds = build(SourceConfig(name="A847", format="ade847", split="training"), cfg.data, vocab, "seg")
    with pytest.raises(AnnotationError, match=r"8-bit label map, but A847 annotations are 16-bit.*class 'pier'"):
        ds.load(0)
    assert ds.load(1)["label"].dtype == np.uint16  # the 16-bit file next to it reads as before


def test_16bit_grey_images_are_scaled_by_range_not_clipped(tmp_path):
    from larvseg.data.io import read_image

    grey = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(grey).save(tmp_path / "g16.png")
    tifffile.imwrite(tmp_path / "g16.tif", grey)
    expected = np.rint(grey / 257.0).astype(np.uint8)
    for name in ("g16.png", "g16.tif"):
        rgb = read_image(tmp_path / name)
        assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
        np.testing.assert_array_equal(rgb[..., 0], expected)  # Pillow's convert("RGB") would give 255 almost everywhere
        assert (rgb == 255).mean() < 0.01
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(tmp_path / "g8.png")  # 8-bit grey: unchanged
    assert (read_image(tmp_path / "g8.png") == 7).all()
