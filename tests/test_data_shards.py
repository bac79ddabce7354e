"""WebDataset shards: `larvseg data shard` (every sample exactly once, bytes untouched, index counts,
resumable), reading them back by offset (equal to the folders) and as streams (pipe:, disjoint shards
per rank and worker, exact resume), and the errors of bad shard lists."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from larvseg.cli import main as cli_main
from larvseg.config import IGNORE_INDEX, SourceConfig
from larvseg.data import shards as wds
from larvseg.data import testing as T
from larvseg.data.io import DataError, read_label
from larvseg.data.mixing import MixedLoader
from larvseg.data.shard_stream import StreamPlan
from larvseg.data.shard_writer import ShardWriter, parse_size
from larvseg.data.sources import build_source_checked, build_vocabulary
from larvseg.data.vocabulary import imagenet_names, imagenet_subset, normalize_name

WNIDS = imagenet_subset("ade847")[:4]


def build_source(source, cfg_data, vocab, role):
    return build_source_checked(source, cfg_data, vocab, role).dataset


def test_brace_expansion_and_sizes():
    assert wds.expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert wds.expand_braces("{a,b}/{8..10}") == ["a/8", "a/9", "a/10", "b/8", "b/9", "b/10"]
    assert wds.expand_braces("pipe:cat x.tar") == ["pipe:cat x.tar"]
    assert wds.split_member("dir/000012.label.png") == ("dir/000012", "label.png")
    assert parse_size("512MB") == 512_000_000 and parse_size("1GiB") == 2**30 and parse_size("4096") == 4096
    with pytest.raises(ValueError, match="shard-size"):
        parse_size("big")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    T.write_imagenet(root / "I22K", WNIDS, per_class=3, size=(32, 40), rng=rng)
    (root / "w.txt").write_text("\n".join(WNIDS))
    T.write_custom_tags(root / "tags", ["red fox", "sea lion"], per_class=2, size=(24, 32), rng=rng)
    T.write_coco171(root / "C171", n=5, size=(40, 48), rng=rng, split="train2017")
    T.write_ade847(root / "A847", n=3, size=(32, 32), rng=rng)  # 16-bit TIFF labels
    sources = {
        "IN": (SourceConfig(name="IN", format="imagenet", root=str(root / "I22K"), classes=str(root / "w.txt")), 5),
        "tags": (SourceConfig(name="tags", format="custom_tags", root=str(root / "tags")), 2),
        "C171": (SourceConfig(name="C171", format="coco171", root=str(root / "C171"), split="train2017"), 2),
        "A847": (SourceConfig(name="A847", format="ade847", root=str(root / "A847")), 2),
    }
    cfg = T.make_config(root)
    for name, (source, per_shard) in sources.items():
        ShardWriter(
            source, cfg.data, root / f"{name}_shards", shard_bytes=10**9, shard_samples=per_shard, progress=False
        ).run()
    return root, sources


def read_shards(folder: Path, pattern: str = "shard-*.tar") -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over the shards of the folder, asserting no key appears twice."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(folder.glob(pattern)):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, ext = wds.split_member(member.name)
                assert ext not in samples.setdefault(key, {}), f"{member.name} twice"
                samples[key][ext] = tar.extractfile(member).read()
    return samples


@pytest.mark.parametrize("name", ["IN", "tags", "C171", "A847"])
def test_every_sample_once_with_its_label_or_tag(data, name):
    root, sources = data
    source, per_shard = sources[name]
    src_root = Path(source.root)
    index = json.loads((root / f"{name}_shards" / "index.json").read_text())
    samples = read_shards(root / f"{name}_shards")
    if source.format in ("imagenet", "custom_tags"):
        images = sorted(p for p in src_root.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    else:
        images = sorted((src_root / "images" / (source.split or "training")).iterdir())  # "": detected
    paths = [json.loads(s["json"])["path"] for s in samples.values()]
    assert sorted(paths) == sorted(str(p.relative_to(src_root)) for p in images)  # each image exactly once
    assert index["complete"] and sum(s["samples"] for s in index["shards"]) == len(images) == index["samples"]
    assert all(s["samples"] <= per_shard for s in index["shards"]) and len(index["shards"]) == -(
        -len(images) // per_shard
    )
    names = index["class_names"]
    totals = np.zeros(len(names), dtype=np.int64)
    for entry in index["shards"]:  # per shard: its samples, and its class histogram in the .npz
        shard_counts: Counter = Counter()
        for members in read_shards(root / f"{name}_shards", entry["name"]).values():
            meta = json.loads(members["json"])
            image_ext = next(e for e in members if e in wds.IMAGE_EXTS)
            assert members[image_ext] == (src_root / meta["path"]).read_bytes()  # bytes untouched
            if index["kind"] == "tag":
                folder = Path(meta["path"]).parts[-2]
                expected = imagenet_names(str(root / "w.txt"))[WNIDS.index(folder)] if name == "IN" else folder
                assert names[int(members["cls"])] == meta["class"] == expected
                shard_counts[int(members["cls"])] += 1
            else:
                label_ext = next(e for e in members if e.startswith("label."))
                assert label_ext == "label" + Path(meta["label"]).suffix
                assert members[label_ext] == (src_root / meta["label"]).read_bytes()
                coding = index["label_codings"][meta["coding"]]
                raw = np.unique(read_label(src_root / meta["label"]))
                lookup = dict(zip(coding["values"], coding["classes"]))
                assert all(int(v) in lookup or int(v) in coding["ignore"] for v in raw)
                shard_counts.update({lookup[int(v)] for v in raw if int(v) in lookup})
        with np.load(root / f"{name}_shards" / entry["name"].replace(".tar", ".npz")) as z:
            assert dict(zip(z["hist_classes"].tolist(), z["hist_counts"].tolist())) == dict(shard_counts)
        for c, n in shard_counts.items():
            totals[c] += n
    assert index["class_counts"] == totals.tolist() and totals.sum() >= len(images)


def test_shuffled_order_is_the_seeded_permutation_of_the_folder(data):
    """Position k of the shards holds the folder's sample permutation(seed 0)[k]: the shards mix classes
    (the folder order would put all of a class together) and the order is reproducible."""
    root, sources = data
    folder_src = sources["IN"][0]
    cfg = T.make_config(root, tag=[folder_src])
    folder = build_source(folder_src, cfg.data, build_vocabulary(cfg), "tag")
    folder_paths = [str(Path(folder.load(i)["path"]).relative_to(folder_src.root)) for i in range(len(folder))]
    samples = read_shards(root / "IN_shards")
    keys = sorted(samples)
    assert keys == [f"{k:09d}" for k in range(len(folder_paths))]  # every position once, in shard order
    order = [json.loads(samples[k]["json"])["path"] for k in keys]
    assert order == [folder_paths[i] for i in np.random.default_rng(0).permutation(len(folder_paths))]
    first = json.loads((root / "IN_shards" / "index.json").read_text())["shards"][0]["samples"]
    # the first shard: all 4 classes; in folder order its 5 samples would hold 2 (3 images per class)
    assert len({Path(p).parts[-2] for p in order[:first]}) == 4
    assert len({Path(p).parts[-2] for p in folder_paths[:first]}) == 2


def test_random_access_equals_folders(data):
    root, sources = data
    for name in sources:
        folder_src = sources[name][0]
        shard_src = SourceConfig(name=name + "s", format="webdataset", root=f"{name}_shards")
        role = "tag" if folder_src.format in ("imagenet", "custom_tags") else "seg"
        cfg = T.make_config(
            root,
            seg=[folder_src, shard_src] if role == "seg" else [],
            tag=[folder_src, shard_src] if role == "tag" else [],
        )
        vocab = build_vocabulary(cfg)
        folder = build_source(folder_src, cfg.data, vocab, role)
        sharded = build_source(shard_src, cfg.data, vocab, role)
        assert len(sharded) == len(folder)
        assert np.array_equal(sharded.class_ids, folder.class_ids)
        by_path = {}
        for i in range(len(folder)):
            item = folder.load(i)
            by_path[str(Path(item["path"]).relative_to(folder_src.root))] = item
        samples = read_shards(root / f"{name}_shards")
        keys = sorted(samples)
        for i in reversed(range(len(keys))):  # random access: any index, in any order, is that sample
            key = keys[i]
            got = sharded.load(i)
            want = by_path[json.loads(samples[key]["json"])["path"]]
            assert np.array_equal(got["image"], want["image"])
            for field in ("label", "tags"):
                assert (got[field] is None and want[field] is None) or np.array_equal(got[field], want[field])
            if got["label"] is not None:
                assert got["label"].dtype == np.uint16 and (got["label"] != IGNORE_INDEX).any()


def test_writer_resumes_after_interruption(data, monkeypatch, tmp_path):
    root, sources = data
    source = sources["IN"][0]
    cfg = T.make_config(root)
    calls = {"n": 0}
    original = ShardWriter._write_shard

    def dies_after_two(self, k, first, bar):
        if calls["n"] == 2:
            (self.out / "shard-000002.tar.tmp999").write_bytes(b"partial")  # what a kill leaves behind
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, k, first, bar)

    monkeypatch.setattr(ShardWriter, "_write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        ShardWriter(source, cfg.data, tmp_path, 10**9, shard_samples=5, progress=False).run()
    index = json.loads((tmp_path / "index.json").read_text())
    assert not index["complete"] and len(index["shards"]) == 2
    with pytest.raises(wds.ShardError, match="incomplete"):
        wds.resolve_shards(str(tmp_path), "", root)
    monkeypatch.setattr(ShardWriter, "_write_shard", original)
    written = []
    monkeypatch.setattr(
        ShardWriter, "_write_shard", lambda self, k, first, bar: written.append(k) or original(self, k, first, bar)
    )
    ShardWriter(source, cfg.data, tmp_path, 10**9, shard_samples=5, progress=False).run()
    assert written == [2]  # only the missing shard was written
    assert not list(tmp_path.glob("*.tmp*"))
    for tar_path in (root / "IN_shards").glob("shard-*"):  # byte-identical to the uninterrupted run
        assert (tmp_path / tar_path.name).read_bytes() == tar_path.read_bytes(), tar_path.name
    assert json.loads((tmp_path / "index.json").read_text()) == json.loads(
        (root / "IN_shards" / "index.json").read_text()
    )
    # other settings into the same folder: refused, not mixed
    with pytest.raises(wds.ShardError, match="shard_samples"):
        ShardWriter(source, cfg.data, tmp_path, 10**9, shard_samples=4, progress=False).run()


def test_shard_command(data, tmp_path, capsys):
    root, _ = data
    out = tmp_path / "cli"
    code = cli_main(
        [
            "data",
            "shard",
            str(root / "C171"),
            "--out",
            str(out),
            "--format",
            "coco171",
            "--split",
            "train2017",
            "--shard-size",
            "12kB",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0 and "5 samples in" in captured.out
    assert "sharding C171" in captured.err and "5/5" in captured.err  # the progress bar
    index = json.loads((out / "index.json").read_text())
    assert len(index["shards"]) > 1 and sum(s["samples"] for s in index["shards"]) == 5
    assert all(
        (out / s["name"]).stat().st_size <= 12_000 + 10_240 for s in index["shards"]
    )  # tar pads to 10 KiB records
    assert (
        cli_main(["data", "shard", str(root / "nowhere"), "--out", str(tmp_path / "x"), "--format", "custom_seg"]) == 1
    )
    assert "nowhere" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Streaming


def test_stream_plan_partitions_shards_per_epoch():
    plan = StreamPlan([f"s{k}" for k in range(11)], np.arange(1, 12), seed=1, source_index=0, streams=4)
    for epoch in range(3):
        parts = [plan.shards_of(g, epoch).tolist() for g in range(4)]
        assert sorted(s for part in parts for s in part) == list(
            range(11)
        )  # every shard once, no two streams share one
    assert plan.shards_of(0, 0).tolist() != plan.shards_of(0, 1).tolist()
    # a position maps to (epoch, shard, sample) consistently with the per-epoch lengths
    n0 = int(plan.counts[plan.shards_of(2, 0)].sum())
    assert plan.locate(2, 0) == (0, 0, 0) and plan.locate(2, n0) == (1, 0, 0)
    assert plan.locate(2, n0 - 1)[0] == 0
    with pytest.raises(wds.ShardError, match="11 shards cannot feed 12 streams"):
        StreamPlan([f"s{k}" for k in range(11)], np.ones(11), 0, 0, streams=12)


def stream_cfg(root, workers=0, seed=5):
    pattern = f"pipe:cat {root}/IN_shards/shard-{{000000..000002}}.tar"  # 12 images in 3 shards
    return T.make_config(
        root,
        seed=seed,
        num_workers=workers,
        seg_batch_size=3,
        tag_batch_size=3,
        scale=[64, 32],
        seg=[SourceConfig(name="C", format="webdataset", root="C171_shards", crop_size=32)],
        tag=[
            SourceConfig(
                name="IN", format="webdataset", root=pattern, index=f"{root}/IN_shards/index.json", crop_size=16
            )
        ],
    )


def take(cfg, vocab, rank, world, start, n):
    it = iter(MixedLoader(cfg, vocab, rank, world, start_step=start))
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_source_resumes_exactly(data, workers):
    root, _ = data
    cfg = stream_cfg(root, workers)
    vocab = build_vocabulary(cfg)
    full = take(cfg, vocab, 0, 1, 0, 7)
    resumed = take(cfg, vocab, 0, 1, 4, 3)
    for a, b in zip(full[4:], resumed):
        assert a.step == b.step
        for x, y in zip(a.seg + a.tag, b.seg + b.tag):
            assert x.paths == y.paths and torch.equal(x.images, y.images)
    tag_paths = [p for s in full for p in s.tag[0].paths]
    assert all(p.startswith("pipe:cat ") for p in tag_paths) and len(set(tag_paths)) > 6


def test_streams_of_ranks_and_workers_read_disjoint_shards(data):
    root, _ = data
    cfg = stream_cfg(root, workers=0)
    vocab = build_vocabulary(cfg)
    # 3 shards, 2 ranks x 1 worker: in the first epoch rank 0 and rank 1 read different shards
    seen = {}
    for rank in range(2):
        batches = take(cfg, vocab, rank, 2, 0, 2)
        seen[rank] = {p.split(":")[1] for b in batches for p in b.tag[0].paths}
        assert sum(len(b.tag[0].paths) for b in batches) == 2 * (2 if rank == 0 else 1)  # array_split of 3
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    with pytest.raises(wds.ShardError, match="3 shards cannot feed 4 streams"):
        MixedLoader(stream_cfg(root, workers=2), vocab, 0, 2)


def test_local_shards_can_stream(data):
    """``stream: true`` on local shards: read in sequence (no random access), every sample with its tag."""
    root, _ = data
    cfg = T.make_config(
        root,
        tag_batch_size=4,
        tag=[SourceConfig(name="IN", format="webdataset", root="IN_shards", stream=True, crop_size=16)],
    )
    vocab = build_vocabulary(cfg)
    source = build_source(cfg.data.tag_sources[0], cfg.data, vocab, "tag")
    with pytest.raises(TypeError, match="streamed shards have no random access"):
        source.load(0)
    samples = read_shards(root / "IN_shards")
    names = imagenet_names(str(root / "w.txt"))
    batches = take(cfg, vocab, 0, 1, 0, 3)  # 12 samples: one epoch
    streamed = [(p, tags[0].item()) for b in batches for p, tags in zip(b.tag[0].paths, b.tag[0].tags)]
    assert len({p for p, _ in streamed}) == len(samples) == 12  # each sample once
    for path, tag in streamed:
        shard, key = path.rsplit(":", 1)[0], path.rsplit(":", 1)[1].split(".")[0]
        assert Path(shard).parent == root / "IN_shards" and key in samples  # read from the local shard files
        folder = Path(json.loads(samples[key]["json"])["path"]).parts[-2]
        assert vocab.names[tag] == normalize_name(names[WNIDS.index(folder)])  # the sample's own class


def test_bad_shard_lists_are_named(data, tmp_path):
    root, _ = data
    with pytest.raises(wds.ShardError, match="needs the source's 'index'"):
        wds.resolve_shards("pipe:cat a-{0..1}.tar", "", root)
    with pytest.raises(wds.ShardError, match="gives 2 shards but its index .* lists 3"):
        wds.resolve_shards(f"{root}/IN_shards/shard-{{000000..000001}}.tar", "", root)
    with pytest.raises(wds.ShardError, match="does not name shard shard-000000.tar"):
        wds.resolve_shards(f"{root}/IN_shards/shard-{{000001,000000,000002}}.tar", "", root)
    with pytest.raises(wds.ShardError, match="not a LarvSeg shard index"):
        (tmp_path / "index.json").write_text("{}")
        wds.resolve_shards(str(tmp_path), "", root)
    with pytest.raises(ValueError, match="only be a tag source"):
        cfg = T.make_config(root, seg=[SourceConfig(name="IN", format="webdataset", root="IN_shards")])
        build_source(cfg.data.seg_sources[0], cfg.data, build_vocabulary(cfg), "seg")
    # a failing pipe: command and a corrupt shard name their command / file
    with pytest.raises(wds.ShardError, match="exited with status"):
        with wds.open_url("pipe:cat /nonexistent/shard.tar") as f:
            list(wds.iter_tar_samples(f, "x"))
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(b"not a tar" * 100)
    with pytest.raises(wds.ShardError, match="corrupt.tar: not a readable tar shard"):
        with wds.open_url(str(corrupt)) as f:
            list(wds.iter_tar_samples(f, str(corrupt)))


def test_data_check_reads_shard_sources(data):
    from larvseg.data.check import check_config

    root, _ = data
    cfg = stream_cfg(root)
    cfg.data.eval = SourceConfig(name="A847s", format="webdataset", root="A847_shards")
    reports = check_config(cfg)
    assert [r.problems for r in reports] == [[], [], []]
    assert [r.images for r in reports] == [5, 12, 3] and all(r.classes_seen > 0 for r in reports)
    assert reports[0].checked == 5 and reports[1].checked == 0  # offsets: decoded; streamed: from the index


def test_streamed_bad_image_is_replaced_without_shifting_positions(data, tmp_path):
    root, _ = data
    folder = tmp_path / "tags"
    T.write_custom_tags(folder, ["a", "b"], per_class=3, size=(24, 32), rng=np.random.default_rng(3))
    bad = folder / "b" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated JPEG: the writer copies it, decoding fails later
    cfg = T.make_config(tmp_path)
    ShardWriter(
        SourceConfig(name="t", format="custom_tags", root=str(folder)),
        cfg.data,
        tmp_path / "s",
        10**9,
        shard_samples=3,
        progress=False,
    ).run()

    def loader(skip_bad):
        c = T.make_config(
            tmp_path,
            seed=1,
            seg_batch_size=0,
            tag_batch_size=2,
            scale=[64, 32],
            tag=[SourceConfig(name="t", format="webdataset", root="s", stream=True, crop_size=16, skip_bad=skip_bad)],
        )
        return MixedLoader(c, build_vocabulary(c), 0, 1)

    with pytest.raises(DataError, match=r"s/shard-00000\d\.tar:\d+\.jpg: cannot decode image"):
        for _ in zip(range(3), loader(False)):
            pass
    skipping = loader(True)
    batches = [b for _, b in zip(range(3), skipping)]  # one epoch: 6 positions
    paths = [p for b in batches for p in b.tag[0].paths]
    assert len(skipping.skipped["t"]) == 1 and "cannot decode image" in skipping.skipped["t"][0]
    assert len(paths) == 6 and len(set(paths)) == 5  # the bad position repeats a good neighbour


def test_http_shards_stream_with_the_index_next_to_them(data):
    import functools
    import http.server
    import threading

    root, _ = data
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root / "IN_shards"))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard-{{000000..000002}}.tar"
        cfg = stream_cfg(root, seed=5)
        cfg.data.tag_sources[0].root, cfg.data.tag_sources[0].index = url, ""  # index.json next to the shards
        remote = take(cfg, build_vocabulary(cfg), 0, 1, 0, 5)
        local = stream_cfg(root, seed=5)  # the same shards through pipe:cat
        piped = take(local, build_vocabulary(local), 0, 1, 0, 5)
        for a, b in zip(remote, piped):
            assert [p.rsplit(":", 1)[1] for p in a.tag[0].paths] == [p.rsplit(":", 1)[1] for p in b.tag[0].paths]
            assert a.tag[0].paths[0].startswith("http://") and torch.equal(a.tag[0].images, b.tag[0].images)
    finally:
        server.shutdown()


def test_writer_bad_label_stops_or_is_skipped(tmp_path):
    from PIL import Image

    T.write_custom_seg(tmp_path / "seg", ["sky", "tree", "road"], n=4, rng=np.random.default_rng(2))
    bad = tmp_path / "seg" / "annotations" / "img2.png"
    Image.fromarray(np.full((48, 64), 7, np.uint8)).save(bad)  # 7 is no class of 3 (and not 255)
    cfg = T.make_config(tmp_path)
    source = SourceConfig(name="s", format="custom_seg", root=str(tmp_path / "seg"))
    with pytest.raises(DataError, match=r"img2\.png: .*label values outside the source's classes: \[7\]"):
        ShardWriter(source, cfg.data, tmp_path / "out1", 10**9, progress=False).run()
    source.skip_bad = True
    index = ShardWriter(source, cfg.data, tmp_path / "out2", 10**9, progress=False).run()
    assert (
        sum(s["samples"] for s in index["shards"]) == 3
        and len(index["skipped"]) == 1
        and "img2.png" in index["skipped"][0]
    )
    assert sorted(json.loads(m["json"])["path"] for m in read_shards(tmp_path / "out2").values()) == [
        "images/img0.jpg",
        "images/img1.jpg",
        "images/img3.jpg",
    ]
