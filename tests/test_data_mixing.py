"""The mixed, deterministic, rank-sharded per-step loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from larvseg.config import IGNORE_INDEX, SourceConfig
from larvseg.data import testing as T
from larvseg.data.batch import TAG_PAD
from larvseg.data.eval_dataset import build_eval_dataset
from larvseg.data.mixing import MixedLoader, SourceSchedule, sample_seed, split_counts
from larvseg.data.sources import build_vocabulary
from larvseg.data.vocabulary import imagenet_subset

WNIDS = imagenet_subset("ade847")[:3]


def split_reference(total: int, weights: list[float]) -> list[int]:
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(np.floor(e)) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def test_split_counts_largest_remainder():
    for total, weights in [
        (8, [1, 1]),
        (8, [1, 1, 1]),
        (7, [0.3, 0.7]),
        (5, [2, 1, 1]),
        (0, [1, 3]),
        (9, [0.1, 0.1, 5]),
    ]:
        got = split_counts(total, weights)
        assert got == split_reference(total, weights) and sum(got) == total
    assert split_counts(8, [1, 1, 1]) == [3, 3, 2] and split_counts(3, [2, 1]) == [2, 1]


def test_schedule_walks_epoch_permutations():
    s = SourceSchedule(length=6, per_step=4, seed=1, source_index=2)
    seen = np.concatenate([s.indices(t) for t in range(3)])  # 12 = two epochs
    assert sorted(seen[:6].tolist()) == list(range(6)) and sorted(seen[6:].tolist()) == list(range(6))
    assert not np.array_equal(seen[:6], seen[6:])  # a new permutation each epoch
    assert np.array_equal(s.indices(1), SourceSchedule(6, 4, 1, 2).indices(1))
    assert not np.array_equal(seen[:6], np.concatenate([SourceSchedule(6, 4, 2, 2).indices(t) for t in range(3)])[:6])
    assert sample_seed(0, 1, 2, 3) == sample_seed(0, 1, 2, 3) != sample_seed(0, 1, 2, 4)


@pytest.fixture(scope="module")
def data_mixed_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    T.write_coco171(root / "C171", n=5, size=(40, 48), rng=rng)
    T.write_ade847(root / "A847", n=4, size=(40, 40), rng=rng)
    T.write_imagenet(root / "I22K", WNIDS, per_class=2, size=(32, 40), rng=rng)
    (root / "w.txt").write_text("\n".join(WNIDS))
    return root


def mixed_cfg(root, seed=3, **data):
    defaults = dict(seg_batch_size=4, tag_batch_size=3, scale=[64, 32], num_workers=0)
    defaults.update(data)
    return T.make_config(
        root,
        seed=seed,
        seg=[SourceConfig(name="C171", format="coco171", split="train2017", crop_size=32)],
        tag=[
            SourceConfig(name="A847w", format="ade847", crop_size=32, share=2.0, loss_weight=0.2, cac_topk=40),
            SourceConfig(
                name="IN", format="imagenet", classes=str(root / "w.txt"), crop_size=16, cac_topk=7, cac_weight=0.3
            ),
        ],
        **defaults,
    )


def steps(cfg, vocab, rank, world, n=3, start=0):
    it = iter(MixedLoader(cfg, vocab, rank, world, start_step=start))
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert a.step == b.step
    for x, y in zip(a.seg + a.tag, b.seg + b.tag):
        assert torch.equal(x.images, y.images) and x.paths == y.paths
        assert torch.equal(x.labels, y.labels) if hasattr(x, "labels") else torch.equal(x.tags, y.tags)


def test_batch_contents(data_mixed_root):
    cfg = mixed_cfg(data_mixed_root)
    vocab = build_vocabulary(cfg)
    first = steps(cfg, vocab, 0, 1, n=1)[0]
    assert (
        first.step == 0
        and [b.source for b in first.seg] == ["C171"]
        and [b.source for b in first.tag] == ["A847w", "IN"]
    )
    seg, a847w, inet = first.seg[0], *first.tag
    assert seg.images.shape == (4, 3, 32, 32) and seg.images.dtype == torch.float32
    assert seg.labels.shape == (4, 32, 32) and seg.labels.dtype == torch.int64 and seg.global_size == 4
    assert [len(a847w.images), len(inet.images)] == [2, 1]  # shares 2:1 of 3
    assert (a847w.loss_weight, a847w.cac_topk, inet.cac_topk, inet.cac_weight) == (0.2, 40, 7, 0.3)
    assert inet.images.shape == (1, 3, 16, 16) and inet.tags.shape == (1, 1)
    wnid = inet.paths[0].split("/")[-2]
    assert inet.tags[0, 0].item() == inet.class_ids[WNIDS.index(wnid)].item()
    # a segmentation set as a tag source: its tags are the classes of the augmented crop
    spec_index = 1
    samples = MixedLoader(cfg, vocab, 0, 1).loaders[spec_index].dataset
    index = SourceSchedule(4, 2, cfg.train.seed, 1).indices(0)
    widths = []
    for j in range(2):
        item = samples[(int(index[j]), sample_seed(cfg.train.seed, 1, 0, j))]
        present = np.unique(item["label"])
        present = present[present != IGNORE_INDEX]
        row = a847w.tags[j]
        assert row[row != TAG_PAD].tolist() == present.tolist() and len(present) > 0
        assert torch.equal(torch.from_numpy(item["image"]), a847w.images[j])
        # each row: its classes first, then TAG_PAD up to the widest row's number of classes
        assert row[: len(present)].tolist() == present.tolist() and (row[len(present) :] == TAG_PAD).all()
        widths.append(len(present))
    assert a847w.tags.shape[1] == max(widths)


def test_ranks_concatenate_to_one_process_and_seeds_repeat(data_mixed_root):
    cfg = mixed_cfg(data_mixed_root)
    vocab = build_vocabulary(cfg)
    one = steps(cfg, vocab, 0, 1)
    r0, r1 = steps(cfg, vocab, 0, 2), steps(cfg, vocab, 1, 2)
    for full, a, b in zip(one, r0, r1):
        for k in range(len(full.seg)):
            assert torch.equal(full.seg[k].images, torch.cat([a.seg[k].images, b.seg[k].images]))
            assert torch.equal(full.seg[k].labels, torch.cat([a.seg[k].labels, b.seg[k].labels]))
            assert full.seg[k].paths == a.seg[k].paths + b.seg[k].paths
            assert a.seg[k].global_size == b.seg[k].global_size == full.seg[k].global_size
        for k in range(len(full.tag)):
            assert torch.equal(full.tag[k].images, torch.cat([a.tag[k].images, b.tag[k].images]))
            assert full.tag[k].paths == a.tag[k].paths + b.tag[k].paths
            got = [t[t != TAG_PAD].tolist() for t in torch.cat([_pad(a.tag[k].tags, b.tag[k].tags)])]
            assert got == [t[t != TAG_PAD].tolist() for t in full.tag[k].tags]
    # IN has 1 image per step: rank 1 holds none of it, with the right shapes
    empty = r1[0].tag[1]
    assert empty.images.shape == (0, 3, 16, 16) and empty.tags.shape == (0, 1) and empty.global_size == 1
    # the same seed gives the same batches; another seed does not; resuming at step 2 gives step 2
    for x, y in zip(one, steps(cfg, vocab, 0, 1)):
        assert_same(x, y)
    other = steps(mixed_cfg(data_mixed_root, seed=4), vocab, 0, 1, n=1)[0]
    assert not torch.equal(other.seg[0].images, one[0].seg[0].images)
    assert_same(steps(cfg, vocab, 0, 1, n=1, start=2)[0], one[2])


def _pad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    width = max(a.shape[1], b.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=TAG_PAD)  # noqa: E731
    return torch.cat([pad(a), pad(b)])


def test_workers_change_nothing_and_finite_runs_stop(data_mixed_root):
    vocab = build_vocabulary(mixed_cfg(data_mixed_root))
    zero = steps(mixed_cfg(data_mixed_root), vocab, 1, 2, n=2)
    two = steps(mixed_cfg(data_mixed_root, num_workers=2), vocab, 1, 2, n=2)
    for x, y in zip(zero, two):
        assert_same(x, y)
    loader = MixedLoader(mixed_cfg(data_mixed_root), vocab, 0, 1, start_step=5, stop_step=7)
    assert [b.step for b in loader] == [5, 6]
    # start_at (how a resumed run positions the loader it was handed) equals starting there
    moved = MixedLoader(mixed_cfg(data_mixed_root), vocab, 1, 2)
    moved.start_at(1)
    assert_same(next(iter(moved)), zero[1])


def test_pin_memory_flag_reaches_the_loaders(data_mixed_root):
    cfg = mixed_cfg(data_mixed_root, tag_batch_size=0)
    vocab = build_vocabulary(cfg)
    for pin in (False, True):
        loader = MixedLoader(cfg, vocab, 0, 1, pin_memory=pin)
        assert [dl.pin_memory for dl in loader.loaders] == [pin]
    if torch.cuda.is_available():  # pinning itself needs an accelerator
        assert next(iter(MixedLoader(cfg, vocab, 0, 1, pin_memory=True))).seg[0].images.is_pinned()


def test_skip_bad_replaces_and_reports_unreadable_samples(tmp_path):
    T.write_coco171(tmp_path / "C171", n=3, size=(32, 32))
    bad = sorted((tmp_path / "C171/images/train2017").glob("*.jpg"))[1]
    bad.write_bytes(b"not a jpeg")
    src = SourceConfig(name="C171", format="coco171", split="train2017", crop_size=32, skip_bad=True)
    cfg = T.make_config(tmp_path, seg=[src], seg_batch_size=3, tag_batch_size=0)
    loader = MixedLoader(cfg, build_vocabulary(cfg), 0, 1)
    batch = next(iter(loader))
    assert batch.seg[0].images.shape[0] == 3 and str(bad) not in batch.seg[0].paths
    assert len(loader.skipped["C171"]) == 1 and bad.name in loader.skipped["C171"][0]
    from larvseg.data.io import CorruptImageError

    src.skip_bad = False
    with pytest.raises(CorruptImageError, match=bad.name):
        next(iter(MixedLoader(cfg, build_vocabulary(cfg), 0, 1)))
    cfg.data.num_workers = 1  # the error keeps its type and message through a worker process
    with pytest.raises(CorruptImageError, match=bad.name):
        next(iter(MixedLoader(cfg, build_vocabulary(cfg), 0, 1)))


def test_eval_dataset_resizes_the_image_not_the_label(tmp_path):
    T.write_ade847(tmp_path / "A847", n=1, size=(64, 96), split="validation", values=[300, 65535])
    cfg = T.make_config(tmp_path)
    cfg.eval.short_side = 32
    ds = build_eval_dataset(cfg, build_vocabulary(cfg))
    item = ds.load(0)
    assert len(ds) == 1 and item["image"].shape == (32, 48, 3) and item["image"].dtype == np.uint8
    assert item["label"].shape == (64, 96) and set(np.unique(item["label"]).tolist()) <= {300, IGNORE_INDEX}
