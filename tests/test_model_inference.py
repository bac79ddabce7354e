"""Whole / sliding-window inference: mmseg slide semantics, exact argmax for 21,843 classes, class subsets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from larvseg.config import EvalConfig
from larvseg.models.cosine_classifier import CosineClassifier
from larvseg.models.inference import segment_image, segment_image_detailed, slide_windows
from larvseg.models.segmenter import Segmenter
from larvseg.models.vit import VisionTransformer


def _segmenter(num_classes: int, dim: int = 16) -> Segmenter:
    torch.manual_seed(0)
    seg = Segmenter(VisionTransformer(dim, 1, 2, pos_grid=2), CosineClassifier(num_classes, dim))
    with torch.no_grad():
        seg.classifier.class_embed.normal_()  # spread the classes out
        seg.classifier.gamma.fill_(3.0)
    return seg.eval()


def _reference_slide(seg, image, crop, stride, out_size, class_ids=None):
    """mmseg slide_inference written out: full N-channel canvas, averaged, resized, argmax."""
    _, hh, ww = image.shape
    ids = torch.arange(seg.num_classes) if class_ids is None else class_ids
    canvas = torch.zeros(len(ids), hh, ww)
    count = torch.zeros(hh, ww)
    h_grids = max(hh - crop + stride - 1, 0) // stride + 1
    w_grids = max(ww - crop + stride - 1, 0) // stride + 1
    with torch.no_grad():
        for i in range(h_grids):
            for j in range(w_grids):
                y2, x2 = min(i * stride + crop, hh), min(j * stride + crop, ww)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                logits = seg(image[None, :, y1:y2, x1:x2], class_ids).logits
                canvas[:, y1:y2, x1:x2] += F.interpolate(logits, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)[0]
                count[y1:y2, x1:x2] += 1
    canvas = F.interpolate((canvas / count)[None], size=out_size, mode="bilinear", align_corners=False)[0]
    return ids[canvas.argmax(0)]


def test_slide_windows_mmseg_grid():
    assert slide_windows(48, 80, 32, 24) == [(0, 32, 0, 32), (0, 32, 24, 56), (0, 32, 48, 80),
                                             (16, 48, 0, 32), (16, 48, 24, 56), (16, 48, 48, 80)]
    assert slide_windows(20, 20, 32, 32) == [(0, 20, 0, 20)]


def test_slide_equals_reference_and_subset():
    seg = _segmenter(40)
    image = torch.rand(3, 48, 80) * 255  # pixel values: the segmenter standardises them
    slide = EvalConfig(mode="slide", crop_size=32, stride=24, amp="off")
    ref = _reference_slide(seg, image, 32, 24, (40, 70))
    pred = segment_image(seg, image, slide, out_size=(40, 70))
    assert pred.dtype == torch.int64 and pred.shape == (40, 70)
    assert torch.equal(pred, ref)
    sub = torch.tensor([3, 17, 5, 30])
    pred_sub = segment_image(seg, image, slide, class_ids=sub, out_size=(40, 70))
    assert set(pred_sub.unique().tolist()) <= set(sub.tolist())
    assert torch.equal(pred_sub, _reference_slide(seg, image, 32, 24, (40, 70), class_ids=sub))
    whole = segment_image(seg, image, EvalConfig(mode="whole", amp="off"))
    logits = seg(image[None]).logits
    assert torch.equal(whole, F.interpolate(logits, size=(48, 80), mode="bilinear", align_corners=False)[0].argmax(0))
    # uint8 pixels give the same prediction as their float values
    assert torch.equal(segment_image(seg, image.to(torch.uint8), slide, out_size=(40, 70)),
                       segment_image(seg, image.to(torch.uint8).float(), slide, out_size=(40, 70)))


@pytest.mark.parametrize("topk", [1, 64])
def test_21k_classes_exact_with_forced_threshold(topk):
    seg = _segmenter(21843, dim=8)
    image = torch.rand(3, 32, 32) * 255
    with torch.no_grad():
        logits = seg(image[None]).logits  # (1, 21843, 2, 2): small at feature resolution
    up = F.interpolate(logits, size=(24, 20), mode="bilinear", align_corners=False)[0]
    ref = up.argmax(0)
    pred, how = segment_image_detailed(
        seg, image, mode="whole", out_size=(24, 20), exact_max_classes=16, topk=topk, chunk_elems=1 << 16
    )
    assert how in ("certified", "expanded")
    if topk == 1:
        assert how == "expanded"  # top-1 candidates cannot certify the interpolated pixels here
    assert torch.equal(pred, ref)


def test_bad_arguments_and_bf16():
    seg = _segmenter(5)
    image = torch.rand(3, 64, 64) * 255
    with pytest.raises(ValueError, match="mode"):
        segment_image(seg, image, EvalConfig(mode="tile"))
    with pytest.raises(ValueError, match="amp"):
        segment_image(seg, image, EvalConfig(amp="fp8"))
    # bf16 autocast of the backbone changes logits by rounding only: the argmax agrees almost everywhere
    bf16 = segment_image(seg, image, EvalConfig(mode="whole", amp="bf16"))
    fp32 = segment_image(seg, image, EvalConfig(mode="whole", amp="off"))
    assert bf16.shape == fp32.shape == (64, 64) and bf16.dtype == torch.int64
    assert len(fp32.unique()) > 1  # a prediction with structure, so agreement means something
    assert (bf16 == fp32).float().mean() > 0.9


def test_21k_uniform_image_is_certified():
    seg = _segmenter(21843, dim=8)
    with torch.no_grad():
        seg.backbone.pos_embed.zero_()  # a constant image then gives the same feature at every pixel
    image = torch.full((3, 32, 48), 0.3)
    pred, how = segment_image_detailed(seg, image, mode="slide", crop_size=32, stride=16, exact_max_classes=16, topk=2)
    assert how == "certified"
    with torch.no_grad():
        ref = seg(image[None, :, :, :32]).logits[0, :, 0, 0].argmax()
    assert torch.equal(pred, torch.full((32, 48), int(ref)))
