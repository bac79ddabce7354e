"""`larvseg demo --quick` end to end: stage 0 pretraining, the real data layer, training loop and inference
on the generated mini benchmark (runs in 2 parallel processes), every check of the claim (P1, P2, M, U,
Delta and the verdict), and a report whose contents are checked (not just its existence)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from larvseg.cli import main as cli_main
from larvseg.config import load_config
from larvseg.data.synthetic import DEMO_CLASSES
from larvseg.demo.checks import CLAIM_RULE
from larvseg.demo.run import VARIANTS, describe_model
from larvseg.models.segmenter import build_segmenter

CELL = r"(\d+\.\d) ± (\d+\.\d)"


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        cli_main(["demo", "--quick", "--jobs", "2", "--out", str(out), "train.iters=60"]) == 0
    )  # overrides reach every run
    printed = capsys.readouterr().out
    report = out / "report.md"
    assert f"report: {report.resolve()}" in printed
    served = re.search(r"larvseg serve (\S+)$", printed, re.M)  # the closing hint names the LarvSeg model
    assert served and served.group(1).endswith("larvseg/final.safetensors") and Path(served.group(1)).is_file()
    assert (out / "data" / "benchmark.json").is_file()  # generated on first use under the out dir

    text = report.read_text()
    assert "| variant | mIoU (all) | mIoU base | mIoU novel |" in text
    miou = {}  # variant label -> (all, base, novel) of the main table
    for variant in VARIANTS:
        m = re.search(rf"^\| {re.escape(variant.label)} \| {CELL} \| {CELL} \| {CELL} \|$", text, re.M)
        assert m, f"no table row for {variant.label!r}"
        values = [float(x) for x in m.groups()]
        assert all(0.0 <= x <= 100.0 for x in values)
        assert values[1::2] == [0.0, 0.0, 0.0]  # one seed: std 0
        miou[variant.label] = tuple(values[0::2])
        assert (out / "runs" / "seed0" / variant.directory / "final.safetensors").is_file()
        # the "Every run" table: the same numbers for the one seed
        assert re.search(
            rf"^\| {re.escape(variant.label)} \| 0 \| {miou[variant.label][0]:.1f} \| "
            rf"{miou[variant.label][1]:.1f} \| {miou[variant.label][2]:.1f} \| \d+ \| \d+ \|$",
            text,
            re.M,
        )
    # the per-class IoU table averages to the mIoU columns (each cell rounded to 0.1: within 0.05 + 0.05)
    per_class = {
        c.name: [
            float(x)
            for x in re.search(
                rf"^\| {c.name} \| {c.role} \| ([\d.]+) \| ([\d.]+) \| "
                rf"([\d.]+) \| ([\d.]+) \|$",
                text,
                re.M,
            ).groups()
        ]
        for c in DEMO_CLASSES
    }
    for k, variant in enumerate(VARIANTS):
        for col, role in ((0, None), (1, "base"), (2, "novel")):
            cells = [per_class[c.name][k] for c in DEMO_CLASSES if role in (None, c.role)]
            assert abs(sum(cells) / len(cells) - miou[variant.label][col]) <= 0.1, (variant.label, role)
    assert miou[VARIANTS[0].label][2] == 0.0  # segmentation only: novel classes never get a mask
    # `larvseg eval` on the LarvSeg checkpoint, restricted to the benchmark's classes, gives the report's row
    larvseg_run = next(v for v in VARIANTS if v.directory == "larvseg")
    run_dir = out / "runs" / "seed0" / larvseg_run.directory
    assert (
        cli_main(
            [
                "eval",
                str(run_dir / "config.yaml"),
                str(run_dir / "final.safetensors"),
                "--classes",
                ",".join(c.name for c in DEMO_CLASSES),
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    evaluated = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert evaluated["num_images"] == 16 and evaluated["skipped_images"] == 0
    assert tuple(round(evaluated[k], 1) for k in ("mIoU", "mIoU_base", "mIoU_novel")) == miou[larvseg_run.label]
    # the claim check: the rule first, then every check with a number, then the verdict (one seed: no interval)
    assert text.index(CLAIM_RULE) < text.index("| P1 premise |") < text.index("**Verdict (habitat benchmark): ")
    assert re.search(r"^\| P1 premise \|.*= \*\*\d+\.\d\d\*\* \| (yes|no) \|$", text, re.M)
    assert re.search(r"^\| P2 target failure \|.*\*\*\d+\.\d\d % vs \d+\.\d\d %\*\* \| (yes|no) \|$", text, re.M)
    assert re.search(r"^\| M mechanism \|.*0\.\d{3} vs 0\.\d{3}: \*\*[+-]\d\.\d{3}\*\* \| (yes|no) \|$", text, re.M)
    assert re.search(r"^\| Δ \|.*\*\*[+-]\d+\.\d\d \(n = 1: no interval\)\*\*", text, re.M)
    assert re.search(r"^\| U upper bound \|.*\*\*[+-]\d+\.\d\d \(n = 1: no interval\)\*\* \| n/a \|$", text, re.M)
    assert "**Verdict (habitat benchmark): inconclusive** (only 1 paired seed(s): no interval)." in text
    assert re.search(
        r"^Base mIoU vs segmentation only: baseline \(CAC off\) [+-]\d+\.\d, LarvSeg \(CAC\) [+-]\d+\.\d", text, re.M
    )
    # the findings are derived from the numbers: one of the two verdicts on LarvSeg vs the baseline
    assert ("LarvSeg (CAC) beats the baseline" in text) != ("LarvSeg (CAC) does NOT beat the baseline" in text)
    for c in DEMO_CLASSES:  # per-class table names every class with its role
        assert re.search(rf"^\| {c.name} \| {c.role} \|", text, re.M)
    # stage 0: the backbone every variant starts from, with its own accuracy and curve
    assert (out / "pretrain" / "backbone.npz").is_file()
    m = re.search(r"training top-1 accuracy .*: \*\*(\d+\.\d) %\*\*", text)
    assert m and 0.0 <= float(m.group(1)) <= 100.0
    assert "model.pretrained=backbone.npz" in text and "![pretraining curve](pretraining.png)" in text
    # paired differences: LarvSeg - baseline of the table's numbers (rounded there to 0.1), and the claim's Δ
    delta_novel, delta_base = map(
        float, re.search(r"^\| 0 \| ([+-]\d+\.\d\d) \| ([+-]\d+\.\d\d) \|$", text, re.M).groups()
    )
    baseline_label = next(v.label for v in VARIANTS if v.directory == "baseline")
    assert abs(delta_novel - (miou[larvseg_run.label][2] - miou[baseline_label][2])) <= 0.1
    assert abs(delta_base - (miou[larvseg_run.label][1] - miou[baseline_label][1])) <= 0.1
    assert f"**{delta_novel:+.2f} (n = 1: no interval)**" in text
    # diagnostics: base -> novel share for every variant, AUCs for every class of the LarvSeg run
    for variant in VARIANTS:
        assert re.search(rf"^\| {re.escape(variant.label)} \| \d+\.\d \|", text, re.M)
    for c in DEMO_CLASSES:
        assert re.search(
            rf"^\| {c.name} \| {c.role} \| (0|1)\.\d\d \| (0|1)\.\d\d \| (0|1)\.\d\d \| [+-]\d\.\d\d \|$", text, re.M
        )
    # the model line describes the model actually trained: its size and the stage-0 backbone it started from
    assert re.search(
        r"^- \*\*model\*\*: vit_mini \(ViT, 192-d, 4 blocks, patch 16\) with the cosine classifier, "
        r"initialised from `[^`]*backbone\.npz`",
        text,
        re.M,
    )
    assert "**training**: 60 iterations" in text
    # the report lists its checkpoints and the exact predict command for the LarvSeg model, which runs
    for variant in VARIANTS:
        assert f"`{out / 'runs' / 'seed0' / variant.directory / 'final.safetensors'}`" in text
    command = re.search(r"`larvseg predict ([^`]+)`", text).group(1).split()
    assert command[0] == str(out / "runs" / "seed0" / "larvseg" / "final.safetensors")
    assert cli_main(["predict", *command]) == 0
    predicted = Path(command[command.index("--out") + 1])
    areas = json.loads((predicted / "areas.json").read_text())
    images = sorted((out / "data" / "A847" / "images" / "validation").iterdir())
    assert sorted(areas) == [str(p) for p in images]  # one entry per evaluation image
    names = json.loads((predicted / "classes.json").read_text())  # the name of every label value
    for path, entry in areas.items():
        assert set(entry["areas"]) <= {c.name for c in DEMO_CLASSES}  # the trained (default) vocabulary
        assert abs(sum(entry["areas"].values()) - 1.0) < 1e-6
        label_map = np.asarray(Image.open(predicted / entry["labels"]))
        assert label_map.shape == np.asarray(Image.open(path)).shape[:2]
        values, counts = np.unique(label_map, return_counts=True)  # the areas are the label map's histogram
        assert {names[v]: round(n / label_map.size, 4) for v, n in zip(values, counts)} == {
            k: round(v, 4) for k, v in entry["areas"].items()
        }

    for name, min_w in (("panel.png", 500), ("per_class_iou.png", 500), ("pretraining.png", 500)):
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width >= min_w and im.height >= 250
            assert np.asarray(im.convert("L")).std() > 10  # not a blank canvas


def test_report_describes_the_model_trained(tmp_path):
    weights = tmp_path / "w.npz"
    for overrides, expected in (
        ([], "vit_mini (ViT, 192-d, 4 blocks, patch 16) with the cosine classifier, **random initialisation**"),
        (
            ["model.arch=vit_small", f"model.pretrained={weights}"],
            f"vit_small (ViT, 384-d, 12 blocks, patch 16) with the cosine classifier, initialised from `{weights}`",
        ),
    ):
        cfg = load_config("demo", overrides)
        model_cfg = dataclasses.replace(cfg.model, pretrained="")  # nothing to load here
        text = describe_model(cfg, build_segmenter(model_cfg, 3))
        assert text.startswith(expected)
        assert ("random initialisation" in text) == (not cfg.model.pretrained)
