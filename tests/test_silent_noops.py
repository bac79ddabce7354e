"""What used to be silent no-ops or silent accepts now does the work or says why not (issue: "no
traceback for any value a user can type, no silent no-op"): a finished run whose final evaluation is
missing evaluates, duplicate inputs get their own areas.json entries, outputs are checked before the
long work, export writes the .onnx only after its check, `data check` writes nothing, per-call classes
on the predictor, warnings as one line, every command prints its threads."""

from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from larvseg.cli import main
from larvseg.config import Config, EvalConfig, ModelConfig, load_config
from larvseg.models.segmenter import build_segmenter
from larvseg.predict import LarvSegPredictor
from larvseg.train.checkpoint import save_checkpoint

NAMES = ["sky", "tree", "road", "person"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = Config(
        model=ModelConfig(arch="vit_mini", drop_path=0.0, cac=False), eval=EvalConfig(mode="whole", short_side=0)
    )
    path = tmp_path_factory.mktemp("noops") / "small.pth"
    save_checkpoint(
        path,
        {
            "model": build_segmenter(cfg.model, len(NAMES)).state_dict(),
            "config": cfg.to_dict(),
            "vocab": NAMES,
            "supervised": [0, 1, 2],
        },
    )
    return path


def _image(path, seed=0, size=(40, 48)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _one_line(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, (argv, err)
    return lines[0]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("LARVSEG_DEBUG", raising=False)


def test_the_same_image_twice_gets_two_areas_entries(ckpt, tmp_path, capsys):
    image = _image(tmp_path / "a.png")
    out = tmp_path / "out"
    assert main(["predict", str(ckpt), str(image), str(image), "--out", str(out), "--device", "cpu"]) == 0
    areas = json.loads((out / "areas.json").read_text())
    assert list(areas) == [str(image), f"{image} (#2)"]
    assert [e["labels"] for e in areas.values()] == ["a_labels.png", "a_1_labels.png"]
    assert (out / "a_labels.png").is_file() and (out / "a_1_labels.png").is_file()


def test_a_missing_class_file_is_an_error_not_a_class_name(ckpt, tmp_path, capsys):
    line = _one_line(
        capsys,
        ["predict", str(ckpt), str(_image(tmp_path / "a.png")), "--out", str(tmp_path / "o"), "--classes", "names.txt"],
    )
    assert "argument --classes" in line and "no such file" in line
    with pytest.raises(Exception, match="names.txt.*no such file"):
        LarvSegPredictor.from_checkpoint(ckpt, classes="names.txt", device="cpu")


def test_per_call_classes_on_the_predictor(ckpt, tmp_path):
    predictor = LarvSegPredictor.from_checkpoint(ckpt, device="cpu")
    image = np.asarray(Image.open(_image(tmp_path / "a.png")))
    only_road = predictor(image, classes=["road"])
    assert set(np.unique(only_road.label_map)) == {2} and list(only_road.areas) == ["road"]
    two = predictor(image, classes="sky, tree")
    assert set(np.unique(two.label_map)) <= {0, 1}
    default = predictor(image)  # the predictor's own vocabulary is unchanged: the supervised classes
    assert set(np.unique(default.label_map)) <= {0, 1, 2}


def test_predict_warnings_are_one_line_without_a_source_line(ckpt, tmp_path, capsys):
    out = tmp_path / "o"
    assert (
        main(
            [
                "predict",
                str(ckpt),
                str(_image(tmp_path / "a.png")),
                "--out",
                str(out),
                "--classes",
                "sky,person",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    warning_lines = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warning_lines) == 1 and warning_lines[0].startswith("larvseg predict: warning: 1 of the requested")
    assert "warnings.warn" not in captured.err and "intra-op thread" in captured.out


def test_eval_checks_its_output_folder_before_evaluating(ckpt, tmp_path, capsys, monkeypatch):
    import larvseg.eval.evaluate as ev

    def refuse(*args, **kwargs):
        raise AssertionError("evaluated before checking the output folder")

    monkeypatch.setattr(ev.Evaluator, "run", refuse)
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    line = _one_line(capsys, ["eval", "tiny_cpu", str(ckpt), "--out", str(blocker / "results")])
    assert "argument --out" in line and "is a file" in line
    # the default output folder, next to the checkpoint, is checked too
    (ckpt.parent / f"eval_{ckpt.stem}").write_text("in the way")
    try:
        line = _one_line(capsys, ["eval", "tiny_cpu", str(ckpt)])
        assert f"eval_{ckpt.stem}" in line and "is a file, not a folder" in line
    finally:
        (ckpt.parent / f"eval_{ckpt.stem}").unlink()


def test_train_checks_its_work_dir_before_building(tmp_path, capsys, monkeypatch):
    import larvseg.train.loop as loop

    monkeypatch.setattr(
        loop.main, "__defaults__", (lambda *a: (_ for _ in ()).throw(AssertionError("built before the check")),)
    )
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = _one_line(capsys, ["train", "tiny_cpu", f"train.work_dir={blocker}/run"])
    assert "work dir" in line and "is a file" in line


def test_export_with_an_unreadable_check_image_writes_no_onnx(ckpt, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    onnx = tmp_path / "m.onnx"
    line = _one_line(capsys, ["export", str(ckpt), "--onnx", str(onnx), "--check-images", str(bad)])
    assert "bad.png" in line
    assert not onnx.exists() and not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".tmp*"))


def test_data_check_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["data", "check", "tiny_cpu", "--max-images", "1"]) == 0
    assert "0 problem(s)" in capsys.readouterr().out
    assert os.listdir(tmp_path) == []  # tiny_cpu's generated data was checked in a temporary folder


def test_a_finished_run_without_its_final_evaluation_evaluates_on_restart(tmp_path, monkeypatch, caplog):
    """The final evaluation failed (a bad label); restarted with data.eval.skip_bad=true it runs, instead
    of "nothing to do"."""
    import larvseg.train.loop as loop
    from larvseg.data.io import DataError
    from larvseg.data.testing import SyntheticLoader
    from larvseg.data.vocabulary import Vocabulary

    (tmp_path / "tiny.yaml").write_text("""
data:
  seg_sources: [{name: S, format: custom_seg, crop_size: 32}]
  tag_sources: [{name: T, format: custom_tags, crop_size: 32}]
  seg_batch_size: 2
  tag_batch_size: 2
  num_workers: 0
model: {arch: vit_mini, drop_path: 0.0, memory_bank_size: 2, num_sampled_classes: 3, cac: false, pretrained: ""}
train: {iters: 2, lr: 0.05, checkpoint_interval: 2, eval_interval: 0, amp: "off", device: cpu, tensorboard: false}
""")

    def build(cfg, device):
        loop.seed_everything(cfg.train.seed)
        return Vocabulary([f"c{i}" for i in range(4)]), build_segmenter(cfg.model, 4), SyntheticLoader(cfg, 0, 1, 4)

    calls = []

    def evaluate(cfg, segmenter, vocab, out_dir):
        calls.append(cfg.data.eval.skip_bad)
        if not cfg.data.eval.skip_bad:
            raise DataError(f"{out_dir}: label value 300 out of range")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval_results.json").write_text("{}")
        return {"mIoU": 50.0}

    def evaluator(cfg):  # what train() is handed: run(segmenter, out_dir=...)
        return SimpleNamespace(run=lambda segmenter, out_dir: evaluate(cfg, segmenter, None, out_dir))

    cfg = load_config(tmp_path / "tiny.yaml", [f"train.work_dir={tmp_path / 'work'}"])
    with pytest.raises(ValueError, match="train.eval_interval=0 evaluates during training, but train"):
        loop.train(cfg, *build(cfg, "cpu"), resume="none")  # no evaluator handed in: said, not skipped
    assert not (tmp_path / "work").exists()
    with pytest.raises(DataError):
        loop.train(cfg, *build(cfg, "cpu"), resume="none", evaluator=evaluator(cfg))
    assert (tmp_path / "work" / "iter_00000002.pth").is_file() and calls == [False]
    cfg = load_config(tmp_path / "tiny.yaml", [f"train.work_dir={tmp_path / 'work'}", "data.eval.skip_bad=true"])
    caplog.set_level(logging.INFO, logger="larvseg")
    caplog.clear()
    loop.train(cfg, *build(cfg, "cpu"), evaluator=evaluator(cfg))
    assert calls == [False, True]
    assert "resumed at step 2 >= train.iters 2: running the missing final evaluation" in caplog.messages
    caplog.clear()
    loop.train(cfg, *build(cfg, "cpu"), evaluator=evaluator(cfg))  # now it is there: nothing to do
    assert calls == [False, True] and "nothing to do: resumed at step 2 >= train.iters 2" in caplog.messages


def test_serve_prints_its_threads(ckpt, monkeypatch, capsys):
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: None)
    assert main(["serve", str(ckpt), "--device", "cpu"]) == 0
    assert "intra-op thread" in capsys.readouterr().out


def test_a_training_error_starts_its_own_line_after_the_progress_bar(tmp_path, monkeypatch, capsys):
    """On a terminal the bar's line is ended before the error propagates (it used to print on the bar's line)."""
    import larvseg.progress
    import larvseg.train.loop as loop
    from larvseg.data.io import DataError
    from larvseg.data.testing import SyntheticLoader
    from larvseg.data.vocabulary import Vocabulary

    monkeypatch.setattr(larvseg.progress, "_is_terminal", lambda stream: True)

    class FailingLoader(SyntheticLoader):
        def batch(self, step):
            if step == 1:
                raise DataError("train/x.png: cannot be decoded")
            return super().batch(step)

    (tmp_path / "tiny.yaml").write_text("""
data: {seg_sources: [{name: S, format: custom_seg, crop_size: 32}], seg_batch_size: 1, tag_batch_size: 0, num_workers: 0}
model: {arch: vit_mini, drop_path: 0.0, cac: false, num_sampled_classes: 2}
train: {iters: 3, checkpoint_interval: 5, eval_interval: -1, amp: "off", device: cpu, tensorboard: false}
""")

    def build(cfg, device):
        loop.seed_everything(0)
        return Vocabulary([f"c{i}" for i in range(6)]), build_segmenter(cfg.model, 6), FailingLoader(cfg, 0, 1, 6)

    monkeypatch.setattr(loop.main, "__defaults__", (build,))  # main(args, build=build): what the command builds
    assert main(["train", str(tmp_path / "tiny.yaml"), "--work-dir", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err
    assert "\rtrain:" in err  # the bar was drawn
    assert "\nlarvseg train: error: train/x.png: cannot be decoded" in err, repr(err[-300:])


def test_an_unreadable_pretrained_file_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # tiny_cpu generates its data under the working folder
    (tmp_path / "bad.npz").write_text("not a numpy archive")
    for value, says in ((tmp_path / "missing.npz", "pretrained file not found"), (tmp_path / "bad.npz", "bad.npz")):
        line = _one_line(capsys, ["train", "tiny_cpu", f"model.pretrained={value}", f"train.work_dir={tmp_path / 'w'}"])
        assert says in line and "model.pretrained" in line, line


def test_a_wrong_thread_count_in_the_environment_is_one_line(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LARVSEG_THREADS", "many")
    line = _one_line(
        capsys, ["predict", str(ckpt), str(_image(tmp_path / "a.png")), "--out", str(tmp_path / "o"), "--device", "cpu"]
    )
    assert "LARVSEG_THREADS='many'" in line
