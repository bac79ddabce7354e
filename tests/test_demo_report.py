"""The demo report: numbers, sentences derived from them, and real PNG figures."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from larvseg.demo.report import PanelRow, RunResult, findings, summarise, summarise_results, write_report

VARIANTS = ("seg", "base", "cac")


def _results(novel: dict[str, list[float]]) -> list[RunResult]:
    out = []
    for v, values in novel.items():
        for seed, x in enumerate(values):
            out.append(
                RunResult(v, seed, miou=40.0 + seed, miou_base=60.0, miou_novel=x, class_iou=[50.0, float("nan"), x])
            )
    return out


def test_summary_is_mean_and_sample_std():
    s = summarise([1.0, 2.0, 6.0])
    assert s.mean == 3.0
    assert math.isclose(s.std, math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))
    assert summarise([5.0]).std == 0.0
    assert s.text() == "3.0 ± 2.6"


def test_findings_say_plainly_when_larvseg_loses():
    res = _results({"seg": [0.0, 0.5, 0.1], "base": [10.0, 12.0, 11.0], "cac": [9.0, 10.0, 8.0]})
    text = " ".join(findings(summarise_results(res), *VARIANTS))
    assert "about 0" in text
    assert "more than segmentation only" in text
    assert "does NOT beat the baseline" in text and "-2.00" in text and "higher in 0 of 3 seeds" in text


def test_findings_flag_a_win_within_noise():
    res = _results({"seg": [0.0, 0.0, 0.0], "base": [10.0, 20.0, 15.0], "cac": [16.0, 14.0, 16.0]})
    text = " ".join(findings(summarise_results(res), *VARIANTS))
    assert "beats the baseline on novel mIoU by +0.33" in text
    assert "not conclusive" in text and "higher in 2 of 3 seeds" in text


def test_write_report(tmp_path):
    res = _results({"seg": [0.0, 1.0], "base": [10.0, 12.0], "cac": [14.0, 15.0]})
    rng = np.random.default_rng(0)
    rows = [
        PanelRow(
            f"img{i}",
            rng.integers(0, 255, (32, 40, 3), dtype=np.uint8),
            rng.integers(-1, 3, (32, 40)),
            {v: rng.integers(0, 3, (32, 40)) for v in VARIANTS},
        )
        for i in range(2)
    ]
    path = write_report(tmp_path, res, ["a", "b", "c"], ["base", "base", "novel"], rows, {"model": "tiny"}, VARIANTS)
    text = path.read_text()
    assert "| base | 40.5 ± 0.7 | 60.0 ± 0.0 | 11.0 ± 1.4 |" in text  # mean ± sample std over 2 seeds
    assert "| cac | 1 | 41.0 | 60.0 | 15.0 |" in text
    assert "| b | base | n/a | n/a | n/a |" in text  # NaN IoU everywhere -> n/a
    for name in ("panel.png", "per_class_iou.png"):
        with Image.open(tmp_path / name) as im:
            im.verify()
        with Image.open(tmp_path / name) as im:
            assert im.width > 300 and im.height > 200
            assert np.asarray(im.convert("L")).std() > 5


def _three(novel_b, novel_l, base_s=60.0, base_b=60.0, base_l=60.0) -> list[RunResult]:
    out = []
    for seed in range(len(novel_b)):
        out.append(RunResult("seg", seed, 30.0, base_s, 0.0, [0.0]))
        out.append(RunResult("base", seed, 30.0, base_b, novel_b[seed], [0.0]))
        out.append(RunResult("cac", seed, 30.0, base_l, novel_l[seed], [0.0]))
    return out


def test_paired_differences():
    from larvseg.demo.report import paired_differences

    res = _three([10.0, 12.0, 11.0], [12.0, 13.5, 13.0])  # +2.0, +1.5, +2.0: mean 1.83, std 0.29
    paired = paired_differences(res, "base", "cac")
    assert paired["miou_novel"].values == [2.0, 1.5, 2.0] and paired["miou_base"].values == [0.0, 0.0, 0.0]
    assert math.isclose(paired["miou_novel"].std, 0.288675, rel_tol=1e-5)


def _claim(p1_novel_right: int, habitat_counts: list[int], oracle: bool = False):
    """Claim inputs with a known answer: P1 from a 2-class confusion (class 0 base always right, class 1 novel
    right p1_novel_right of 4 times), P2 from summed counts, M from fixed AUCs."""
    from larvseg.demo.diagnostics import FeatureDiagnostics
    from larvseg.demo.image_level_probe import ImageLevelProbe
    from larvseg.demo.report import ClaimInputs

    conf = np.array([[4, 0], [4 - p1_novel_right, p1_novel_right]])
    diag = FeatureDiagnostics([0.5, 0.5], None, None, 0.0, [1.0, 1.0], seed_confusion=conf)
    probe = ImageLevelProbe(habitat_counts, [0.9, 0.6], None)
    cac_probe = ImageLevelProbe([0, 0, 0, 0], [0.9, 0.6], [0.9, 0.7])
    return ClaimInputs(
        {("seg", 0): diag}, {("base", 0): probe, ("cac", 0): cac_probe}, VARIANTS, "oracle" if oracle else None
    )


def test_claim_section_states_the_rule_then_the_numbers():
    from larvseg.demo.checks import CLAIM_RULE
    from larvseg.demo.report import claim_section

    res = _three([10.0, 12.0, 11.0, 10.0, 12.0], [11.0, 12.5, 11.0, 10.5, 12.5])  # +1, +.5, 0, +.5, +.5
    text = "\n".join(claim_section(res, _claim(4, [30, 100, 10, 100]), ["base", "novel"]))
    assert text.index("**Rule.** " + CLAIM_RULE) < text.index("| P1 premise")
    # P1: both classes always right: 100 / 100 = 1.00; P2 30 % vs 10 %; M 0.7 - 0.6
    assert "100.0 / 100.0 = **1.00** | yes |" in text
    assert "**30.00 % vs 10.00 %** | yes |" in text and "0.700 vs 0.600: **+0.100** | yes |" in text
    # Delta: mean 0.5, s = 0.3536, t(4) 2.776 -> [+0.06, +0.94]: supported
    assert "**+0.50, 95% interval [+0.06, +0.94] (n = 5)**" in text
    assert "**Verdict (habitat benchmark): supported** (lower bound +0.06 > 0)" in text
    assert "base +0.0, cac +0.0 (within the ±3-point tolerance)" in text

    null = _three([10.0, 12.0, 11.0, 10.0, 12.0], [11.0, 11.5, 10.0, 10.5, 12.0])  # +1, -.5, -1, +.5, 0
    text = "\n".join(claim_section(null, _claim(1, [5, 100, 10, 100]), ["base", "novel"]))
    # P1 fails (novel IoU 1 / (1 + 3) = 25, base 4 / 7 = 57.1: 0.44) and P2 fails (5 % < 1.5 x 10 %)
    assert "**0.44** | no |" in text and "**5.00 % vs 10.00 %** | no |" in text
    assert "**Verdict (habitat benchmark): inconclusive** (lower bound" in text
    assert "P1 (premise) does not hold; P2 (target failure) does not hold" in text


def test_roc_auc_matches_pair_counting():
    from larvseg.demo.diagnostics import roc_auc

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 200).astype(np.float64)  # many ties
    pos = rng.random(200) < 0.3
    p, n = scores[pos], scores[~pos]
    expected = ((p[:, None] > n[None]).sum() + 0.5 * (p[:, None] == n[None]).sum()) / (p.size * n.size)
    assert math.isclose(roc_auc(scores, pos), expected, rel_tol=1e-12)
    assert roc_auc(np.array([0.1, 0.9]), np.array([False, True])) == 1.0
    assert math.isnan(roc_auc(np.array([0.1, 0.9]), np.array([True, True])))


def test_diagnostics_lines_report_leak_and_auc_gap():
    from larvseg.demo.diagnostics import FeatureDiagnostics
    from larvseg.demo.report import diagnostics_lines

    d = {
        ("cac", 0): FeatureDiagnostics([0.5, 0.6], [0.5, 0.7], [0.4, 0.6], 12.5, [1.0, 2.0]),
        ("cac", 1): FeatureDiagnostics([0.5, 0.6], [0.5, 0.7], [0.4, 0.6], 7.5, [1.0, 4.0]),
        ("seg", 0): FeatureDiagnostics([0.5, 0.6], None, None, 0.0, [1.0, 0.0]),
    }
    text = "\n".join(diagnostics_lines(d, ["seg", "cac"], ["x", "y"], ["base", "novel"], "cac", {"cac": -4.5}))
    assert "| cac | 10.0 | 3.00 |" in text and "| seg | 0.0 | 0.00 |" in text  # means over seeds
    # a base drop beyond the tolerance is explained (with the leak); one within it is called kept
    assert "Base mIoU drops with image-level data (cac: -4.5 vs segmentation only; 10.0 % of the base" in text
    assert "Cause: the image-level loss pools the logits" in text
    kept = "\n".join(diagnostics_lines(d, ["seg", "cac"], ["x", "y"], ["base", "novel"], "cac", {"cac": -2.5}))
    assert "Base mIoU is kept with image-level data: cac -2.5 vs segmentation only" in kept and "Cause:" not in kept
    assert "| y | novel | 0.70 | 0.60 | 0.60 | +0.10 |" in text
    assert "On 1 of 1 novel classes the bank separates" in text
