"""The CAC memory bank's scope (docs/CONFIGS.md, "memory bank scope"): the original keeps one bank per GPU and
never synchronises it; ours gathers every rank's entries, so 2 processes (torchrun, gloo, CPU) hold, on
every rank, exactly the bank of 1 process given the combined batch, also when two image-level sources tag
the same class in one step (the entries are enqueued source by source, each in batch order)."""

from __future__ import annotations

import runpy
import subprocess
import sys

import torch

from subprocesses import clean_env

# Runs TrainingObjective.forward (the step's losses and its one bank update) for 3 steps on this rank's
# share of a fixed global batch: two tag sources, A multi-tag (like A150w) and B single-tag (like
# ImageNet), both tagging class 3; the global batch is split across ranks as MixedLoader does.
RUNNER = """
import sys
import numpy as np
import torch
from larvseg import distributed
from larvseg.config import ModelConfig
from larvseg.data.batch import TAG_PAD, StepBatch, TagBatch
from larvseg.models.objective import TrainingObjective
from larvseg.models.segmenter import build_segmenter

distributed.init_from_env("cpu")
rank, world = distributed.rank(), distributed.world_size()
torch.manual_seed(0)
cfg = ModelConfig(arch="vit_mini", drop_path=0.0, num_sampled_classes=0, memory_bank_size=8, warm_up=1)
objective = TrainingObjective(build_segmenter(cfg, 6), cfg, seed=0)
a_tags = torch.tensor([[3, 1], [3, TAG_PAD], [2, 3], [3, 1]])
b_tags = torch.tensor([[3], [4], [3], [3]])
for step in range(3):
    gen = torch.Generator().manual_seed(step)
    a_images, b_images = torch.rand(4, 3, 32, 32, generator=gen) * 255, torch.rand(4, 3, 32, 32, generator=gen) * 255
    mine = torch.from_numpy(np.array_split(np.arange(4), world)[rank])
    a = TagBatch("A", a_images[mine], a_tags[mine], torch.arange(1, 4), 4, 0.1, 0.1, 2)
    b = TagBatch("B", b_images[mine], b_tags[mine], torch.arange(3, 6), 4, 0.2, 0.1, 2)
    with torch.no_grad():
        objective(StepBatch(step, [], [a, b]))
bank = objective.segmenter.bank
torch.save({"slots": bank.slots, "ptr": bank.ptr, "wraps": bank.wraps}, f"{sys.argv[1]}/bank{rank}.pt")
distributed.cleanup()
"""


def _banks(path, n: int) -> list[dict[str, torch.Tensor]]:
    return [torch.load(path / f"bank{r}.pt", weights_only=True) for r in range(n)]


def test_two_processes_hold_the_bank_of_one_process_with_the_combined_batch(tmp_path, monkeypatch):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(runner), str(two)]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setattr(sys, "argv", [str(runner), str(one)])
    with torch.random.fork_rng():  # the reference: the same script in this process (no process group)
        runpy.run_path(str(runner), run_name="__main__")
    (ref,) = _banks(one, 1)
    # class 3: 3 + 4 entries in step 0 alone, from both sources and both ranks; 3 steps wrap its 8 slots
    assert ref["ptr"][3] + 8 * ref["wraps"][3] == 21 and ref["wraps"][3] == 2
    assert ref["ptr"][1] + 8 * ref["wraps"][1] == 6 and (ref["slots"][3].norm(dim=1) > 0).all()
    for bank in _banks(two, 2):  # both ranks
        assert torch.equal(bank["ptr"], ref["ptr"]) and torch.equal(bank["wraps"], ref["wraps"])
        # each slot is the mean of K features of one (image, tag) pair: the same pair in the same slot
        # (features of 2 images per forward instead of 4: equal up to float rounding)
        torch.testing.assert_close(bank["slots"], ref["slots"], rtol=0, atol=1e-5)
