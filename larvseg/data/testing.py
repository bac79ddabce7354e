"""Writers of tiny datasets in the exact on-disk formats, for tests and examples.

Every writer takes a folder and a ``numpy.random.Generator`` and writes real files: JPEG images via
Pillow, uint8 PNG / uint16 TIFF label maps, ``fall11_whole/<wnid>/*.JPEG`` folders. Label maps are
blocky (a few rectangles of classes) so random crops see several classes. ``values`` are the *raw*
on-disk values to draw from. ``make_config`` builds a Config over such a root.

``SyntheticLoader`` skips the files: it makes StepBatches directly, for tests of the training loop
(including ones launched under torchrun, which cannot import a test module).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from larvseg.config import IGNORE_INDEX, Config, DataConfig, SourceConfig, TrainConfig
from larvseg.data.batch import SegBatch, StepBatch, TagBatch


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def blocky_labels(
    rng: np.random.Generator, h: int, w: int, values: Sequence[int], dtype=np.uint8, blocks: int = 4
) -> np.ndarray:
    """A (h, w) map of ``blocks`` x ``blocks`` rectangles, each a value drawn from ``values``."""
    grid = rng.choice(np.asarray(values), size=(blocks, blocks)).astype(dtype)
    ys = np.minimum(np.arange(h) * blocks // h, blocks - 1)
    xs = np.minimum(np.arange(w) * blocks // w, blocks - 1)
    return grid[ys[:, None], xs[None, :]]


def write_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=90)


def write_png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label).save(path)


def _write_seg(
    root: Path,
    split: str,
    n: int,
    size: tuple[int, int],
    rng: np.random.Generator,
    values,
    dtype,
    suffix: str,
    stem_fmt: str,
) -> list[Path]:
    h, w = size
    paths = []
    for i in range(n):
        stem = stem_fmt.format(i=i)
        write_jpeg(root / "images" / split / f"{stem}.jpg", random_image(rng, h, w))
        label = blocky_labels(rng, h, w, values, dtype)
        label_path = root / "annotations" / split / f"{stem}{suffix}"
        if suffix.endswith(".tif"):
            label_path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(label_path, label)
        else:
            write_png(label_path, label)
        paths.append(label_path)
    return paths


def write_ade150(root: Path, n: int = 4, size=(64, 80), rng=None, split: str = "training", values=None) -> list[Path]:
    """A150 layout: png values 0 (unlabeled) and v = class v-1. Returns the annotation paths."""
    rng = rng or np.random.default_rng(0)
    return _write_seg(
        root,
        split,
        n,
        size,
        rng,
        values if values is not None else [0, 1, 3, 13, 150],
        np.uint8,
        ".png",
        "ADE_train_{i:08d}",
    )


def write_ade847(root: Path, n: int = 4, size=(64, 80), rng=None, split: str = "training", values=None) -> list[Path]:
    """A847 layout: uint16 tif, class ids including ids >= 256, and 65535 = unlabeled."""
    rng = rng or np.random.default_rng(0)
    return _write_seg(
        root,
        split,
        n,
        size,
        rng,
        values if values is not None else [0, 5, 300, 846, 65535],
        np.uint16,
        ".tif",
        "ADE_frame_{i:08d}",
    )


def write_coco171(
    root: Path, n: int = 4, size=(64, 80), rng=None, split: str = "train2017", values=None, train_ids: bool = False
) -> list[Path]:
    """C171 layout: raw COCO-Stuff ids (default includes 11, an unlisted id, and 255), or with
    ``train_ids`` the converted ``*_labelTrainIds.png``."""
    rng = rng or np.random.default_rng(0)
    default = [0, 168, 170, 255] if train_ids else [0, 2, 11, 181, 255]
    suffix = "_labelTrainIds.png" if train_ids else ".png"
    return _write_seg(
        root, split, n, size, rng, values if values is not None else default, np.uint8, suffix, "{i:012d}"
    )


def write_imagenet(root: Path, wnids: Sequence[str], per_class: int = 2, size=(48, 64), rng=None) -> list[Path]:
    """I22K layout: ``root/fall11_whole/<wnid>/<wnid>_<n>.JPEG``."""
    rng = rng or np.random.default_rng(0)
    paths = []
    for wnid in wnids:
        for i in range(per_class):
            p = root / "fall11_whole" / wnid / f"{wnid}_{i}.JPEG"
            write_jpeg(p, random_image(rng, *size))
            paths.append(p)
    return paths


def write_custom_seg(root: Path, class_names: Sequence[str], n: int = 3, size=(48, 64), rng=None) -> list[Path]:
    """Custom segmentation: images/, annotations/ (png value = class index, 255 unlabeled), classes.txt."""
    rng = rng or np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(class_names) + "\n")
    h, w = size
    paths = []
    for i in range(n):
        write_jpeg(root / "images" / f"img{i}.jpg", random_image(rng, h, w))
        p = root / "annotations" / f"img{i}.png"
        write_png(p, blocky_labels(rng, h, w, list(range(len(class_names))) + [255]))
        paths.append(p)
    return paths


def write_custom_tags(
    root: Path, class_names: Sequence[str], per_class: int = 2, size=(48, 64), rng=None
) -> list[Path]:
    """Custom image-level data: ``root/<class name>/*.jpg``."""
    rng = rng or np.random.default_rng(0)
    paths = []
    for name in class_names:
        for i in range(per_class):
            p = root / name / f"{i}.jpg"
            write_jpeg(p, random_image(rng, *size))
            paths.append(p)
    return paths


def make_config(
    root: Path,
    seg: Sequence[SourceConfig] = (),
    tag: Sequence[SourceConfig] = (),
    eval_source: SourceConfig | None = None,
    seed: int = 0,
    **data,
) -> Config:
    """A Config whose data root is ``root`` (index cache in ``root/cache``, 0 workers unless given);
    ``data`` sets other DataConfig fields. The eval source defaults to A847 validation."""
    data = {"num_workers": 0, "index_cache_dir": str(Path(root) / "cache"), **data}
    return Config(
        name="test",
        data=DataConfig(
            root=str(root),
            seg_sources=list(seg),
            tag_sources=list(tag),
            eval=eval_source or SourceConfig(name="A847", format="ade847", split="validation"),
            **data,
        ),
        train=TrainConfig(seed=seed),
    )


class SyntheticLoader:
    """StepBatches of one segmentation source "S" (classes 0..3) and one single-tag source "T" (classes
    3..num_classes-1), random pixel values and labels that are a function of (seed, step) only, sharded
    by rank like larvseg.data.mixing.MixedLoader (numpy.array_split of each global batch). Sizes come
    from ``cfg.data`` (seg_batch_size, tag_batch_size) and ``size``; the seed from ``cfg.train.seed``."""

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, num_classes: int = 6, size: int = 32) -> None:
        self.cfg, self.rank, self.world, self.num_classes, self.size = cfg, rank, world_size, num_classes, size
        self.start_step = 0

    def start_at(self, step: int) -> None:
        self.start_step = step

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1

    def batch(self, step: int) -> StepBatch:
        rng = np.random.default_rng([self.cfg.train.seed, step])
        n_seg, n_tag, s, k = self.cfg.data.seg_batch_size, self.cfg.data.tag_batch_size, self.size, self.num_classes
        images = torch.from_numpy(rng.uniform(0, 255, (n_seg, 3, s, s)).astype(np.float32))
        labels = torch.from_numpy(rng.integers(0, 4, (n_seg, s, s)))
        labels[:, :4] = IGNORE_INDEX  # some ignored pixels
        tag_images = torch.from_numpy(rng.uniform(0, 255, (n_tag, 3, s, s)).astype(np.float32))
        tags = torch.from_numpy(rng.integers(3, k, (n_tag, 1)))
        mine_seg = torch.from_numpy(np.array_split(np.arange(n_seg), self.world)[self.rank])
        mine_tag = torch.from_numpy(np.array_split(np.arange(n_tag), self.world)[self.rank])
        seg = SegBatch("S", images[mine_seg], labels[mine_seg], torch.arange(4), n_seg)
        tag = TagBatch(
            "T",
            tag_images[mine_tag],
            tags[mine_tag],
            torch.arange(3, k),
            n_tag,
            loss_weight=0.2,
            cac_weight=0.1,
            cac_topk=2,
        )
        return StepBatch(step, [seg], [tag])
