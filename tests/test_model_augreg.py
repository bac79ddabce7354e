"""ViT backbone and AugReg .npz loading: key layout, tensor-by-tensor mapping, forward vs a direct computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from larvseg.models.pretrained_weights import CheckpointLoadError, load_augreg_npz, load_pretrained
from larvseg.models.vit import VIT_BUILDERS, VisionTransformer, build_vit, resize_pos_grid

D, HEADS, HD, DEPTH, GRID = 64, 4, 16, 2, 4


def augreg_arrays(rng: np.random.Generator, grid: int = GRID) -> dict[str, np.ndarray]:
    r = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.2  # noqa: E731
    a = {
        "embedding/kernel": r(16, 16, 3, D),
        "embedding/bias": r(D),
        "cls": r(1, 1, D),
        "Transformer/posembed_input/pos_embedding": r(1, 1 + grid * grid, D),
        "Transformer/encoder_norm/scale": 1 + r(D),
        "Transformer/encoder_norm/bias": r(D),
        "head/kernel": r(D, 10),
        "head/bias": r(10),
    }
    for i in range(DEPTH):
        p = f"Transformer/encoderblock_{i}/"
        m = p + "MultiHeadDotProductAttention_1/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            a[p + ln + "/scale"], a[p + ln + "/bias"] = 1 + r(D), r(D)
        for n in ("query", "key", "value"):
            a[m + n + "/kernel"], a[m + n + "/bias"] = r(D, HEADS, HD), r(HEADS, HD)
        a[m + "out/kernel"], a[m + "out/bias"] = r(HEADS, HD, D), r(D)
        a[p + "MlpBlock_3/Dense_0/kernel"], a[p + "MlpBlock_3/Dense_0/bias"] = r(D, 4 * D), r(4 * D)
        a[p + "MlpBlock_3/Dense_1/kernel"], a[p + "MlpBlock_3/Dense_1/bias"] = r(4 * D, D), r(D)
    return a


def direct_forward(a: dict[str, np.ndarray], img: np.ndarray) -> np.ndarray:
    """ViT forward written straight from the Flax arrays (NHWC, einsum over head axes)."""
    t = {k: torch.from_numpy(v).double() for k, v in a.items()}
    x = torch.from_numpy(img).double().permute(0, 2, 3, 1)  # NHWC
    b, hh, ww, _ = x.shape
    h, w = hh // 16, ww // 16
    patches = x.reshape(b, h, 16, w, 16, 3).permute(0, 1, 3, 2, 4, 5)  # b h w ph pw c
    tok = torch.einsum("bhwijc,ijcd->bhwd", patches, t["embedding/kernel"]) + t["embedding/bias"]
    tok = tok.reshape(b, h * w, D)
    tok = torch.cat([t["cls"].expand(b, 1, D), tok], 1) + t["Transformer/posembed_input/pos_embedding"]

    def ln(v, pre):
        mu, var = v.mean(-1, keepdim=True), v.var(-1, unbiased=False, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-6) * t[pre + "/scale"] + t[pre + "/bias"]

    for i in range(DEPTH):
        p = f"Transformer/encoderblock_{i}/"
        m = p + "MultiHeadDotProductAttention_1/"
        y = ln(tok, p + "LayerNorm_0")
        q, k, v = (
            torch.einsum("bnd,dhe->bnhe", y, t[m + n + "/kernel"]) + t[m + n + "/bias"]
            for n in ("query", "key", "value")
        )
        att = torch.softmax(torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(HD), -1)
        o = torch.einsum("bhqk,bkhe->bqhe", att, v)
        tok = tok + torch.einsum("bqhe,hed->bqd", o, t[m + "out/kernel"]) + t[m + "out/bias"]
        y = ln(tok, p + "LayerNorm_2")
        y = y @ t[p + "MlpBlock_3/Dense_0/kernel"] + t[p + "MlpBlock_3/Dense_0/bias"]
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
        tok = tok + y @ t[p + "MlpBlock_3/Dense_1/kernel"] + t[p + "MlpBlock_3/Dense_1/bias"]
    tok = ln(tok, "Transformer/encoder_norm")
    return tok[:, 1:].reshape(b, h, w, D).permute(0, 3, 1, 2).numpy()


@pytest.fixture
def npz_file(tmp_path):
    arrays = augreg_arrays(np.random.default_rng(0))
    path = tmp_path / "augreg_tiny.npz"
    np.savez(path, **arrays)
    return path, arrays


def test_npz_mapping_tensor_by_tensor(npz_file):
    path, a = npz_file
    model = VisionTransformer(D, DEPTH, HEADS, pos_grid=GRID)
    report = load_augreg_npz(model, path)
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.unused) == ["head/bias", "head/kernel"]
    sd = model.state_dict()
    m = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/"
    qkv_w, qkv_b = sd["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.bias"]
    for j, n in enumerate(("query", "key", "value")):
        kern = a[m + n + "/kernel"]  # (D, H, hd): output unit (h, e) is row j*D + h*HD + e
        for h in range(HEADS):
            for e in (0, HD - 1):
                np.testing.assert_array_equal(qkv_w[j * D + h * HD + e].numpy(), kern[:, h, e])
                assert qkv_b[j * D + h * HD + e].item() == a[m + n + "/bias"][h, e]
    out_k = a[m + "out/kernel"]
    np.testing.assert_array_equal(sd["blocks.1.attn.proj.weight"][:, 2 * HD + 3].numpy(), out_k[2, 3, :])
    np.testing.assert_array_equal(sd["patch_embed.weight"][5, 1, 2, 7].numpy(), a["embedding/kernel"][2, 7, 1, 5])
    np.testing.assert_array_equal(
        sd["blocks.0.mlp.fc1.weight"].numpy(), a["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"].T
    )
    np.testing.assert_array_equal(
        sd["blocks.0.mlp.fc2.bias"].numpy(), a["Transformer/encoderblock_0/MlpBlock_3/Dense_1/bias"]
    )
    np.testing.assert_array_equal(
        sd["blocks.0.norm2.weight"].numpy(), a["Transformer/encoderblock_0/LayerNorm_2/scale"]
    )
    np.testing.assert_array_equal(sd["norm.bias"].numpy(), a["Transformer/encoder_norm/bias"])
    np.testing.assert_array_equal(sd["cls_token"].numpy(), a["cls"])
    np.testing.assert_array_equal(sd["pos_embed"].numpy(), a["Transformer/posembed_input/pos_embedding"])


def test_forward_equals_direct_computation(npz_file):
    path, a = npz_file
    model = VisionTransformer(D, DEPTH, HEADS, pos_grid=GRID).eval()
    load_pretrained(model, path)
    img = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ours = model(torch.from_numpy(img)).numpy()
    assert ours.shape == (2, D, 4, 4)
    np.testing.assert_allclose(ours, direct_forward(a, img), atol=2e-4, rtol=1e-4)


def test_pos_grid_resized_bicubically(npz_file, tmp_path):
    _, a = npz_file
    model = VisionTransformer(D, DEPTH, HEADS, pos_grid=6)
    path = tmp_path / "g.npz"
    np.savez(path, **a)
    load_augreg_npz(model, path)
    pos = torch.from_numpy(a["Transformer/posembed_input/pos_embedding"])
    grid = pos[0, 1:].reshape(GRID, GRID, D).permute(2, 0, 1)[None]
    ref = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).reshape(36, D)
    torch.testing.assert_close(model.pos_embed.data[0, 1:], ref)
    torch.testing.assert_close(model.pos_embed.data[0, 0], pos[0, 0])
    # and at forward time to a non-square input grid
    assert model(torch.randn(1, 3, 32, 80)).shape == (1, D, 2, 5)
    assert resize_pos_grid(model.pos_embed[:, 1:], (2, 5)).shape == (1, 10, D)


def test_missing_unexpected_and_shape_errors(npz_file, tmp_path):
    _, a = npz_file
    b = dict(a)
    del b["Transformer/encoder_norm/scale"]
    b["Transformer/extra/kernel"] = np.zeros(3, np.float32)
    path = tmp_path / "partial.npz"
    np.savez(path, **b)
    report = load_augreg_npz(VisionTransformer(D, DEPTH, HEADS, pos_grid=GRID), path)
    assert report.missing == ["norm.weight"]
    assert report.unexpected == ["Transformer/extra/kernel"]
    with pytest.raises(CheckpointLoadError, match=r"partial.npz: .*wrong architecture"):
        load_augreg_npz(VisionTransformer(32, DEPTH, 2, pos_grid=GRID), tmp_path / "partial.npz")


def test_truncated_foreign_and_missing_files(npz_file, tmp_path):
    path, _ = npz_file
    data = path.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    model = VisionTransformer(D, DEPTH, HEADS, pos_grid=GRID)
    with pytest.raises(CheckpointLoadError, match="cut.npz.*truncated or corrupt"):
        load_augreg_npz(model, cut)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros(3))
    with pytest.raises(CheckpointLoadError, match="foreign.npz: not an AugReg"):
        load_augreg_npz(model, foreign)
    with pytest.raises(CheckpointLoadError, match="not found"):
        load_augreg_npz(model, tmp_path / "nope.npz")
    with pytest.raises(CheckpointLoadError, match="unknown pretrained file type"):
        load_pretrained(model, tmp_path / "w.ckpt")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_own_checkpoint_backbone(tmp_path, suffix):
    src = VisionTransformer(D, DEPTH, HEADS, pos_grid=GRID)
    state = {f"segmenter.backbone.{k}": v for k, v in src.state_dict().items()}
    state["segmenter.classifier.gamma"] = torch.tensor(2.0)
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".pth":
        torch.save({"model": state, "step": 3}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    dst = VisionTransformer(D, DEPTH, HEADS, pos_grid=GRID)
    report = load_pretrained(dst, path)
    assert report.missing == [] and report.unexpected == []
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, rtol=0, atol=0)


def test_builders_dims():
    # the published ViT shapes (width, depth, heads) of the built models (ViT-B/16 by its builder's
    # arguments: building it costs 344 MB and seconds)
    shapes = {
        k: (m.embed_dim, len(m.blocks), m.num_heads)
        for k, m in ((k, build_vit(k)) for k in ("vit_mini", "vit_tiny", "vit_small"))
    }
    assert shapes == {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_mini": (192, 4, 3)}
    assert VIT_BUILDERS["vit_base"].args == (768, 12, 12)
    with pytest.raises(KeyError, match="vit_huge"):
        build_vit("vit_huge")
    assert set(VIT_BUILDERS) >= {"vit_tiny", "vit_small", "vit_base"}
    tiny = VIT_BUILDERS["vit_tiny"](drop_path=0.1)
    assert len(tiny.blocks) == 12 and tiny.num_heads == 3 and tiny.pos_embed.shape == (1, 1 + 32 * 32, 192)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny(torch.randn(1, 3, 40, 32))
