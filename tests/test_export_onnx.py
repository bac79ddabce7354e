"""`larvseg export`: ONNX for a fixed vocabulary, dynamic image size, checked against PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from larvseg.cli import main as cli_main
from larvseg.config import Config, EvalConfig, ModelConfig
from larvseg.models.inference import segment_image
from larvseg.models.segmenter import build_segmenter
from larvseg.predict import image_to_tensor
from larvseg.train.checkpoint import save_checkpoint

ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")

NAMES = ["sky", "tree", "road", "person", "car", "building", "water"]


def test_export_matches_pytorch_at_any_size(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(arch="vit_mini", drop_path=0.0, cac=False), eval=EvalConfig(mode="whole"))
    segmenter = build_segmenter(cfg.model, len(NAMES)).eval()
    ckpt = tmp_path / "small.pth"
    save_checkpoint(ckpt, {"model": segmenter.state_dict(), "config": cfg.to_dict(), "vocab": NAMES})
    rng = np.random.default_rng(1)
    photo = np.asarray(Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((71, 50), Image.BICUBIC))
    Image.fromarray(photo).save(tmp_path / "photo.png")
    onnx_path = tmp_path / "out" / "model.onnx"

    code = cli_main(["export", str(ckpt), "--classes", "road,Sky,person", "--onnx", str(onnx_path),
                     "--check-images", str(tmp_path / "photo.png")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "max abs logit diff" in printed and "labels agree on 100.000% of pixels" in printed

    # without PyTorch's help: onnxruntime on images of sizes never seen at export (not multiples of 16)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
    assert classes == ["sky", "road", "person"]  # the checkpoint's order
    assert json.loads(onnx_path.with_suffix(".classes.json").read_text()) == classes
    ids = torch.tensor([NAMES.index(c) for c in classes])
    for h, w in ((50, 71), (32, 48), (97, 33)):
        image = photo if (h, w) == photo.shape[:2] else np.asarray(Image.fromarray(photo).resize((w, h)))
        logits, labels = session.run(["logits", "labels"], {"image": image.astype(np.float32).transpose(2, 0, 1)[None]})
        assert logits.shape == (1, 3, -(-h // 16), -(-w // 16)) and labels.shape == (1, h, w)
        # the same prediction as larvseg's own whole-image inference over the same classes
        expected = segment_image(segmenter, image_to_tensor(image), class_ids=ids, mode="whole", out_size=(h, w))
        agreement = (ids[torch.from_numpy(labels[0])] == expected).float().mean().item()
        assert agreement > 0.999, (h, w, agreement)
        assert len(np.unique(labels)) > 1  # a non-trivial map, or the check above proves little
