"""Reading images and label maps, with errors that name the file and the problem."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from larvseg.errors import UserError

if TYPE_CHECKING:
    from larvseg.config import SourceConfig

# File suffixes (lower case) taken as images wherever folders are listed: dataset image folders, class
# folders of image-level data, and the folders given to ``larvseg predict``; ``read_image`` decodes all.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DataError(UserError, ValueError):
    """Bad input on disk. ``path`` names the file (or folder) at fault."""

    hint = (
        "fix or remove the file, or set skip_bad=true on its source (e.g. data.eval.skip_bad=true) to skip such files"
    )

    def __init__(self, path: str | Path, problem: str | None = None) -> None:
        # one-argument form: the full message (how DataLoader workers re-create an exception)
        self.path, self.problem = str(path), problem
        super().__init__(str(path) if problem is None else f"{path}: {problem}")


class CorruptImageError(DataError):
    """An image or label file that cannot be decoded (corrupt, truncated, not an image)."""


class AnnotationError(DataError):
    """A missing annotation, or one whose size or layout does not match its image."""


class LabelValueError(DataError):
    """A label value that is not a class of the source's vocabulary nor its 'unlabeled' value."""


class EmptyDatasetError(DataError):
    """A dataset, split or class folder without any sample."""


class DatasetRootError(DataError):
    """A dataset root or sub-folder that does not exist."""


def source_root(source: SourceConfig, data_root: Path, default: str) -> Path:
    """A source's folder: its ``root`` (or the format's ``default``), relative to ``data_root`` unless absolute."""
    root = Path(source.root or default).expanduser()
    return root if root.is_absolute() else data_root / root


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetRootError(path, f"{what} not found (check data.root / the source's root)")
    return path


def _to_rgb(im: Image.Image) -> np.ndarray:
    """uint8 RGB of any Pillow image. 16/32-bit grey ("I;16", "I", "F") is scaled by its range instead of
    Pillow's convert, which clips every value above 255 (a 16-bit photo would come out almost all white):
    16-bit by the full 0..65535 range, 32-bit and float by 0..255 / 0..65535 when the values fit in
    them, else by their own min..max."""
    if im.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return np.asarray(im.convert("RGB"))
    grey = np.asarray(im).astype(np.float64)
    if im.mode.startswith("I;16"):
        lo, hi = 0.0, 65535.0
    elif grey.size and grey.min() >= 0 and grey.max() <= 255:
        lo, hi = 0.0, 255.0
    elif grey.size and grey.min() >= 0 and grey.max() <= 65535:
        lo, hi = 0.0, 65535.0
    else:
        lo, hi = (float(grey.min()), float(grey.max())) if grey.size else (0.0, 1.0)
    scaled = np.rint((grey - lo) * (255.0 / max(hi - lo, 1e-12))).clip(0, 255).astype(np.uint8)
    return np.repeat(scaled[:, :, None], 3, axis=2)


def read_image(path: str | Path, data: bytes | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3). Truncated files fail here (Pillow refuses to decode them) instead of later;
    16-bit grey images are scaled by their range (see _to_rgb). ``data``: the file's bytes when they come
    from elsewhere (a tar shard); ``path`` then only names it."""
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as im:
            im.load()
            return _to_rgb(im)
    except FileNotFoundError:
        raise CorruptImageError(path, "image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(path, f"cannot decode image ({exc})") from None


def read_label(path: str | Path, data: bytes | None = None) -> np.ndarray:
    """A label map as stored: (H, W) uint8 or uint16 (TIFF via tifffile, PNG via Pillow), all bits kept.
    ``data``: the file's bytes when they come from elsewhere (a tar shard); ``path`` names it and its
    suffix picks the decoder."""
    path = Path(path)
    source = path if data is None else io.BytesIO(data)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            array = tifffile.imread(source)
        else:
            with Image.open(source) as im:
                im.load()
                if im.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
                    raise AnnotationError(
                        path, f"label image has mode {im.mode}; expected a single-channel 8- or 16-bit map"
                    )
                array = np.asarray(im)
    except FileNotFoundError:
        raise AnnotationError(path, "annotation file not found") from None
    except AnnotationError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, tifffile.TiffFileError) as exc:
        raise CorruptImageError(path, f"cannot decode label map ({exc})") from None
    array = np.squeeze(array)
    if array.ndim != 2:
        raise AnnotationError(path, f"label map has shape {array.shape}; expected a single-channel (H, W) map")
    if array.dtype.kind not in "ui":
        raise AnnotationError(path, f"label map has dtype {array.dtype}; expected integer labels")
    if array.dtype.kind == "i" or array.dtype.itemsize > 2:  # int or 32/64-bit maps: must fit uint16
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise LabelValueError(path, f"label values outside 0..65535 (min {array.min()}, max {array.max()})")
        array = array.astype(np.uint16)
    return array
