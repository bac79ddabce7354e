"""Cosine classifier over a vocabulary of any size (docs/METHOD.md, section 1, "Head").

    p = normalize(x W_p)            per pixel, (B, hw, D)
    c = normalize(E[ids] W_c)       per class of the current subset, (N, D)
    s = p c^T                       raw cosine score in [-1, 1]
    logits = gamma * standardize_N(s) + beta,  standardize_N: (s - mean_N) / sqrt(var_N + 1e-5), biased var

For inference over many classes the same logits come from one GEMM (``CenteredClasses``): the mean over
classes of s is p . mean(c), and its variance is the quadratic form p^T Sigma p of the class vectors'
covariance, so gamma * standardize_N(s) + beta = (a p) (c - mean(c))^T + beta with a = gamma /
sqrt(p^T Sigma p + eps) per pixel. No pass over the (hw, N) scores besides the GEMM itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STANDARDIZE_EPS = 1e-5


@dataclass
class ClassifierOutput:
    logits: Tensor  # (B, N, h, w)
    scores: Tensor  # (B, N, h, w) raw cosine scores s, detached
    features: Tensor  # (B, D, h, w) L2-normalised projected pixel features p, detached


def standardize(s: Tensor, dim: int, eps: float = STANDARDIZE_EPS) -> Tensor:
    """(s - mean) / sqrt(biased var + eps) along ``dim``."""
    mean = s.mean(dim, keepdim=True)
    var = s.var(dim, unbiased=False, keepdim=True)
    return (s - mean) * torch.rsqrt(var + eps)


@dataclass
class CenteredClasses:
    """Class vectors prepared for ``CosineClassifier.logits_one_gemm`` (depend on the classes only)."""

    centered: Tensor  # (N, D) c - mean over classes of c
    cov: Tensor  # (D, D) biased covariance of the class vectors: var_N(p c^T) = p cov p^T

    @staticmethod
    def of(c: Tensor) -> CenteredClasses:
        """From (N, D) class vectors (float32; centred first, so the covariance has no cancellation)."""
        centered = c - c.mean(0, keepdim=True)
        return CenteredClasses(centered, centered.T @ centered / c.shape[0])


class CosineClassifier(nn.Module):
    """Class embeddings for the whole vocabulary; any subset of it can be scored per forward."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dim = dim
        self.class_embed = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.trunc_normal_(self.class_embed, std=0.02)  # cut at +-2 (absolute), as timm/mmcv
        self.proj_patch = nn.Parameter(torch.randn(dim, dim) * dim**-0.5)  # W_p
        self.proj_class = nn.Parameter(torch.randn(dim, dim) * dim**-0.5)  # W_c
        self.gamma = nn.Parameter(torch.tensor(1.0))
        self.beta = nn.Parameter(torch.tensor(0.0))

    def pixel_vectors(self, x: Tensor) -> Tensor:
        """(B, D, h, w) backbone map -> p (B, hw, D), L2-normalised."""
        return F.normalize(x.flatten(2).transpose(1, 2) @ self.proj_patch, dim=-1)

    def class_vectors(self, class_ids: Tensor | None = None) -> Tensor:
        """c (N, D), L2-normalised, for the given union ids (all classes when None)."""
        emb = self.class_embed if class_ids is None else self.class_embed[class_ids]
        return F.normalize(emb @ self.proj_class, dim=-1)

    def logits_from_scores(self, s: Tensor, dim: int = -1) -> Tensor:
        return self.gamma * standardize(s, dim) + self.beta

    def logits_one_gemm(self, p: Tensor, classes: CenteredClasses) -> Tensor:
        """``logits_from_scores(p @ c.T).T`` for (M, D) pixel vectors p: (N, M), classes first (for N >> M
        the faster GEMM layout on CPU), as one GEMM (see the module doc). Equal up to float rounding; the
        standardisation's statistics come from the (D, D) covariance."""
        var = ((p @ classes.cov) * p).sum(-1).clamp_min(0.0)
        scale = self.gamma * torch.rsqrt(var + STANDARDIZE_EPS)
        return torch.addmm(self.beta.expand(1, 1), classes.centered, (p * scale[:, None]).T)

    def forward(self, x: Tensor, class_ids: Tensor | None = None) -> ClassifierOutput:
        b, _, h, w = x.shape
        p = self.pixel_vectors(x)
        c = self.class_vectors(class_ids)
        s = p @ c.T  # (B, hw, N)
        logits = self.logits_from_scores(s, dim=-1)
        to_map = lambda t: t.transpose(1, 2).reshape(b, t.shape[-1], h, w)  # noqa: E731
        return ClassifierOutput(logits=to_map(logits), scores=to_map(s.detach()), features=to_map(p.detach()))
