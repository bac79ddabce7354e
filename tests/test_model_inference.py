"""Whole / sliding-window inference: mmseg slide semantics, exact argmax for 21,843 classes, class subsets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from larvseg.config import EvalConfig
from larvseg.models import bounded_argmax as bounded_argmax_module
from larvseg.models import chunked_argmax as chunked_argmax_module
from larvseg.models.bilinear import resize_matrix
from larvseg.models.bounded_argmax import bounded_argmax
from larvseg.models.chunked_argmax import chunked_argmax
from larvseg.models.cosine_classifier import CenteredClasses, CosineClassifier
from larvseg.models.inference import (
    argmax_path,
    centered_classes,
    segment_image,
    segment_image_detailed,
    slide_windows,
    upsample_crop_matrix,
)
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
                canvas[:, y1:y2, x1:x2] += F.interpolate(
                    logits, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False
                )[0]
                count[y1:y2, x1:x2] += 1
    canvas = F.interpolate((canvas / count)[None], size=out_size, mode="bilinear", align_corners=False)[0]
    return ids[canvas.argmax(0)]


def test_upsample_crop_matrix_is_interpolate_exactly_in_float32():
    """The traced whole-image function builds its upsampling matrices in float32 (onnxruntime has no float64
    resize), predict's slide path in float64: the same values, since every x16 weight is a multiple of 1/32."""
    for n_feat in [1, 2, 3, 7, 16, 33, 64]:
        full = resize_matrix(n_feat, 16 * n_feat, dtype=torch.float64)
        for n_out in {1, 16 * n_feat - 15, 16 * n_feat - 1, 16 * n_feat}:
            f64 = upsample_crop_matrix(n_feat, n_out, torch.float64)
            assert torch.equal(f64, full[:n_out])
            assert torch.equal(upsample_crop_matrix(n_feat, n_out), f64.float()), (n_feat, n_out)
    x = torch.randn(1, 5, 3, 4)
    up = F.interpolate(x, size=(48, 64), mode="bilinear", align_corners=False)[0, :, :41, :50]
    assert torch.allclose(upsample_crop_matrix(3, 41) @ x[0] @ upsample_crop_matrix(4, 50).T, up, atol=1e-6)


def test_slide_windows_mmseg_grid():
    assert slide_windows(48, 80, 32, 24) == [
        (0, 32, 0, 32),
        (0, 32, 24, 56),
        (0, 32, 48, 80),
        (16, 48, 0, 32),
        (16, 48, 24, 56),
        (16, 48, 48, 80),
    ]
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
    assert torch.equal(
        segment_image(seg, image.to(torch.uint8), slide, out_size=(40, 70)),
        segment_image(seg, image.to(torch.uint8).float(), slide, out_size=(40, 70)),
    )


def _trained_like(seg, image, clusters):
    """Class vectors 0..clusters-1 = k-means centres of the image's pixel features (each pixel close to
    one class, as after training); the others stay random."""
    clf = seg.classifier
    with torch.no_grad():
        p = clf.pixel_vectors(seg.backbone(image[None]))[0]
        centres = p[torch.randperm(p.shape[0], generator=torch.Generator().manual_seed(0))[:clusters]].clone()
        for _ in range(5):
            assign = (p @ centres.T).argmax(1)
            sums = torch.zeros_like(centres).index_add_(0, assign, p)
            centres = F.normalize(sums + 1e-6 * centres, dim=-1)
        clf.proj_class.copy_(torch.eye(clf.dim))
        clf.class_embed[:clusters] = centres
        clf.gamma.fill_(8.0)


@pytest.mark.parametrize("kind", ["random", "trained", "ties"])
@pytest.mark.parametrize(
    "mode,out_size", [("whole", (24, 20)), ("whole", (70, 90)), ("slide", (40, 70)), ("slide", (13, 21))]
)
def test_bounded_argmax_equals_dense_reference(kind, mode, out_size):
    """The bounded and the chunked path (forced) give the naive dense argmax of the upsampled logits:
    random and trained-like classifiers, up- and down-sampled outputs, and exact ties between duplicated
    classes."""
    seg = _segmenter(300, dim=8)
    image = torch.randn(3, 48, 80)
    if kind == "trained":
        _trained_like(seg, image, 12)
    if kind == "ties":
        with torch.no_grad():
            seg.classifier.class_embed[1::2] = seg.classifier.class_embed[0::2]  # every class twice
    crop, stride = (32, 24) if mode == "slide" else (512, 512)
    ref = _reference_slide(seg, image, crop, stride, out_size) if mode == "slide" else None
    if mode == "whole":
        with torch.no_grad():
            up = F.interpolate(seg(image[None]).logits, size=(48, 80), mode="bilinear", align_corners=False)
            up = F.interpolate(up, size=out_size, mode="bilinear", align_corners=False)[0]  # two steps, as mmseg
        ref = up.argmax(0)
    pred, info = segment_image_detailed(
        seg, image, mode=mode, crop_size=crop, stride=stride, out_size=out_size, dense_max_elems=0
    )
    assert info["path"] == "bounded"
    assert torch.equal(pred, ref)
    chunked, info = segment_image_detailed(
        seg, image, mode=mode, crop_size=crop, stride=stride, out_size=out_size, argmax="chunked"
    )  # the GPU path, forced on the CPU
    assert info["path"] == "chunked" and torch.equal(chunked, ref)
    dense, info = segment_image_detailed(seg, image, mode=mode, crop_size=crop, stride=stride, out_size=out_size)
    assert info["path"] == "dense" and torch.equal(dense, ref)
    if kind == "ties":
        assert (pred % 2 == 0).all()  # of two identical classes the first wins, as torch.argmax
        assert (chunked % 2 == 0).all()


def test_bounded_argmax_ties_and_constant_logits():
    r, c = resize_matrix(4, 37, dtype=torch.float64), resize_matrix(5, 29, dtype=torch.float64)
    logits = torch.zeros(6, 4, 5)  # (classes, feature rows, feature columns)
    pred, _ = bounded_argmax(logits, r, c)
    assert torch.equal(pred, torch.zeros(37, 29, dtype=torch.long))  # all tied: the first class
    logits = torch.randn(50, 4, 5, generator=torch.Generator().manual_seed(1))
    logits[30] = logits[7]  # an exact duplicate after the class it copies
    logits[3] = logits[41]  # ... and one before
    dense = torch.einsum("ya,nab,xb->nyx", r.float(), logits, c.float()).argmax(0)
    pred, _ = bounded_argmax(logits, r, c)
    assert torch.equal(pred, dense)
    assert not (pred == 30).any() and not (pred == 41).any()


def test_21k_classes_exact():
    seg = _segmenter(21843, dim=8)
    image = torch.rand(3, 32, 32) * 255
    with torch.no_grad():
        logits = seg(image[None]).logits  # (1, 21843, 2, 2): small at feature resolution
    ref = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    ref = F.interpolate(ref, size=(24, 20), mode="bilinear", align_corners=False)[0].argmax(0)
    pred, info = segment_image_detailed(seg, image, mode="whole", out_size=(24, 20), dense_max_elems=0)
    assert info["path"] == "bounded"
    assert info["level0_pairs"] < 4 * 21843  # the level-0 bound dropped classes
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


def test_uniform_image_is_one_class_without_pixel_work():
    seg = _segmenter(21843, dim=8)
    with torch.no_grad():
        seg.backbone.pos_embed.zero_()  # a constant image then gives the same feature at every pixel
    image = torch.full((3, 32, 48), 0.3)
    pred, info = segment_image_detailed(seg, image, mode="slide", crop_size=32, stride=16, dense_max_elems=0)
    with torch.no_grad():
        ref = seg(image[None, :, :, :32]).logits[0, :, 0, 0].argmax()
    assert torch.equal(pred, torch.full((32, 48), int(ref)))
    assert info["level0_pairs"] == info["cells"]  # one class survives per cell: painted, no pixel evaluated


def test_one_gemm_logits_equal_classifier_arithmetic():
    """gamma * standardize(p c^T) + beta from the class covariance equals the classifier's own formula,
    also when the class vectors share a large common direction (no cancellation: vectors are centred)."""
    clf = CosineClassifier(500, 32)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        clf.gamma.fill_(-4.0), clf.beta.fill_(0.7)  # a negative scale is allowed by the formula too
        p = F.normalize(torch.randn(64, 32, generator=g), dim=-1)
        for shift in (0.0, 3.0):
            c = F.normalize(torch.randn(500, 32, generator=g) + shift * torch.ones(32), dim=-1)
            ref = clf.logits_from_scores(p @ c.T)
            got = clf.logits_one_gemm(p, CenteredClasses.of(c))
            assert got.shape == (500, 64)
            assert torch.allclose(got.T, ref, atol=2e-5 * ref.abs().max(), rtol=0)


def test_class_cache_follows_weights_and_class_sets():
    seg = _segmenter(60, dim=8)
    image = torch.rand(3, 32, 48) * 255
    whole = EvalConfig(mode="whole", amp="off")
    clf, all_ids, sub = seg.classifier, torch.arange(60), torch.tensor([5, 1, 40])
    first = centered_classes(clf, all_ids)
    assert centered_classes(clf, sub) is not first
    assert centered_classes(clf, torch.arange(60)) is first  # equal ids, another tensor: a hit
    assert torch.equal(segment_image(seg, image, whole), _reference_slide(seg, image, 512, 512, (32, 48)))
    with torch.no_grad():
        clf.class_embed[7:20] = clf.class_embed[30:43].flip(0) * 2  # in place: a new version of the weights
    assert centered_classes(clf, all_ids) is not first
    assert torch.equal(segment_image(seg, image, whole), _reference_slide(seg, image, 512, 512, (32, 48)))
    clf.proj_class.data = torch.eye(8)  # a new tensor: another address
    assert torch.equal(
        segment_image(seg, image, whole, class_ids=sub), _reference_slide(seg, image, 512, 512, (32, 48), class_ids=sub)
    )


@pytest.mark.parametrize("dense_pixels", [1, 12, 1 << 20])
def test_bounded_argmax_quadtree_and_dense_stage_agree(monkeypatch, dense_pixels):
    """Sub-cells go down the corner quadtree until they hold at most DENSE_PIXELS pixels, then every
    candidate is evaluated at every pixel: any split point gives the dense argmax, ties to the lowest class."""
    monkeypatch.setattr(bounded_argmax_module, "DENSE_PIXELS", dense_pixels)
    monkeypatch.setattr(bounded_argmax_module, "DENSE_ELEMS", 1 << 12)  # several blocks of sub-cells
    r, c = resize_matrix(5, 61, dtype=torch.float64), resize_matrix(6, 47, dtype=torch.float64)
    logits = torch.randn(400, 5, 6, generator=torch.Generator().manual_seed(2))
    logits[200:] = logits[:200]  # every class twice: the first copy must win
    dense = torch.einsum("ya,nab,xb->nyx", r.float(), logits, c.float()).argmax(0)
    pred, stats = bounded_argmax(logits, r, c)
    assert torch.equal(pred, dense) and int(pred.max()) < 200
    assert stats["dense_values"] > 0  # contested pixels were evaluated (single pixels, at the latest)


def _near_tied_logits(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(300, 5, 6) logits where every odd class is its even twin plus 2-3e-5 at every feature pixel
    (so it wins wherever the pair does, by less than one bf16 GEMM can resolve: ~1e-2 at these values),
    and classes 250.. exact duplicates of 0..49; and the axes' resize matrices (up-sampling)."""
    gen = torch.Generator().manual_seed(seed)
    base = 3 * torch.randn(150, 5, 6, generator=gen)
    twin = base + 2e-5 * (1 + 0.5 * torch.rand(150, 5, 6, generator=gen))
    logits = torch.stack([base, twin], 1).reshape(300, 5, 6)
    logits[250:] = logits[:50]  # exact duplicates: the first copy must win
    return logits, resize_matrix(5, 61, dtype=torch.float64), resize_matrix(6, 47, dtype=torch.float64)


@pytest.mark.parametrize("class_chunk,tile_elems", [(256, 1 << 26), (7, 1000)])
def test_chunked_argmax_rechecks_near_ties_exactly(monkeypatch, class_chunk, tile_elems):
    """Split bf16 GEMMs cannot order classes closer than their error bound; those pixels are re-checked in
    float32, so the labels equal the dense float32 argmax (ties to the lowest class), whatever the class
    chunks (7: twins in different chunks) and row tiles."""
    logits, r, c = _near_tied_logits()
    dense = torch.einsum("ya,nab,xb->nyx", r.float(), logits, c.float()).argmax(0)
    pred, stats = chunked_argmax(logits, r, c, class_chunk=class_chunk, tile_elems=tile_elems)
    assert torch.equal(pred, dense)
    assert (pred % 2 == 1).all() and int(pred.max()) < 250  # the better twin, never a later duplicate
    assert stats["near_ties"] > 0.5 * pred.numel()  # the near-ties are most pixels here: all re-checked
    fp32, stats = chunked_argmax(
        logits, r, c, compute_dtype=torch.float32, class_chunk=class_chunk, tile_elems=tile_elems
    )
    assert torch.equal(fp32, dense) and stats["near_ties"] == 0  # float32 tiles: the reference itself
    # the re-check decides those pixels: without it (class 0 instead) they are wrong
    monkeypatch.setattr(chunked_argmax_module, "exact_values_argmax", lambda logits, r, c, ys, xs: torch.zeros_like(ys))
    unchecked, _ = chunked_argmax(logits, r, c, class_chunk=class_chunk, tile_elems=tile_elems)
    assert (unchecked != dense).float().mean() > 0.5


@pytest.mark.parametrize("out_w", [96, 47, 5])  # x16 up-sampling (C exact in bf16), other sizes (C split too)
def test_chunked_argmax_error_bound_holds(out_w):
    """The bf16 split values stay within error_bound of the exact (float64) values: the premise of the
    re-check. Large logits, so that the bound is far above float32 noise."""
    gen = torch.Generator().manual_seed(5)
    logits = 50 * torch.randn(64, 5, 6, generator=gen)
    r, c = resize_matrix(5, 61, dtype=torch.float64), resize_matrix(6, out_w, dtype=torch.float64)
    c_hi, c_lo = chunked_argmax_module.split_c(c.float())
    assert (c_lo is None) == (out_w == 96)
    approx = chunked_argmax_module.split_values(torch.matmul(r.float(), logits), c_hi, c_lo)
    exact = torch.einsum("ya,nab,xb->nyx", r, logits.double(), c)
    bound = float(chunked_argmax_module.error_bound(logits))
    worst = float((approx.double() - exact).abs().max())
    assert 0 < worst <= bound
    one_term = torch.matmul(torch.matmul(r.float(), logits).bfloat16(), c_hi)  # a single bf16 GEMM
    assert float((one_term.double() - exact).abs().max()) > 20 * bound  # what the split buys


def test_chunked_argmax_ties_and_constant_logits():
    r, c = resize_matrix(4, 37, dtype=torch.float64), resize_matrix(5, 29, dtype=torch.float64)
    pred, stats = chunked_argmax(torch.zeros(6, 4, 5), r, c)
    assert torch.equal(pred, torch.zeros(37, 29, dtype=torch.long)) and stats["near_ties"] == 37 * 29
    pred, _ = chunked_argmax(torch.randn(1, 4, 5), r, c)  # one class
    assert torch.equal(pred, torch.zeros(37, 29, dtype=torch.long))


def test_argmax_path_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert argmax_path(cpu, 100, 1000) == argmax_path(cuda, 100, 1000) == "dense"
    assert argmax_path(cpu, 10_000, 1000) == "bounded" and argmax_path(cuda, 10_000, 1000) == "chunked"
    with pytest.raises(ValueError, match="argmax"):
        segment_image_detailed(_segmenter(3), torch.rand(3, 16, 16), argmax="fast")


def test_chunked_argmax_loop_makes_no_host_sync_calls(monkeypatch):
    """The chunk x tile loop reads nothing back to the host (on a GPU every kernel is queued without
    waiting); the bf16 path reads back only outside it: whether bf16 holds C exactly (before) and the
    near-tie pixels (after)."""
    logits, r, c = _near_tied_logits()
    calls = []
    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "nonzero"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    pred, _ = chunked_argmax(logits, r, c, compute_dtype=torch.float32, class_chunk=7, tile_elems=1000)
    loop_calls = list(calls)
    chunked_argmax(logits, r, c, class_chunk=7, tile_elems=1000)  # bf16: the re-check reads back
    monkeypatch.undo()
    assert loop_calls == [] and "nonzero" in calls
