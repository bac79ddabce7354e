"""Training augmentation and evaluation resize, in NumPy/OpenCV.

The training pipeline is MMSegmentation 0.x's: Resize (random ratio of a (long, short) scale, keep
aspect) -> RandomCrop (cat_max_ratio) -> RandomFlip -> PhotoMetricDistortion -> Pad. Images leave the
data layer as RGB pixel values; standardising them with the pixel mean/std is the model's first step
(larvseg.models.segmenter.Segmenter.preprocess). Padding uses the mean colour, which standardises to 0:
the same as MMSegmentation's Pad after Normalize.
Every random choice comes from the ``numpy.random.Generator`` passed in, so a sample's augmentation
is a function of its seed alone. Labels are only ever resized with nearest-neighbour interpolation and
stay uint16 (all 16 bits of ADE-847 ids survive).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from larvseg.config import IGNORE_INDEX, PIXEL_MEAN, DataConfig, SourceConfig


def rescale_size(h: int, w: int, long_side: float, short_side: float) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long edge <= long_side and short edge <= short_side."""
    factor = min(long_side / max(h, w), short_side / min(h, w))
    # at least 1 px: a 2000x1 strip must not become 0 px high (cv2.resize refuses an empty size)
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return cv2.resize(image, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)


def resize_label(label: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour only: a label is a class id, never an average of two."""
    return cv2.resize(label, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)


def random_rescale(image, label, scale, ratio_range, rng: np.random.Generator):
    """mmseg Resize(img_scale=scale, ratio_range, keep_ratio=True): target (int(long*r), int(short*r))."""
    ratio = rng.uniform(ratio_range[0], ratio_range[1])
    hw = rescale_size(image.shape[0], image.shape[1], int(scale[0] * ratio), int(scale[1] * ratio))
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
            if counts.size > IGNORE_INDEX:
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


@dataclass
class Photometric:
    """The random draws of one PhotoMetricDistortion; None = that step is not applied."""

    brightness: float | None  # added to every channel
    contrast: float | None  # multiplies every channel
    contrast_first: bool  # contrast before (True) or after saturation and hue
    saturation: float | None  # multiplies the HSV saturation
    hue: int | None  # added to the OpenCV hue (units of 2 degrees), modulo 180


def draw_photometric(
    rng: np.random.Generator,
    brightness_delta: int = 32,
    contrast_range=(0.5, 1.5),
    saturation_range=(0.5, 1.5),
    hue_delta: int = 18,
) -> Photometric:
    """mmseg's defaults; each step is applied with probability 1/2, the hue shift is in [-18, 18)
    (np.random.randint's exclusive upper bound, as mmseg)."""
    brightness = rng.uniform(-brightness_delta, brightness_delta) if rng.integers(2) else None
    contrast_first = bool(rng.integers(2))
    contrast = rng.uniform(*contrast_range) if rng.integers(2) else None
    saturation = rng.uniform(*saturation_range) if rng.integers(2) else None
    hue = int(rng.integers(-hue_delta, hue_delta)) if rng.integers(2) else None
    return Photometric(brightness, contrast, contrast_first, saturation, hue)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's PhotoMetricDistortion.convert: x * alpha + beta, clipped, back to uint8 (truncating)."""
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def apply_photometric(image: np.ndarray, p: Photometric) -> np.ndarray:
    """uint8 RGB -> uint8 RGB, step by step as mmseg (uint8 after every step; saturation and hue each
    round-trip through OpenCV's uint8 HSV). mmseg works on BGR with BGR2HSV; RGB with RGB2HSV gives the
    same H, S, V."""
    if p.brightness is not None:
        image = _convert(image, beta=p.brightness)
    if p.contrast_first and p.contrast is not None:
        image = _convert(image, alpha=p.contrast)
    if p.saturation is not None:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=p.saturation)
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if p.hue is not None:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + p.hue) % 180
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not p.contrast_first and p.contrast is not None:
        image = _convert(image, alpha=p.contrast)
    return image


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """MMSegmentation's PhotoMetricDistortion (brightness, contrast, saturation, hue) on uint8 RGB."""
    return apply_photometric(np.ascontiguousarray(image), draw_photometric(rng))


def to_chw(image: np.ndarray, dtype: type | None = None) -> np.ndarray:
    """RGB (H, W, 3) -> contiguous (3, H, W), the layout the model takes (``dtype``: default unchanged)."""
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=dtype)


def pad_to(image: np.ndarray, label, size: int):
    """Pad a (3, H, W) image with the pixel mean and its label with IGNORE_INDEX to (size, size)."""
    _, h, w = image.shape
    if h == size and w == size:
        return image, label
    out = np.empty((3, size, size), dtype=image.dtype)
    out[:] = np.asarray(PIXEL_MEAN, dtype=image.dtype)[:, None, None]
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
    photometric: bool = True

    def __call__(self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator):
        """uint8 RGB image (+ uint16 label) -> float32 (3, crop, crop) RGB pixel values (+ uint16
        (crop, crop) label, IGNORE_INDEX in the padding). All randomness comes from ``rng``."""
        image, label = random_rescale(image, label, self.scale, self.ratio_range, rng)
        image, label = random_crop(image, label, self.crop_size, self.cat_max_ratio, rng)
        image, label = random_flip(image, label, rng, self.flip_prob)
        if self.photometric:
            image = photometric_distortion(image, rng)
        image = to_chw(image, np.float32)  # float: the padding colour is not integral
        if label is not None:
            label = np.ascontiguousarray(label, dtype=np.uint16)
        return pad_to(image, label, self.crop_size)


def source_scale(source: SourceConfig, data: DataConfig) -> tuple[int, int]:
    """The (long, short) rescale target of ``source``'s training images: its own ``scale``, else ``data.scale``."""
    return tuple(source.scale or data.scale)  # type: ignore[return-value]


def train_transform(source: SourceConfig, data: DataConfig) -> TrainTransform:
    """The training pipeline of one source: its crop and rescale, the data section's ratio range,
    cat_max_ratio and photometric switch. A source's object masks (the oracle attention's) never steer
    the crop: their transform skips the cat_max_ratio retries, so it draws the same crops as without them."""
    cat_max_ratio = 1.0 if source.object_masks else data.cat_max_ratio
    ratio_range = (data.ratio_range[0], data.ratio_range[1])
    return TrainTransform(
        source.crop_size, source_scale(source, data), ratio_range, cat_max_ratio, photometric=data.photometric
    )


def eval_resize(image: np.ndarray, short_side: int = 512, max_long_side: int = 2048) -> np.ndarray:
    """Resize (bilinear) so the short side is ``short_side`` keeping the ratio, long side <= max_long_side
    (mmseg's test Resize(img_scale=(2048, 512), keep_ratio=True)); ``short_side <= 0`` keeps the image.
    Returns uint8 RGB (standardising is the model's ``preprocess``), so that the same item can also be
    shown. The label is not resized: predictions are resized back to it and metrics use the original
    resolution."""
    if short_side <= 0:
        return image
    hw = rescale_size(image.shape[0], image.shape[1], max_long_side, short_side)
    return image if hw == image.shape[:2] else resize_image(image, hw)
