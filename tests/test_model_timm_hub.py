"""Pretrained weights in timm's layout (.safetensors / .pth) and from a Hugging Face Hub cache (hf-hub:...).

The timm layout is written here from timm's published conventions (``checkpoint_filter_fn`` /
``_load_weights`` of timm.models.vision_transformer): patch_embed.proj.weight (D,3,16,16), cls_token,
pos_embed, blocks.i.{norm1, attn.qkv (rows [q; k; v]), attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, head.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from larvseg.models.pretrained_weights import CheckpointLoadError, load_pretrained
from larvseg.models.vit import VisionTransformer
from test_model_augreg import DEPTH, GRID, HEADS, D, augreg_arrays

HUB_REPO = "timm/vit_base_patch16_384.augreg_in21k_ft_in1k"
POS = "Transformer/posembed_input/pos_embedding"


def npz_to_timm(a: dict[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
    d = a["cls"].shape[-1]
    t = {
        "patch_embed.proj.weight": a["embedding/kernel"].transpose(3, 2, 0, 1),  # HWIO -> OIHW
        "patch_embed.proj.bias": a["embedding/bias"],
        "cls_token": a["cls"],
        "pos_embed": a[POS],
        "norm.weight": a["Transformer/encoder_norm/scale"],
        "norm.bias": a["Transformer/encoder_norm/bias"],
        "head.weight": a["head/kernel"].T,
        "head.bias": a["head/bias"],
    }
    for i in range(depth):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        m = p + "MultiHeadDotProductAttention_1/"
        t[b + "norm1.weight"], t[b + "norm1.bias"] = a[p + "LayerNorm_0/scale"], a[p + "LayerNorm_0/bias"]
        t[b + "norm2.weight"], t[b + "norm2.bias"] = a[p + "LayerNorm_2/scale"], a[p + "LayerNorm_2/bias"]
        t[b + "attn.qkv.weight"] = np.concatenate(
            [a[m + n + "/kernel"].reshape(d, -1).T for n in ("query", "key", "value")]
        )
        t[b + "attn.qkv.bias"] = np.concatenate([a[m + n + "/bias"].reshape(-1) for n in ("query", "key", "value")])
        t[b + "attn.proj.weight"] = a[m + "out/kernel"].transpose(2, 0, 1).reshape(d, -1)
        t[b + "attn.proj.bias"] = a[m + "out/bias"]
        for j in (0, 1):
            t[b + f"mlp.fc{j + 1}.weight"] = a[p + f"MlpBlock_3/Dense_{j}/kernel"].T
            t[b + f"mlp.fc{j + 1}.bias"] = a[p + f"MlpBlock_3/Dense_{j}/bias"]
    return {k: np.ascontiguousarray(v) for k, v in t.items()}


def timm_to_npz(t: dict[str, np.ndarray], depth: int, heads: int) -> dict[str, np.ndarray]:
    d = t["cls_token"].shape[-1]
    a = {
        "embedding/kernel": t["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": t["patch_embed.proj.bias"],
        "cls": t["cls_token"],
        POS: t["pos_embed"],
        "Transformer/encoder_norm/scale": t["norm.weight"],
        "Transformer/encoder_norm/bias": t["norm.bias"],
        "head/kernel": t["head.weight"].T,
        "head/bias": t["head.bias"],
    }
    for i in range(depth):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        m = p + "MultiHeadDotProductAttention_1/"
        a[p + "LayerNorm_0/scale"], a[p + "LayerNorm_0/bias"] = t[b + "norm1.weight"], t[b + "norm1.bias"]
        a[p + "LayerNorm_2/scale"], a[p + "LayerNorm_2/bias"] = t[b + "norm2.weight"], t[b + "norm2.bias"]
        w, bias = t[b + "attn.qkv.weight"].reshape(3, d, d), t[b + "attn.qkv.bias"].reshape(3, heads, d // heads)
        for j, n in enumerate(("query", "key", "value")):
            a[m + n + "/kernel"], a[m + n + "/bias"] = w[j].T.reshape(d, heads, d // heads), bias[j]
        a[m + "out/kernel"] = t[b + "attn.proj.weight"].reshape(d, heads, d // heads).transpose(1, 2, 0)
        a[m + "out/bias"] = t[b + "attn.proj.bias"]
        for j in (0, 1):
            a[p + f"MlpBlock_3/Dense_{j}/kernel"] = t[b + f"mlp.fc{j + 1}.weight"].T
            a[p + f"MlpBlock_3/Dense_{j}/bias"] = t[b + f"mlp.fc{j + 1}.bias"]
    return {k: np.ascontiguousarray(v) for k, v in a.items()}


def random_timm_state(
    rng: np.random.Generator, d: int, depth: int, grid: int, classes: int = 10
) -> dict[str, np.ndarray]:
    r = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    t = {
        "patch_embed.proj.weight": r(d, 3, 16, 16),
        "patch_embed.proj.bias": r(d),
        "cls_token": r(1, 1, d),
        "pos_embed": r(1, 1 + grid * grid, d),
        "norm.weight": 1 + r(d),
        "norm.bias": r(d),
        "head.weight": r(classes, d),
        "head.bias": r(classes),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        t.update(
            {
                b + "norm1.weight": 1 + r(d),
                b + "norm1.bias": r(d),
                b + "norm2.weight": 1 + r(d),
                b + "norm2.bias": r(d),
                b + "attn.qkv.weight": r(3 * d, d),
                b + "attn.qkv.bias": r(3 * d),
                b + "attn.proj.weight": r(d, d),
                b + "attn.proj.bias": r(d),
                b + "mlp.fc1.weight": r(4 * d, d),
                b + "mlp.fc1.bias": r(4 * d),
                b + "mlp.fc2.weight": r(d, 4 * d),
                b + "mlp.fc2.bias": r(d),
            }
        )
    return t


def _features(path, pos_grid: int = GRID) -> tuple[torch.Tensor, object]:
    model = VisionTransformer(D, DEPTH, HEADS, pos_grid=pos_grid).eval()
    report = load_pretrained(model, path)
    image = torch.from_numpy(np.random.default_rng(7).standard_normal((1, 3, 48, 64)).astype(np.float32))
    with torch.no_grad():
        return model(image), report


def _write_all(tmp_path, a: dict[str, np.ndarray], t: dict[str, np.ndarray]) -> dict[str, object]:
    np.savez(tmp_path / "augreg.npz", **a)
    save_file(t, str(tmp_path / "timm.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in t.items()}, tmp_path / "timm.pth")
    return {s: tmp_path / s for s in ("augreg.npz", "timm.safetensors", "timm.pth")}


@pytest.mark.parametrize("direction", ["npz->timm", "timm->npz"])
def test_npz_and_timm_layouts_give_identical_features(tmp_path, direction):
    rng = np.random.default_rng(3)
    if direction == "npz->timm":
        a = augreg_arrays(rng)
        t = npz_to_timm(a, DEPTH)
        back = timm_to_npz(t, DEPTH, HEADS)
    else:
        t = random_timm_state(rng, D, DEPTH, GRID)
        a = timm_to_npz(t, DEPTH, HEADS)
        back = npz_to_timm(a, DEPTH)
    original = a if direction == "npz->timm" else t
    assert set(back) == set(original) and all(np.array_equal(back[k], original[k]) for k in original)  # lossless
    paths = _write_all(tmp_path, a, t)
    reference, report = _features(paths["augreg.npz"])
    assert report.missing == [] and report.unexpected == []
    for name in ("timm.safetensors", "timm.pth"):
        features, report = _features(paths[name])
        assert report.missing == [] and report.unexpected == [], report.summary()
        assert sorted(report.unused) == ["head.bias", "head.weight"]
        assert len(report.loaded) == 6 + 12 * DEPTH  # every backbone tensor
        torch.testing.assert_close(features, reference, rtol=0, atol=0)
    # the position grid of either layout is resized the same way to another model grid
    np.testing.assert_array_equal(_features(paths["timm.safetensors"], 6)[0], _features(paths["augreg.npz"], 6)[0])


def test_timm_state_dict_shape_and_key_report(tmp_path):
    t = npz_to_timm(augreg_arrays(np.random.default_rng(0)), DEPTH)
    del t["blocks.1.mlp.fc2.bias"]
    t["blocks.1.ls1.gamma"] = np.ones(D, np.float32)  # a LayerScale ViT: not this architecture
    save_file(t, str(tmp_path / "odd.safetensors"))
    _, report = _features(tmp_path / "odd.safetensors")
    assert report.missing == ["blocks.1.mlp.fc2.bias"]
    assert report.unexpected == ["blocks.1.ls1.gamma"]
    wide = random_timm_state(np.random.default_rng(1), 2 * D, DEPTH, GRID)  # ViT-L for a ViT-B, so to speak
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointLoadError, match=r"wide.safetensors: .* gives shape .*wrong architecture"):
        _features(tmp_path / "wide.safetensors")


def _hub_cache(root, t: dict[str, np.ndarray], revision: str = "0123456789abcdef0123456789abcdef01234567"):
    """$HF_HOME as huggingface_hub lays it out: hub/models--<owner>--<name>/{refs/main, snapshots/<rev>/...}."""
    repo_dir = root / "hub" / ("models--" + HUB_REPO.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    save_file(t, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_384", "num_classes": 10}))
    return snapshot / "model.safetensors"


_HUB_SCRIPT = """
import json, sys
import numpy as np, torch
from larvseg.models.pretrained_weights import CheckpointLoadError, load_pretrained
from larvseg.models.vit import VisionTransformer
d, depth, heads, grid = json.loads(sys.argv[1])
model = VisionTransformer(d, depth, heads, pos_grid=grid).eval()
report = load_pretrained(model, "hf-hub:" + sys.argv[2])
image = torch.from_numpy(np.random.default_rng(7).standard_normal((1, 3, 48, 64)).astype(np.float32))
with torch.no_grad():
    np.save(sys.argv[3], model(image).numpy())
try:
    load_pretrained(model, "hf-hub:timm/not_in_the_cache")
except CheckpointLoadError as exc:
    print("MISSING:", exc)
print("REPORT:", json.dumps({"path": report.path, "missing": report.missing, "unexpected": report.unexpected,
                             "unused": report.unused}))
"""


def test_hf_hub_name_resolved_from_an_offline_cache(tmp_path):
    pytest.importorskip("huggingface_hub", reason="the [hub] extra is not installed")
    a = augreg_arrays(np.random.default_rng(5))
    cached = _hub_cache(tmp_path / "hf", npz_to_timm(a, DEPTH))
    np.savez(tmp_path / "augreg.npz", **a)
    reference, _ = _features(tmp_path / "augreg.npz")
    # a fresh process: huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when it is imported
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_CACHE"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = tmp_path / "features.npy"
    proc = subprocess.run(
        [sys.executable, "-c", _HUB_SCRIPT, json.dumps([D, DEPTH, HEADS, GRID]), HUB_REPO, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.split("REPORT:", 1)[1])
    assert os.path.samefile(report["path"], cached)
    assert (
        report["missing"] == []
        and report["unexpected"] == []
        and sorted(report["unused"]) == ["head.bias", "head.weight"]
    )
    np.testing.assert_array_equal(np.load(out), reference.numpy())
    missing = proc.stdout.split("MISSING:", 1)[1].split("REPORT:")[0]
    assert "timm/not_in_the_cache" in missing and "HF_HUB_OFFLINE=1" in missing and "not in the cache" in missing
