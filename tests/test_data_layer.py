"""The data layer on tiny datasets written in the exact on-disk formats."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from larvseg.cli import main as cli_main
from larvseg.config import IGNORE_INDEX, Config, DataConfig, SourceConfig, TrainConfig
from larvseg.data import testing as T
from larvseg.data.datasets import build_source
from larvseg.data.file_index import FolderIndex
from larvseg.data.io import AnnotationError, CorruptImageError, DatasetRootError, EmptyDatasetError, LabelValueError
from larvseg.data.mixing import MixedLoader, build_eval_dataset, split_counts
from larvseg.data.transforms import TrainTransform, eval_resize, random_crop
from larvseg.data.vocabulary import (
    Vocabulary,
    VocabularyError,
    base_novel_split,
    build_vocabulary,
    imagenet_subset,
    load_class_names,
)

IN585_WNIDS = imagenet_subset("ade847")[:3]


def make_cfg(root, seg=(), tag=(), eval_source=None, **data) -> Config:
    return Config(
        name="t",
        data=DataConfig(root=str(root), seg_sources=list(seg), tag_sources=list(tag),
                        eval=eval_source or SourceConfig(name="A847", format="ade847", split="validation"),
                        index_cache_dir=str(root / "cache"), **{"num_workers": 0, **data}),
        train=TrainConfig(seed=3),
    )


# ---------------------------------------------------------------------------------------------- vocabulary


def test_union_vocabularies_and_base_novel(tmp_path):
    cfg = make_cfg(tmp_path, seg=[SourceConfig(name="C171", format="coco171")],
                   tag=[SourceConfig(name="A847w", format="ade847")])
    vocab = build_vocabulary(cfg)
    a847 = load_class_names("ade847")
    coco = set(load_class_names("coco171"))
    # COCO-Stuff's 160 merged names join ADE-847's short names ('-' and ' ' are one): 847 + 160 - 98
    assert len(set(coco)) == 160 and len(vocab) == 909
    assert vocab.names[:len(set(load_class_names("coco171")))] == list(dict.fromkeys(vocab.names[:160]))
    assert vocab.index("television-receiver") == vocab.index("television receiver")
    ids, base = base_novel_split(vocab, cfg)
    assert len(ids) == 847 and ids.tolist() == vocab.ids(a847).tolist()
    assert base.sum() == 98  # ADE-847 classes that have masks in C171

    cfg150 = make_cfg(tmp_path, seg=[SourceConfig(name="C171", format="coco171")],
                      eval_source=SourceConfig(name="A150", format="ade150", split="validation"))
    v150 = build_vocabulary(cfg150)
    _, base150 = base_novel_split(v150, cfg150)
    assert len(v150) == 247 and base150.sum() == 63  # the spec's 63 base classes of ADE-150


def test_imagenet_subsets_join_ade_by_matching():
    assert len(imagenet_subset("ade150")) == 124 and len(imagenet_subset("ade847")) == 585
    assert len(imagenet_subset("all")) == 21843
    cfg = Config(data=DataConfig(tag_sources=[SourceConfig(name="IN124", format="imagenet", classes="ade150")],
                                 eval=SourceConfig(format="ade150")))
    vocab = build_vocabulary(cfg)
    assert len(vocab) == 150  # all 124 synsets are ADE-150 classes
    full = Vocabulary.union(*[load_class_names("ade150")], [])
    with pytest.raises(KeyError):
        full.index("no such class")


def test_unknown_wnid_in_subset_file_is_an_error(tmp_path):
    f = tmp_path / "wnids.txt"
    f.write_text(f"{IN585_WNIDS[0]}\nn99999999  # typo\n")
    with pytest.raises(VocabularyError, match="n99999999"):
        imagenet_subset(str(f))


# ---------------------------------------------------------------------------------------------- formats


def test_ade847_keeps_all_16_bits_through_loading_and_batching(tmp_path):
    T.write_ade847(tmp_path / "A847", n=3, size=(64, 64), values=[300, 846, 65535, 5], split="training")
    cfg = make_cfg(tmp_path, seg=[SourceConfig(name="A847", format="ade847", crop_size=32)],
                   seg_batch_size=3, tag_batch_size=0, scale=[64, 64], ratio_range=[1.0, 1.0], num_workers=0)
    vocab = build_vocabulary(cfg)
    ds = build_source(cfg.data.seg_sources[0], cfg.data, vocab)
    raw = tifffile.imread(ds.pairs[0][1])
    item = ds.load(0)
    assert item["label"].dtype == np.uint16
    expected = np.where(raw == 65535, IGNORE_INDEX, raw)  # A847 alone: union ids == train ids
    assert np.array_equal(item["label"], expected)
    batch = next(iter(MixedLoader(cfg, vocab, 0, 1))).seg[0]
    values = set(torch.unique(batch.labels).tolist())
    assert values & {300, 846}, values  # ids >= 256 survive augmentation and batching
    assert values <= {5, 300, 846, IGNORE_INDEX}


def test_coco_raw_ids_and_train_id_files(tmp_path):
    T.write_coco171(tmp_path / "C171", n=2, size=(32, 32), values=[0, 11, 181, 255])
    cfg = make_cfg(tmp_path, seg=[SourceConfig(name="C171", format="coco171", split="train2017")])
    vocab = build_vocabulary(cfg)
    ds = build_source(cfg.data.seg_sources[0], cfg.data, vocab)
    raw = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(ds.pairs[0][1]))
    label = ds.load(0)["label"]
    assert np.all(label[raw == 0] == vocab.index("person"))
    assert np.all(label[raw == 181] == vocab.index("wood"))  # raw 181 = wood (train id 170)
    assert np.all(label[(raw == 11) | (raw == 255)] == IGNORE_INDEX)  # 11 is not a COCO-Stuff class
    # already-converted train ids
    T.write_coco171(tmp_path / "C2", n=1, size=(32, 32), values=[0, 170, 255], train_ids=True)
    ds2 = build_source(SourceConfig(name="C2", format="coco171", root="C2", split="train2017"), cfg.data, vocab)
    raw2 = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(ds2.pairs[0][1]))
    lab2 = ds2.load(0)["label"]
    assert ds2.pairs[0][1].name.endswith("_labelTrainIds.png")
    assert np.all(lab2[raw2 == 170] == vocab.index("wood")) and np.all(lab2[raw2 == 255] == IGNORE_INDEX)


def test_ade150_zero_is_unlabeled(tmp_path):
    T.write_ade150(tmp_path / "A150", n=1, size=(32, 32), values=[0, 1, 150])
    cfg = make_cfg(tmp_path, seg=[SourceConfig(name="A150", format="ade150")],
                   eval_source=SourceConfig(format="ade150", split="training"))
    vocab = build_vocabulary(cfg)
    ds = build_source(cfg.data.seg_sources[0], cfg.data, vocab)
    raw = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(ds.pairs[0][1]))
    label = ds.load(0)["label"]
    assert np.all(label[raw == 0] == IGNORE_INDEX)
    assert np.all(label[raw == 1] == vocab.index("wall")) and np.all(label[raw == 150] == vocab.index("flag"))


def test_imagenet_tags_and_custom_formats(tmp_path):
    T.write_imagenet(tmp_path / "I22K", IN585_WNIDS, per_class=2)
    wnid_file = tmp_path / "w.txt"
    wnid_file.write_text("\n".join(IN585_WNIDS))
    T.write_custom_seg(tmp_path / "myseg", ["red thing", "blue thing"], n=2)
    T.write_custom_tags(tmp_path / "mytags", ["green thing", "red thing"], per_class=2)
    cfg = make_cfg(tmp_path, seg=[SourceConfig(name="mine", format="custom_seg", root="myseg")],
                   tag=[SourceConfig(name="IN3", format="imagenet", classes=str(wnid_file), crop_size=32),
                        SourceConfig(name="tags", format="custom_tags", root="mytags", crop_size=32)])
    vocab = build_vocabulary(cfg)
    assert "red thing" in vocab and "green thing" in vocab
    inet = build_source(cfg.data.tag_sources[0], cfg.data, vocab, "tag")
    assert len(inet) == 6 and inet.single_tag
    for i in range(len(inet)):
        wnid = inet.files[i].parent.name
        assert inet.load(i)["tags"].tolist() == [vocab.index(inet.class_names[IN585_WNIDS.index(wnid)])]
    tags = build_source(cfg.data.tag_sources[1], cfg.data, vocab, "tag")
    assert [tags.load(i)["tags"].tolist()[0] for i in range(4)] == [vocab.index("green thing")] * 2 + [vocab.index("red thing")] * 2
    seg = build_source(cfg.data.seg_sources[0], cfg.data, vocab)
    label = seg.load(0)["label"]
    assert set(np.unique(label).tolist()) <= {vocab.index("red thing"), vocab.index("blue thing"), IGNORE_INDEX}


def test_file_index_is_cached_and_rebuilt_on_change(tmp_path):
    T.write_imagenet(tmp_path / "I22K", IN585_WNIDS[:2], per_class=2)
    root = tmp_path / "I22K" / "fall11_whole"
    index = FolderIndex(root, tmp_path / "cache", progress=False)
    first = index.files(IN585_WNIDS[:2])
    assert index.stats == {"listed": 2, "reused": 0} and len(first[IN585_WNIDS[0]]) == 2
    again = FolderIndex(root, tmp_path / "cache", progress=False)
    assert again.files(IN585_WNIDS[:2]) == first and again.stats == {"listed": 0, "reused": 2}
    T.write_jpeg(root / IN585_WNIDS[1] / "new.JPEG", np.zeros((8, 8, 3), np.uint8))
    import os
    os.utime(root / IN585_WNIDS[1], ns=(1, 1))  # make the change visible whatever the fs mtime granularity
    third = FolderIndex(root, tmp_path / "cache", progress=False)
    files = third.files(IN585_WNIDS[:2])
    assert third.stats == {"listed": 1, "reused": 1} and "new.JPEG" in files[IN585_WNIDS[1]]


# ---------------------------------------------------------------------------------------------- transforms


def test_train_transform_effects():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    label = T.blocky_labels(rng, 60, 90, [1, 300, 846, IGNORE_INDEX], np.uint16)
    tf = TrainTransform(crop_size=64, scale=(120, 40), ratio_range=(0.5, 2.0))
    for seed in range(5):
        img, lab = tf(image, label, np.random.default_rng(seed))
        assert img.shape == (3, 64, 64) and img.dtype == np.float32 and lab.dtype == np.uint16
        assert set(np.unique(lab).tolist()) <= {1, 300, 846, IGNORE_INDEX}  # nearest only: no new values
        again = tf(image, label, np.random.default_rng(seed))
        assert np.array_equal(img, again[0]) and np.array_equal(lab, again[1])
    # padding: a small image padded with 0 (image) and IGNORE (label)
    img, lab = TrainTransform(crop_size=64, scale=(32, 16), ratio_range=(1.0, 1.0))(image, label, np.random.default_rng(0))
    assert (lab[16:, :] == IGNORE_INDEX).all() and (img[:, 16:, :] == 0).all()


def test_random_crop_respects_cat_max_ratio():
    label = np.zeros((100, 100), np.uint16)
    label[:, 80:] = 7  # class 0 covers 80%: a 20x20 crop is accepted only if x0 >= 66 (15 of 81 offsets)
    image = np.zeros((100, 100, 3), np.uint8)

    def accepted(ratio: float) -> int:
        n = 0
        for seed in range(30):
            _, lab = random_crop(image, label, 20, ratio, np.random.default_rng(seed))
            counts = np.bincount(lab.ravel())
            counts = counts[counts > 0]
            n += int(counts.size > 1 and counts.max() / counts.sum() < 0.75)
        return n

    # with up to 10 retries most crops pass (18 of these 30); without the rule (ratio 1.0) about 1 in 5
    assert accepted(0.75) >= 15 and accepted(1.0) <= 10


def test_eval_resize_short_side():
    assert eval_resize(np.zeros((100, 300, 3), np.uint8), 50, 2048).shape == (50, 150, 3)
    assert eval_resize(np.zeros((100, 1000, 3), np.uint8), 50, 200).shape == (20, 200, 3)


# ---------------------------------------------------------------------------------------------- mixing


def _mixed_cfg(tmp_path, **data):
    T.write_ade847(tmp_path / "A847", n=5, size=(48, 48), split="training")
    T.write_coco171(tmp_path / "C171", n=5, size=(48, 48))
    T.write_imagenet(tmp_path / "I22K", IN585_WNIDS, per_class=2, size=(40, 40))
    wnids = tmp_path / "w.txt"
    wnids.write_text("\n".join(IN585_WNIDS))
    defaults = dict(seg_batch_size=4, tag_batch_size=3, scale=[64, 32], num_workers=0)
    defaults.update(data)
    return make_cfg(tmp_path, seg=[SourceConfig(name="C171", format="coco171", split="train2017", crop_size=32)],
                    tag=[SourceConfig(name="A847w", format="ade847", crop_size=32, share=2.0, loss_weight=0.2),
                         SourceConfig(name="IN", format="imagenet", classes=str(wnids), crop_size=16, cac_topk=7)],
                    **defaults)


def _steps(cfg, vocab, rank, world, n=3, start=0):
    it = iter(MixedLoader(cfg, vocab, rank, world, start_step=start))
    return [next(it) for _ in range(n)]


def test_mixed_batches_shard_exactly_and_deterministically(tmp_path):
    cfg = _mixed_cfg(tmp_path)
    vocab = build_vocabulary(cfg)
    one = _steps(cfg, vocab, 0, 1)
    assert [b.source for b in one[0].seg] == ["C171"] and [b.source for b in one[0].tag] == ["A847w", "IN"]
    assert [len(b.images) for b in one[0].tag] == [2, 1]  # shares 2:1 of 3
    tag = one[0].tag[1]
    assert tag.single_tag and tag.cac_topk == 7 and tag.global_size == 1 and tag.images.shape[-1] == 16
    assert not one[0].tag[0].single_tag and one[0].tag[0].loss_weight == 0.2
    # tags of a segmentation set = the classes in its augmented crop
    a847w = one[0].tag[0]
    assert (a847w.tags[:, 0] >= 0).all()
    r0, r1 = _steps(cfg, vocab, 0, 2), _steps(cfg, vocab, 1, 2)
    for full, a, b in zip(one, r0, r1):
        for k in range(len(full.seg)):
            assert torch.equal(full.seg[k].images, torch.cat([a.seg[k].images, b.seg[k].images]))
            assert torch.equal(full.seg[k].labels, torch.cat([a.seg[k].labels, b.seg[k].labels]))
        for k in range(len(full.tag)):
            assert torch.equal(full.tag[k].images, torch.cat([a.tag[k].images, b.tag[k].images]))
    # a rank can hold 0 images of a source: IN has 1 image per step, rank 1 gets none
    assert r1[0].tag[1].images.shape == (0, 3, 16, 16) and r1[0].tag[1].global_size == 1
    # resuming at step 2 gives step 2 again; workers change nothing
    assert torch.equal(_steps(cfg, vocab, 0, 1, n=1, start=2)[0].seg[0].images, one[2].seg[0].images)
    cfg_w = _mixed_cfg(tmp_path, num_workers=2)
    workers = _steps(cfg_w, vocab, 0, 1)
    assert all(torch.equal(x.seg[0].labels, y.seg[0].labels) and torch.equal(x.tag[1].images, y.tag[1].images)
               for x, y in zip(one, workers))


def test_split_counts():
    assert split_counts(8, [1, 1]) == [4, 4]
    assert split_counts(8, [1, 1, 1]) == [3, 3, 2]
    assert sum(split_counts(7, [0.3, 0.7])) == 7


def test_eval_dataset_resizes_image_not_label(tmp_path):
    T.write_ade847(tmp_path / "A847", n=1, size=(64, 96), split="validation")
    cfg = make_cfg(tmp_path)
    cfg.eval.short_side = 32
    item = build_eval_dataset(cfg, build_vocabulary(cfg)).load(0)
    assert item["image"].shape == (32, 48, 3) and item["label"].shape == (64, 96)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_errors_naming_the_file(tmp_path):
    T.write_ade847(tmp_path / "A847", n=4, size=(32, 32), values=[1, 2], split="training")
    cfg = make_cfg(tmp_path, seg=[SourceConfig(name="A847", format="ade847")])
    vocab = build_vocabulary(cfg)
    src = cfg.data.seg_sources[0]
    images = sorted((tmp_path / "A847/images/training").glob("*.jpg"))
    labels = sorted((tmp_path / "A847/annotations/training").glob("*.tif"))
    # truncated JPEG
    data = images[0].read_bytes()
    images[0].write_bytes(data[: len(data) // 2])
    ds = build_source(src, cfg.data, vocab)
    with pytest.raises(CorruptImageError, match=images[0].name):
        ds.load(0)
    # size mismatch
    tifffile.imwrite(labels[1], np.ones((16, 32), np.uint16))
    with pytest.raises(AnnotationError, match="16"):
        ds.load(1)
    # out-of-range label value (847 is not an ADE-847 class)
    tifffile.imwrite(labels[2], np.full((32, 32), 847, np.uint16))
    with pytest.raises(LabelValueError, match=f"{labels[2].name}.*847"):
        ds.load(2)
    # missing annotation: an error, or with skip_bad a counted skip
    labels[3].unlink()
    with pytest.raises(AnnotationError, match="missing"):
        build_source(src, cfg.data, vocab)
    skipping = build_source(SourceConfig(name="A847", format="ade847", skip_bad=True), cfg.data, vocab)
    assert len(skipping) == 3 and len(skipping.skipped) == 1
    # wrong root, empty dataset, empty class folder
    with pytest.raises(DatasetRootError, match="nowhere"):
        build_source(SourceConfig(name="x", format="ade847", root="nowhere"), cfg.data, vocab)
    (tmp_path / "E/images/training").mkdir(parents=True)
    (tmp_path / "E/annotations/training").mkdir(parents=True)
    with pytest.raises(EmptyDatasetError):
        build_source(SourceConfig(name="e", format="ade847", root="E"), cfg.data, vocab)
    T.write_imagenet(tmp_path / "I22K", IN585_WNIDS[:1])
    (tmp_path / "I22K/fall11_whole" / IN585_WNIDS[1]).mkdir()
    wf = tmp_path / "w.txt"
    wf.write_text("\n".join(IN585_WNIDS[:2]))
    inet = SourceConfig(name="IN", format="imagenet", classes=str(wf))
    v2 = Vocabulary.union(vocab.names, [])
    with pytest.raises(EmptyDatasetError, match=IN585_WNIDS[1]):
        build_source(inet, cfg.data, v2, "tag")


def test_skip_bad_replaces_and_counts_corrupt_samples(tmp_path):
    T.write_coco171(tmp_path / "C171", n=3, size=(32, 32))
    bad = sorted((tmp_path / "C171/images/train2017").glob("*.jpg"))[1]
    bad.write_bytes(b"not a jpeg")
    cfg = make_cfg(tmp_path, seg=[SourceConfig(name="C171", format="coco171", split="train2017", crop_size=32, skip_bad=True)],
                   seg_batch_size=3, tag_batch_size=0)
    loader = MixedLoader(cfg, build_vocabulary(cfg), 0, 1)
    batch = next(iter(loader))
    assert batch.seg[0].images.shape[0] == 3
    assert len(loader.skipped["C171"]) == 1 and bad.name in loader.skipped["C171"][0]
    cfg.data.seg_sources[0].skip_bad = False
    with pytest.raises(CorruptImageError, match=bad.name):
        next(iter(MixedLoader(cfg, build_vocabulary(cfg), 0, 1)))
    cfg.data.num_workers = 1  # the error keeps its type and message through a worker process
    with pytest.raises(CorruptImageError, match=bad.name):
        next(iter(MixedLoader(cfg, build_vocabulary(cfg), 0, 1)))


# ---------------------------------------------------------------------------------------------- data check


def test_data_check_reports_counts_and_problems(tmp_path, capsys):
    T.write_coco171(tmp_path / "C171", n=3, size=(32, 32), values=[0, 2])
    T.write_ade847(tmp_path / "A847", n=2, size=(32, 32), values=[0, 300], split="validation")
    T.write_imagenet(tmp_path / "I22K", IN585_WNIDS[:2], per_class=3)
    wf = tmp_path / "w.txt"
    wf.write_text("\n".join(IN585_WNIDS[:2]))
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        f"data:\n  root: {tmp_path}\n  seg_sources: [{{name: C171, format: coco171, split: train2017}}]\n"
        f"  tag_sources: [{{name: IN2, format: imagenet, classes: {wf}}}]\n"
        f"  eval: {{name: A847, format: ade847, split: validation}}\n  index_cache_dir: {tmp_path / 'cache'}\n"
    )
    assert cli_main(["data", "check", str(cfg_file)]) == 0
    out = capsys.readouterr().out
    assert "[seg] C171 (coco171): 3 images, classes 2/171, ok" in out
    assert "[tag] IN2 (imagenet): 6 images, classes 2/2, ok" in out
    assert "[eval] A847 (ade847): 2 images, classes 2/847, ok" in out
    tifffile.imwrite(sorted((tmp_path / "A847/annotations/validation").glob("*.tif"))[0], np.full((32, 32), 900, np.uint16))
    assert cli_main(["data", "check", str(cfg_file)]) == 1
    out = capsys.readouterr().out
    assert "1 problem(s)" in out and "900" in out
