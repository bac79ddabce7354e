"""Demo training step vs intra-op threads, with and without a concurrent CPU-heavy process.

The step is one `larvseg demo` LarvSeg step (vit_mini, 8 segmentation + 8 image-level images at 96 px,
CAC on) built from synthetic tensors, timed with 1 and with 2 torch threads; then again while a second
process runs a single-threaded matmul loop (the "other engineer's job"). This is what picks the demo's
THREADS_PER_RUN (larvseg/demo/run.py): oversubscribed OpenMP threads spin and wait on each other.

    python benchmarks/bench_demo_threads.py [--repeats 20]
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time

import torch

from common import parser, report
from larvseg.config import ModelConfig
from larvseg.data.batch import SegBatch, StepBatch, TagBatch
from larvseg.models.objective import TrainingObjective
from larvseg.models.segmenter import build_segmenter


def _burn(stop: mp.Event) -> None:
    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    while not stop.is_set():
        a = (a @ a).tanh_()


def _step_fn(size: int, batch: int):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="vit_mini", cac=True, drop_path=0.0, num_sampled_classes=100, memory_bank_size=4)
    vocab = 60
    seg = build_segmenter(cfg, vocab)
    objective = TrainingObjective(seg, cfg, seed=0)
    opt = torch.optim.SGD(seg.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 8, (batch, size, size), generator=g)
    tags = torch.randint(8, 22, (batch, 1), generator=g)
    step_batch = StepBatch(
        0,
        [SegBatch("S", torch.randn(batch, 3, size, size, generator=g), labels, torch.arange(50), batch)],
        [
            TagBatch(
                "T", torch.randn(batch, 3, size, size, generator=g), tags, torch.arange(8, 22), batch, True, 0.2, 0.1, 4
            )
        ],
    )

    def step() -> None:
        terms = objective(step_batch)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()

    return step


def _median_step(step, threads: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = parser(__doc__)
    p.set_defaults(repeats=20)
    args = p.parse_args()
    size, batch, repeats = (96, 8, args.repeats) if not args.tiny else (32, 2, 2)
    step = _step_fn(size, batch)
    out = {}
    for load in (False, True):
        stop = mp.get_context("spawn").Event()
        burner = mp.get_context("spawn").Process(target=_burn, args=(stop,), daemon=True) if load else None
        if burner:
            burner.start()
            time.sleep(1.0)  # let it start burning
        try:
            for threads in (1, 2):
                out[f"{'load' if load else 'idle'}_t{threads}_s"] = _median_step(step, threads, repeats)
        finally:
            if burner:
                stop.set()
                burner.join(timeout=10)
    report(
        "demo_threads",
        **out,
        load_slowdown_t1=out["load_t1_s"] / out["idle_t1_s"],
        load_slowdown_t2=out["load_t2_s"] / out["idle_t2_s"],
        idle_t2_over_t1=out["idle_t2_s"] / out["idle_t1_s"],
    )


if __name__ == "__main__":
    main()
