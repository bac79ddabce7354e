"""The representative pass that ``amp: auto`` times (larvseg.precision): one block of the model's own ViT.

A copy of the backbone's first transformer block (its weights, dims and attention kernel) on the tokens
of one 512 x 512 crop (1,025 with the class token): forward only for inference, forward + backward for
training. A ViT's cost is its blocks', so the block's float32 / bf16 ratio is the model's, at about
1/depth of a pass (ViT-B/16 on one core of a shared AMX Xeon: 1.6-3 s for inference, 6-11 s for
training, docs/PERFORMANCE.md row C1). The probe is the same block on 65 tokens. The copy
draws nothing from the global random state (drop-path removed, inputs from a local generator), so a run
that calibrates and one that reads the cache train identically.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import nn

from larvseg.models.vit import Block, VisionTransformer
from larvseg.precision import Workload, bf16_autocast

CALIBRATION_TOKENS = 1 + (512 // 16) ** 2  # a 512 x 512 crop of 16 x 16 patches + the class token
PROBE_TOKENS = 1 + (128 // 16) ** 2  # the probe run first: 1/16 of the work, to stop early where bf16 is far slower


def vit_workload(backbone: VisionTransformer, kind: str) -> Workload:
    """``Workload`` of ``kind`` ("inference" | "training") for this backbone's shapes."""
    if kind not in ("inference", "training"):
        raise ValueError(f"workload kind must be 'inference' or 'training', got {kind!r}")
    block = cast(Block, backbone.blocks[0])
    dim, heads, hidden = backbone.embed_dim, backbone.num_heads, block.mlp.fc1.out_features
    shape = f"vit block dim={dim} heads={heads} mlp={hidden} tokens={CALIBRATION_TOKENS} batch=1"

    def builder(tokens: int):
        def build(device: torch.device):
            blk = copy.deepcopy(block).to(device)
            blk.drop_path = nn.Identity()
            x = torch.randn(1, tokens, dim, generator=torch.Generator().manual_seed(0)).to(device)
            if kind == "inference":
                blk.eval()

                @torch.no_grad()
                def run(bf16: bool) -> None:
                    with bf16_autocast(bf16, device):
                        blk(x)

                return run

            blk.train()
            for p in blk.parameters():
                p.requires_grad_(True)

            def run_train(bf16: bool) -> None:
                with torch.enable_grad():
                    with bf16_autocast(bf16, device):
                        y = blk(x.requires_grad_(True))
                    y.float().square().mean().backward()
                blk.zero_grad(set_to_none=True)
                x.grad = None

            return run_train

        return build

    return Workload(kind, shape, builder(CALIBRATION_TOKENS), builder(PROBE_TOKENS))
