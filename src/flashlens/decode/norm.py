"""The final norm (and what the head does past W_U), applied to neuron vectors as the model
applies it to the residual stream."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
from torch import Tensor

NormMode = Literal["model", "gain", "none"]
NORM_MODES: tuple[NormMode, ...] = ("model", "gain", "none")
NormKind = Literal["rms", "layer"]


@dataclass(frozen=True)
class Readout:
    """How the model reads logits out of a residual vector, past W_U's rows, fp32:

        rms:    norm(w) = w / sqrt(mean(w^2) + eps) * gain
        layer:  norm(w) = (w - mean(w)) / sqrt(var(w) + eps) * gain + bias
        logits = scale * (W_U @ norm(w) + logit_bias)

    gain (d_model,) as the model applies it (Gemma: 1 + weight; ones for a norm without a
    weight); bias (d_model,) or None; logit_bias (d_vocab,), the LM-head's own bias (Phi-2,
    GPT-J), or None. The scale (Granite divides its logits, Cohere multiplies them) is applied
    to the normed vector, which the head's linearity makes the same, and to the logit bias
    (`scaled_logit_bias`). A soft-cap, where the model has one, comes after all of it."""

    gain: Tensor
    eps: float
    kind: NormKind = "rms"
    bias: Tensor | None = None
    scale: float = 1.0
    logit_bias: Tensor | None = None

    def to(self, device: torch.device) -> Readout:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, torch.float32)

        return replace(
            self,
            gain=self.gain.to(device, torch.float32),
            bias=move(self.bias),
            logit_bias=move(self.logit_bias),
        )

    @property
    def scaled_logit_bias(self) -> Tensor | None:
        """What the logits gain per token past x . W_U (x the normed, scaled vector), (V,)."""
        if self.logit_bias is None:
            return None
        return self.logit_bias.float() * self.scale


def head_tail(
    logits: Tensor, bias: Tensor | None, softcap: float | None, ids: Tensor | None = None
) -> Tensor:
    """What the head does to the products x . W_U (x normed and scaled): add its bias (V,),
    already times the logits' scale (`Readout.scaled_logit_bias`), at tokens `ids` (any
    shape; None: the whole vocabulary, last dimension), then the tanh soft-cap."""
    if bias is not None:
        logits = logits + (bias if ids is None else bias[ids])
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


class Affine(NamedTuple):
    """apply_final_norm(W) as x = (W - m[:, None]) * f[:, None] * g + c: per-row factors f
    (n,) and means m (n,) or None, a gain g (d_model,), an offset c (d_model,) or None."""

    f: Tensor
    g: Tensor
    m: Tensor | None
    c: Tensor | None


def apply_final_norm(W: Tensor, readout: Readout, mode: NormMode) -> Tensor:
    """W (n, d_model) neuron vectors -> (n, d_model) fp32, ready for the LM-head.

    model: the final norm as the model computes it on a residual w (Readout), then the scale
    gain:  w * gain * scale  (direction weighting only: no centring, rescaling or bias)
    none:  w * scale
    """
    x = W.float()
    if mode == "model":
        if readout.kind == "layer":
            x = x - x.mean(-1, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + readout.eps)
    if mode != "none":
        x = x * readout.gain.float()
    if mode == "model" and readout.bias is not None:
        x = x + readout.bias.float()
    return x * readout.scale if readout.scale != 1.0 else x


def norm_factors(W: Tensor, readout: Readout, mode: NormMode, rows: int = 1024) -> Affine:
    """apply_final_norm(W) in the factored form of `Affine`, computed in slices of `rows`, so
    no fp32 copy of W is made (for reading many entries of a whole layer exactly)."""
    n, d = W.shape
    g = readout.gain.float() if mode != "none" else torch.ones(d, device=W.device)
    f = torch.full((n,), float(readout.scale), device=W.device)
    layer = mode == "model" and readout.kind == "layer"
    m = torch.zeros(n, device=W.device) if layer else None
    if mode == "model":
        for lo in range(0, n, rows):
            w = W[lo : lo + rows].float()
            if m is not None:
                m[lo : lo + rows] = mean = w.mean(-1)
                w = w - mean[:, None]
            f[lo : lo + rows] *= torch.rsqrt(w.pow(2).mean(-1) + readout.eps)
    c = None
    if mode == "model" and readout.bias is not None:
        c = readout.bias.float() * readout.scale
    return Affine(f, g, m, c)
