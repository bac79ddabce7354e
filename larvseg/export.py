"""``larvseg export``: the segmenter for a fixed vocabulary as an ONNX model (dynamic image size), checked
with onnxruntime against PyTorch.

    larvseg export work_dirs/c171_a150w/final.safetensors --classes "sky,tree,person" --onnx model.onnx

The ONNX graph (``ExportableSegmenter``) takes ``image``: float32 (1, 3, H, W), RGB 0..255, any H and W
from 32 to 8192, and returns ``logits`` (1, N, ceil(H/16), ceil(W/16)) over the N exported classes and
``labels`` (1, H, W) int64: the index into the class list, stored as JSON in the model's metadata (``classes``)
and in ``<model>.classes.json``. The graph is a trace of ``larvseg.models.inference.whole_image_segmentation``,
the function ``segment_image`` (predict, eval, serve) runs in whole mode when the output has the image's
size: standardise, zero-pad bottom/right to a multiple of 16, backbone, cosine classifier standardised over
the N classes, bilinear upsampling to the padded size, crop, argmax. How the model differs from ``larvseg predict``
(no resizing, whole image only, float32, all classes in one argmax step) is spelled out in
``larvseg export --help`` (``larvseg.cli.EXPORT_DESCRIPTION``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from larvseg import atomic
from larvseg.errors import UserError
from larvseg.models.cosine_classifier import CenteredClasses
from larvseg.models.inference import centered_classes, whole_image_segmentation
from larvseg.models.segmenter import Segmenter
from larvseg.predict import LarvSegPredictor, read_image
from larvseg.threads import configure_threads


class OnnxMismatchError(UserError, RuntimeError):
    """The exported model's outputs differ from PyTorch's beyond the tolerance; nothing was written."""

    hint = "raise --tolerance if the difference is acceptable, or report it with the versions of torch and onnxruntime"


OPSET = 18
MIN_SIDE = 32  # smaller images would need a 1-token grid, which the exported shapes exclude


class ExportableSegmenter(nn.Module):
    """``whole_image_segmentation`` (what ``segment_image`` runs in whole mode) for a fixed class list:
    raw RGB image (1, 3, H, W) -> (logits (1, N, ceil(H/16), ceil(W/16)), labels (1, H, W) positions in
    the class list)."""

    class_centered: Tensor  # buffers (register_buffer), declared for the type checker
    class_cov: Tensor

    def __init__(self, segmenter: Segmenter, class_ids: Tensor) -> None:
        super().__init__()
        self.segmenter = segmenter
        # constants of the graph (the vocabulary is fixed): the classes prepared as predict prepares them
        prepared = centered_classes(segmenter.classifier, class_ids)
        self.register_buffer("class_centered", prepared.centered.detach().clone())
        self.register_buffer("class_cov", prepared.cov.detach().clone())

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        classes = CenteredClasses(self.class_centered, self.class_cov)
        # one class chunk: the chunk size predict derives from the image size would be symbolic here
        logits, labels = whole_image_segmentation(
            self.segmenter, image[0], classes, class_chunk=self.class_centered.shape[0]
        )
        return logits[None], labels[None]


def export_onnx(
    module: ExportableSegmenter,
    path: str | Path,
    class_names: Sequence[str],
    example_hw: tuple[int, int] = (70, 90),
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``module`` to ``path`` (temp file + os.replace): batch 1, dynamic height and width (>= 32 px).
    ``check(temp_path)`` runs on the written temp file before it is renamed: when it raises, the temp
    file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # an example that needs padding (not a multiple of 16), so the traced graph keeps the pad
    example = torch.rand(1, 3, *example_hw) * 255
    dims = {2: torch.export.Dim("height", min=MIN_SIDE, max=8192), 3: torch.export.Dim("width", min=MIN_SIDE, max=8192)}
    tmp = path.with_name(f".tmp.{path.name}")
    # the exporter warns, once per op, that torchvision (which larvseg never uses) is missing
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        # torch's own exporter calls an API it deprecates (torch 2.9+): nothing a user can act on
        warnings.filterwarnings(
            "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
        )
        # Shape checks in Python (the ViT's multiple-of-16 test, the position grid's "same size?" shortcut)
        # become runtime asserts instead of guards that would pin the size to the example's.
        program = torch.export.export(
            module.eval(),
            (example,),
            dynamic_shapes={"image": dims},
            strict=False,
            prefer_deferred_runtime_asserts_over_guards=True,
        )
        onnx_program = torch.onnx.export(
            program,
            (example,),
            dynamo=True,
            input_names=["image"],
            output_names=["logits", "labels"],
            opset_version=OPSET,
            verbose=False,
        )
    if onnx_program is None:  # dynamo=True always returns the program; None is the legacy exporter's answer
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    onnx_program.model.metadata_props["classes"] = json.dumps(list(class_names), ensure_ascii=False)
    try:
        onnx_program.save(tmp)  # ViT-B with all 21,843 classes: about 0.4 GB, one file
        if check is not None:
            check(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def check_onnx(module: ExportableSegmenter, path: str | Path, images: Sequence[np.ndarray]) -> list[dict[str, float]]:
    """Run the ONNX model with onnxruntime and the module with PyTorch on each uint8 HxWx3 image: max abs
    logit difference and the fraction of pixels whose labels agree."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    results = []
    for image in images:
        x = np.ascontiguousarray(image.astype(np.float32).transpose(2, 0, 1)[None])
        onnx_logits, onnx_labels = session.run(["logits", "labels"], {"image": x})
        with torch.no_grad():
            logits, labels = module(torch.from_numpy(x))
        results.append(
            {
                "height": image.shape[0],
                "width": image.shape[1],
                "max_abs_logit_diff": float(np.abs(onnx_logits - logits.numpy()).max()),
                "label_agreement": float((onnx_labels == labels.numpy()).mean()),
            }
        )
    return results


def _check_images(paths: Sequence[str]) -> list[np.ndarray]:
    """The given images, or two smooth synthetic ones of different sizes (a dynamic-size check)."""
    if paths:
        return [read_image(p) for p in paths]
    import cv2

    rng = np.random.default_rng(0)
    return [
        cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
        for h, w in ((200, 300), (157, 93))
    ]


def main(args: argparse.Namespace) -> int:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        print(f'larvseg export needs {", ".join(missing)}: pip install "larvseg[onnx]"')
        return 2
    images = _check_images(args.check_images or [])  # before the export: an unreadable one fails fast
    predictor = LarvSegPredictor.from_checkpoint(args.checkpoint, classes=args.classes, device="cpu")
    configure_threads(predictor.segmenter, predictor.eval_cfg.threads)
    names = predictor.class_names
    ids = np.arange(len(names)) if predictor.class_ids is None else predictor.class_ids.numpy()
    class_names = [names[i] for i in ids]
    module = ExportableSegmenter(predictor.segmenter, torch.from_numpy(ids)).eval()

    def check(candidate: Path) -> None:  # on the temp file: the .onnx appears only once this passes
        worst_diff, worst_agree = 0.0, 1.0
        for r in check_onnx(module, candidate, images):
            print(
                f"onnxruntime vs PyTorch on a {r['height']}x{r['width']} image: max abs logit diff "
                f"{r['max_abs_logit_diff']:.2e}, labels agree on {100 * r['label_agreement']:.3f}% of pixels"
            )
            worst_diff, worst_agree = max(worst_diff, r["max_abs_logit_diff"]), min(worst_agree, r["label_agreement"])
        if worst_diff > args.tolerance or worst_agree < 0.999:
            raise OnnxMismatchError(
                f"{args.onnx}: not written: the ONNX model differs from PyTorch (max abs logit diff {worst_diff:.2e} "
                f"> --tolerance {args.tolerance:g} or label agreement {100 * worst_agree:.3f}% < 99.9%)"
            )

    path = export_onnx(module, args.onnx, class_names, check=check)
    sidecar = path.with_suffix(".classes.json")
    atomic.write_text(sidecar, json.dumps(class_names, indent=0, ensure_ascii=False))
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB, {len(class_names)} classes; list also in {sidecar})")
    return 0
