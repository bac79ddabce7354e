"""Checkpoint files: atomic save, weights_only load, clear errors, keep-last-k, resume resolution,
RNG state round trip, the safetensors export; plus the poly schedule and the metric logger."""

from __future__ import annotations

import json
import logging
import os
import random

import numpy as np
import pytest
import torch

from larvseg.train import checkpoint as ck
from larvseg.train.logger import MetricLogger, read_metrics
from larvseg.train.schedule import poly_lr, set_lr


def _state(step=3):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {
        "format": 1,
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "config": {"train": {"iters": 10}},
        "vocab": ["sky", "tree"],
        "rng": ck.rng_state(),
    }


def test_roundtrip_weights_only(tmp_path):
    state = _state()
    path = tmp_path / ck.checkpoint_name(3)
    ck.save_checkpoint(path, state)
    assert path.name == "iter_00000003.pth"
    torch.load(path, weights_only=True)  # the contract: plain data only
    loaded = ck.load_checkpoint(path)
    assert loaded["step"] == 3 and loaded["vocab"] == ["sky", "tree"] and loaded["config"] == state["config"]
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    mom = state["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], mom)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_rng_state_roundtrip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    ck.save_checkpoint(tmp_path / "r.pth", {"rng": ck.rng_state()})
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ck.set_rng_state(ck.load_checkpoint(tmp_path / "r.pth")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_failed_save_leaves_old_file_and_no_partial(tmp_path, monkeypatch):
    path = tmp_path / "iter_00000002.pth"
    ck.save_checkpoint(path, {"step": 2})
    before = path.read_bytes()

    real_save = torch.save

    def dying_save(obj, f):  # writes part of the file, then fails (like a full disk or a kill mid-write)
        real_save({"step": 4, "big": torch.zeros(1000)}, f)
        f.truncate(100)
        raise OSError("No space left on device")

    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(OSError, match="No space"):
        ck.save_checkpoint(path, {"step": 4})
    with pytest.raises(OSError, match="No space"):
        ck.save_checkpoint(tmp_path / "iter_00000004.pth", {"step": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_00000002.pth"]
    assert path.read_bytes() == before


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "iter_00000005.pth"
    ck.save_checkpoint(path, _state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="iter_00000005.pth.*truncated or corrupt"):
        ck.load_checkpoint(path)
    with pytest.raises(ck.CheckpointError, match="missing.pth: checkpoint not found"):
        ck.load_checkpoint(tmp_path / "missing.pth")


def test_keep_last_latest_link_and_resume_resolution(tmp_path):
    assert ck.resolve_resume("auto", tmp_path / "nothing") is None
    for step in (2, 4, 10, 6):
        path = tmp_path / ck.checkpoint_name(step)
        ck.save_checkpoint(path, {"step": step})
    (tmp_path / ".iter_00000012.pth.tmp-1").write_bytes(b"partial")  # a leftover temp is never picked
    ck.update_latest_link(tmp_path / ck.checkpoint_name(10))
    assert ck.prune_checkpoints(tmp_path, 2) == [tmp_path / ck.checkpoint_name(2), tmp_path / ck.checkpoint_name(4)]
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [6, 10]
    assert ck.load_checkpoint(tmp_path / ck.LATEST_LINK)["step"] == 10
    assert ck.resolve_resume(None, tmp_path) == tmp_path / ck.checkpoint_name(10)
    assert ck.resolve_resume("", tmp_path) == tmp_path / ck.checkpoint_name(10)
    assert ck.resolve_resume("none", tmp_path) is None
    assert ck.resolve_resume(str(tmp_path / ck.checkpoint_name(6)), tmp_path) == tmp_path / ck.checkpoint_name(6)
    with pytest.raises(ck.CheckpointError, match="nope.pth"):
        ck.resolve_resume(str(tmp_path / "nope.pth"), tmp_path)


def test_export_safetensors_with_json(tmp_path):
    state = {"backbone.w": torch.randn(3, 2), "classifier.e": torch.randn(5, 2), "bank.slots": torch.zeros(5, 2, 2)}
    out = ck.export_weights(tmp_path / ck.FINAL_WEIGHTS, state, {"name": "x"}, ["a", "b"], 7)
    assert out == tmp_path / "final.safetensors"
    meta = json.loads((tmp_path / "final.json").read_text())
    assert meta["vocab"] == ["a", "b"] and meta["step"] == 7 and meta["config"] == {"name": "x"}
    loaded = ck.load_checkpoint(out)
    assert sorted(loaded["model"]) == ["backbone.w", "classifier.e"]  # the bank is training-only
    assert torch.equal(loaded["model"]["backbone.w"], state["backbone.w"])
    assert loaded["vocab"] == ["a", "b"] and loaded["config"] == {"name": "x"}
    os.remove(tmp_path / "final.json")
    with pytest.raises(ck.CheckpointError, match="final.json"):
        ck.load_checkpoint(out)


def test_poly_lr_matches_formula():
    base, power, min_lr, iters = 1e-3, 0.9, 1e-5, 320_000
    for step in (0, 1, 1000, 160_000, 319_999, 320_000):
        expected = (base - min_lr) * (1 - step / iters) ** power + min_lr
        assert poly_lr(step, iters, base, power, min_lr) == pytest.approx(expected, rel=1e-12)
    assert poly_lr(0, iters, base, power, min_lr) == base
    assert poly_lr(iters, iters, base, power, min_lr) == min_lr
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"] == 0.25


def test_metric_logger_means_and_resume_truncation(tmp_path):
    log = MetricLogger(tmp_path, total_iters=6, start_step=0, images_per_step=4, log_interval=2, enabled=True)
    for step in range(1, 7):
        log.update(step, lr=0.1 * step, terms={"loss": float(step), "seg/S": step / 2})
    log.log_eval(6, {"mIoU": 12.5, "per_class": [{"a": 1}]})
    assert log.plot().is_file()
    log.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert [r["loss"] for r in train] == [1.5, 3.5, 5.5]  # mean over each window of 2 steps
    assert [r["seg/S"] for r in train] == [0.75, 1.75, 2.75]
    assert all(r["images_per_s"] > 0 for r in train) and train[-1]["eta_s"] == 0
    assert records[-1] == {"kind": "eval", "step": 6, "mIoU": 12.5}
    # resuming at step 4 drops the later records
    MetricLogger(tmp_path, 6, start_step=4, images_per_step=4, log_interval=2, enabled=True).close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2, 4]


def orphan_temp(folder, name: str):
    """The temp file a writer killed (SIGKILL) in the middle of an atomic save leaves behind."""
    import subprocess
    import sys
    import time

    code = (
        "import sys, time\nfrom larvseg.atomic import atomic_write\n"
        "atomic_write(sys.argv[1], lambda f: (f.write(b'x' * 4096), f.flush(), time.sleep(120)))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder / name)], env=dict(os.environ, OMP_NUM_THREADS="1"))
    tmp = folder / f".{name}.tmp-{proc.pid}"
    deadline = time.monotonic() + 60
    while not tmp.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the writer never started its temp file"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert tmp.is_file()  # the kill left it
    return tmp


def test_pruning_removes_temp_files_of_killed_writers_only(tmp_path):
    for step in (2, 4, 6):
        ck.save_checkpoint(tmp_path / ck.checkpoint_name(step), {"step": step})
    orphan = orphan_temp(tmp_path, ck.checkpoint_name(8))
    live = tmp_path / f".{ck.checkpoint_name(10)}.tmp-{os.getpid()}"  # a writer that still runs (this process)
    live.write_bytes(b"being written")
    deleted = ck.prune_checkpoints(tmp_path, keep_last=2)
    assert orphan in deleted and not orphan.exists()
    assert live.exists() and live not in deleted
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [4, 6]


def test_auto_resume_skips_an_unreadable_newest_checkpoint(tmp_path):
    for step in (2, 4, 6):
        ck.save_checkpoint(tmp_path / ck.checkpoint_name(step), _state(step))
    newest = tmp_path / ck.checkpoint_name(6)
    newest.write_bytes(newest.read_bytes()[:300])  # truncated by a crash of another writer / a bad disk
    ck.save_checkpoint(tmp_path / ck.checkpoint_name(4), {"step": 4, "model": {}})  # loads, but not resumable
    said = []
    path, state = ck.load_resume("auto", tmp_path, say=said.append)
    assert path == tmp_path / ck.checkpoint_name(2) and state["step"] == 2
    assert len(said) == 2
    assert "iter_00000006.pth" in said[0] and "truncated or corrupt" in said[0]
    assert "iter_00000004.pth" in said[1] and "not a training checkpoint" in said[1]
    # an explicitly named file is never replaced by another one
    with pytest.raises(ck.CheckpointError, match="iter_00000006.pth"):
        ck.load_resume(str(newest), tmp_path)
    assert ck.load_resume("none", tmp_path) == (None, None)


def test_full_disk_during_save_names_the_file(tmp_path, monkeypatch):
    from larvseg import atomic
    from larvseg.errors import OutputWriteError, describe

    path = tmp_path / ck.checkpoint_name(2)
    monkeypatch.setattr(atomic, "_open_temp", lambda tmp: open("/dev/full", "wb"))  # the kernel's ENOSPC
    with pytest.raises(OutputWriteError) as info:  # torch.save's "[enforce fail at inline_container.cc]" before
        ck.save_checkpoint(path, {"w": torch.zeros(100_000)})
    line = describe(info.value)
    assert str(path) in line and "MB free" in line and "disk is full" in line
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_export_with_a_json_of_another_vocabulary_is_a_clear_error(tmp_path):
    weights = {"classifier.class_embed": torch.zeros(6, 8), "backbone.w": torch.zeros(3)}
    path = ck.export_weights(
        tmp_path / "final.safetensors", weights, {}, [f"c{i}" for i in range(6)], 5, supervised=[1, 3]
    )
    assert ck.load_checkpoint(path)["supervised"] == [1, 3]
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["vocab"] = [f"c{i}" for i in range(7)]  # the .json of another run
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(
        ck.CheckpointError, match=r"final\.safetensors: the weights hold 6 classes .* final\.json lists 7"
    ):
        ck.load_checkpoint(path)


def test_checkpointer_prepares_saves_prunes_and_resumes_exactly(tmp_path, caplog):
    """The one checkpointer of train and pretrain: work dir + config.yaml + killed saves' temps removed,
    atomic saves with the RNG states and extra entries, latest.pth, keep-last-k, and a resume that restores
    the model, the optimizer's momentum and the RNG streams."""
    work = tmp_path / "work"
    work.mkdir()
    orphan = orphan_temp(work, ck.checkpoint_name(9))
    checkpointer = ck.Checkpointer(work, keep_last=2)
    with caplog.at_level(logging.INFO, logger="larvseg"):
        checkpointer.prepare("train: {iters: 6}\n")
    assert (work / "config.yaml").read_text() == "train: {iters: 6}\n" and not orphan.exists()
    assert f"removed {orphan.name}: temp file of a killed save" in caplog.messages

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in (2, 4, 6):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        assert checkpointer.save(
            step, model, opt, {"train": {"iters": 6}}, ["sky", "tree"], kind="test"
        ) == work / ck.checkpoint_name(step)
    assert [s for s, _ in ck.list_checkpoints(work)] == [4, 6] and checkpointer.latest() == work / ck.checkpoint_name(6)
    assert os.readlink(work / ck.LATEST_LINK) == ck.checkpoint_name(6)
    expected_next = torch.rand(3)  # the torch RNG right after the step-6 save

    fresh = torch.nn.Linear(4, 3)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    path, state = ck.Checkpointer(work, keep_last=2).pick("auto")
    assert path == work / ck.checkpoint_name(6) and state["kind"] == "test" and state["vocab"] == ["sky", "tree"]
    step, state = checkpointer.restore(path, None, ["sky", "tree"], fresh, fresh_opt)  # reads the file itself
    assert step == 6 and state["config"] == {"train": {"iters": 6}}
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    assert torch.equal(
        fresh_opt.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"]
    )
    assert torch.equal(torch.rand(3), expected_next)
    with pytest.raises(ck.CheckpointError, match="vocabulary"):
        checkpointer.restore(path, state, ["sky"], fresh, fresh_opt)
    assert ck.Checkpointer(tmp_path / "empty", keep_last=2).pick("auto") == (None, None)
