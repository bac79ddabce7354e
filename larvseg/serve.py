"""``larvseg serve CHECKPOINT``: a local web page to segment an uploaded image with a trained checkpoint.

    larvseg serve work_dirs/c171_in21k/final.safetensors      # then open http://127.0.0.1:8000

The page (``serve_page.html``, plain HTML + JavaScript, no build step) uploads an image, lets the user type
class names or pick a vocabulary (the checkpoint's own, ADE-150, ADE-847, COCO-Stuff, all 21,843
ImageNet-21K classes; names the checkpoint does not know are left out and counted), shows progress while
the image is segmented, then the overlay, a legend, a per-class area table and links to download the
label map (union class ids, 8-bit PNG below 255 classes else 16-bit, as ``larvseg predict``) and the
class list. Only classes with training data (recorded in the checkpoint) are offered by default: the
others' classifier rows never got a signal; typing one is allowed, with a notice.

HTTP API (FastAPI, served by uvicorn; optional dependency ``pip install "larvseg[web]"``):
    GET  /api/info                     checkpoint, vocabulary presets, upload limits
    GET  /api/classes                  names of the classes the checkpoint was trained on
    GET  /api/suggest?q=               autocompletion: names, WordNet lemmas, wnids and concepts (word*)
                                       starting with q, each with its class, wnid, gloss and class count
    POST /api/segment?preset=&classes= the image file as the request body -> {"job": id}; 4xx + {"error"};
                                       503 + Retry-After when --max-queue uploads are waiting or running
    GET  /api/jobs/{id}                state, progress 0..1, stage text, and the result when done
    GET  /api/jobs/{id}/overlay.png | labels.png | classes.json | image.jpg | colors.png
                                       (the page layers image.jpg and colors.png under an opacity slider)

Uploads are checked before anything runs: empty, too large (bytes or pixels), not an image, or an
unsupported pixel format give a message that names the file and the problem. CMYK images are converted
to RGB and 16-bit images reduced to 8 bits per channel, each with a visible notice. Jobs run one at a
time on a single worker thread (one model in memory); at most ``max_queue`` wait or run (each holds its
decoded image), so memory stays bounded under many uploads; the last ``MAX_JOBS`` results are kept.
The classes of each result get perceptually distinct colours, largest area first (data/overlay.py).
"""

# No "from __future__ import annotations": FastAPI reads the route signatures (Request is imported locally).

import argparse
import importlib.util
import io
import json
import re
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

from larvseg.data.class_query import ClassQuery, suggest
from larvseg.data.overlay import colours_by_area
from larvseg.data.vocabulary import imagenet_class_names, load_class_names, normalize_name
from larvseg.predict import (
    LarvSegPredictor,
    Prediction,
    UnknownClassError,
    label_png_dtype,
)
from larvseg.threads import configure_threads

PAGE = Path(__file__).with_name("serve_page.html")
MAX_JOBS = 20
MAX_QUEUE = 4  # uploads waiting or running at once (larvseg serve --max-queue); each holds its decoded image
POLL_HINT_S = 0.25
# The service checks the pixel count itself (--max-megapixels) right after reading the header, before
# decoding; Pillow's own warning for images above 89 megapixels would only repeat it on the console.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class UploadError(ValueError):
    """A request the page can explain to its user: ``status`` is the HTTP status, the message says why;
    ``retry_after`` (seconds) goes into a Retry-After header (503: the queue is full)."""

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


# ----------------------------------------------------------------------------------------------
# Vocabularies


@dataclass(frozen=True)
class Preset:
    key: str
    label: str
    names: Callable[[], list[str]]


PRESETS: tuple[Preset, ...] = (
    Preset("ade150", "ADE20K-150", lambda: load_class_names("ade150")),
    Preset("ade847", "ADE20K-847", lambda: load_class_names("ade847")),
    Preset("coco171", "COCO-Stuff-171", lambda: load_class_names("coco171")),
    Preset("in21k", "ImageNet-21K (all 21,843 synsets)", lambda: list(imagenet_class_names("ade847").values())),
)


def preset_ids(names: Sequence[str], model_index: dict[str, int]) -> tuple[np.ndarray, int]:
    """Union ids of the names the model knows (sorted, unique) and how many names it does not know."""
    ids = {model_index[n] for n in map(normalize_name, names) if n in model_index}
    unknown = sum(normalize_name(n) not in model_index for n in names)
    return np.array(sorted(ids), dtype=np.int64), unknown


# ----------------------------------------------------------------------------------------------
# Uploads


def _bits_per_sample(im: Image.Image, data: bytes) -> int:
    """Bits per channel as stored in the file (Pillow silently opens 16-bit RGB PNG/TIFF as 8-bit RGB)."""
    if im.format == "PNG" and data[12:16] == b"IHDR":
        return data[24]
    if isinstance(im, TiffImagePlugin.TiffImageFile):  # im.format == "TIFF"
        bits = im.tag_v2.get(258, (8,))
        return max(bits) if isinstance(bits, tuple) else int(bits)
    return 16 if im.mode.startswith("I;16") else 8


def decode_upload(data: bytes, name: str, max_bytes: int, max_pixels: int) -> tuple[np.ndarray, list[str]]:
    """uint8 HxWx3 RGB of an uploaded file, and notices about conversions; UploadError naming ``name``."""
    if not data:
        raise UploadError(f"{name}: the upload is empty")
    if len(data) > max_bytes:
        raise UploadError(
            f"{name}: the file is {len(data) / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB "
            "(larvseg serve --max-upload-mb)",
            413,
        )
    try:
        im: Image.Image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # hundreds of megapixels: refused by Pillow before decoding
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)) / 1e6:.0f} megapixels" if found else "hundreds of megapixels"
        raise UploadError(
            f"{name}: the image is {size}; the limit is {max_pixels / 1e6:.0f} megapixels "
            "(larvseg serve --max-megapixels)",
            413,
        ) from None
    except UnidentifiedImageError:  # its message names only an in-memory buffer
        raise UploadError(f"{name}: not an image that can be read (JPEG, PNG, TIFF, WebP, BMP, GIF)", 415) from None
    except OSError as exc:
        raise UploadError(
            f"{name}: not an image that can be read (JPEG, PNG, TIFF, WebP, BMP, GIF): {exc}", 415
        ) from None
    w, h = im.size
    if w * h > max_pixels:
        raise UploadError(
            f"{name}: the image is {w}x{h} = {w * h / 1e6:.1f} megapixels; the limit is "
            f"{max_pixels / 1e6:.0f} megapixels (larvseg serve --max-megapixels)",
            413,
        )
    notices = []
    try:
        im.load()
        frames = getattr(im, "n_frames", 1)
        if frames > 1:
            notices.append(f"{name} has {frames} frames; the first one is segmented")
        bits = _bits_per_sample(im, data)  # before exif_transpose, whose copy has no format
        im = ImageOps.exif_transpose(im)  # what the browser shows is what gets segmented
        if im.mode == "CMYK":
            notices.append(
                f"{name} is a CMYK image; it was converted to RGB without a colour profile, "
                "so colours may differ slightly from what you see elsewhere"
            )
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16/32-bit grey: scale, do not clip at 255
            grey = np.asarray(im).astype(np.float64)
            top = 65535.0 if bits == 16 or grey.max() <= 65535 else float(grey.max())
            im = Image.fromarray(np.clip(grey / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
        elif im.mode == "F":
            raise UploadError(f"{name}: floating-point images are not supported; save it as an 8-bit PNG or JPEG", 415)
        if bits > 8:
            notices.append(f"{name} has {bits} bits per channel; it was reduced to 8 bits per channel for the model")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            notices.append(f"{name}: transparency is ignored")
        rgb = np.asarray(im.convert("RGB"))
    except UploadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UploadError(f"{name}: the image cannot be decoded (truncated or corrupt?): {exc}", 415) from None
    return rgb, notices


def _jpeg_bytes(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", array, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _png_bytes(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


# ----------------------------------------------------------------------------------------------
# Jobs


@dataclass
class Job:
    id: str
    name: str
    state: str = "queued"  # queued | running | done | error
    stage: str = "waiting for the model"
    progress: float = 0.0
    windows_done: int = 0  # backbone forwards run so far (sliding windows), the progress unit
    windows_total: int = 0
    started: float = field(default_factory=time.perf_counter)
    notices: list[str] = field(default_factory=list)
    error: str | None = None
    result: dict[str, Any] | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    seconds: float = 0.0  # from upload to done or error (the Retry-After estimate)

    def status(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "stage": self.stage,
            "progress": round(self.progress, 3),
            "windows_done": self.windows_done,
            "windows_total": self.windows_total,
            "elapsed_s": round(time.perf_counter() - self.started, 2),
            "notices": self.notices,
            "error": self.error,
            "result": self.result,
        }


class SegmentationService:
    """The model, the vocabularies and the jobs behind the page; usable without any web framework."""

    def __init__(
        self,
        predictor: LarvSegPredictor,
        checkpoint: str,
        max_upload_mb: float = 20.0,
        max_megapixels: float = 25.0,
        max_queue: int = MAX_QUEUE,
    ) -> None:
        self.predictor = predictor
        self.checkpoint = checkpoint
        self.names = predictor.class_names
        # The predictor's default vocabulary: the classes with training data (masks or tags) when the
        # checkpoint records them, else all. Presets are matched against these; the rest are untrained noise.
        default = predictor.class_ids
        self.trained = np.arange(len(self.names)) if default is None else default.cpu().numpy()
        self.index = {normalize_name(self.names[i]): int(i) for i in self.trained}
        self.all_trained = len(self.trained) == len(self.names)
        self.max_queue = max_queue
        self.max_bytes = int(max_upload_mb * 2**20)
        self.max_pixels = int(max_megapixels * 1e6)
        self.presets = {p.key: p for p in PRESETS}
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="larvseg-serve")

    def info(self) -> dict[str, Any]:
        own = (
            f"all classes of this model ({len(self.names)})"
            if self.all_trained
            else f"the {len(self.trained)} classes this model was trained on (of {len(self.names)})"
        )
        presets = [{"key": "model", "label": own, "known": len(self.trained), "total": len(self.names)}]
        for p in PRESETS:
            names = p.names()
            ids, _ = preset_ids(names, self.index)
            presets.append(
                {
                    "key": p.key,
                    "label": f"{p.label}: {len(ids)} of {len(names)} in this model",
                    "known": int(len(ids)),
                    "total": len(names),
                }
            )
        return {
            "checkpoint": self.checkpoint,
            "num_classes": len(self.names),
            "trained_classes": len(self.trained),
            "presets": presets,
            "max_upload_mb": self.max_bytes / 2**20,
            "max_megapixels": self.max_pixels / 1e6,
            "max_queue": self.max_queue,
        }

    def pending(self) -> int:
        """Jobs waiting or running."""
        return sum(job.state in ("queued", "running") for job in list(self.jobs.values()))

    def check_capacity(self) -> None:
        """UploadError 503 with a Retry-After estimate when ``max_queue`` jobs are waiting or running."""
        pending = self.pending()
        if pending >= self.max_queue:
            durations = [j.seconds for j in self.jobs.values() if j.seconds]  # of finished jobs
            per_job = sum(durations) / len(durations) if durations else 5.0
            raise UploadError(
                f"the server is busy: {pending} uploads are waiting or running, the most it takes is "
                f"{self.max_queue} (larvseg serve --max-queue); try again in a few seconds",
                503,
                retry_after=max(1, round(per_job * (pending - self.max_queue + 1))),
            )

    def class_names(self) -> list[str]:
        """Names worth typing: the trained classes."""
        return [self.names[i] for i in self.trained]

    def suggest(self, prefix: str, limit: int = 20) -> list[dict]:
        """Autocompletion of a typed class (larvseg.data.class_query.suggest): a few items, never the vocabulary."""
        return suggest(prefix, self.predictor.resolver, limit)

    def vocabulary(self, preset: str, classes: str) -> tuple[np.ndarray, list[str], ClassQuery | None]:
        """Union ids to score, notices and, for typed classes, the resolved query (aliases, concepts ``dog*``).
        ``preset``: "custom" (the typed ``classes``), "model" (the trained classes) or a key of PRESETS (its
        classes that this model was trained on)."""
        if preset == "custom":
            typed = [c for c in classes.replace("\n", ",").split(",") if c.strip()]
            if not typed:
                raise UploadError("type at least one class name (comma-separated), or pick a vocabulary")
            try:
                query = self.predictor.resolve(typed)
            except UnknownClassError as exc:
                raise UploadError(f"{exc}; pick the model's own vocabulary to see what it knows") from None
            ids = query.class_ids
            untrained = [self.names[i] for i in np.setdiff1d(ids, self.trained)]
            notices = (
                [
                    f"{len(untrained)} of your classes had no training data in this checkpoint, their predictions "
                    f"are noise: {', '.join(untrained[:10])}{' ...' if len(untrained) > 10 else ''}"
                ]
                if untrained
                else []
            )
            return ids, query.notes + notices, query
        if preset == "model":
            return self.trained, [], None
        if preset not in self.presets:
            raise UploadError(f"unknown vocabulary {preset!r}; choose one of {['custom', 'model', *self.presets]}")
        p = self.presets[preset]
        ids, unknown = preset_ids(p.names(), self.index)
        if not len(ids):
            raise UploadError(
                f"none of the {p.label} classes is among the {len(self.trained)} classes this model was trained on"
            )
        notices = (
            [f"{p.label}: {unknown} of its classes are not in this model's trained vocabulary and were left out"]
            if unknown
            else []
        )
        return ids, notices, None

    def submit(self, data: bytes, name: str, preset: str, classes: str) -> Job:
        """Check the upload and the vocabulary now (UploadError), segment in the background."""
        class_ids, vocab_notices, query = self.vocabulary(preset, classes)
        self.check_capacity()  # before decoding: a full queue must not cost the memory of another image
        rgb, notices = decode_upload(data, name, self.max_bytes, self.max_pixels)
        job = Job(uuid.uuid4().hex[:12], name, notices=notices + vocab_notices)
        with self._lock:  # checked again under the lock: uploads decoded concurrently may have filled it
            self.check_capacity()
            self.jobs[job.id] = job
            finished = [k for k, j in self.jobs.items() if j.state in ("done", "error")]
            for old in finished[: max(0, len(self.jobs) - MAX_JOBS)]:  # never drop a job still in the queue
                del self.jobs[old]
        self._worker.submit(self._run, job, rgb, class_ids, query)
        return job

    def _run(self, job: Job, rgb: np.ndarray, class_ids: np.ndarray, query: ClassQuery | None = None) -> None:
        predictor = self.predictor
        total = job.windows_total = predictor.windows(rgb.shape[:2])

        def window_done(done: int, total: int) -> None:  # after each window's backbone pass: the progress unit
            job.windows_done, job.windows_total = done, total
            job.progress = 0.05 + 0.85 * done / total
            job.stage = f"segmenting: window {done + 1} of {total}" if done < total else "combining windows"

        job.state, job.stage, job.progress = "running", f"segmenting: window 1 of {total}", 0.05
        try:
            pred = predictor.segment(rgb, torch.from_numpy(class_ids), progress=window_done, query=query)
            job.stage, job.progress = "drawing the overlay", 0.92
            job.result, job.files = self._render(rgb, pred, class_ids)
            job.state, job.stage, job.progress = "done", "done", 1.0
        except Exception as exc:  # noqa: BLE001 - any failure is shown on the page, not lost in a thread
            job.state, job.error, job.stage = (
                "error",
                f"{job.name}: segmentation failed: {type(exc).__name__}: {exc}",
                "failed",
            )
        finally:
            job.seconds = time.perf_counter() - job.started

    def _render(self, rgb: np.ndarray, pred: Prediction, class_ids: np.ndarray) -> tuple[dict, dict]:
        names = pred.class_names  # the model's, renamed and extended by a query (concepts: ids after the vocabulary)
        colours = colours_by_area(pred)  # the classes of this image, in perceptually distinct colours
        painted = colours[pred.label_map]
        overlay = cv2.addWeighted(rgb, 0.5, painted, 0.5, 0.0)  # uint8 throughout: no float copies of a 25 MP image
        counts = np.bincount(pred.label_map.ravel(), minlength=len(names))
        present = pred.present
        rows = [
            {
                "id": int(i),
                "name": names[i],
                "color": "#{:02x}{:02x}{:02x}".format(*(int(c) for c in colours[i])),
                "pixels": int(counts[i]),
                "fraction": float(counts[i] / pred.label_map.size),
                "members": pred.breakdown.get(names[i], {}),
            }
            for i in present
        ]
        scored = len(class_ids)
        files = {
            "overlay.png": _png_bytes(cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR)),
            # the page layers these two with an opacity slider
            "image.jpg": _jpeg_bytes(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)),
            "colors.png": _png_bytes(cv2.cvtColor(painted, cv2.COLOR_RGB2BGR)),
            "labels.png": _png_bytes(pred.label_map.astype(label_png_dtype(len(names)))),
            "classes.json": json.dumps(names, ensure_ascii=False).encode(),
        }
        result = {
            "width": int(rgb.shape[1]),
            "height": int(rgb.shape[0]),
            "classes": rows,
            "num_scored_classes": scored,
            "label_dtype": np.dtype(label_png_dtype(len(names))).name,
        }
        return result, files

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# The web app


def create_app(service: SegmentationService):
    """The FastAPI application serving the page and the API of ``service``."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    app = FastAPI(title="LarvSeg", docs_url=None, redoc_url=None)
    page = PAGE.read_text()

    def error(message: str, status: int, retry_after: int | None = None) -> JSONResponse:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return JSONResponse({"error": message, "retry_after": retry_after}, status_code=status, headers=headers)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return service.info()

    @app.get("/api/classes")
    def classes() -> list[str]:
        return service.class_names()

    @app.get("/api/suggest")
    def suggestions(q: str = "", limit: int = 20) -> list[dict]:
        return service.suggest(q, max(1, min(limit, 50)))

    @app.post("/api/segment")
    async def segment(request: Request, preset: str = "model", classes: str = "", name: str = "upload"):
        try:
            service.check_capacity()  # before reading the body
        except UploadError as exc:
            return error(str(exc), exc.status, exc.retry_after)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > service.max_bytes:
            return error(
                f"{name}: the file is {int(declared) / 2**20:.1f} MB; the limit is "
                f"{service.max_bytes / 2**20:.0f} MB (larvseg serve --max-upload-mb)",
                413,
            )
        body = bytearray()
        async for chunk in request.stream():  # stop reading an oversized body early
            body += chunk
            if len(body) > service.max_bytes:
                return error(
                    f"{name}: the file is larger than the limit of {service.max_bytes / 2**20:.0f} MB "
                    "(larvseg serve --max-upload-mb)",
                    413,
                )
        try:
            job = await run_in_threadpool(service.submit, bytes(body), name, preset, classes)
        except UploadError as exc:
            return error(str(exc), exc.status, exc.retry_after)
        return JSONResponse({"job": job.id, "poll_s": POLL_HINT_S}, status_code=202)

    def find(job_id: str) -> Job | None:
        return service.jobs.get(job_id)

    @app.get("/api/jobs/{job_id}")
    def job_status(job_id: str):
        job = find(job_id)
        return (
            error(f"no job {job_id!r} (finished jobs are kept for the last {MAX_JOBS} uploads)", 404)
            if job is None
            else job.status()
        )

    media = {
        "overlay.png": "image/png",
        "labels.png": "image/png",
        "classes.json": "application/json",
        "image.jpg": "image/jpeg",
        "colors.png": "image/png",
    }

    @app.get("/api/jobs/{job_id}/{file_name}")
    def job_file(job_id: str, file_name: str):
        job = find(job_id)
        if job is None or file_name not in job.files:
            return error(f"no file {file_name!r} for job {job_id!r}", 404)
        stem = re.sub(r"[^\w.-]", "_", Path(job.name).stem)[:100] or "image"  # a safe header value
        download = {
            "labels.png": f"{stem}_labels.png",
            "classes.json": "classes.json",
            "overlay.png": f"{stem}_overlay.png",
            "image.jpg": f"{stem}.jpg",
            "colors.png": f"{stem}_colors.png",
        }
        return Response(
            job.files[file_name],
            media_type=media[file_name],
            headers={"Content-Disposition": f'inline; filename="{download[file_name]}"'},
        )

    return app


def build_service(
    checkpoint: str,
    device: str = "auto",
    max_upload_mb: float = 20.0,
    max_megapixels: float = 25.0,
    max_queue: int = MAX_QUEUE,
) -> SegmentationService:
    predictor = LarvSegPredictor.from_checkpoint(checkpoint, device=device)
    if predictor.device.type == "cpu":
        configure_threads(predictor.segmenter, predictor.eval_cfg.threads)
    return SegmentationService(predictor, str(checkpoint), max_upload_mb, max_megapixels, max_queue)


def main(args: argparse.Namespace) -> int:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        print(f'larvseg serve needs {" and ".join(missing)}: pip install "larvseg[web]"')
        return 2
    import uvicorn

    service = build_service(args.checkpoint, args.device, args.max_upload_mb, args.max_megapixels, args.max_queue)
    print(
        f"larvseg serve: {args.checkpoint} ({len(service.names)} classes) at http://{args.host}:{args.port}  "
        "(Ctrl+C stops)",
        flush=True,
    )
    try:
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning")
    finally:
        service.close()
    return 0
