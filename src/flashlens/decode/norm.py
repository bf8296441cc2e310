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
