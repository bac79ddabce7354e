"""`larvseg pretrain` on a tiny tag folder: the .npz has exactly the AugReg keys and shapes (written out
here from the published layout, not from our writer), loads through `model.pretrained=` with nothing
missing or unexpected, and a resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from larvseg.cli import main as cli_main
from larvseg.config import ConfigError, load_config
from larvseg.data.testing import write_coco171, write_custom_tags
from larvseg.models.pretrained_weights import load_pretrained
from larvseg.models.segmenter import build_segmenter
from larvseg.models.vit import build_vit
from larvseg.train.checkpoint import list_checkpoints, load_checkpoint
from larvseg.train.pretrain import BACKBONE_FILE, classification_loss_sum, multi_hot, pretrain, pretrain_vocabulary

CLASSES = ["cat", "dog", "fish"]
D, DEPTH, HEADS, GRID = 192, 4, 3, 32  # vit_mini; the stored position grid is 32x32


def augreg_layout(num_classes: int) -> dict[str, tuple[int, ...]]:
    """AugReg's ViT keys and shapes, as in Google's B_16 file (D=192, 3 heads of 64, 4 blocks here)."""
    hd = D // HEADS
    keys = {
        "embedding/kernel": (16, 16, 3, D),
        "embedding/bias": (D,),
        "cls": (1, 1, D),
        "Transformer/posembed_input/pos_embedding": (1, 1 + GRID * GRID, D),
        "Transformer/encoder_norm/scale": (D,),
        "Transformer/encoder_norm/bias": (D,),
        "head/kernel": (D, num_classes),
        "head/bias": (num_classes,),
    }
    for i in range(DEPTH):
        b = f"Transformer/encoderblock_{i}/"
        m = b + "MultiHeadDotProductAttention_1/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            keys[b + ln + "/scale"] = keys[b + ln + "/bias"] = (D,)
        for n in ("query", "key", "value"):
            keys[m + n + "/kernel"], keys[m + n + "/bias"] = (D, HEADS, hd), (HEADS, hd)
        keys[m + "out/kernel"], keys[m + "out/bias"] = (HEADS, hd, D), (D,)
        keys[b + "MlpBlock_3/Dense_0/kernel"], keys[b + "MlpBlock_3/Dense_0/bias"] = (D, 4 * D), (4 * D,)
        keys[b + "MlpBlock_3/Dense_1/kernel"], keys[b + "MlpBlock_3/Dense_1/bias"] = (4 * D, D), (D,)
    return keys


def tiny_config(tmp_path, work: str, *extra: str):
    root = tmp_path / "data"
    if not root.exists():
        write_custom_tags(root / "tags", CLASSES, per_class=3, size=(40, 48), rng=np.random.default_rng(1))
    cfg_file = tmp_path / "pretrain.yaml"
    cfg_file.write_text(f"""
data:
  root: {root}
  tag_sources: [{{name: T, format: custom_tags, root: tags, crop_size: 32}}]
  num_workers: 0
  scale: [96, 48]
model: {{arch: vit_mini, drop_path: 0.1, pretrained: ""}}
train: {{seed: 5, device: cpu, amp: "off", log_interval: 2, checkpoint_interval: 2, keep_last: 5}}
pretrain: {{iters: 4, batch_size: 4, lr: 0.001, warmup_iters: 2}}
""")
    return cfg_file, load_config(cfg_file, [f"pretrain.work_dir={tmp_path / work}", *extra])


def test_pretrain_writes_augreg_layout_that_loads_with_nothing_missing(tmp_path, capsys):
    cfg_file, cfg = tiny_config(tmp_path, "run")
    threads_before = torch.get_num_threads()
    try:
        assert (
            cli_main(
                [
                    "pretrain",
                    str(cfg_file),
                    f"pretrain.work_dir={tmp_path / 'run'}",
                    "pretrain.loss=sigmoid",
                    "train.threads=1",
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads_before)
    printed = capsys.readouterr().out
    assert "done: backbone" in printed
    assert "larvseg: 1 intra-op thread (config)" in printed  # chosen on purpose and said, as in train
    npz = tmp_path / "run" / BACKBONE_FILE
    with np.load(npz, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    expected = augreg_layout(len(CLASSES))
    assert sorted(arrays) == sorted(expected)
    assert {k: a.shape for k, a in arrays.items()} == expected
    assert all(a.dtype == np.float32 for a in arrays.values())
    assert np.abs(arrays["head/kernel"]).max() > 0  # the head was trained (it starts at zero)
    assert (tmp_path / "run" / "classes.txt").read_text().split("\n")[:3] == CLASSES

    # through the same loader as Google's file: every backbone tensor set, only head/* unused
    fresh = build_vit("vit_mini")
    report = load_pretrained(fresh, npz)
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.unused) == ["head/bias", "head/kernel"]
    state = load_checkpoint(tmp_path / "run" / "iter_00000004.pth")["model"]
    for name, value in fresh.state_dict().items():  # the loaded backbone is the trained one, exactly
        torch.testing.assert_close(value, state[f"backbone.{name}"], rtol=0, atol=0)

    seg = build_segmenter(load_config(cfg_file, [f"model.pretrained={npz}"]).model, num_classes=5)
    torch.testing.assert_close(seg.backbone.patch_embed.weight, state["backbone.patch_embed.weight"], rtol=0, atol=0)


def test_pretrain_resume_is_exact(tmp_path):
    _, cfg = tiny_config(tmp_path, "full")
    pretrain(cfg, resume="none")
    assert [s for s, _ in list_checkpoints(tmp_path / "full")] == [2, 4]

    _, cfg2 = tiny_config(tmp_path, "resumed")
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "full" / "iter_00000002.pth", tmp_path / "resumed" / "iter_00000002.pth")
    pretrain(cfg2)  # auto-resume from the copied step-2 checkpoint
    a = load_checkpoint(tmp_path / "full" / "iter_00000004.pth")
    b = load_checkpoint(tmp_path / "resumed" / "iter_00000004.pth")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    with np.load(tmp_path / "full" / BACKBONE_FILE) as fa, np.load(tmp_path / "resumed" / BACKBONE_FILE) as fb:
        assert all(np.array_equal(fa[k], fb[k]) for k in fa.files)
    # and training changed the weights (the comparison above is not between two untouched models)
    first = load_checkpoint(tmp_path / "full" / "iter_00000002.pth")["model"]
    assert not torch.equal(first["backbone.blocks.0.attn.qkv.weight"], a["model"]["backbone.blocks.0.attn.qkv.weight"])


def test_pretrain_multi_tag_source_and_losses(tmp_path):
    # a segmentation set used for tags gives several tags per image: softmax spreads the target over them
    write_coco171(tmp_path / "data" / "C171", n=3, size=(40, 48), rng=np.random.default_rng(2))
    _, cfg = tiny_config(
        tmp_path,
        "multi",
        "data.tag_sources.0.format=coco171",
        "data.tag_sources.0.root=C171",
        "data.tag_sources.0.split=train2017",
        "pretrain.iters=2",
    )
    out = pretrain(cfg, resume="none")
    with np.load(out) as f:
        assert f["head/kernel"].shape == (D, len(pretrain_vocabulary(cfg))) == (D, 160)  # COCO-Stuff merged names

    tags = torch.tensor([[0, 2], [1, -1]])
    target = multi_hot(tags, 3)
    assert target.tolist() == [[1, 0, 1], [0, 1, 0]]
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]])
    lsm = torch.log_softmax(logits, 1)
    expected = -(0.5 * lsm[0, 0] + 0.5 * lsm[0, 2]) - lsm[1, 1]
    torch.testing.assert_close(classification_loss_sum(logits, target, "softmax"), expected)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum")
    torch.testing.assert_close(classification_loss_sum(logits, target, "sigmoid"), bce)


def test_pretrain_stops_on_a_non_finite_loss_keeping_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """The same stop as `larvseg train` (train.loop.optimizer_step_or_stop): before backward, the step's
    terms named, the last good checkpoint kept and named, exit code 2."""
    from larvseg.train import pretrain as pretrain_module

    real = pretrain_module.step_terms
    calls = []

    def poisoned(model, batch, num_classes, loss):
        terms = real(model, batch, num_classes, loss)
        calls.append(1)
        if len(calls) == 4:  # step 3
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(pretrain_module, "step_terms", poisoned)
    cfg_file, cfg = tiny_config(tmp_path, "nan")
    with pytest.raises(
        pretrain_module.NonFiniteLossError,
        match=r"non-finite loss at step 3 \(lr .*\): loss=nan, top1=.*iter_00000002\.pth",
    ):
        pretrain(cfg, resume="none")
    assert [s for s, _ in list_checkpoints(tmp_path / "nan")] == [2]
    assert not (tmp_path / "nan" / BACKBONE_FILE).exists()
    calls.clear()
    assert cli_main(["pretrain", str(cfg_file), f"pretrain.work_dir={tmp_path / 'nan2'}", "--resume", "none"]) == 2
    assert "non-finite loss at step 3" in capsys.readouterr().err


def test_pretrain_needs_tag_sources(tmp_path):
    _, cfg = tiny_config(tmp_path, "none", "data.tag_sources=[]")
    with pytest.raises(ConfigError, match="data.tag_sources is empty"):
        pretrain(cfg)
    with pytest.raises(ConfigError, match="pretrain.loss"):
        tiny_config(tmp_path, "x", "pretrain.loss=hinge")
