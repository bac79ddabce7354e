"""Data loading: images/s of one worker for a segmentation source (512 crops) and an ImageNet-style
source (320 crops), decoding real JPEG/PNG files and running the full training augmentation; the same
images read from folders, from WebDataset shards by byte offset, and from shards streamed sequentially.

The files are generated first (random-content JPEGs of 512x683, ADE-like sizes; ImageNet-like 375x500)
in a temporary folder and written into shards with ``larvseg data shard``'s writer; the timed part is
the real MixedLoader pipeline of one worker (``_Samples`` + collate for folders and offsets,
``_StreamSteps`` for streams; batches of one image), the three interleaved so that machine noise hits them alike. The files sit in the page cache:
this measures the CPU cost per image (decode + augmentation + reading), not a network file system.

    python benchmarks/bench_data.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from common import parser, report, setup
from larvseg.config import Config, DataConfig, SourceConfig
from larvseg.data import testing as T
from larvseg.data.mixing import MixedLoader, sample_seed
from larvseg.data.shard_writer import ShardWriter
from larvseg.data.sources import build_vocabulary
from larvseg.data.vocabulary import imagenet_subset


def timed_rates(fns: dict, n: int, repeats: int) -> dict[str, float]:
    """images/s of each fn (each processes n images per call), median of interleaved repeats."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up: page cache, open files
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: n / float(np.median(v)) for k, v in times.items()}


def indexed(loader: MixedLoader, index: int, n: int, like: int):
    """n samples read by index; their augmentation seeds are those of the streamed source ``like``, so that
    both draw the same rescale/crop sizes (the main cost besides decoding)."""
    items = loader.loaders[index].dataset  # _Samples: load + augment one sample
    collate = loader.loaders[index].collate_fn  # batches of 1, as the streamed variant yields them
    keys = [(i % len(items), sample_seed(loader.cfg.train.seed, loader.specs[like].index, i, 0)) for i in range(n)]
    return lambda: [collate([items[key]]) for key in keys]


def streamed(loader: MixedLoader, index: int, n: int):
    """The first n steps of the stream (1 image each), from the start at every call."""
    steps = loader.loaders[index].dataset  # _StreamSteps: this rank's per-step batches

    def run() -> None:
        batches = iter(steps)
        for _ in range(n):
            next(batches)

    return run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=24)
    args = p.parse_args()
    setup(args)
    n, seg_hw, in_hw, seg_crop, in_crop, repeats = args.images, (512, 683), (375, 500), 512, 320, args.repeats
    if args.tiny:
        n, seg_hw, in_hw, seg_crop, in_crop, repeats = 3, (64, 80), (48, 64), 32, 32, 1
    wnids = imagenet_subset("ade847")[:4]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        T.write_coco171(root / "C171", n=n, size=seg_hw, rng=rng)
        T.write_imagenet(root / "I22K", wnids, per_class=max(1, n // 4), size=in_hw, rng=rng)
        (root / "w.txt").write_text("\n".join(wnids))
        folders = [
            SourceConfig(name="C171", format="coco171", root=str(root / "C171"), split="train2017", crop_size=seg_crop),
            SourceConfig(
                name="IN", format="imagenet", root=str(root / "I22K"), classes=str(root / "w.txt"), crop_size=in_crop
            ),
        ]
        data = DataConfig(root=str(root), num_workers=0, index_cache_dir=str(root / "cache"))
        for source in folders:  # 2 shards each, so the stream crosses a shard boundary
            ShardWriter(
                source, data, root / f"{source.name}_shards", 10**12, shard_samples=max(1, n // 2), progress=False
            ).run()
        shard = {s.name: dict(format="webdataset", root=f"{s.name}_shards", crop_size=s.crop_size) for s in folders}
        cfg = Config(
            data=DataConfig(
                root=str(root),
                num_workers=0,
                index_cache_dir=str(root / "cache"),
                seg_batch_size=3,
                tag_batch_size=3,
                seg_sources=[
                    folders[0],
                    SourceConfig(name="Cs", **shard["C171"]),
                    SourceConfig(name="Ct", stream=True, **shard["C171"]),
                ],
                tag_sources=[
                    folders[1],
                    SourceConfig(name="INs", **shard["IN"]),
                    SourceConfig(name="INt", stream=True, **shard["IN"]),
                ],
                eval=SourceConfig(format="ade150"),
            )
        )
        loader = MixedLoader(cfg, build_vocabulary(cfg), 0, 1)
        seg = timed_rates(
            {"folder": indexed(loader, 0, n, 2), "offset": indexed(loader, 1, n, 2), "stream": streamed(loader, 2, n)},
            n,
            repeats,
        )
        inet = timed_rates(
            {"folder": indexed(loader, 3, n, 5), "offset": indexed(loader, 4, n, 5), "stream": streamed(loader, 5, n)},
            n,
            repeats,
        )
    report(
        "data",
        seg_folder=seg["folder"],
        seg_shard_offset=seg["offset"],
        seg_shard_stream=seg["stream"],
        seg_crop=seg_crop,
        imagenet_folder=inet["folder"],
        imagenet_shard_offset=inet["offset"],
        imagenet_shard_stream=inet["stream"],
        imagenet_crop=in_crop,
        images=n,
        unit="images_per_s_per_worker",
        mfu="n/a",
    )  # decoding + augmentation on the host, any --device


if __name__ == "__main__":
    main()
