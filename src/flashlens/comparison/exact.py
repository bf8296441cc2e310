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
            source.readout(),
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
        x = apply_final_norm(W.to(d.device), d.readout, d.norm)  # type: ignore[arg-type]
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
        stored: tuple[Stored, Stored],  # what each atlas holds for this layer
        advance: Callable[[int], None] = lambda n: None,
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(jsd, tv) of every neuron of one layer, each (d_mlp,). Refuses weights that are not
        the ones the atlases decoded (see `_check_weights`, `_check_probs`)."""
        W_a = self.a.source.neurons(matrix, layer)  # (d_mlp, d_model), stored dtype
        W_b = self.b.source.neurons(matrix, layer)
        for head, W, st in ((self.a, W_a, stored[0]), (self.b, W_b, stored[1])):
            _check_weights(head.source, matrix, layer, W, st.w_norm)
        jsd, tv = [], []
        for lo in range(0, W_a.shape[0], self.block):
            hi = min(lo + self.block, W_a.shape[0])
            lp_a, lp_b = self.a.log_probs(W_a[lo:hi]), self.b.log_probs(W_b[lo:hi])
            for head, lp, st in ((self.a, lp_a, stored[0]), (self.b, lp_b, stored[1])):
                _check_probs(head.source, matrix, layer, lo, lp, st)
            j, t = distances(lp_a, lp_b)
            jsd.append(j.cpu())
            tv.append(t.cpu())
            advance(hi - lo)
        return torch.cat(jsd).numpy(), torch.cat(tv).numpy()


@dataclass
class Stored:
    """What an atlas holds for one layer: w_norm (d_mlp,), top_ids and top_probs (d_mlp, k)."""

    w_norm: NDArray[np.floating]
    top_ids: NDArray[np.integer]
    top_probs: NDArray[np.floating]


# The atlas's top-k probabilities are within 1% of exact (the map's tolerance): 0.1 nat apart
# in log-probability means the weights decode to something else.
PROB_TOLERANCE_NATS = 0.1
LOG_FLOOR = math.log(1e-30)


def _check_weights(
    source: ModelSource, matrix: str, layer: int, W: Tensor, w_norm: NDArray[np.floating]
) -> None:
    """The atlas stores each neuron's |w|: refuse weights that are not the ones it decoded.
    A non-finite norm (a NaN or infinite weight) matches the same non-finite stored norm."""
    got = W.float().norm(dim=1).numpy()  # read in the stored dtype: fp32 rounding applies
    if got.shape != w_norm.shape or not norms_agree(got, w_norm).all():
        raise AtlasError(_changed(source, matrix, layer, "neuron norms differ"))


def _check_probs(
    source: ModelSource, matrix: str, layer: int, lo: int, lp: Tensor, stored: Stored
) -> None:
    """Norm-preserving edits (a sign flipped, entries permuted) pass `_check_weights`: the
    exact log-probabilities (B, V) of neurons lo.. must also give the atlas's top-k tokens the
    probabilities it stores for them."""
    rows = slice(lo, lo + lp.shape[0])  # (copies: Arrow's arrays are read-only)
    ids = torch.from_numpy(np.array(stored.top_ids[rows], dtype=np.int64))
    want = torch.from_numpy(np.array(stored.top_probs[rows], dtype=np.float64)).log()
    got = lp.gather(1, ids.to(lp.device)).double().cpu()
    # (a stored probability that underflowed to 0 is log 0: both sides floored at 1e-30)
    off = (got.clamp_min(LOG_FLOOR) - want.clamp_min(LOG_FLOOR)).abs()
    bad = off > PROB_TOLERANCE_NATS  # (NaN, a non-finite neuron on either side: not bad)
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0, 0])
        raise AtlasError(
            _changed(
                source,
                matrix,
                layer,
                f"neuron {lo + row} decodes to other probabilities for its stored top tokens",
            )
        )


def _changed(source: ModelSource, matrix: str, layer: int, what: str) -> str:
    return (
        f"the weights at {source.folder} are not the ones its atlas decoded ({matrix} layer "
        f"{layer}: {what}); the model changed since it was mapped. Remap it, or compare from "
        "the atlases alone with --distance atlas"
    )
