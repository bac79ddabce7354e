"""Data loading: images/s of one worker for a segmentation source (512 crops) and an ImageNet-style
source (320 crops), decoding real JPEG/PNG files and running the full training augmentation.

The files are generated first (random-content JPEGs of 512x683, ADE-like sizes; ImageNet-like 375x500)
in a temporary folder; the timed part is ``_Samples.__getitem__`` of the real MixedLoader pipeline.

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
from larvseg.data.mixing import MixedLoader
from larvseg.data.vocabulary import build_vocabulary, imagenet_subset


def images_per_second(loader: MixedLoader, index: int, n: int) -> float:
    loader_items = loader.loaders[index].dataset  # _Samples: load + augment one sample
    keys = [(i % len(loader_items), 1000 + i) for i in range(n)]
    loader_items[keys[0]]  # warm-up
    t0 = time.perf_counter()
    for key in keys:
        loader_items[key]
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=24)
    args = p.parse_args()
    setup(args)
    n, seg_hw, in_hw, seg_crop, in_crop = args.images, (512, 683), (375, 500), 512, 320
    if args.tiny:
        n, seg_hw, in_hw, seg_crop, in_crop = 3, (64, 80), (48, 64), 32, 32
    wnids = imagenet_subset("ade847")[:4]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        T.write_coco171(root / "C171", n=n, size=seg_hw, rng=rng)
        T.write_imagenet(root / "I22K", wnids, per_class=max(1, n // 4), size=in_hw, rng=rng)
        (root / "w.txt").write_text("\n".join(wnids))
        cfg = Config(data=DataConfig(
            root=str(root), num_workers=0, index_cache_dir=str(root / "cache"),
            seg_sources=[SourceConfig(name="C171", format="coco171", split="train2017", crop_size=seg_crop)],
            tag_sources=[SourceConfig(name="IN", format="imagenet", classes=str(root / "w.txt"), crop_size=in_crop)],
            eval=SourceConfig(format="ade150"),
        ))
        loader = MixedLoader(cfg, build_vocabulary(cfg), 0, 1)
        seg = images_per_second(loader, 0, n)
        inet = images_per_second(loader, 1, n)
    report("data", seg_images_per_s_per_worker=seg, seg_crop=seg_crop, imagenet_images_per_s_per_worker=inet,
           imagenet_crop=in_crop, images=n, mfu="n/a")  # decoding + augmentation on the host, any --device


if __name__ == "__main__":
    main()
