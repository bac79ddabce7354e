"""The pre-registered checks (larvseg/demo/checks.py): the t-interval and the verdict rule against a
hand-worked example, and each check's function on a tiny case with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from larvseg.demo import checks


def test_t_quantiles_match_the_tables():
    # two-sided 95 % critical values of Student's t (any statistics table)
    for df, expected in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert math.isclose(checks.t_quantile(0.975, df), expected, abs_tol=5e-4)
    assert math.isclose(checks.t_cdf(0.0, 3), 0.5) and math.isclose(checks.t_cdf(-1.0, 5) + checks.t_cdf(1.0, 5), 1.0)
    with pytest.raises(ValueError):
        checks.t_quantile(0.3, 4)


def test_t_interval_hand_worked():
    # the paired novel differences of the earlier default demo: +1.38, -3.92, +1.46
    # mean = -1.08 / 3 = -0.36; deviations 1.74, -3.56, 1.82; SS = 3.0276 + 12.6736 + 3.3124 = 19.0136
    # s = sqrt(19.0136 / 2) = 3.0833; se = s / sqrt(3) = 1.7802; t(0.975, 2) = 4.3027; half-width 7.6596
    iv = checks.t_interval([1.38, -3.92, 1.46])
    assert math.isclose(iv.mean, -0.36, abs_tol=1e-9)
    assert math.isclose(iv.lo, -0.36 - 7.6596, abs_tol=2e-3) and math.isclose(iv.hi, -0.36 + 7.6596, abs_tol=2e-3)
    assert iv.text() == "-0.36, 95% interval [-8.02, +7.30] (n = 3)"
    one = checks.t_interval([2.0])
    assert one.n == 1 and math.isnan(one.lo) and "no interval" in one.text()


def _iv(lo: float, hi: float, n: int = 5) -> checks.Interval:
    return checks.Interval((lo + hi) / 2, lo, hi, n, [0.0] * n)


def test_verdict_rule():
    assert checks.claim_verdict(_iv(0.4, 9.0), False, False)[0] == "supported"  # lo > 0 decides alone
    verdict, reason = checks.claim_verdict(_iv(-1.0, 4.0), True, True)
    assert verdict == "not reproduced at this scale" and "upper bound +4.00 < +6.0" in reason
    verdict, reason = checks.claim_verdict(_iv(-1.0, 6.5), True, True)  # the paper's +6.0 not excluded
    assert verdict == "inconclusive" and "+6.50 >= +6.0" in reason
    verdict, reason = checks.claim_verdict(_iv(-1.0, 4.0), False, True)
    assert verdict == "inconclusive" and "P1 (premise) does not hold" in reason and "P2" not in reason
    verdict, reason = checks.claim_verdict(_iv(-1.0, 4.0), True, False)
    assert verdict == "inconclusive" and "P2 (target failure) does not hold" in reason
    assert checks.claim_verdict(_iv(0.0, 4.0), True, True)[0] == "not reproduced at this scale"  # lo = 0 is not > 0
    assert checks.claim_verdict(checks.t_interval([3.0]), True, True)[0] == "inconclusive"  # one seed
    # the hand-worked interval above: P1 and P2 holding, it still cannot exclude +6.0
    assert checks.claim_verdict(checks.t_interval([1.38, -3.92, 1.46]), True, True)[0] == "inconclusive"


def test_seed_propagation_known_answer():
    # 2 x 4 patches: class 0 left, class 1 right; every patch of a segment has its class's feature, except
    # the unlabeled patch at (1, 1), whose feature is class 1's: propagation labels it 1 whatever seeds are drawn
    labels = np.array([[0, 0, 1, 1], [0, -1, 1, 1]])
    feats = np.zeros((2, 2, 4))
    feats[0, :, :2] = 1.0
    feats[1, :, 2:] = 1.0
    feats[:, 1, 1] = [0.0, 1.0]
    pred = checks.propagate_seeds(feats, labels, np.random.default_rng(0))
    assert pred.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    # two disconnected segments of one class are two segments, and each seed labels its own patch
    split = np.array([[2, 1, 2]])
    assert [c for c, _ in checks.segments(split)] == [1, 2, 2]
    exact = np.eye(3)[:, None, :]  # (3 dims, 1, 3 patches): each patch its own direction
    assert (checks.propagate_seeds(exact, split, np.random.default_rng(0)) == split).all()
    assert (checks.propagate_seeds(feats, np.full((2, 4), -1), np.random.default_rng(0)) == -1).all()  # no segment


def test_premise_ratio_from_a_confusion():
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 1, 2, 0])  # class 2 (novel) half wrong
    conf = checks.confusion(pred, labels, 3)
    assert conf.tolist() == [[2, 0, 0], [0, 2, 0], [1, 0, 1]]
    iou = checks.class_iou(conf)  # 2/3, 1, 1/2
    assert np.allclose(iou, [200 / 3, 100.0, 50.0])
    p = checks.premise(conf, np.array([True, True, False]))
    assert math.isclose(p.miou_base, (200 / 3 + 100) / 2) and math.isclose(p.ratio, 50.0 / ((200 / 3 + 100) / 2))
    assert p.ratio < checks.P1_MIN_RATIO


def test_habitat_counts_and_target_failure():
    # tag 3, habitat {0}; patches: two habitat (one predicted as the tag), three others (none), the tag itself
    labels = np.array([0, 0, 1, 2, 2, 3, -1])
    pred = np.array([3, 0, 1, 2, 3, 3, 3])
    counts = checks.habitat_counts(pred, labels, 3, (0,))
    assert counts.tolist() == [1, 2, 1, 3]
    tf = checks.target_failure(counts)
    assert tf.habitat_share == 50.0 and math.isclose(tf.other_share, 100 / 3)
    assert tf.holds  # 50 >= 1.5 x 33.3
    assert not checks.target_failure(np.array([1, 2, 2, 3])).holds  # 50 % vs 66.7 %
    assert not checks.target_failure(np.array([0, 4, 0, 4])).holds  # never predicted anywhere
    assert math.isnan(checks.target_failure(np.array([0, 0, 1, 3])).habitat_share)  # no habitat (uniform family)


def test_within_image_auc_and_class_means():
    assert checks.within_image_auc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0])) == 1.0
    assert checks.within_image_auc(np.array([0.5, 0.5, 0.5]), np.array([1, 0, 0])) == 0.5
    assert math.isnan(checks.within_image_auc(np.array([0.5, 0.6]), np.array([1, 1])))
    means = checks.per_class_mean([1.0, 0.5, float("nan"), 0.8], [0, 0, 1, 2], 4)
    assert means[0] == 0.75 and math.isnan(means[1]) and means[2] == 0.8 and math.isnan(means[3])
