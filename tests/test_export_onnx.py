"""`larvseg export`: ONNX for a fixed vocabulary, dynamic image size, checked against PyTorch; the README's
lines that run it without PyTorch."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from larvseg.cli import main as cli_main
from larvseg.config import Config, EvalConfig, ModelConfig
from larvseg.data.synthetic.appearance import DEMO_CLASSES, NOVEL_CLASSES, render_scene
from larvseg.export import ExportableSegmenter
from larvseg.models.inference import segment_image
from larvseg.models.segmenter import build_segmenter
from larvseg.predict import LarvSegPredictor, read_image
from larvseg.train.checkpoint import save_checkpoint

ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")

NAMES = ["sky", "tree", "road", "person", "car", "building", "water"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export (the slow part, ~20 s of CPU) shared by the tests: (segmenter, ONNX path, photo, printed)."""
    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(arch="vit_mini", drop_path=0.0, cac=False), eval=EvalConfig(mode="whole"))
    segmenter = build_segmenter(cfg.model, len(NAMES)).eval()
    ckpt = tmp / "small.pth"
    save_checkpoint(ckpt, {"model": segmenter.state_dict(), "config": cfg.to_dict(), "vocab": NAMES})
    # a textured scene as the benchmark draws them (background regions, objects, sensor noise), as a PNG file
    scene = render_scene(
        np.random.default_rng(1), (50, 71), [DEMO_CLASSES.index(c) for c in NOVEL_CLASSES[:2]], [(0.1, 0.3)] * 2
    )
    Image.fromarray(scene.image).save(tmp / "photo.png")
    photo = np.array(read_image(tmp / "photo.png"))  # decoded from the file, writable
    onnx_path = tmp / "out" / "model.onnx"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(
            [
                "export",
                str(ckpt),
                "--classes",
                "road,Sky,person",
                "--onnx",
                str(onnx_path),
                "--check-images",
                str(tmp / "photo.png"),
            ]
        )
    assert code == 0, out.getvalue() + err.getvalue()
    # a normal run: its threads, and no third-party warning (torch's exporter deprecates its own calls)
    assert "intra-op thread" in out.getvalue()
    assert "warning" not in err.getvalue().lower() and "deprecated" not in err.getvalue(), err.getvalue()
    return segmenter, onnx_path, photo, out.getvalue()


def test_export_matches_pytorch_at_any_size(exported):
    segmenter, onnx_path, photo, printed = exported
    assert "max abs logit diff" in printed and "labels agree on 100.000% of pixels" in printed

    # onnxruntime alone, on sizes never seen at export (not multiples of 16 too)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
    assert classes == ["sky", "road", "person"]  # the checkpoint's order
    assert json.loads(onnx_path.with_suffix(".classes.json").read_text()) == classes
    ids = torch.tensor([NAMES.index(c) for c in classes])
    for h, w in ((50, 71), (32, 48), (97, 33)):
        image = photo if (h, w) == photo.shape[:2] else np.array(Image.fromarray(photo).resize((w, h)))
        logits, labels = session.run(["logits", "labels"], {"image": image.astype(np.float32).transpose(2, 0, 1)[None]})
        assert logits.shape == (1, 3, -(-h // 16), -(-w // 16)) and labels.shape == (1, h, w)
        # the same prediction as larvseg's own whole-image inference over the same classes
        expected = segment_image(
            segmenter,
            torch.from_numpy(image).permute(2, 0, 1),
            EvalConfig(mode="whole", amp="off"),
            class_ids=ids,
            out_size=(h, w),
        )
        agreement = (ids[torch.from_numpy(labels[0])] == expected).float().mean().item()
        assert agreement > 0.999, (h, w, agreement)
        assert len(np.unique(labels)) > 1  # a non-trivial map, or the check above proves little


def test_exported_function_is_predicts_segmentation(exported):
    """The traced module gives exactly the labels of `larvseg predict` in whole mode (no resizing, float32)."""
    segmenter, onnx_path, photo, _ = exported
    ckpt = onnx_path.parent.parent / "small.pth"
    predictor = LarvSegPredictor.from_checkpoint(ckpt, classes="road,Sky,person", device="cpu", amp="off", short_side=0)
    assert predictor.eval_cfg.mode == "whole"
    ids = predictor.class_ids
    module = ExportableSegmenter(predictor.segmenter, ids).eval()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for image in (photo, photo[:41, 5:]):  # the file as decoded, and a crop of another size
        expected = predictor(image).label_map  # union ids at the image's size
        with torch.no_grad():
            logits, labels = module(torch.from_numpy(image).permute(2, 0, 1)[None].float())
        assert labels.shape == (1, *image.shape[:2])
        np.testing.assert_array_equal(ids[labels[0]].numpy(), expected)
        assert len(np.unique(expected)) > 1  # a non-trivial map, or the equality proves little
        onnx_logits, onnx_labels = session.run(
            ["logits", "labels"], {"image": image.astype(np.float32).transpose(2, 0, 1)[None]}
        )
        np.testing.assert_allclose(onnx_logits, logits.numpy(), atol=1e-3)
        assert (ids[torch.from_numpy(onnx_labels[0])].numpy() == expected).mean() > 0.999


def test_readme_snippet_runs_without_pytorch(exported, tmp_path):
    """The README's lines that run the exported model with onnxruntime alone, executed as written."""
    _, onnx_path, _, _ = exported
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"Without\s+PyTorch.*?```python\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "model.onnx").write_bytes(onnx_path.read_bytes())
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    script = (
        "import sys\nsys.modules['torch'] = None  # any import of torch fails\n"
        + snippet
        + "\nprint(labels.shape, labels.dtype, set(labels.ravel().tolist()) <= {0, 1, 2}, classes)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(45, 61) int64 True ['sky', 'road', 'person']"


def test_export_rejects_unknown_classes(exported, tmp_path, capsys):
    ckpt = exported[1].parent.parent / "small.pth"
    assert cli_main(["export", str(ckpt), "--classes", "sky,unicorn", "--onnx", str(tmp_path / "m.onnx")]) == 1
    assert "['unicorn']" in capsys.readouterr().err  # one line naming the unknown class
    assert not (tmp_path / "m.onnx").exists()
