"""Training augmentation and evaluation resize (spec section 4), in NumPy/OpenCV.

The training pipeline is MMSegmentation 0.x's: Resize (random ratio of a (long, short) scale, keep
aspect) -> RandomCrop (cat_max_ratio) -> RandomFlip -> PhotoMetricDistortion -> Normalize -> Pad.
Every random choice comes from the ``numpy.random.Generator`` passed in, so a sample's augmentation
is a function of its seed alone. Labels are only ever resized with nearest-neighbour interpolation and
stay uint16 (all 16 bits of ADE-847 ids survive).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from larvseg.config import IGNORE_INDEX

MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def rescale_size(h: int, w: int, long_side: float, short_side: float) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long edge <= long_side and short edge <= short_side."""
    factor = min(long_side / max(h, w), short_side / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return cv2.resize(image, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)


def resize_label(label: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour only: a label is a class id, never an average of two."""
    return cv2.resize(label, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)


def random_rescale(image, label, scale, ratio_range, rng: np.random.Generator):
    ratio = rng.uniform(ratio_range[0], ratio_range[1])
    hw = rescale_size(image.shape[0], image.shape[1], scale[0] * ratio, scale[1] * ratio)
    return resize_image(image, hw), (None if label is None else resize_label(label, hw))


def crop_box(h: int, w: int, crop: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    y = int(rng.integers(0, max(h - crop, 0) + 1))
    x = int(rng.integers(0, max(w - crop, 0) + 1))
    return y, min(y + crop, h), x, min(x + crop, w)


def random_crop(image, label, crop: int, cat_max_ratio: float, rng: np.random.Generator):
    """Random crop; with a label, retry up to 10 times while one class covers >= cat_max_ratio of it."""
    h, w = image.shape[:2]
    box = crop_box(h, w, crop, rng)
    if label is not None and cat_max_ratio < 1.0:
        for _ in range(10):
            y0, y1, x0, x1 = box
            counts = np.bincount(label[y0:y1, x0:x1].ravel())
            if IGNORE_INDEX < counts.size:
                counts[IGNORE_INDEX] = 0
            counts = counts[counts > 0]
            if counts.size > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = crop_box(h, w, crop, rng)
    y0, y1, x0, x1 = box
    return image[y0:y1, x0:x1], (None if label is None else label[y0:y1, x0:x1])


def random_flip(image, label, rng: np.random.Generator, prob: float = 0.5):
    if rng.random() < prob:
        image = image[:, ::-1]
        label = None if label is None else label[:, ::-1]
    return image, label


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, brightness_delta: int = 32,
                           contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """MMSegmentation's PhotoMetricDistortion on an RGB uint8 image; returns float32 in [0, 255]."""
    img = image.astype(np.float32)
    if rng.integers(2):
        img = np.clip(img + rng.uniform(-brightness_delta, brightness_delta), 0, 255)
    contrast_first = bool(rng.integers(2))

    def contrast(x: np.ndarray) -> np.ndarray:
        if rng.integers(2):
            x = np.clip(x * rng.uniform(*contrast_range), 0, 255)
        return x

    if contrast_first:
        img = contrast(img)
    do_sat, do_hue = bool(rng.integers(2)), bool(rng.integers(2))
    sat = rng.uniform(*saturation_range) if do_sat else 1.0
    hue = rng.integers(-hue_delta, hue_delta) if do_hue else 0
    if do_sat or do_hue:
        hsv = cv2.cvtColor(img / 255.0, cv2.COLOR_RGB2HSV)  # float: H in [0, 360), S, V in [0, 1]
        hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 1)
        hsv[..., 0] = (hsv[..., 0] + 2.0 * hue) % 360.0  # mmcv's hue unit is 2 degrees (OpenCV uint8 HSV)
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0
    if not contrast_first:
        img = contrast(img)
    return img


def normalize(image: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) -> float32 (3, H, W), (x - mean) / std."""
    return np.ascontiguousarray(((image.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1))


def pad_to(image: np.ndarray, label, size: int):
    """Pad a normalised (3, H, W) image with 0 and its label with IGNORE_INDEX to (size, size)."""
    _, h, w = image.shape
    if h == size and w == size:
        return image, label
    out = np.zeros((3, size, size), dtype=image.dtype)
    out[:, :h, :w] = image
    if label is None:
        return out, None
    lab = np.full((size, size), IGNORE_INDEX, dtype=np.uint16)
    lab[:h, :w] = label
    return out, lab


@dataclass
class TrainTransform:
    crop_size: int = 512
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5

    def __call__(self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator):
        """uint8 RGB image (+ uint16 label) -> float32 (3, crop, crop) (+ uint16 (crop, crop) label)."""
        image, label = random_rescale(image, label, self.scale, self.ratio_range, rng)
        image, label = random_crop(image, label, self.crop_size, self.cat_max_ratio, rng)
        image, label = random_flip(image, label, rng, self.flip_prob)
        image = normalize(photometric_distortion(image, rng))
        if label is not None:
            label = np.ascontiguousarray(label, dtype=np.uint16)
        return pad_to(image, label, self.crop_size)


def eval_resize(image: np.ndarray, short_side: int = 512, max_long_side: int = 2048) -> np.ndarray:
    """Resize (bilinear) so the short side is ``short_side`` keeping the ratio, long side <= max_long_side
    (mmseg's test Resize with keep_ratio); ``short_side <= 0`` keeps the image. The label is not resized:
    predictions are resized back to it, metrics use the original resolution."""
    if short_side <= 0:
        return image
    hw = rescale_size(image.shape[0], image.shape[1], max_long_side, short_side)
    return image if hw == image.shape[:2] else resize_image(image, hw)
