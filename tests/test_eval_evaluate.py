"""``larvseg eval``: data.eval.skip_bad, eval.classes / --classes (the demo's numbers), the collapsed table."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

from larvseg.cli import main as cli_main
from larvseg.config import EvalConfig, ModelConfig, SourceConfig, dump_config
from larvseg.data import testing as T
from larvseg.data.io import CorruptImageError
from larvseg.data.sources import build_vocabulary
from larvseg.eval.evaluate import evaluate, format_table
from larvseg.models.segmenter import build_segmenter
from larvseg.train.checkpoint import save_checkpoint

SMALL_EVAL = EvalConfig(mode="whole", crop_size=32, stride=32, short_side=32, max_long_side=64, amp="off")


def _segmenter(num_classes: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_segmenter(ModelConfig(arch="vit_mini", drop_path=0.0, cac=False), num_classes).eval()


def test_eval_skip_bad_counts_a_corrupt_image_and_the_table_collapses_idle_classes(tmp_path, caplog):
    T.write_ade847(tmp_path / "A847", n=4, size=(24, 32), values=[5, 300, 65535], split="validation")
    broken = sorted((tmp_path / "A847" / "images" / "validation").glob("*.jpg"))[2]
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    source = SourceConfig(name="A847", format="ade847", split="validation")
    cfg = dataclasses.replace(T.make_config(tmp_path, eval_source=source), eval=SMALL_EVAL)
    vocab = build_vocabulary(cfg)
    segmenter = _segmenter(len(vocab))
    with pytest.raises(CorruptImageError, match=broken.name):
        evaluate(cfg, segmenter, vocab)
    caplog.clear()
    cfg.data.eval.skip_bad = True  # was ignored: the same traceback
    with caplog.at_level(logging.INFO, logger="larvseg"):
        results = evaluate(cfg, segmenter, vocab, out_dir=tmp_path / "out")
    assert results["skipped_images"] == 1 and results["num_images"] == 3
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith(f"skipped an evaluation image (data.eval.skip_bad): {broken}")
    table = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    # 847 classes, 2 in the ground truth: the ones never predicted either are one line, not 800 rows of nan
    rows = [r for r in results["per_class"] if r["gt_pixels"] or r["pred_pixels"]]
    idle = len(results["per_class"]) - len(rows)
    assert idle > 700 and len(table.splitlines()) < len(rows) + 15
    assert f"({idle} classes absent from the ground truth and never predicted" in table
    assert "3 images (1 unreadable, skipped)" in table
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text())["skipped_images"] == 1
    assert format_table(results) in table


def test_eval_classes_reproduces_the_demo_numbers(tmp_path, capsys):
    from larvseg.data.synthetic import DEMO_CLASSES, SMOKE_SPEC, ensure_benchmark
    from larvseg.demo.run import LARVSEG, demo_evaluator, evaluate_variant, variant_config

    layout = ensure_benchmark(tmp_path / "data", SMOKE_SPEC)
    cfg = variant_config(layout, tmp_path / "work", LARVSEG, 0, 2)
    cfg.eval = dataclasses.replace(cfg.eval, amp="off")
    vocab = build_vocabulary(cfg)
    segmenter = _segmenter(len(vocab), seed=3)
    demo, _ = evaluate_variant(demo_evaluator(cfg, vocab), segmenter, 0)
    names = ",".join(c.name for c in DEMO_CLASSES)
    cfg.eval.classes = names
    results = evaluate(cfg, segmenter, vocab)
    assert len(results["per_class"]) == len(DEMO_CLASSES)  # scored: the 14 classes only (847 before)
    for key in ("mIoU", "mIoU_base", "mIoU_novel"):
        assert results[key] == pytest.approx(demo[key], abs=1e-9)
    by_name = {r["class"]: r["IoU"] for r in results["per_class"]}
    np.testing.assert_allclose(
        [by_name[vocab.names[vocab.index(c.name)]] for c in DEMO_CLASSES], demo["IoU"], atol=1e-9
    )

    # the command line: --classes (after the overrides), the checkpoint's own vocabulary
    config = tmp_path / "demo_eval.yaml"
    cfg.eval.classes = ""
    config.write_text(dump_config(cfg))
    ckpt = tmp_path / "model.pth"
    save_checkpoint(ckpt, {"model": segmenter.state_dict(), "config": cfg.to_dict(), "vocab": list(vocab.names)})
    assert (
        cli_main(
            [
                "eval",
                str(config),
                str(ckpt),
                "--eval",
                "mIoU",
                "eval.amp=off",
                "--classes",
                names,
                "--out",
                str(tmp_path / "cli"),
            ]
        )
        == 0
    )
    saved = json.loads((tmp_path / "cli" / "eval_results.json").read_text())
    assert saved["mIoU"] == pytest.approx(demo["mIoU"], abs=1e-9) and len(saved["per_class"]) == len(DEMO_CLASSES)
    assert cli_main(["eval", str(config), str(ckpt), "--classes", "sky,unicorn", "--out", str(tmp_path / "x")]) == 1
    assert "'unicorn'" in capsys.readouterr().err


def test_an_evaluator_builds_its_data_once_and_runs_like_evaluate(tmp_path, monkeypatch):
    """Evaluator(cfg, vocab): the dataset and scored classes are built once (on first use), then every run
    and every overlay reuses them; its run gives what evaluate() gives, and overlays draw the first images."""
    import larvseg.eval.evaluate as ev

    T.write_ade847(tmp_path / "A847", n=3, size=(24, 32), values=[5, 300], split="validation")
    source = SourceConfig(name="A847", format="ade847", split="validation")
    cfg = dataclasses.replace(T.make_config(tmp_path, eval_source=source), eval=SMALL_EVAL)
    vocab = build_vocabulary(cfg)
    segmenter = _segmenter(len(vocab))
    builds = []
    real = ev.build_eval_dataset
    monkeypatch.setattr(ev, "build_eval_dataset", lambda *a: builds.append(1) or real(*a))
    evaluator = ev.Evaluator(cfg, vocab)
    assert builds == []  # nothing read until it is used
    first = evaluator.run(segmenter, verbose=False)
    second = evaluator.run(segmenter, verbose=False)
    drawn = evaluator.overlays(segmenter, 2)
    assert builds == [1]
    once = evaluate(cfg, segmenter, vocab, verbose=False)
    keys = ("mIoU", "mIoU_base", "mIoU_novel", "mAcc", "aAcc", "num_images")
    np.testing.assert_equal([first[k] for k in keys], [once[k] for k in keys])
    np.testing.assert_equal([second[k] for k in keys], [once[k] for k in keys])
    assert first["num_images"] == 3
    assert len(drawn) == 2 and all(d.dtype == np.uint8 and d.ndim == 3 and d.shape[2] == 3 for d in drawn)
    assert len(evaluator.overlays(segmenter, 10)) == 3  # at most the dataset's images
