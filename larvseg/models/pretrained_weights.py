"""Pretrained weights for the ViT backbone (``model.pretrained``), one loader per source format:

- ``load_augreg_npz``: Google's AugReg ``.npz`` (Flax tree, keys joined by '/');
- ``load_torch_state_dict``: a PyTorch state dict file (``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin``):
  a timm-format ViT (e.g. ``timm/vit_base_patch16_384.augreg_in21k_ft_in1k``) or a LarvSeg checkpoint
  (its ``backbone.*`` tensors);
- ``load_hf_hub``: ``hf-hub:<repo>``, timm weights from the Hugging Face Hub (resolved by larvseg.models.hub);
- ``load_pretrained``: the one the value of ``model.pretrained`` names (prefix, then suffix).

and the writer of the AugReg layout (``augreg_state``, ``save_augreg_npz``: ``larvseg pretrain``'s output).
Every format goes through ``_copy_checked``: the same shape checks and the same missing/unexpected-key report.

timm layout (the same network, PyTorch layout; ours differs only in ``patch_embed.proj.`` -> ``patch_embed.``):
  patch_embed.proj.{weight (D,3,16,16), bias} · cls_token (1,1,D) · pos_embed (1, 1+24*24, D) ·
  blocks.{i}.norm1/norm2.{weight,bias} · blocks.{i}.attn.qkv.weight (3D, D) rows [q; k; v] · attn.qkv.bias ·
  blocks.{i}.attn.proj.{weight (D,D), bias} · blocks.{i}.mlp.fc1/fc2.{weight (out,in), bias} ·
  norm.{weight,bias} · head.{weight,bias} (classification head: expected, unused).

AugReg layout (ViT-B/16: D=768, 12 heads of 64):
  embedding/kernel (16,16,3,D) HWIO conv · embedding/bias (D,) · cls (1,1,D) ·
  Transformer/posembed_input/pos_embedding (1, 1+24*24, D) ·
  Transformer/encoderblock_{i}/LayerNorm_{0,2}/{scale,bias} ·
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value}/kernel (D,H,hd), /bias (H,hd) ·
  .../MultiHeadDotProductAttention_1/out/kernel (H,hd,D), /bias (D,) ·
  Transformer/encoderblock_{i}/MlpBlock_3/Dense_{0,1}/{kernel (in,out), bias} ·
  Transformer/encoder_norm/{scale,bias} · head/{kernel,bias} (classification head: expected, unused).
"""

from __future__ import annotations

import logging
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from larvseg.atomic import atomic_write
from larvseg.models.hub import HF_HUB_PREFIX, CheckpointLoadError, resolve_hf_hub
from larvseg.models.vit import Block, VisionTransformer, resize_pos_grid

log = logging.getLogger(__name__)

# classification head of the ImageNet fine-tune (AugReg '/' keys, timm '.' keys)
EXPECTED_UNUSED_PREFIXES = ("head/", "pre_logits/", "head.", "fc_norm.", "pre_logits.")
TIMM_RENAMES = {"patch_embed.proj.": "patch_embed."}  # timm name prefix -> ours


@dataclass
class LoadReport:
    """What a weight file did to the backbone."""

    path: str
    loaded: list[str] = field(default_factory=list)  # backbone tensors that were set
    missing: list[str] = field(default_factory=list)  # backbone tensors left at their initialisation
    unexpected: list[str] = field(default_factory=list)  # file keys that map to nothing
    unused: list[str] = field(default_factory=list)  # file keys expected not to be used (head/*)

    def summary(self) -> str:
        return (
            f"{self.path}: loaded {len(self.loaded)} tensors; missing {self.missing or 'none'}; "
            f"unexpected {self.unexpected or 'none'}; unused {len(self.unused)} head tensors"
        )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise CheckpointLoadError(f"{path}: pretrained file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError) as exc:
        raise CheckpointLoadError(f"{path}: not a readable .npz (truncated or corrupt?): {exc}") from exc


def _augreg_mapping(
    model: VisionTransformer, arrays: dict[str, np.ndarray], path: Path
) -> dict[str, tuple[str, Tensor]]:
    """Backbone parameter name -> (source key, tensor already in PyTorch layout)."""
    d = model.embed_dim
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
    out: dict[str, tuple[str, Tensor]] = {}

    def put(name: str, key: str, convert) -> None:
        if key in arrays:
            out[name] = (key, convert(arrays[key]))

    put("patch_embed.weight", "embedding/kernel", lambda a: t(a).permute(3, 2, 0, 1))  # HWIO -> OIHW
    put("patch_embed.bias", "embedding/bias", t)
    put("cls_token", "cls", t)
    put("norm.weight", "Transformer/encoder_norm/scale", t)
    put("norm.bias", "Transformer/encoder_norm/bias", t)
    for i in range(len(model.blocks)):
        src, dst = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        attn = src + "MultiHeadDotProductAttention_1/"
        put(dst + "norm1.weight", src + "LayerNorm_0/scale", t)
        put(dst + "norm1.bias", src + "LayerNorm_0/bias", t)
        put(dst + "norm2.weight", src + "LayerNorm_2/scale", t)
        put(dst + "norm2.bias", src + "LayerNorm_2/bias", t)
        qkv = [attn + f"{n}/kernel" for n in ("query", "key", "value")]
        qkv_b = [attn + f"{n}/bias" for n in ("query", "key", "value")]
        if all(k in arrays for k in qkv):
            # (D, H, hd) -> (D, D) in (in, out) -> transpose to (out, in); rows [q; k; v], head-major.
            w = torch.cat([t(arrays[k]).reshape(arrays[k].shape[0], -1).T for k in qkv], dim=0)
            out[dst + "attn.qkv.weight"] = ("+".join(qkv), w)
        if all(k in arrays for k in qkv_b):
            out[dst + "attn.qkv.bias"] = ("+".join(qkv_b), torch.cat([t(arrays[k]).reshape(-1) for k in qkv_b]))
        put(dst + "attn.proj.weight", attn + "out/kernel", lambda a: t(a).reshape(-1, a.shape[-1]).T)  # (H,hd,D)
        put(dst + "attn.proj.bias", attn + "out/bias", t)
        for j, fc in ((0, "fc1"), (1, "fc2")):
            put(dst + f"mlp.{fc}.weight", src + f"MlpBlock_3/Dense_{j}/kernel", lambda a: t(a).T)
            put(dst + f"mlp.{fc}.bias", src + f"MlpBlock_3/Dense_{j}/bias", t)
    pos_key = "Transformer/posembed_input/pos_embedding"
    if pos_key in arrays:
        pos = t(arrays[pos_key])
        if pos.ndim != 3 or pos.shape[-1] != d:
            raise CheckpointLoadError(
                f"{path}: {pos_key} has shape {tuple(pos.shape)}, the backbone needs (1, 1+g*g, {d}) (wrong architecture?)"
            )
        grid = resize_pos_grid(pos[:, 1:], (model.pos_grid, model.pos_grid))  # 24x24 -> the model's grid
        out["pos_embed"] = (pos_key, torch.cat([pos[:, :1], grid], dim=1))
    return out


def load_augreg_npz(model: VisionTransformer, path: str | Path) -> LoadReport:
    """Copy every tensor of an AugReg ``.npz`` into ``model`` (shape-checked); returns and logs a report.

    Raises CheckpointLoadError for an unreadable/truncated file, a file without AugReg keys, or a
    tensor whose shape does not fit the backbone (e.g. a ViT-L file for a ViT-B model).
    """
    path = Path(path)
    arrays = _read_npz(path)
    if "embedding/kernel" not in arrays and not any(k.startswith("Transformer/") for k in arrays):
        raise CheckpointLoadError(
            f"{path}: not an AugReg ViT checkpoint (no 'embedding/kernel' or 'Transformer/*' keys; "
            f"found e.g. {sorted(arrays)[:5]})"
        )
    return _copy_checked(model, _augreg_mapping(model, arrays, path), list(arrays), path)


def _copy_checked(
    model: VisionTransformer, mapping: dict[str, tuple[str, Tensor]], file_keys: list[str], path: str | Path
) -> LoadReport:
    """Copy ``mapping`` (backbone name -> (source key(s) joined by '+', tensor)) into ``model``, every tensor
    shape-checked; the position grid is resized to the model's when only its token count differs.
    Names that are not backbone parameters and file keys that map to nothing are reported as unexpected
    (or unused, for the classification head); parameters without a value as missing."""
    params = dict(model.named_parameters())
    report = LoadReport(str(path))
    used_keys: set[str] = set()
    with torch.no_grad():
        for name, (key, value) in mapping.items():
            if name not in params:
                continue  # reported below through its file key
            if (
                name == "pos_embed"
                and value.ndim == 3
                and value.shape[-1] == model.embed_dim
                and value.shape != params[name].shape
            ):
                try:  # e.g. timm's 24x24 grid -> the model's
                    grid = resize_pos_grid(value[:, 1:], (model.pos_grid,) * 2)
                except ValueError as exc:
                    raise CheckpointLoadError(f"{path}: {key}: {exc}") from None
                value = torch.cat([value[:, :1], grid], dim=1)
            if value.shape != params[name].shape:
                raise CheckpointLoadError(
                    f"{path}: {key} gives shape {tuple(value.shape)} for {name}, the backbone needs "
                    f"{tuple(params[name].shape)} (wrong architecture?)"
                )
            params[name].copy_(value)
            report.loaded.append(name)
            used_keys.update(key.split("+"))
    report.missing = [n for n in params if n not in report.loaded]
    for key in sorted(file_keys):
        if key in used_keys:
            continue
        (report.unused if key.startswith(EXPECTED_UNUSED_PREFIXES) else report.unexpected).append(key)
    if not report.loaded:
        raise CheckpointLoadError(f"{path}: no backbone tensors found (keys e.g. {sorted(file_keys)[:5]})")
    (log.warning if report.missing or report.unexpected else log.info)(report.summary())
    return report


def _extract_backbone_state(state: dict[str, Any]) -> dict[str, Tensor]:
    """Backbone tensors of a checkpoint: a bare backbone state dict, or any state dict whose keys contain
    'backbone.' (Segmenter, TrainingObjective, DDP 'module.' prefixes), possibly nested under 'model' or
    'state_dict'."""
    for nest in ("model", "state_dict", "segmenter"):
        if nest in state and isinstance(state[nest], dict):
            return _extract_backbone_state(state[nest])
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    picked = {k.split("backbone.", 1)[1]: v for k, v in tensors.items() if "backbone." in k}
    return picked or tensors


def load_torch_state_dict(model: VisionTransformer, path: str | Path) -> LoadReport:
    """Backbone weights from a PyTorch state dict file (.safetensors, or .pth / .pt / .bin read with
    weights_only=True): a LarvSeg checkpoint (its ``backbone.*`` tensors, under 'model' or not) or a
    timm-format ViT state dict (timm's names mapped to ours)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointLoadError(f"{path}: checkpoint not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # re-raised with the path; torch/safetensors raise many types
        raise CheckpointLoadError(f"{path}: cannot read checkpoint: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointLoadError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    backbone = _extract_backbone_state(state)
    return _copy_checked(model, {_timm_to_ours(k): (k, v) for k, v in backbone.items()}, list(backbone), path)


def _timm_to_ours(name: str) -> str:
    for prefix, ours in TIMM_RENAMES.items():
        if name.startswith(prefix):
            return ours + name[len(prefix) :]
    return name


def load_hf_hub(model: VisionTransformer, name: str) -> LoadReport:
    """``hf-hub:<repo>[@revision]``: the repository's timm weights from the Hugging Face Hub cache,
    downloaded when online (larvseg.models.hub), loaded as a state dict."""
    return load_torch_state_dict(model, resolve_hf_hub(name))


# the loader of each file suffix of ``model.pretrained`` (``hf-hub:`` names go to load_hf_hub)
LOADERS_BY_SUFFIX = {
    ".npz": load_augreg_npz,
    ".pth": load_torch_state_dict,
    ".pt": load_torch_state_dict,
    ".bin": load_torch_state_dict,
    ".safetensors": load_torch_state_dict,
}


def load_pretrained(model: VisionTransformer, path: str | Path) -> LoadReport:
    """The loader ``model.pretrained`` names: ``hf-hub:<repo>`` (load_hf_hub), an AugReg ``.npz``
    (load_augreg_npz), or a ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` state dict, LarvSeg's or timm's
    (load_torch_state_dict)."""
    if str(path).startswith(HF_HUB_PREFIX):
        return load_hf_hub(model, str(path))
    suffix = Path(path).suffix
    if suffix not in LOADERS_BY_SUFFIX:
        raise CheckpointLoadError(
            f"{path}: unknown pretrained file type {suffix!r}; expected {sorted(LOADERS_BY_SUFFIX)} or {HF_HUB_PREFIX}<repo>"
        )
    return LOADERS_BY_SUFFIX[suffix](model, path)


# ----------------------------------------------------------------------------------------------
# Writing: the inverse of _augreg_mapping, so a backbone we pretrain loads like Google's file


def augreg_state(model: VisionTransformer, head_weight: Tensor, head_bias: Tensor) -> dict[str, np.ndarray]:
    """The backbone and a linear classification head (``head_weight`` (C, D) as nn.Linear, ``head_bias``
    (C,)) as AugReg arrays: Flax layouts (HWIO conv, (in, out) dense, (D, heads, head_dim) attention),
    float32. The position grid is written at the model's stored grid (``pos_grid``) with the class token
    first, as AugReg's (1, 1 + g*g, D)."""
    d, heads = model.embed_dim, model.num_heads
    hd = d // heads
    a = lambda x: x.detach().to("cpu", torch.float32).contiguous().numpy().copy()  # noqa: E731
    out = {
        "embedding/kernel": a(model.patch_embed.weight.permute(2, 3, 1, 0)),  # OIHW -> HWIO
        "embedding/bias": a(model.patch_embed.bias),
        "cls": a(model.cls_token),
        "Transformer/posembed_input/pos_embedding": a(model.pos_embed),
        "Transformer/encoder_norm/scale": a(model.norm.weight),
        "Transformer/encoder_norm/bias": a(model.norm.bias),
        "head/kernel": a(head_weight.T),
        "head/bias": a(head_bias),
    }
    for i, block in enumerate(cast(Iterable[Block], model.blocks)):
        src = f"Transformer/encoderblock_{i}/"
        attn = src + "MultiHeadDotProductAttention_1/"
        out[src + "LayerNorm_0/scale"], out[src + "LayerNorm_0/bias"] = a(block.norm1.weight), a(block.norm1.bias)
        out[src + "LayerNorm_2/scale"], out[src + "LayerNorm_2/bias"] = a(block.norm2.weight), a(block.norm2.bias)
        w, b = block.attn.qkv.weight, block.attn.qkv.bias  # rows [q; k; v], head-major; (out, in)
        for j, name in enumerate(("query", "key", "value")):
            out[attn + f"{name}/kernel"] = a(w[j * d : (j + 1) * d].T.reshape(d, heads, hd))
            out[attn + f"{name}/bias"] = a(b[j * d : (j + 1) * d].reshape(heads, hd))
        out[attn + "out/kernel"] = a(block.attn.proj.weight.T.reshape(heads, hd, d))
        out[attn + "out/bias"] = a(block.attn.proj.bias)
        for j, fc in ((0, block.mlp.fc1), (1, block.mlp.fc2)):
            out[src + f"MlpBlock_3/Dense_{j}/kernel"] = a(fc.weight.T)
            out[src + f"MlpBlock_3/Dense_{j}/bias"] = a(fc.bias)
    return out


def save_augreg_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` as an uncompressed ``.npz`` (as Google's files), atomically (larvseg.atomic: a temp
    file renamed over ``path``, so a crash never leaves a truncated file under the final name)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: an AugReg file must end in .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a file object: np.savez would append .npz to a name; the ignore: numpy's stub reads a key as allow_pickle
    atomic_write(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]
    return path
