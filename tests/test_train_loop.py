"""The training loop end to end on a tiny ViT with synthetic data (no files):

(a) torchrun --nproc_per_node=2 (gloo, CPU) gives the weights of one process with the same global batch;
(b) a run killed (SIGKILL) between checkpoints and resumed ends with the weights of an uninterrupted run;
(c) a NaN loss stops the run with a message naming the step and terms, keeping the last good checkpoint.

The data (larvseg.data.testing.SyntheticLoader) follows the MixedLoader contract (deterministic per
step, the global batch split across ranks with numpy.array_split) but makes its tensors directly, and
is handed to the loop as `larvseg train`'s main() hands it the real loader: these tests exercise the
loop, not image decoding; tests/test_train_tools.py runs the real data layer through tools/dist_train.sh.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from larvseg.config import load_config
from larvseg.data.batch import SegBatch, StepBatch, TagBatch
from larvseg.data.testing import SyntheticLoader
from larvseg.data.vocabulary import Vocabulary
from larvseg.models.segmenter import build_segmenter
from larvseg.train import loop
from larvseg.train.checkpoint import list_checkpoints, load_checkpoint
from subprocesses import clean_env, kill_when_written

NUM_CLASSES = 6
NAMES = [f"class {i}" for i in range(NUM_CLASSES)]

TINY = """
data:
  seg_sources: [{name: S, format: custom_seg, crop_size: 32}]
  tag_sources: [{name: T, format: custom_tags, crop_size: 32}]
  seg_batch_size: 3      # odd, so the two ranks hold 2 + 1 images
  tag_batch_size: 3
  num_workers: 0
model: {arch: vit_mini, drop_path: 0.0, memory_bank_size: 2, num_sampled_classes: 3, cac: true, pretrained: ""}
train: {iters: 6, lr: 0.05, log_interval: 2, checkpoint_interval: 2, keep_last: 5, eval_interval: -1,
        amp: "off", device: cpu, seed: 3}
"""


def synthetic_build(cfg, device, loader_cls=SyntheticLoader):
    """``loop.build`` with in-memory data: the vocabulary, a seeded segmenter and a SyntheticLoader."""
    from larvseg import distributed

    loop.seed_everything(cfg.train.seed)
    segmenter = build_segmenter(cfg.model, NUM_CLASSES)
    return Vocabulary(NAMES), segmenter, loader_cls(cfg, distributed.rank(), distributed.world_size(), NUM_CLASSES)


# What `larvseg train` runs, with synthetic data handed to it (no test module is imported).
RUNNER = """
import sys
from larvseg import distributed
from larvseg.cli import build_parser
from larvseg.data.testing import SyntheticLoader
from larvseg.data.vocabulary import Vocabulary
from larvseg.log import setup_logging
from larvseg.models.segmenter import build_segmenter
from larvseg.train import loop

def build(cfg, device):
    loop.seed_everything(cfg.train.seed)
    return (Vocabulary({names!r}), build_segmenter(cfg.model, {n}),
            SyntheticLoader(cfg, distributed.rank(), distributed.world_size(), {n}))

setup_logging()  # an entry point, as larvseg.cli.main: rank 0 shows the status lines
sys.exit(loop.main(build_parser().parse_args(sys.argv[1:]), build=build))
"""


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), atol=atol, rtol=0), key


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    (root / "tiny.yaml").write_text(TINY)
    (root / "runner.py").write_text(RUNNER.format(names=NAMES, n=NUM_CLASSES))
    # The uninterrupted single-process reference, in this process.
    cfg = load_config(root / "tiny.yaml", [f"train.work_dir={root / 'ref'}"])
    loop.train(cfg, *synthetic_build(cfg, "cpu"), resume="none")
    return root


def test_reference_run_outputs(setup):
    ref = setup / "ref"
    assert [s for s, _ in list_checkpoints(ref)] == [2, 4, 6]
    state = load_checkpoint(ref / "iter_00000006.pth")
    assert state["step"] == 6 and state["vocab"] == NAMES
    assert state["model"]["bank.wraps"].sum() > 0  # the memory bank is in the checkpoint
    assert (ref / "latest.pth").resolve() == (ref / "iter_00000006.pth").resolve()
    assert (ref / "config.yaml").is_file() and (ref / "training_curve.png").is_file()
    final = load_checkpoint(ref / "final.safetensors")
    _assert_same(final["model"], {k: v for k, v in state["model"].items() if not k.startswith("bank.")}, 0)
    assert final["vocab"] == state["vocab"]
    lines = (ref / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all('"cac/T"' in line and '"seg/S"' in line for line in lines)
    # the weights moved between checkpoints
    first = load_checkpoint(ref / "iter_00000002.pth")["model"]
    changed = [k for k in first if not torch.equal(first[k], state["model"][k])]
    assert len(changed) > len(first) // 2


def test_two_processes_match_one(setup):
    work = setup / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(setup / "runner.py"),
        "train",
        str(setup / "tiny.yaml"),
        "--work-dir",
        str(work),
    ]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done:") == 1  # rank 0 reports
    _assert_same(_weights(work / "iter_00000006.pth"), _weights(setup / "ref" / "iter_00000006.pth"), 1e-5)


def test_killed_and_resumed_matches_uninterrupted(setup):
    work = setup / "killed"
    cmd = [sys.executable, str(setup / "runner.py"), "train", str(setup / "tiny.yaml"), "--work-dir", str(work)]
    proc = kill_when_written(cmd, work / "iter_00000002.pth", timeout=90)
    assert proc.returncode == -signal.SIGKILL
    assert not (work / "final.safetensors").exists()  # it really was interrupted
    assert [s for s, _ in list_checkpoints(work)][-1] < 6

    # auto-resume from the newest checkpoint in the work dir
    done = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    ref = load_checkpoint(setup / "ref" / "iter_00000006.pth")
    got = load_checkpoint(work / "iter_00000006.pth")
    _assert_same(got["model"], ref["model"], 1e-6)
    _assert_same(
        {str(k): v["momentum_buffer"] for k, v in got["optimizer"]["state"].items()},
        {str(k): v["momentum_buffer"] for k, v in ref["optimizer"]["state"].items()},
        1e-6,
    )
    steps = (work / "metrics.jsonl").read_text().splitlines()
    assert len(steps) == 3  # one record per logged step, none duplicated by the restart


def test_nan_loss_stops_and_keeps_last_checkpoint(setup, capsys):
    class PoisonedLoader(SyntheticLoader):
        def batch(self, step):
            b = super().batch(step)
            if step == 3:
                b.seg[0].images[0, 0, 0, 0] = float("nan")
            return b

    def poisoned_build(cfg, device):
        return synthetic_build(cfg, device, PoisonedLoader)

    work = setup / "nan"
    cfg = load_config(setup / "tiny.yaml", [f"train.work_dir={work}"])
    with pytest.raises(loop.NonFiniteLossError, match=r"non-finite loss at step 3 .*seg/S=nan.*iter_00000002\.pth"):
        loop.train(cfg, *poisoned_build(cfg, "cpu"), resume="none")
    assert [s for s, _ in list_checkpoints(work)] == [2]
    assert not (work / "final.safetensors").exists()
    # the kept checkpoint is the reference run's step-2 state, intact
    _assert_same(_weights(work / "iter_00000002.pth"), _weights(setup / "ref" / "iter_00000002.pth"), 0)

    # through the command: exit code 2 and the message on stderr
    args = loop_args(setup / "tiny.yaml", work, resume="none")
    assert loop.main(args, build=poisoned_build) == 2
    assert "non-finite loss at step 3" in capsys.readouterr().err


def loop_args(config: Path, work: Path, resume: str | None = None):
    from larvseg.cli import build_parser

    argv = ["train", str(config), "--work-dir", str(work)] + (["--resume", resume] if resume else [])
    return build_parser().parse_args(argv)


def test_ddp_wrapper_uses_the_argument_every_supported_torch_has(tmp_path, monkeypatch):
    """broadcast_buffers=False (torch >= 2.1), not forward_sync_buffers (only torch >= 2.13)."""
    import inspect
    import warnings

    import torch.distributed as dist

    from larvseg.config import ModelConfig
    from larvseg.models.objective import TrainingObjective
    from larvseg.models.segmenter import build_segmenter

    objective = TrainingObjective(
        build_segmenter(ModelConfig(arch="vit_mini", memory_bank_size=2), 4), ModelConfig(), 0
    )
    calls = []

    def ddp_2_1(
        module,
        device_ids=None,
        output_device=None,
        dim=0,
        broadcast_buffers=True,
        process_group=None,
        bucket_cap_mb=25,
        find_unused_parameters=False,
        check_reduction=False,
        gradient_as_bucket_view=False,
        static_graph=False,
    ):  # torch 2.1's DistributedDataParallel signature
        calls.append(broadcast_buffers)
        return module

    with monkeypatch.context() as m:
        m.setattr(loop, "DistributedDataParallel", ddp_2_1)
        assert loop.data_parallel(objective, torch.device("cpu")) is objective
    assert calls == [False]
    # and with this torch's real DDP (a one-process gloo group): no buffer sync per forward, no warning
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = loop.data_parallel(objective, torch.device("cpu"))
        new_name = "forward_sync_buffers" in inspect.signature(type(model).__init__).parameters  # torch >= 2.13
        assert getattr(model, "forward_sync_buffers" if new_name else "broadcast_buffers") is False
    finally:
        dist.destroy_process_group()


def test_mark_supervised_counts_labelled_pixels_and_tags_only():
    seen = torch.zeros(6, dtype=torch.bool)
    labels = torch.full((1, 4, 4), 65535)
    labels[0, 0, :2] = 1
    seg = SegBatch("S", torch.zeros(1, 3, 4, 4), labels, torch.arange(4), 1)
    tag = TagBatch("T", torch.zeros(2, 3, 4, 4), torch.tensor([[4, -1], [4, -1]]), torch.arange(6), 2)
    loop.mark_supervised(seen, StepBatch(0, [seg], [tag]))
    assert seen.nonzero().flatten().tolist() == [1, 4]


def test_resume_falls_back_past_a_corrupt_checkpoint_and_removes_orphan_temps(setup, caplog):
    import shutil

    from test_train_checkpoint import orphan_temp

    work = setup / "fallback"
    work.mkdir()
    for step in (2, 4):
        shutil.copy(setup / "ref" / f"iter_0000000{step}.pth", work)
    newest = work / "iter_00000004.pth"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    orphan = orphan_temp(work, "iter_00000006.pth")
    cfg = load_config(setup / "tiny.yaml", [f"train.work_dir={work}"])
    with caplog.at_level(logging.INFO, logger="larvseg"):
        loop.train(cfg, *synthetic_build(cfg, "cpu"))  # resume: auto
    (warned,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipping checkpoint iter_00000004.pth for auto-resume" in warned and "truncated or corrupt" in warned
    assert f"resumed from {work / 'iter_00000002.pth'} at step 2" in caplog.messages
    assert f"removed {orphan.name}: temp file of a killed save" in caplog.messages and not orphan.exists()
    _assert_same(_weights(work / "iter_00000006.pth"), _weights(setup / "ref" / "iter_00000006.pth"), 0)
    # the fake data labels classes 0..3 and tags 3..5: all six had supervision
    assert load_checkpoint(work / "iter_00000006.pth")["supervised"] == list(range(NUM_CLASSES))
