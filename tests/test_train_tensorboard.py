"""TensorBoard event files of a real (tiny) training run: the JSONL's scalars, the curve and prediction
overlays, read back from the files in the work dir."""

from __future__ import annotations

import io
import json
import struct
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from larvseg.cli import main as cli_main
from larvseg.config import dump_config, load_config
from larvseg.data.synthetic import BenchmarkSpec, write_benchmark
from larvseg.distributed import select_device
from larvseg.eval.evaluate import Evaluator
from larvseg.train.logger import MetricLogger, read_metrics
from larvseg.train.loop import build, train

event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2", reason="the [tensorboard] extra is not installed")


def read_events(work_dir) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, np.ndarray]]]:
    """Scalars and images of every event file in ``work_dir`` (TFRecord framing: length, crc, data, crc)."""
    scalars: dict[str, dict[int, float]] = defaultdict(dict)
    images: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    files = sorted(work_dir.glob("events.out.tfevents.*"))
    assert files, f"no event files in {work_dir}"
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("image"):
                    images[value.tag][event.step] = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
                else:
                    scalars[value.tag][event.step] = value.simple_value
    return scalars, images


def test_training_writes_scalars_curve_and_overlays(tmp_path):
    data = write_benchmark(
        tmp_path / "data", BenchmarkSpec(seed=2, num_seg=4, per_class=1, num_eval=2, sizes=[[64, 80]])
    )
    work = tmp_path / "work"
    cfg = load_config(
        "tiny_cpu",
        [
            f"data.root={data.root}",
            f"data.tag_sources.0.classes={data.wnid_file}",
            f"train.work_dir={work}",
            "train.iters=4",
            "train.eval_interval=2",
            "train.log_interval=1",
            "train.checkpoint_interval=2",
        ],
    )
    vocab, segmenter, loader = build(cfg, select_device(cfg.train.device))
    train(cfg, vocab, segmenter, loader, resume="none", evaluator=Evaluator(cfg, vocab))
    records = read_metrics(work / "metrics.jsonl")
    scalars, images = read_events(work)

    trains = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in trains] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    for key in ("loss", "seg/C171", "cls/IN", "cac/IN", "lr"):  # the JSONL values, step by step
        assert scalars[f"train/{key}"] == pytest.approx({r["step"]: r[key] for r in trains}, rel=1e-6, abs=1e-9)
    for key in ("mIoU", "mIoU_base", "mIoU_novel"):
        assert scalars[f"eval/{key}"] == pytest.approx({r["step"]: r[key] for r in evals}, rel=1e-6, abs=1e-6)

    assert set(images["curve"]) == {2, 4}  # redrawn at each checkpoint
    curve = images["curve"][4]
    assert curve.shape[1] > 300 and curve.std() > 5
    for k in range(2):  # num_eval=2: both evaluation images, at both evaluations
        overlays = images[f"eval/prediction_{k}"]
        assert set(overlays) == {2, 4}
        h, w, _ = overlays[4].shape
        assert h >= 64 and w > 240  # the image plus the legend panel
        assert (overlays[4][:, -240:] < 128).any()  # the legend names classes

    # larvseg eval writes the same tags, at the checkpoint's step, next to its results
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_config(cfg))
    out = tmp_path / "eval_out"
    assert cli_main(["eval", str(config), str(work / "iter_00000004.pth"), "--out", str(out)]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    scalars, images = read_events(out)
    assert scalars["eval/mIoU"] == pytest.approx({4: results["mIoU"]}, rel=1e-6, abs=1e-6)
    assert scalars["eval/mIoU_novel"] == pytest.approx({4: results["mIoU_novel"]}, rel=1e-6, abs=1e-6)
    assert set(images["eval/prediction_1"]) == {4}


def test_tensorboard_off(tmp_path):
    logger = MetricLogger(
        tmp_path, total_iters=2, start_step=0, images_per_step=1, log_interval=1, enabled=True, tensorboard=False
    )
    logger.update(1, 0.1, {"loss": 1.0})
    logger.close()
    assert logger.tb is None and not list(tmp_path.glob("events.out.tfevents.*"))
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["loss"] == 1.0


def test_nan_metrics_are_left_out_without_a_message(tmp_path, capfd):
    """mIoU_novel is NaN when no novel class is scored (eval --classes of base classes): no point to plot,
    and no "NaN or Inf found in input tensor." line from tensorboardX for each such metric."""
    pytest.importorskip("tensorboardX")
    from larvseg.tensorboard import TensorBoardLog

    log = TensorBoardLog(tmp_path)
    log.scalars("eval/", 1, {"mIoU": 40.0, "mIoU_novel": float("nan"), "mAcc_novel": float("inf")})
    log.close()
    out, err = capfd.readouterr()
    assert "NaN or Inf" not in out + err
    scalars, _ = read_events(tmp_path)
    assert dict(scalars) == {"eval/mIoU": {1: 40.0}}
