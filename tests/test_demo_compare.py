"""`larvseg demo --compare`: the OPTION syntax, leakage against a per-pixel count, the paired table against a
hand computation, run reuse keyed on the resolved config, and the whole path end to end with --quick."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from larvseg.cli import build_parser, parse_args
from larvseg.cli import main as cli_main
from larvseg.config import load_config
from larvseg.data.synthetic import DEMO_CLASSES
from larvseg.demo.checks import t_interval
from larvseg.demo.compare import (
    PAPER,
    RUN_RECORD,
    CompareOptionError,
    LossOption,
    build_rows,
    finished_record,
    format_table,
    leakage,
    parse_option,
    parse_options,
    run_compare,
    run_key,
)
from larvseg.demo.run import BASELINE, LARVSEG, PROFILES, SEG_ONLY


def test_option_syntax():
    assert parse_option("model.image_loss.pooling=region") == LossOption(
        "pooling=region", ("model.image_loss.pooling=region",)
    )
    both = parse_option("region+conf: model.image_loss.pooling=region model.image_loss.confident_base=0.5")
    assert both.label == "region+conf"
    assert both.overrides == ("model.image_loss.pooling=region", "model.image_loss.confident_base=0.5")
    assert both.folder == "pooling=region+confident_base=0.5"
    # a colon inside a value is no label
    assert parse_option("model.pretrained=C:/x.npz").overrides == ("model.pretrained=C:/x.npz",)
    assert parse_option("model.image_loss.pooling=topk train.lr=0.1").label == "pooling=topk train.lr=0.1"
    with pytest.raises(ValueError, match=r"--compare 'pooling':.*not KEY=VALUE: 'pooling'"):
        parse_option("pooling")
    with pytest.raises(ValueError, match="no override"):
        parse_option("label:")
    with pytest.raises(ValueError, match="unbalanced|quotation"):
        parse_option("'model.image_loss.pooling=topk")
    with pytest.raises(ValueError, match="is taken by"):
        parse_options(["paper: model.image_loss.pooling=topk"])
    with pytest.raises(ValueError, match="is taken by"):
        parse_options([f"{SEG_ONLY.label}: model.image_loss.pooling=topk"])
    with pytest.raises(ValueError, match="label 'a' is taken by another OPTION"):
        parse_options(["a: model.image_loss.pooling=topk", "a: model.image_loss.pooling=region"])
    with pytest.raises(ValueError, match="have the same overrides"):  # one run folder
        parse_options(["a: model.image_loss.pooling=topk", "b: model.image_loss.pooling=topk"])


def test_cli_collects_options_after_the_overrides():
    args = parse_args(
        build_parser(),
        [
            "demo",
            "--quick",
            "train.iters=5",
            "--compare",
            "model.image_loss.pooling=topk",
            "r: model.image_loss.pooling=region",
            "--compare",
            "model.image_loss.confident_base=0.5",
        ],
    )
    assert args.overrides == ["train.iters=5"]
    assert args.compare == [
        "model.image_loss.pooling=topk",
        "r: model.image_loss.pooling=region",
        "model.image_loss.confident_base=0.5",
    ]


def test_the_reference_stays_the_papers_loss(tmp_path):
    with pytest.raises(CompareOptionError, match="reference would not be the paper's loss"):
        run_compare(
            tmp_path,
            tmp_path / "data",
            PROFILES["quick"],
            1,
            parse_options(["model.image_loss.pooling=topk"]),
            ["model.image_loss.pooling=region"],
        )
    assert not (tmp_path / "data").exists()  # refused before generating anything


def test_leakage_matches_a_per_pixel_count():
    rng = np.random.default_rng(0)
    base = np.array([True, True, False, True, False])
    gt = rng.integers(0, 5, 4000)
    pred = rng.integers(0, 6, 4000)  # 5 = "other"
    matrix = np.bincount(gt * 6 + pred, minlength=36).reshape(6, 6)

    def is_base(c: int) -> bool:
        return c < 5 and bool(base[c])

    def is_novel(c: int) -> bool:
        return c < 5 and not base[c]

    b2n = 100.0 * sum(is_base(g) and is_novel(p) for g, p in zip(gt, pred)) / sum(is_base(g) for g in gt)
    n2b = 100.0 * sum(is_novel(g) and is_base(p) for g, p in zip(gt, pred)) / sum(is_novel(g) for g in gt)
    assert leakage(matrix, base) == pytest.approx((b2n, n2b), rel=1e-12)
    assert np.isnan(leakage(np.zeros((6, 6)), base)[0])
    with pytest.raises(ValueError, match="must be"):
        leakage(np.zeros((5, 5)), base)


def _record(loss, variant, seed, base, novel, b2n=1.0, n2b=2.0):
    return {
        "loss": loss,
        "variant": variant.label,
        "seed": seed,
        "mIoU_base": base,
        "mIoU_novel": novel,
        "base_to_novel": b2n,
        "novel_to_base": n2b,
    }


def test_rows_pair_by_seed_against_the_paper():
    paper_b = {0: (30.0, 8.0), 1: (32.0, 9.0), 2: (28.0, 7.0)}
    paper_l = {0: (29.0, 9.0), 1: (31.0, 8.5), 2: (27.0, 8.0)}
    opt_b = {0: (48.0, 8.0), 1: (49.0, 8.5), 2: (46.0, 8.1)}
    opt_l = {0: (25.0, 12.0), 1: (33.0, 10.0), 2: (20.0, 11.0)}
    records = [_record(SEG_ONLY.label, SEG_ONLY, s, b, 0.0) for s, b in ((0, 50.0), (1, 49.0))]
    for loss, per_variant in ((PAPER, (paper_b, paper_l)), ("opt", (opt_b, opt_l))):
        for variant, values in zip((BASELINE, LARVSEG), per_variant):
            records += [_record(loss, variant, s, b, n, b2n=10.0 * s) for s, (b, n) in values.items()]
    rows = build_rows(records, [PAPER, "opt"])
    assert [(r.loss, r.variant) for r in rows] == [
        (SEG_ONLY.label, SEG_ONLY.label),
        (PAPER, BASELINE.label),
        (PAPER, LARVSEG.label),
        ("opt", BASELINE.label),
        ("opt", LARVSEG.label),
    ]
    ob, ol = rows[3], rows[4]
    expected = t_interval([opt_b[s][0] - paper_b[s][0] for s in range(3)])
    assert (ob.vs_paper["base"].mean, ob.vs_paper["base"].lo, ob.vs_paper["base"].hi) == pytest.approx(
        (expected.mean, expected.lo, expected.hi)
    )
    assert ob.improved == {"base": 3, "novel": 1}  # novel: +0.0 (not improved), -0.5, +1.1
    assert ob.base_vs_seg == pytest.approx(np.mean([48, 49, 46]) - 49.5)
    assert ob.novel_gain_kept == pytest.approx(100 * np.mean([8, 8.5, 8.1]) / 8.0)
    assert ob.meets_bar  # base -1.8 vs segmentation only, novel gain kept 102.5 %
    assert not ol.meets_bar  # base -23.5
    assert ol.improved == {"base": 1, "novel": 3}
    assert rows[1].vs_paper == {} and np.mean(list(rows[1].base_to_novel.values())) == pytest.approx(10.0)
    table = format_table(rows)
    assert re.search(
        r"^\| opt \| baseline \(CAC off\) \| 47\.7 \| 8\.2 \| \+17\.7 \[[+-]\d+\.\d, [+-]\d+\.\d\] \| .* \| 3/3 / 1/3 \| "
        r"-1\.8 \| 103 % \| 10\.0 \| 2\.0 \| yes \|$",
        table,
        re.MULTILINE,
    ), table


def test_reuse_is_keyed_on_the_resolved_config(tmp_path):
    cfg = load_config("demo", [f"train.work_dir={tmp_path}", "train.seed=1"])
    key = run_key(cfg, "backbone-hash", "benchmark-hash")
    assert finished_record(cfg, key) is None  # nothing there yet
    (tmp_path / RUN_RECORD).write_text(json.dumps({"key": key, "mIoU_base": 1.0}))
    assert finished_record(cfg, key)["mIoU_base"] == 1.0
    assert (
        finished_record(
            cfg,
            run_key(
                load_config("demo", [f"train.work_dir={tmp_path}", "train.seed=1"]), "backbone-hash", "benchmark-hash"
            ),
        )
        is not None
    )  # an identical config, rebuilt
    for other in (
        run_key(load_config("demo", [f"train.work_dir={tmp_path}", "train.seed=2"]), "backbone-hash", "benchmark-hash"),
        run_key(
            load_config("demo", [f"train.work_dir={tmp_path}", "train.seed=1", "model.image_loss.pooling=topk"]),
            "backbone-hash",
            "benchmark-hash",
        ),
        run_key(cfg, "another backbone", "benchmark-hash"),
        run_key(cfg, "backbone-hash", "another benchmark"),
    ):
        assert finished_record(cfg, other) is None


def test_compare_quick_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "cmp"
    common = ["demo", "--quick", "--jobs", "1", "--out", str(out), "train.iters=3", "pretrain.iters=2"]
    assert cli_main([*common, "--compare", "model.image_loss.pooling=region"]) == 0
    printed = capsys.readouterr().out
    assert "5 runs (0 finished ones reused), training 5" in printed
    md, data = (out / "compare.md").read_text(), json.loads((out / "compare.json").read_text())
    labels = [(r["loss"], r["variant"]) for r in data["rows"]]
    assert labels == [
        (SEG_ONLY.label, SEG_ONLY.label),
        (PAPER, BASELINE.label),
        (PAPER, LARVSEG.label),
        ("pooling=region", BASELINE.label),
        ("pooling=region", LARVSEG.label),
    ]
    for row in data["rows"]:
        assert f"| {row['variant']} | {row['mean']['base']:.1f} | {row['mean']['novel']:.1f} |" in md
        assert 0.0 <= row["mean"]["base_to_novel"] <= 100.0 and 0.0 <= row["mean"]["novel_to_base"] <= 100.0
    region = data["rows"][3]
    assert region["vs_paper"]["base"]["n"] == 1 and region["vs_paper"]["base"]["lo"] is None  # one seed: no interval
    assert region["vs_paper"]["base"]["mean"] == pytest.approx(region["mean"]["base"] - data["rows"][1]["mean"]["base"])
    # the leakage in the table is the one of the run's own confusion matrix
    run = out / "runs" / "seed0" / "pooling=region" / "baseline"
    base_mask = np.array([c.role == "base" for c in DEMO_CLASSES])
    assert leakage(np.load(run / "compare_eval" / "confusion.npy"), base_mask)[0] == pytest.approx(
        region["mean"]["base_to_novel"]
    )
    assert data["options"] == [
        {"label": "pooling=region", "overrides": ["model.image_loss.pooling=region"], "folder": "pooling=region"}
    ]

    # a second compare on the same folder: the paper's and segmentation only's runs are reused, a run whose record is
    # missing (killed before it finished) is trained again, a new option is trained
    paper_record = out / "runs" / "seed0" / "baseline" / RUN_RECORD
    stamp = paper_record.stat().st_mtime_ns
    (out / "runs" / "seed0" / "pooling=region" / "larvseg" / RUN_RECORD).unlink()
    before = json.loads((run / RUN_RECORD).read_text())
    assert cli_main([*common, "--compare", "model.image_loss.pooling=region", "model.image_loss.pooling=topk"]) == 0
    printed = capsys.readouterr().out
    assert "7 runs (4 finished ones reused), training 3" in printed
    assert paper_record.stat().st_mtime_ns == stamp
    assert json.loads((run / RUN_RECORD).read_text()) == before
    again = json.loads((out / "compare.json").read_text())
    assert again["rows"][:5] == data["rows"]  # deterministic: the retrained run gives the same numbers
    assert [r["loss"] for r in again["rows"][5:]] == ["pooling=topk"] * 2
    assert os.path.isfile(out / "runs" / "seed0" / "pooling=topk" / "larvseg" / RUN_RECORD)
