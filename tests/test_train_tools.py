"""tools/dist_train.sh and tools/dist_test.sh end to end on CPU (gloo / one process) with the real data
layer, on a few images of the `larvseg demo` mini benchmark in its on-disk layouts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from larvseg.data.synthetic import BenchmarkSpec, write_benchmark
from larvseg.train.checkpoint import list_checkpoints, load_checkpoint
from larvseg.train.logger import read_metrics
from subprocesses import clean_env

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    data = write_benchmark(root / "data", BenchmarkSpec(seed=1, num_seg=4, per_class=1, num_eval=2, sizes=[[64, 80]]))
    config = root / "tiny.yaml"  # an experiment file, as the original's scripts take
    config.write_text(
        "_base_: tiny_cpu\n"
        f"data:\n  root: {data.root}\n"
        "  tag_sources:\n"
        f"    - {{name: IN, format: imagenet, root: I22K, classes: {data.wnid_file}, crop_size: 64,"
        " loss_weight: 0.2, cac_weight: 0.1, cac_topk: 2}\n"
        f"train:\n  work_dir: {root / 'work'}\n"
    )
    return root, config


def test_dist_train_then_dist_test(experiment):
    root, config = experiment
    work = root / "work"
    train = subprocess.run(
        ["bash", str(REPO / "tools" / "dist_train.sh"), str(config)],
        cwd=root,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(work)] == [2]
    assert (work / "final.safetensors").is_file() and (work / "final.json").is_file()
    records = read_metrics(work / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert {"loss", "seg/C171", "cls/IN", "cac/IN", "lr", "images_per_s", "eta_s"} <= set(records[0])
    in_loop = [r for r in records if r["kind"] == "eval"]
    assert len(in_loop) == 1 and in_loop[0]["step"] == 2  # eval_interval 0: once, at the end

    ckpt = work / "iter_00000002.pth"
    assert load_checkpoint(ckpt)["step"] == 2
    # overrides after --eval mIoU, the order of the script's own usage line ("unsupported --eval metric" before)
    test = subprocess.run(
        [
            "bash",
            str(REPO / "tools" / "dist_test.sh"),
            str(config),
            str(ckpt),
            "1",
            "--eval",
            "mIoU",
            "data.num_workers=0",
            "eval.max_images=0",
        ],
        cwd=root,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert test.returncode == 0, test.stdout[-2000:] + test.stderr[-3000:]
    results = json.loads((work / "eval_iter_00000002" / "eval_results.json").read_text())
    # the checkpoint evaluated by the script scores exactly what the loop measured on the same weights
    assert results["mIoU"] == pytest.approx(in_loop[0]["mIoU"], abs=1e-9)

    # 2-process evaluation (gloo on CPU): each rank scores its shard, the matrices are summed across ranks
    test2 = subprocess.run(
        [
            "bash",
            str(REPO / "tools" / "dist_test.sh"),
            str(config),
            str(ckpt),
            "2",
            "--eval",
            "mIoU",
            "--out",
            str(root / "eval_2proc"),
        ],
        cwd=root,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert test2.returncode == 0, test2.stdout[-2000:] + test2.stderr[-3000:]
    one = np.load(work / "eval_iter_00000002" / "confusion.npy")
    two = np.load(root / "eval_2proc" / "confusion.npy")
    assert one.sum() > 0 and np.array_equal(one, two)
    results2 = json.loads((root / "eval_2proc" / "eval_results.json").read_text())
    assert results2["num_images"] == results["num_images"] == 2
    assert results2["mIoU"] == pytest.approx(results["mIoU"], abs=1e-12)
