"""Exact full-vocabulary distances between two models' decodings of the same neurons.

Each neuron is decoded by both models exactly as `map` decodes it (final norm, LM-head,
soft-cap), blockwise in fp32 so only a (block, d_vocab) slice of each model's logits is held:

    jsd  Jensen-Shannon divergence in bits, ½ KL(p_A‖m) + ½ KL(p_B‖m), m = ½ (p_A + p_B); in [0, 1]
    tv   total-variation distance ½ Σ_t |p_A(t) - p_B(t)|; in [0, 1]

Tokens where both log-probabilities are bitwise equal contribute exactly 0, so a neuron whose
weights, final norm and LM-head are unchanged has distance exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from ..atlas.prob import norms_agree
from ..decode.engine import Decoder
from ..decode.norm import NormMode, apply_final_norm
from ..errors import AtlasError
from ..families import Matrix
from ..weights import ModelSource

LN2 = math.log(2.0)
ARRAYS_PER_ROW = 16  # (block, d_vocab) fp32-sized temporaries alive at once while a block is scored


@dataclass
class Head:
    """One model's final norm + LM-head on the device, fp32."""

    source: ModelSource
    decoder: Decoder

    @classmethod
    def open(cls, source: ModelSource, norm: NormMode, device: torch.device) -> Head:
        decoder = Decoder(
            source.W_U(),
            source.norm_weight(),
            source.norm_eps,
            norm,
            1,
            device,
            torch.float32,
            source.logit_softcap,
        )
        return cls(source, decoder)

    def log_probs(self, W: Tensor) -> Tensor:
        """Neuron vectors W (B, d_model) -> log softmax of their logits, (B, d_vocab) fp32."""
        d = self.decoder
        x = apply_final_norm(W.to(d.device), d.gain, d.eps, d.norm)  # type: ignore[arg-type]
        return torch.log_softmax(d.logits(x).float(), dim=-1)


def distances(lp_a: Tensor, lp_b: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probabilities (B, V) of two distributions per row -> (jsd bits, tv), each (B,) fp64."""
    p_a, p_b = lp_a.exp(), lp_b.exp()
    tv = 0.5 * (p_a - p_b).abs().double().sum(1)
    lp_m = torch.logaddexp(lp_a, lp_b) - LN2  # log of the mixture m
    terms = p_a * (lp_a - lp_m) + p_b * (lp_b - lp_m)  # (B, V)
    terms = torch.where(lp_a == lp_b, torch.zeros_like(terms), terms)
    jsd = 0.5 * terms.double().sum(1) / LN2
    return jsd.clamp(0.0, 1.0), tv.clamp(0.0, 1.0)


class ExactPair:
    """Both models' weights, opened once, for exact distances layer by layer."""

    def __init__(self, model_a: Path, model_b: Path, norm: NormMode, device: torch.device) -> None:
        self.a = Head.open(ModelSource.open(model_a), norm, device)
        self.b = Head.open(ModelSource.open(model_b), norm, device)
        self.device = device
        d_vocab = self.a.source.d_vocab
        budget = (2 << 30) if device.type == "cuda" else (256 << 20)
        self.block = max(1, budget // (4 * d_vocab * ARRAYS_PER_ROW))

    def close(self) -> None:
        self.a.source.close()
        self.b.source.close()

    def layer(
        self,
        matrix: Matrix,
        layer: int,
        w_norms: tuple[NDArray[np.floating], NDArray[np.floating]],  # (d_mlp,) from each atlas
        advance: Callable[[int], None] = lambda n: None,
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(jsd, tv) of every neuron of one layer, each (d_mlp,)."""
        W_a = self.a.source.neurons(matrix, layer)  # (d_mlp, d_model), stored dtype
        W_b = self.b.source.neurons(matrix, layer)
        for head, W, w_norm in ((self.a, W_a, w_norms[0]), (self.b, W_b, w_norms[1])):
            _check_weights(head.source, matrix, layer, W, w_norm)
        jsd, tv = [], []
        for lo in range(0, W_a.shape[0], self.block):
            hi = min(lo + self.block, W_a.shape[0])
            j, t = distances(self.a.log_probs(W_a[lo:hi]), self.b.log_probs(W_b[lo:hi]))
            jsd.append(j.cpu())
            tv.append(t.cpu())
            advance(hi - lo)
        return torch.cat(jsd).numpy(), torch.cat(tv).numpy()


def _check_weights(
    source: ModelSource, matrix: str, layer: int, W: Tensor, w_norm: NDArray[np.floating]
) -> None:
    """The atlas stores each neuron's |w|: refuse weights that are not the ones it decoded.
    A non-finite norm (a NaN or infinite weight) matches the same non-finite stored norm."""
    got = W.float().norm(dim=1).numpy()  # read in the stored dtype: fp32 rounding applies
    if got.shape != w_norm.shape or not norms_agree(got, w_norm).all():
        raise AtlasError(
            f"the weights at {source.folder} are not the ones its atlas decoded ({matrix} layer "
            f"{layer}: neuron norms differ); the model changed since it was mapped. Remap it, "
            "or compare from the atlases alone with --distance atlas"
        )
