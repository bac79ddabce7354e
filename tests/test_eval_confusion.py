"""The bincount confusion matrix and the mIoU-family metrics, against hand-computed and loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from larvseg.config import IGNORE_INDEX
from larvseg.eval.confusion import ConfusionAccumulator, compute_metrics, confusion_matrix

IGN = IGNORE_INDEX


def test_hand_computed_matrix_and_metrics_with_other_column():
    # eval vocabulary: union ids 5, 2, 9 -> eval indices 0, 1, 2; class 0 is base, 1 and 2 novel.
    # union id 7 is no eval class (e.g. a COCO-only class): predicting it is always wrong.
    label = torch.tensor([[5, 5, 5, 2], [2, 9, IGN, 2]])
    pred = torch.tensor([[5, 5, 2, 2], [7, 5, 5, 2]])
    acc = ConfusionAccumulator([5, 2, 9])
    acc.update(pred, label)
    expected = torch.tensor([[2, 1, 0, 0], [0, 2, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(acc.reduce(), expected)

    m = compute_metrics(acc.matrix, base_mask=[True, False, False])
    # tp = [2, 2, 0]; gt = [3, 3, 1]; predicted as each eval class = [3, 3, 0] (the 7 is in no column)
    np.testing.assert_allclose(m["IoU"], [100 * 2 / 4, 100 * 2 / 4, 0.0])
    np.testing.assert_allclose(m["Acc"], [100 * 2 / 3, 100 * 2 / 3, 0.0])
    assert m["mIoU"] == pytest.approx(100 / 3)
    assert m["mAcc"] == pytest.approx(100 * 4 / 9)
    assert m["aAcc"] == pytest.approx(100 * 4 / 7)
    assert m["mIoU_base"] == pytest.approx(50.0)
    assert m["mAcc_base"] == pytest.approx(100 * 2 / 3)
    assert m["aAcc_base"] == pytest.approx(100 * 2 / 3)
    assert m["mIoU_novel"] == pytest.approx(25.0)
    assert m["mAcc_novel"] == pytest.approx(100 / 3)
    assert m["aAcc_novel"] == pytest.approx(50.0)


def test_conventions_differ_on_predicted_but_absent_class():
    # class 2 is predicted once but never in the ground truth; class 3 is neither.
    label = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])
    acc = ConfusionAccumulator([0, 1, 2, 3])
    acc.update(pred, label)
    mm = compute_metrics(acc.matrix, convention="mmseg")
    d2 = compute_metrics(acc.matrix, convention="detectron2")
    np.testing.assert_allclose(mm["IoU"], [50.0, 100.0, 0.0, np.nan])
    np.testing.assert_allclose(d2["IoU"], [50.0, 100.0, np.nan, np.nan])
    assert mm["mIoU"] == pytest.approx(50.0)
    assert d2["mIoU"] == pytest.approx(75.0)
    np.testing.assert_allclose(mm["Acc"], [50.0, 100.0, np.nan, np.nan])
    assert mm["mAcc"] == d2["mAcc"] == pytest.approx(75.0)
    assert mm["aAcc"] == d2["aAcc"] == pytest.approx(75.0)
    with pytest.raises(ValueError, match="convention"):
        compute_metrics(acc.matrix, convention="cityscapes")


def _loop_reference(
    pred: np.ndarray, label: np.ndarray, eval_ids: list[int], base: np.ndarray, convention: str
) -> dict:
    """Straight per-class loop over the definitions (independent of the bincount code)."""
    keep = label != IGN
    p, g = pred[keep], label[keep]
    ious, accs = [], []
    for c in eval_ids:
        tp = np.sum((p == c) & (g == c))
        gt = np.sum(g == c)
        pr = np.sum(p == c)
        union = gt + pr - tp
        iou = tp / union if union > 0 else math.nan
        if convention == "detectron2" and gt == 0:
            iou = math.nan
        ious.append(iou)
        accs.append(tp / gt if gt > 0 else math.nan)
    ious, accs = np.array(ious), np.array(accs)
    correct = np.array([np.sum((p == c) & (g == c)) for c in eval_ids])
    labelled = np.array([np.sum(g == c) for c in eval_ids])
    out = {}
    for suffix, sel in (("", np.ones(len(eval_ids), bool)), ("_base", base), ("_novel", ~base)):
        out["mIoU" + suffix] = np.nanmean(ious[sel]) * 100
        out["mAcc" + suffix] = np.nanmean(accs[sel]) * 100
        out["aAcc" + suffix] = correct[sel].sum() / labelled[sel].sum() * 100
    out["IoU"], out["Acc"] = ious * 100, accs * 100
    return out


@pytest.mark.parametrize("convention", ["mmseg", "detectron2"])
def test_random_images_match_loop_reference(convention):
    rng = np.random.default_rng(1)
    eval_ids = [3, 0, 8, 5, 11, 2, 7]  # union ids; 1, 4, 6, 9, 10 are no eval class
    base = np.array([True, True, False, True, False, False, False])
    acc = ConfusionAccumulator(eval_ids)
    preds, labels = [], []
    for _ in range(3):  # several images of different sizes, accumulated
        h, w = rng.integers(5, 12, size=2)
        label = rng.choice(eval_ids[:-1], size=(h, w))  # union id 7 never in the ground truth
        label[rng.random((h, w)) < 0.2] = IGN
        pred = np.where(rng.random((h, w)) < 0.5, label, rng.integers(0, 12, size=(h, w)))
        pred[label == IGN] = rng.integers(0, 12, size=int((label == IGN).sum()))
        acc.update(torch.from_numpy(pred), torch.from_numpy(label))
        preds.append(pred.ravel())
        labels.append(label.ravel())
    got = compute_metrics(acc.matrix, base, convention)
    ref = _loop_reference(np.concatenate(preds), np.concatenate(labels), eval_ids, base, convention)
    np.testing.assert_allclose(got["IoU"], ref["IoU"])
    np.testing.assert_allclose(got["Acc"], ref["Acc"])
    for key in ("mIoU", "mAcc", "aAcc"):
        for suffix in ("", "_base", "_novel"):
            assert got[key + suffix] == pytest.approx(ref[key + suffix]), key + suffix


def test_confusion_matrix_matches_pairwise_count_and_rejects_out_of_range():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 6, (2, 9, 7), generator=g)
    pred = torch.randint(0, 6, (2, 9, 7), generator=g)
    label[0, :2] = IGN
    m = confusion_matrix(pred, label, 6, IGN)
    ref = torch.zeros(6, 6, dtype=torch.long)
    for gt, pr in zip(label.flatten().tolist(), pred.flatten().tolist()):
        if gt != IGN:
            ref[gt, pr] += 1
    assert m.dtype == torch.long and torch.equal(m, ref)
    bad = pred.clone()
    bad[1, 0, 0] = 6
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        confusion_matrix(bad, label, 6, IGN)
    bad_ignored = pred.clone()
    bad_ignored[0, 0, 0] = 99  # under an ignored label: not counted, no error
    assert torch.equal(confusion_matrix(bad_ignored, label, 6, IGN), m)


def test_labels_outside_eval_vocabulary_are_an_error():
    acc = ConfusionAccumulator([0, 1])
    acc.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="outside the evaluation vocabulary"):
        compute_metrics(acc.matrix)
