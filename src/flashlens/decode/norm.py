"""The final norm, applied to neuron vectors as the model applies it to the residual stream."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

NormMode = Literal["model", "gain", "none"]
NORM_MODES: tuple[NormMode, ...] = ("model", "gain", "none")


def apply_final_norm(W: Tensor, gain: Tensor, eps: float, mode: NormMode) -> Tensor:
    """W (n, d_model) neuron vectors -> (n, d_model) fp32, ready for the LM-head.

    model: RMSNorm, w / sqrt(mean(w^2) + eps) * gain  (what the model computes on a residual w)
    gain:  w * gain  (direction weighting only, no rescaling)
    none:  w
    """
    x = W.float()
    if mode == "none":
        return x
    if mode == "model":
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * gain.float()


def norm_factors(
    W: Tensor, gain: Tensor, eps: float, mode: NormMode, rows: int = 1024
) -> tuple[Tensor, Tensor]:
    """apply_final_norm(W) as row factors f (n,) and a gain g (d_model,), both fp32, with
    x = W * f[:, None] * g; computed in slices of `rows`, so no fp32 copy of W is made (for
    reading many entries of a whole layer exactly)."""
    n, d = W.shape
    g = gain.float() if mode != "none" else torch.ones(d, device=W.device)
    f = torch.ones(n, device=W.device)
    if mode == "model":
        for lo in range(0, n, rows):
            f[lo : lo + rows] = torch.rsqrt(W[lo : lo + rows].float().pow(2).mean(-1) + eps)
    return f, g
