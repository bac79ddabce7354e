"""amp "auto" (decided by measured, mocked and real timings; cached per machine and workload; bf16 labels of a trained model), intra-op thread choice, no host syncs in the step."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch
from torch import Tensor

from larvseg import precision, threads
from larvseg.config import EvalConfig, ModelConfig
from larvseg.data.batch import TAG_PAD, SegBatch, StepBatch, TagBatch
from larvseg.models import amp_workload
from larvseg.models.cosine_classifier import CosineClassifier
from larvseg.models.inference import segment_image
from larvseg.models.memory_bank import MemoryBank
from larvseg.models.objective import TrainingObjective
from larvseg.models.segmenter import Segmenter, build_segmenter
from larvseg.models.vit import VisionTransformer

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


TIMINGS = {
    "2x": precision.Timing(1.0, 0.5, 0.1, False),
    "1.05x": precision.Timing(1.0, 0.95, 0.1, False),
    "0.2x": precision.Timing(1.0, 5.0, 0.1, True),
}


def _workload(kind: str = "inference", shape: str = "vit block dim=32") -> precision.Workload:
    def build(device):
        raise AssertionError("measure is mocked: the workload must not be built")

    return precision.Workload(kind, shape, build)


@pytest.fixture
def calibration(monkeypatch, tmp_path):
    """amp=auto calibration on, its cache in tmp_path, measure() mocked: returns the timing in
    ``state["timing"]`` and counts its calls."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(precision.CALIBRATION_ENV, raising=False)
    monkeypatch.setattr(precision, "_DECIDED", {})
    state = {"timing": TIMINGS["2x"], "calls": []}

    def fake_measure(workload, device):
        state["calls"].append(workload.kind)
        return state["timing"]

    monkeypatch.setattr(precision, "measure", fake_measure)
    return state


def test_amp_auto_chooses_bf16_only_where_measured_faster(calibration, caplog):
    with caplog.at_level(logging.INFO, logger="larvseg"):
        choice = precision.choose("auto", CPU, _workload(), announce=True)
    assert choice.bf16 and "amp=auto: bf16 (measured 2.00x faster here for inference" in choice.line
    assert f"larvseg: {choice.line}" in caplog.messages  # announced, with the measured ratio
    for name in ("1.05x", "0.2x"):  # within noise of float32, or slower: float32
        calibration["timing"] = TIMINGS[name]
        precision._DECIDED.clear()
        precision.cache_path().unlink()
        choice = precision.choose("auto", CPU, _workload())
        assert not choice.bf16 and f"bf16 measured {name[:-1]}" in choice.line and "needs >= 1.10x" in choice.line
    calls = len(calibration["calls"])
    assert precision.use_bf16("bf16", CPU) and not precision.use_bf16("off", CPU)  # overrides: no measuring
    assert precision.describe("off", CPU) == "amp=off: float32"
    assert len(calibration["calls"]) == calls
    with pytest.raises(ValueError, match="amp"):
        precision.use_bf16("fp16", CPU)
    with pytest.raises(ValueError, match="workload"):
        precision.choose("auto", CPU)


def test_amp_auto_cache_is_reused_and_invalidated(calibration, monkeypatch, tmp_path):
    work = _workload("training", "vit block dim=32")
    assert precision.choose("auto", CPU, work).bf16 and calibration["calls"] == ["training"]
    cache = tmp_path / "larvseg" / precision.CACHE_NAME
    assert cache.is_file() and precision.cache_path() == cache  # under $XDG_CACHE_HOME/larvseg
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["bf16"] and entry["speedup"] == pytest.approx(2.0) and entry["fp32_s"] == 1.0

    def fresh_process():
        precision._DECIDED.clear()
        return precision.choose("auto", CPU, work)

    calibration["timing"] = TIMINGS["0.2x"]  # a new measurement would say float32: the cache is used instead
    choice = fresh_process()
    assert choice.bf16 and "cached in" in choice.line and len(calibration["calls"]) == 1
    changes = [
        lambda: monkeypatch.setattr(torch, "__version__", "9.9.9"),  # another torch
        lambda: monkeypatch.setattr(precision, "_cpu_description", lambda: "cpu Other CPU [avx2 fma]"),  # another CPU
        lambda: monkeypatch.setattr(torch, "get_num_threads", lambda: 64),  # other thread count
    ]
    for n, change in enumerate(changes, start=2):
        change()
        assert not fresh_process().bf16 and len(calibration["calls"]) == n  # measured again
        assert len(json.loads(cache.read_text())) == n  # each key kept beside the others
    work = _workload("inference", "vit block dim=32")  # another workload
    assert not fresh_process().bf16 and calibration["calls"][-1] == "inference"
    work = _workload("inference", "vit block dim=64")  # other shapes
    fresh_process()
    assert len(calibration["calls"]) == 6
    fresh_process()
    assert len(calibration["calls"]) == 6  # all cached now
    cache.write_text("{not json")  # a damaged cache: said, measured again, rewritten
    assert not fresh_process().bf16 and len(calibration["calls"]) == 7
    assert len(json.loads(cache.read_text())) == 1


def test_amp_auto_without_measuring(calibration, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.describe("auto", CUDA, _workload()) == "amp=auto: float32 (CUDA bf16 not supported)"
    monkeypatch.setenv(precision.CALIBRATION_ENV, "off")
    assert not precision.use_bf16("auto", CPU, _workload())
    assert "disabled by LARVSEG_AMP_CALIBRATION" in precision.describe("auto", CPU, _workload())
    assert calibration["calls"] == []


def test_measure_times_the_real_block_and_stops_early(monkeypatch):
    """The real workloads run in both precisions without touching the global random state (a run that
    calibrates trains like one that reads the cache); a bf16 pass far slower than float32 ends it early."""
    monkeypatch.setattr(precision, "CALIBRATION_ROUNDS", 1)
    monkeypatch.setattr(amp_workload, "CALIBRATION_TOKENS", 17)
    backbone = VisionTransformer(32, 2, 2, pos_grid=2)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    for kind in ("inference", "training"):
        work = amp_workload.vit_workload(backbone, kind)
        assert work.shape == "vit block dim=32 heads=2 mlp=128 tokens=17 batch=1"
        timing = precision.measure(work, CPU)
        assert timing.fp32_s > 0 and timing.bf16_s > 0 and timing.seconds >= timing.fp32_s + timing.bf16_s
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in backbone.parameters())  # the model itself is untouched

    def build(device):
        return lambda bf16: time.sleep(0.06 if bf16 else 0.001)

    timing = precision.measure(precision.Workload("training", "sleep", build), CPU)  # stopped after the warm-up
    assert timing.early_stop and timing.bf16_s > 4 * timing.fp32_s and not precision.decide(timing)

    def never(device):
        raise AssertionError("the probe decided: the full pass must not run")

    timing = precision.measure(precision.Workload("training", "sleep", never, build_probe=build), CPU)
    assert timing.early_stop and not precision.decide(timing)

    def tiny_probe(device):  # bf16 10x slower, but in a probe too short to tell (fixed costs)
        return lambda bf16: time.sleep(0.01 if bf16 else 0.001)

    def faster_in_bf16(device):
        return lambda bf16: time.sleep(0.002 if bf16 else 0.006)

    for probe in (lambda d: lambda bf16: time.sleep(0.001), tiny_probe):  # parity, or too short to tell
        timing = precision.measure(precision.Workload("training", "sleep", faster_in_bf16, build_probe=probe), CPU)
        assert not timing.early_stop and precision.decide(timing)  # the full pass decides


def test_cpu_flags_parsing(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: X Y\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n\nprocessor\t: 1\nflags\t: fpu\n"
    )
    assert precision.cpu_flags(info) == {"fpu", "avx2", "amx_bf16", "amx_tile"}
    assert precision.cpu_flags(tmp_path / "missing") == set()
    assert precision.cpu_model(info) == "X Y"


def _segmenter(classes: int = 12) -> Segmenter:
    torch.manual_seed(0)
    seg = Segmenter(VisionTransformer(32, 2, 2, pos_grid=2), CosineClassifier(classes, 32))
    with torch.no_grad():
        seg.classifier.gamma.fill_(4.0)
    return seg.eval()


def test_bf16_autocast_outputs_close_to_fp32():
    seg = _segmenter()
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255  # RGB pixel values
    with torch.no_grad():
        ref = seg(image[None]).logits
        with precision.autocast_context("bf16", CPU):
            low = seg(image[None]).logits
    assert low.dtype == torch.bfloat16  # autocast ran (losses and inference cast to float32 after it)
    torch.testing.assert_close(low.float(), ref, atol=0.15, rtol=0.05)


def _palette_images(n: int, palette: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(n, 3, 64, 64) images of 16 x 16 patches, each one palette colour plus noise, and their (n, 4, 4) labels."""
    labels = torch.randint(0, palette.shape[0], (n, 4, 4), generator=gen)
    images = palette[labels].permute(0, 3, 1, 2).repeat_interleave(16, 2).repeat_interleave(16, 3)
    return (images + 12 * torch.randn(images.shape, generator=gen)).clamp(0, 255), labels


def test_bf16_labels_agree_with_fp32_on_a_trained_model():
    """A small ViT trained until it segments its task; bf16 autocast changes almost none of its labels."""
    gen = torch.Generator().manual_seed(0)
    palette = torch.rand(6, 3, generator=gen) * 255
    torch.manual_seed(0)
    seg = build_segmenter(ModelConfig(arch="vit_mini", drop_path=0.0, cac=False), 6)
    optimizer = torch.optim.AdamW(seg.parameters(), lr=1e-3)
    seg.train()
    for _ in range(40):
        images, labels = _palette_images(8, palette, gen)
        loss = torch.nn.functional.cross_entropy(seg(images).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seg.eval()
    images, labels = _palette_images(6, palette, gen)
    fp32, bf16 = [], []
    for image in images:
        fp32.append(segment_image(seg, image, EvalConfig(mode="whole", amp="off")))
        bf16.append(segment_image(seg, image, EvalConfig(mode="whole", amp="bf16")))
    fp32, bf16 = torch.stack(fp32), torch.stack(bf16)
    truth = labels.repeat_interleave(16, 1).repeat_interleave(16, 2)
    assert (fp32 == truth).float().mean() > 0.9  # trained: it segments the held-out images
    agreement = (fp32 == bf16).float().mean()
    assert agreement > 0.998, f"bf16 vs fp32 label agreement {agreement:.4f}"  # 0.9999 measured; untrained 0.996
    assert (bf16 == truth).float().mean() > (fp32 == truth).float().mean() - 0.01


def test_thread_choice_order():
    assert threads.choose_threads(5_000_000, requested=3, env={"LARVSEG_THREADS": "2"}) == (3, "config")
    assert threads.choose_threads(5_000_000, env={"LARVSEG_THREADS": "2", "OMP_NUM_THREADS": "4"})[0] == 2
    assert threads.choose_threads(5_000_000, env={"OMP_NUM_THREADS": "4"}) == (4, "OMP_NUM_THREADS")
    assert threads.default_threads(5_700_000, cores=16) == 1  # ViT-Tiny: one thread
    assert threads.default_threads(86_000_000, cores=16) == 5
    assert threads.default_threads(86_000_000, cores=2) == 2
    n, source = threads.choose_threads(86_000_000, env={})
    assert n == threads.default_threads(86_000_000) and "86.0 M parameters" in source
    with pytest.raises(ValueError, match="LARVSEG_THREADS"):
        threads.choose_threads(1, env={"LARVSEG_THREADS": "many"})


def test_configure_threads_sets_and_logs(caplog, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("LARVSEG_THREADS", raising=False)
    try:
        with caplog.at_level(logging.INFO, logger="larvseg"):
            assert threads.configure_threads(torch.nn.Linear(4, 4), requested=1) == 1
        assert torch.get_num_threads() == 1
        assert caplog.messages == ["larvseg: 1 intra-op thread (config)"]
    finally:
        torch.set_num_threads(before)


def test_training_step_makes_no_host_sync_calls(monkeypatch):
    """Forward + backward of the full step (seg + tag + CAC) call no .item()/.cpu()/.tolist()/.numpy().
    (Class sampling and tag pairs still use data-dependent shapes; see docs/PERFORMANCE.md.)"""
    torch.manual_seed(0)
    seg = Segmenter(VisionTransformer(32, 1, 2, pos_grid=2), CosineClassifier(20, 32), MemoryBank(20, 2, 32))
    obj = TrainingObjective(seg, ModelConfig(num_sampled_classes=3, memory_bank_size=2), seed=0)
    sb = SegBatch("S", torch.randn(2, 3, 32, 32), torch.randint(0, 8, (2, 32, 32)), torch.arange(8), 2)
    tb = TagBatch("T", torch.randn(2, 3, 32, 32), torch.tensor([[9, 10], [11, TAG_PAD]]), torch.arange(8, 20), 2, False)
    calls = []
    for name in ("item", "cpu", "tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for step in range(3):  # the CAC term is live from step 2
        seg.zero_grad()
        out = obj(StepBatch(step, [sb], [tb]))
        out["loss"].backward()
    monkeypatch.undo()
    assert calls == []
    assert out["cac/T"].item() > 0 and torch.isfinite(out["loss"])
