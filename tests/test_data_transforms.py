"""Training augmentation and evaluation resize, each checked on its effect against direct references."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from larvseg.config import IGNORE_INDEX, PIXEL_MEAN, ConfigError, SourceConfig, load_config
from larvseg.data import testing as T
from larvseg.data.io import read_image
from larvseg.data.mixing import MixedLoader
from larvseg.data.sources import build_vocabulary
from larvseg.data.transforms import (
    Photometric,
    TrainTransform,
    apply_photometric,
    eval_resize,
    pad_to,
    random_crop,
    random_flip,
    random_rescale,
    rescale_size,
    resize_label,
    source_scale,
    train_transform,
)
from larvseg.data.vocabulary import imagenet_subset
from larvseg.models.cosine_classifier import CosineClassifier
from larvseg.models.segmenter import Segmenter
from larvseg.models.vit import build_vit


def nearest_reference(label: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    h, w = label.shape
    ys = np.minimum(np.floor(np.arange(hw[0]) * h / hw[0]).astype(int), h - 1)
    xs = np.minimum(np.floor(np.arange(hw[1]) * w / hw[1]).astype(int), w - 1)
    return label[ys[:, None], xs[None, :]]


def test_rescale_size_is_mmcv_keep_ratio():
    # the largest size with long side <= L and short side <= S; int(x * f + 0.5)
    assert rescale_size(375, 500, 2048, 512) == (512, 683)
    assert rescale_size(100, 1000, 2048, 512) == (205, 2048)  # long side limits
    assert rescale_size(500, 375, 1024, 256) == (341, 256)


def test_random_rescale_uses_int_scaled_target_and_nearest_labels():
    rng0 = np.random.default_rng(0)
    image = rng0.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    label = rng0.integers(250, 1000, (30, 50)).astype(np.uint16)
    for seed in range(4):
        ratio = np.random.default_rng(seed).uniform(0.5, 2.0)
        f = min(int(100 * ratio) / 50, int(40 * ratio) / 30)
        hw = (int(30 * f + 0.5), int(50 * f + 0.5))
        img, lab = random_rescale(image, label, (100, 40), (0.5, 2.0), np.random.default_rng(seed))
        assert img.shape == (*hw, 3) and img.dtype == np.uint8
        assert lab.dtype == np.uint16 and np.array_equal(lab, nearest_reference(label, hw))
    assert np.array_equal(resize_label(label, (71, 13)), nearest_reference(label, (71, 13)))


def test_random_crop_retries_while_one_class_dominates():
    label = np.zeros((60, 60), np.uint16)
    label[:, 45:] = 700  # class 0 covers 75%
    label[:5, :] = IGNORE_INDEX
    image = np.zeros((60, 60, 3), np.uint8)

    def reference(seed: int) -> tuple[int, int]:
        """The same draws, done one by one as mmseg: first box, then up to 10 retries."""
        rng = np.random.default_rng(seed)
        box = int(rng.integers(0, 41)), int(rng.integers(0, 41))
        for _ in range(10):
            crop = label[box[0] : box[0] + 20, box[1] : box[1] + 20]
            values, counts = np.unique(crop, return_counts=True)
            counts = counts[values != IGNORE_INDEX]
            if len(counts) > 1 and counts.max() / counts.sum() < 0.75:
                break
            box = int(rng.integers(0, 41)), int(rng.integers(0, 41))
        return box

    accepted = 0
    for seed in range(40):
        _, lab = random_crop(image, label, 20, 0.75, np.random.default_rng(seed))
        y, x = reference(seed)
        assert np.array_equal(lab, label[y : y + 20, x : x + 20])
        values, counts = np.unique(lab[lab != IGNORE_INDEX], return_counts=True)
        accepted += int(len(counts) > 1 and counts.max() / counts.sum() < 0.75)
    # a random 20x20 crop has two classes only if x in 26..44 (19 of 41 offsets); retries make it most
    assert accepted >= 35
    # without a label (ImageNet) and for crops larger than the image: the whole image
    img, lab = random_crop(image[:10, :15], None, 20, 0.75, np.random.default_rng(0))
    assert img.shape == (10, 15, 3) and lab is None


def test_flip_and_determinism():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    label = np.array([[1, 2, 300], [4, 5, 600]], np.uint16)
    flips = [np.random.default_rng(s).random() < 0.5 for s in range(6)]
    for seed, flip in enumerate(flips):
        img, lab = random_flip(image, label, np.random.default_rng(seed))
        assert np.array_equal(lab, label[:, ::-1] if flip else label)
        assert np.array_equal(img, image[:, ::-1] if flip else image)
    assert any(flips) and not all(flips)


def test_photometric_steps_match_mmseg_formulas():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    none = Photometric(None, None, True, None, None)
    assert np.array_equal(apply_photometric(image, none), image)
    # brightness and contrast: x * a + b, clipped, truncated to uint8 after each step
    out = apply_photometric(image, Photometric(20.7, None, True, None, None))
    assert np.array_equal(out, np.clip(image.astype(np.float32) + 20.7, 0, 255).astype(np.uint8))
    out = apply_photometric(image, Photometric(-10.5, 1.3, False, None, None))
    step = np.clip(image.astype(np.float32) - 10.5, 0, 255).astype(np.uint8)
    assert np.array_equal(out, np.clip(step.astype(np.float32) * 1.3, 0, 255).astype(np.uint8))
    # saturation 0 gives grey pixels; saturation 1 and hue 0 change a pixel by at most HSV rounding
    grey = apply_photometric(image, Photometric(None, None, True, 0.0, None))
    assert (grey.max(axis=2) == grey.min(axis=2)).all() and np.array_equal(grey[..., 0], image.max(axis=2))
    same = apply_photometric(image, Photometric(None, None, True, 1.0, 0)).astype(int)
    assert np.abs(same - image).max() <= 4
    # hue +60 units (120 degrees) turns pure red into pure green; +90 turns it to cyan
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 255
    assert apply_photometric(red, Photometric(None, None, True, None, 60)).tolist() == [[[0, 255, 0]]]
    assert apply_photometric(red, Photometric(None, None, True, None, 90)).tolist() == [[[0, 255, 255]]]
    # contrast order: first (before saturation) and last differ on the same draws
    a = apply_photometric(image, Photometric(None, 1.4, True, 1.4, None))
    b = apply_photometric(image, Photometric(None, 1.4, False, 1.4, None))
    assert not np.array_equal(a, b)


def test_pad_uses_the_colour_the_model_standardises_to_zero():
    img, lab = pad_to(np.ones((3, 5, 7), np.float32), np.full((5, 7), 300, np.uint16), 8)
    assert img.shape == (3, 8, 8) and lab.dtype == np.uint16
    assert (img[:, :5, :7] == 1).all() and (lab[:5, :7] == 300).all()
    assert (lab[5:, :] == IGNORE_INDEX).all() and (lab[:, 7:] == IGNORE_INDEX).all()
    # the padding, once the model has standardised it, is exactly 0 (MMSegmentation pads after Normalize)
    seg = Segmenter(build_vit("vit_mini"), CosineClassifier(2, 192))
    padded = seg.preprocess(torch.from_numpy(img))
    assert (padded[:, 5:, :] == 0).all() and (padded[:, :, 7:] == 0).all()
    assert not (padded[:, :5, :7] == 0).any()


def test_train_transform_end_to_end_keeps_16_bit_labels():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    label = T.blocky_labels(rng, 60, 90, [1, 300, 846, 40000, IGNORE_INDEX], np.uint16)
    tf = TrainTransform(crop_size=64, scale=(120, 40), ratio_range=(0.5, 2.0))
    seen: set[int] = set()
    for seed in range(6):
        img, lab = tf(image, label, np.random.default_rng(seed))
        assert img.shape == (3, 64, 64) and img.dtype == np.float32 and lab.shape == (64, 64) and lab.dtype == np.uint16
        values = set(np.unique(lab).tolist())
        assert values <= {1, 300, 846, 40000, IGNORE_INDEX}  # nearest only: never a new value
        seen |= values
        img2, lab2 = tf(image, label, np.random.default_rng(seed))
        assert np.array_equal(img, img2) and np.array_equal(lab, lab2)  # a function of the seed alone
    assert {300, 846, 40000} <= seen
    # an image smaller than the crop: padded with the pixel mean (image) and IGNORE_INDEX (label)
    img, lab = TrainTransform(crop_size=64, scale=(32, 16), ratio_range=(1.0, 1.0))(
        image, label, np.random.default_rng(0)
    )
    mean = np.asarray(PIXEL_MEAN, np.float32)[:, None, None]
    assert (
        (lab[16:, :] == IGNORE_INDEX).all() and (img[:, 16:, :] == mean).all() and (lab[:, 24:] == IGNORE_INDEX).all()
    )
    assert img.min() >= 0 and img.max() <= 255  # pixel values: the model standardises them
    # ImageNet-style: no label
    img, lab = TrainTransform(crop_size=32, scale=(64, 32))(image, None, np.random.default_rng(0))
    assert img.shape == (3, 32, 32) and lab is None


def test_eval_resize_short_side_with_long_side_limit():
    assert eval_resize(np.zeros((100, 300, 3), np.uint8), 512, 2048).shape == (512, 1536, 3)
    assert eval_resize(np.zeros((100, 1000, 3), np.uint8), 512, 2048).shape == (205, 2048, 3)
    assert eval_resize(np.zeros((700, 500, 3), np.uint8), 512, 2048).shape == (717, 512, 3)
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    assert eval_resize(image, 0, 2048) is image
    out = eval_resize(image, 20, 2048)
    ref = cv2.resize(image, (30, 20), interpolation=cv2.INTER_LINEAR)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8 and np.array_equal(out, ref)


def test_train_transform_without_photometric_keeps_the_colours():
    # data.photometric=false: the crop holds the source pixels unchanged (up to the flip); with it on,
    # the same seeds change some of them (colour jitter)
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    changed = 0
    for seed in range(8):
        kept, _ = TrainTransform(crop_size=32, scale=(48, 48), ratio_range=(1.0, 1.0), photometric=False)(
            image, None, np.random.default_rng(seed)
        )
        patches = {np.ascontiguousarray(image[y : y + 32, x : x + 32]).tobytes() for y in range(17) for x in range(17)}
        patches |= {
            np.ascontiguousarray(image[y : y + 32, x : x + 32][:, ::-1]).tobytes() for y in range(17) for x in range(17)
        }
        assert kept.transpose(1, 2, 0).astype(np.uint8).tobytes() in patches
        jittered, _ = TrainTransform(crop_size=32, scale=(48, 48), ratio_range=(1.0, 1.0))(
            image, None, np.random.default_rng(seed)
        )
        changed += not np.array_equal(jittered, kept)
    assert changed > 0


def test_per_source_scale_fits_a_whole_imagenet_photo_in_its_crop(tmp_path):
    # the original rescales ImageNet to (320, 320) (its own Resize, not the segmentation sets' (2048, 512)):
    # at ratio 1 a 500x375 photo becomes 320x240 and the 320 crop holds all of it, plus padding below
    wnid = imagenet_subset("ade150")[0]
    (photo_path,) = T.write_imagenet(tmp_path / "I22K", [wnid], per_class=1, size=(375, 500))
    (tmp_path / "wnids.txt").write_text(wnid + "\n")
    photo = read_image(photo_path)
    mean = np.asarray(PIXEL_MEAN, np.float32)[:, None, None]

    def crop(scale):
        source = SourceConfig(
            name="IN", format="imagenet", classes=str(tmp_path / "wnids.txt"), crop_size=320, scale=scale
        )
        cfg = T.make_config(
            tmp_path,
            tag=[source],
            seg_batch_size=0,
            tag_batch_size=1,
            scale=[2048, 512],
            ratio_range=[1.0, 1.0],
            photometric=False,
        )
        batch = next(iter(MixedLoader(cfg, build_vocabulary(cfg), 0, 1)))
        assert batch.tag[0].paths == [str(photo_path)]
        return batch.tag[0].images[0].numpy()

    img = crop([320, 320])
    assert img.shape == (3, 320, 320)
    whole = np.ascontiguousarray(cv2.resize(photo, (320, 240), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1))
    # the whole photo (maybe flipped), then 80 rows of the padding colour
    assert np.array_equal(img[:, :240], whole) or np.array_equal(img[:, :240], whole[:, :, ::-1])
    assert (img[:, 240:] == mean).all()
    # the global data.scale (2048, 512): short side 512 (683x512), so the crop is all photo, 29 % of it
    img = crop([])
    assert not (img == mean).all(axis=0).any()
    assert 0.28 < 320 * 320 / (683 * 512) < 0.30
    # the packaged configs: ImageNet sources (320, 320), segmentation sets data.scale
    cfg = load_config("c171_a150w_in124")
    assert [source_scale(s, cfg.data) for s in cfg.data.seg_sources + cfg.data.tag_sources] == [
        (2048, 512),
        (2048, 512),
        (320, 320),
    ]
    assert train_transform(cfg.data.tag_sources[1], cfg.data).scale == (320, 320)
    assert load_config("c171_a150w_in124", ["data.tag_sources.1.scale=[640, 160]"]).data.tag_sources[1].scale == [
        640,
        160,
    ]


def test_per_source_scale_is_checked():
    for bad in ("[320]", "[320, 0]", "[320, 1.5]"):
        with pytest.raises(ConfigError, match=r"data\.tag_sources\.1\.scale=.*expected \[\] \(= data\.scale\)"):
            load_config("c171_a150w_in124", [f"data.tag_sources.1.scale={bad}"])
