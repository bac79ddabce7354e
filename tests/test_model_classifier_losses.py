"""Cosine classifier, class sampling and the baseline losses against loop-based references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from larvseg.config import IGNORE_INDEX, ModelConfig
from larvseg.data.batch import TAG_PAD, SegBatch, StepBatch, TagBatch
from larvseg.models.class_sampling import global_presence, sample_classes, step_generator
from larvseg.models.cosine_classifier import CosineClassifier
from larvseg.models.losses import (
    attended_mean_weights,
    image_level_ce_sum,
    pixel_ce_sum,
    upsampled_mean_weights,
)
from larvseg.models.memory_bank import MemoryBank
from larvseg.models.objective import TrainingObjective
from larvseg.models.segmenter import Segmenter, build_segmenter
from larvseg.models.vit import VisionTransformer


def test_cosine_logits_against_loop():
    torch.manual_seed(0)
    V, D = 12, 8
    clf = CosineClassifier(V, D)
    with torch.no_grad():
        clf.gamma.fill_(1.7)
        clf.beta.fill_(-0.3)
    x = torch.randn(2, D, 3, 2)
    ids = torch.tensor([7, 1, 4, 9, 0])
    out = clf(x, ids)
    assert out.logits.shape == (2, 5, 3, 2) and out.features.shape == (2, D, 3, 2)
    assert not out.scores.requires_grad and not out.features.requires_grad
    e = clf.class_embed.detach()
    wp, wc = clf.proj_patch.detach(), clf.proj_class.detach()
    for b in range(2):
        for i in range(3):
            for j in range(2):
                pv = x[b, :, i, j] @ wp
                pv = pv / pv.norm()
                s = []
                for c in ids.tolist():
                    cv = e[c] @ wc
                    s.append(float(pv @ (cv / cv.norm())))
                mean = sum(s) / len(s)
                var = sum((v - mean) ** 2 for v in s) / len(s)  # biased
                for n, v in enumerate(s):
                    assert out.scores[b, n, i, j].item() == pytest.approx(v, abs=1e-5)
                    ref = 1.7 * (v - mean) / math.sqrt(var + 1e-5) - 0.3
                    assert out.logits[b, n, i, j].item() == pytest.approx(ref, abs=1e-4)
                torch.testing.assert_close(out.features[b, :, i, j], pv, atol=1e-5, rtol=0)


def test_classifier_init():
    torch.manual_seed(0)
    clf = CosineClassifier(2000, 64)
    assert clf.gamma.item() == 1.0 and clf.beta.item() == 0.0
    assert abs(clf.class_embed.std().item() - 0.02) < 0.002
    assert abs(clf.proj_patch.std().item() - 64**-0.5) < 0.01


def test_class_sampling():
    V = 50
    pool = torch.arange(10, 40)
    present = global_presence(torch.tensor([12, 30, 45]), V)  # 45: present but outside the pool
    a = sample_classes(pool, present, 5, step_generator(0, 3, 1), V)
    b = sample_classes(pool, present, 5, step_generator(0, 3, 1), V)
    c = sample_classes(pool, present, 5, step_generator(0, 4, 1), V)
    assert torch.equal(a.class_ids, b.class_ids) and not torch.equal(a.class_ids, c.class_ids)
    assert a.class_ids.numel() == 8 and {12, 30, 45} <= set(a.class_ids.tolist())
    assert set(a.class_ids.tolist()) - {45} <= set(range(10, 40))
    assert torch.equal(a.class_ids, a.class_ids.sort().values)
    labels = torch.tensor([[12, IGNORE_INDEX], [30, 45]])
    r = a.remap(labels, pad=IGNORE_INDEX)
    ids = a.class_ids.tolist()
    assert r.tolist() == [[ids.index(12), IGNORE_INDEX], [ids.index(30), ids.index(45)]]
    with pytest.raises(ValueError, match="not in the sampled class subset"):
        a.remap(torch.tensor([1]), pad=IGNORE_INDEX)
    whole = sample_classes(pool, present, 0, step_generator(0, 3, 1), V)
    assert whole.class_ids.tolist() == list(range(10, 40)) + [45]


def test_pixel_ce_against_loop():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 3)
    labels = torch.randint(0, 4, (2, 8, 8))
    labels[0, :4, :] = IGNORE_INDEX
    total = pixel_ce_sum(logits, labels, downsample=2)
    up = F.interpolate(logits, size=(4, 4), mode="bilinear", align_corners=False)
    ref = 0.0
    for b in range(2):
        for i in range(4):
            for j in range(4):
                lab = int(labels[b, i * 2, j * 2])  # nearest 8 -> 4 picks the even pixels
                if lab != IGNORE_INDEX:
                    ref -= float(torch.log_softmax(up[b, :, i, j], 0)[lab])
    assert total.item() == pytest.approx(ref, rel=1e-5)


def test_image_level_loss_against_loop():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 4, 4)
    tags = torch.tensor([[1, 4, 2], [5, TAG_PAD, TAG_PAD]])
    total = image_level_ce_sum(logits, tags, TAG_PAD, downsample=1, crop_hw=(4, 4))
    ref = 0.0
    for b in range(2):
        image_tags = [t for t in tags[b].tolist() if t != TAG_PAD]
        pooled = logits[b].mean((1, 2))
        for t in image_tags:
            kept = [c for c in range(6) if c == t or c not in image_tags]
            ref -= float(pooled[t] - torch.logsumexp(pooled[kept], 0))
    assert total.item() == pytest.approx(ref, rel=1e-5)


def _tiny_segmenter(V: int = 20, cac: bool = True) -> Segmenter:
    bank = MemoryBank(V, 2, 32) if cac else None
    return Segmenter(VisionTransformer(32, 1, 2, pos_grid=2, drop_path=0.1), CosineClassifier(V, 32), bank)


def test_gradients_reach_every_parameter_but_not_the_bank():
    torch.manual_seed(0)
    seg = _tiny_segmenter()
    obj = TrainingObjective(seg, ModelConfig(num_sampled_classes=3, memory_bank_size=2), seed=0)
    sb = SegBatch("S", torch.randn(2, 3, 32, 32), torch.randint(0, 8, (2, 32, 32)), torch.arange(8), 2)
    tb = TagBatch("T", torch.randn(2, 3, 32, 32), torch.tensor([[9, 10], [11, TAG_PAD]]), torch.arange(8, 20), 2, False)
    for step in range(3):  # ring of 2 slots wraps after 2 steps -> the CAC term is live at step 2
        seg.zero_grad()
        out = obj(StepBatch(step, [sb], [tb]))
        out["loss"].backward()
    assert out["cac/T"].item() > 0
    assert set(out) == {"loss", "seg/S", "cls/T", "cac/T"}
    torch.testing.assert_close(out["loss"], out["seg/S"] + out["cls/T"] + out["cac/T"])
    for name, p in seg.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(not b.requires_grad for b in seg.bank.buffers())
    assert {"bank.slots", "bank.ptr", "bank.wraps"} <= set(seg.state_dict())


def test_objective_zero_images_and_normalisation():
    torch.manual_seed(0)
    seg = _tiny_segmenter(cac=False)
    obj = TrainingObjective(seg, ModelConfig(num_sampled_classes=0, cac=False), seed=0)
    empty = SegBatch("S", torch.zeros(0, 3, 32, 32), torch.zeros(0, 32, 32, dtype=torch.long), torch.arange(8), 4)
    tb = TagBatch("T", torch.zeros(0, 3, 32, 32), torch.zeros(0, 1, dtype=torch.long), torch.arange(8, 20), 4, True)
    out = obj(StepBatch(0, [empty], [tb]))
    assert out["loss"].item() == 0.0 and out["loss"].requires_grad
    out["loss"].backward()
    assert all(p.grad is not None for p in seg.parameters())
    # global normalisation: 2 local images of a global batch of 4 -> half of the local mean
    labels = torch.randint(0, 8, (2, 32, 32))
    imgs = torch.randn(2, 3, 32, 32)
    half = obj(StepBatch(1, [SegBatch("S", imgs, labels, torch.arange(8), 4)], []))["seg/S"]
    full = obj(StepBatch(1, [SegBatch("S", imgs, labels, torch.arange(8), 2)], []))["seg/S"]
    assert half.item() == pytest.approx(full.item() / 2, rel=1e-5)


def test_build_segmenter_forward_is_the_cosine_formula_on_standardised_pixels():
    """A built segmenter: an empty bank of the configured size, and logits = gamma * standardize_N(p . c) + beta
    of the backbone's features of the images standardised with the ImageNet mean/std, written out per pixel."""
    torch.manual_seed(0)
    seg = build_segmenter(ModelConfig(arch="vit_tiny", cac=True, memory_bank_size=3, drop_path=0.0), num_classes=7)
    seg.eval()
    assert seg.bank.slots.shape == (7, 3, 192) and not seg.bank.slots.any() and not seg.bank.ptr.any()
    with torch.no_grad():
        seg.classifier.gamma.fill_(1.7)
        seg.classifier.beta.fill_(-0.3)
        images = torch.rand(1, 3, 32, 48) * 255  # RGB pixel values, standardised by the segmenter
        ids = torch.tensor([1, 3, 6, 0])
        out = seg(images, ids)
        assert out.logits.shape == (1, 4, 2, 3) and out.features.shape == (1, 192, 2, 3)
        mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
        std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
        x = seg.backbone((images - mean) / std)[0]  # (192, 2, 3)
        clf = seg.classifier
        for i in range(2):
            for j in range(3):
                pv = x[:, i, j] @ clf.proj_patch
                pv = pv / pv.norm()
                s = [
                    float(pv @ (clf.class_embed[c] @ clf.proj_class) / (clf.class_embed[c] @ clf.proj_class).norm())
                    for c in ids.tolist()
                ]
                m = sum(s) / len(s)
                var = sum((v - m) ** 2 for v in s) / len(s)  # biased
                for n, v in enumerate(s):
                    ref = 1.7 * (v - m) / math.sqrt(var + 1e-5) - 0.3
                    assert out.logits[0, n, i, j].item() == pytest.approx(ref, abs=1e-4)
                torch.testing.assert_close(out.features[0, :, i, j], pv, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "feat_hw,loss_hw",
    [((4, 4), (8, 8)), ((5, 7), (13, 11)), ((20, 20), (160, 160)), ((6, 6), (6, 6)), ((8, 6), (4, 3))],
)
def test_pooling_at_feature_resolution_equals_upsampled_pooling(feat_hw, loss_hw):
    """mean over loss pixels of up(z) and of up(z) * sigmoid(up(s)) (the CAC's attention: sigmoid AFTER the
    upsampling), computed at feature resolution: same values, same grads."""
    torch.manual_seed(1)
    z = torch.randn(2, 5, *feat_hw, requires_grad=True)
    s = 2 * torch.randn(2, 3, *feat_hw)
    up = lambda x: F.interpolate(x.double(), size=loss_hw, mode="bilinear", align_corners=False)  # noqa: E731
    ref_mean = up(z).mean((2, 3))
    ref_prod = torch.einsum("bnij,btij->bnt", up(z), torch.sigmoid(up(s))) / (loss_hw[0] * loss_hw[1])
    w = upsampled_mean_weights(feat_hw, loss_hw, z.device)
    a = attended_mean_weights(s.flatten(0, 1), loss_hw).view(2, 3, -1)  # (b, T, hw)
    ours_mean = z.flatten(2) @ w
    ours_prod = torch.bmm(z.flatten(2), a.transpose(1, 2))
    torch.testing.assert_close(ours_mean, ref_mean.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_prod, ref_prod.float(), rtol=1e-5, atol=1e-6)
    coef = torch.randn_like(ours_prod)
    (g_ref,) = torch.autograd.grad((ref_prod * coef.double()).sum() + ref_mean.sum(), z)
    (g_ours,) = torch.autograd.grad((ours_prod * coef).sum() + ours_mean.sum(), z)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "src,labels_hw,down", [((4, 4), (16, 16), 2), ((5, 7), (26, 22), 2), ((32, 32), (512, 512), 2), ((6, 6), (6, 6), 1)]
)
def test_pixel_ce_equals_interpolate_then_cross_entropy(src, labels_hw, down):
    """The chunked upsample + CE gives F.cross_entropy(F.interpolate(z)) and its gradient, ignore pixels included."""
    torch.manual_seed(3)
    n = 7
    z = torch.randn(2, n, *src, requires_grad=True)
    labels = torch.randint(0, n, (2, *labels_hw))
    labels[0, : labels_hw[0] // 3] = IGNORE_INDEX
    size = (labels_hw[0] // down, labels_hw[1] // down)
    small = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    up = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
    ref = F.cross_entropy(up, small, ignore_index=IGNORE_INDEX, reduction="sum")
    ours = pixel_ce_sum(z, labels, down)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    (g_ref,) = torch.autograd.grad(ref * 0.5, z)
    (g_ours,) = torch.autograd.grad(ours * 0.5, z)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # no gradient wanted: the same value
        assert pixel_ce_sum(z, labels, down).item() == pytest.approx(ref.item(), rel=1e-5)
