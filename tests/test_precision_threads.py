"""amp "auto" (mocked capabilities, bf16 outputs close to fp32), intra-op thread choice, no host syncs in the step."""

from __future__ import annotations

import pytest
import torch

from larvseg import precision, threads
from larvseg.config import EvalConfig, ModelConfig
from larvseg.data.batch import TAG_PAD, SegBatch, StepBatch, TagBatch
from larvseg.models.cosine_classifier import CosineClassifier
from larvseg.models.inference import segment_image
from larvseg.models.memory_bank import MemoryBank
from larvseg.models.objective import TrainingObjective
from larvseg.models.segmenter import Segmenter
from larvseg.models.vit import VisionTransformer

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def no_amx(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(precision, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": {"avx2", "fma"})


def test_amp_auto_cpu_follows_amx(monkeypatch, no_amx):
    assert not precision.use_bf16("auto", CPU)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # torch's own query
    assert precision.use_bf16("auto", CPU)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(precision, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": {"avx512f", "amx_tile", "amx_bf16"})
    assert precision.use_bf16("auto", CPU)  # the /proc/cpuinfo fallback
    monkeypatch.setattr(precision, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": {"avx512f", "avx512_bf16"})
    assert not precision.use_bf16("auto", CPU)  # AVX-512-BF16 without AMX: measured slower, stays fp32
    assert precision.use_bf16("bf16", CPU) and not precision.use_bf16("off", CPU)
    assert "CPU without AMX" in precision.describe("auto", CPU)
    with pytest.raises(ValueError, match="amp"):
        precision.use_bf16("fp16", CPU)


def test_amp_auto_cuda_follows_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.use_bf16("auto", CUDA)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert not precision.use_bf16("auto", CUDA)
    assert precision.describe("auto", CUDA) == "amp=auto: float32 (CUDA bf16 not supported)"


def test_cpu_flags_parsing(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert precision.cpu_flags(info) == {"fpu", "avx2", "amx_bf16", "amx_tile"}
    assert precision.cpu_flags(tmp_path / "missing") == set()


def _segmenter(classes: int = 12) -> Segmenter:
    torch.manual_seed(0)
    seg = Segmenter(VisionTransformer(32, 2, 2, pos_grid=2), CosineClassifier(classes, 32))
    with torch.no_grad():
        seg.classifier.gamma.fill_(4.0)
    return seg.eval()


def test_amp_auto_on_amx_gives_bf16_outputs_close_to_fp32(monkeypatch):
    seg = _segmenter()
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255  # RGB pixel values
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    with torch.no_grad():
        ref = seg(image[None]).logits
        with precision.autocast_context("auto", CPU):
            low = seg(image[None]).logits
    assert low.dtype == torch.bfloat16  # autocast ran (losses and inference cast to float32 after it)
    torch.testing.assert_close(low.float(), ref, atol=0.15, rtol=0.05)
    labels_auto = segment_image(seg, image, EvalConfig(mode="whole", amp="auto"))
    labels_off = segment_image(seg, image, EvalConfig(mode="whole", amp="off"))
    assert (labels_auto == labels_off).float().mean() > 0.9


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


def test_configure_threads_sets_and_prints(capsys, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("LARVSEG_THREADS", raising=False)
    try:
        assert threads.configure_threads(torch.nn.Linear(4, 4), requested=1) == 1
        assert torch.get_num_threads() == 1
        assert "larvseg: 1 intra-op thread (config)" in capsys.readouterr().out
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
