"""The per-block reductions over a (neurons, vocabulary) logit block, as one fusable function.

`block_stats` is plain PyTorch: eager it is the reference; under `torch.compile` (inductor) it
becomes one or two fused loops over each row, which is what keeps `map` near the GEMM's peak.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

CHUNK = 64  # vocabulary chunk whose max/min locate the top-/bottom-k candidates


class BlockStats(NamedTuple):
    lse: Tensor  # (B,) logsumexp of the row
    entropy: Tensor  # (B,) of softmax(row), nats
    m2: Tensor  # (B,) central moments of the logits over the vocabulary, about `mu`
    m3: Tensor
    m4: Tensor
    chunk_max: Tensor  # (B, V // CHUNK) max of each full chunk of CHUNK tokens
    chunk_min: Tensor  # (B, V // CHUNK)
    reverse_mask: Tensor  # (B, V) bool: logit - lse > threshold[token]


def block_stats(L: Tensor, mu: Tensor, threshold: Tensor) -> BlockStats:
    """Reductions of logits L (B, V; any float dtype) computed in fp32.

    mu (B,): the exact mean logit of each row (x . mean(W_U)), so moments are central.
    threshold (V,): per-token log-probability a neuron must beat to enter the reverse index.
    """
    L = L.float()
    B, V = L.shape
    m = L.amax(1, keepdim=True)  # (B, 1)
    e = torch.exp(L - m)
    s = e.sum(1)
    lse = m.squeeze(1) + torch.log(s)
    entropy = lse - (e * L).sum(1) / s
    c = L - mu[:, None]
    c2 = c * c
    m2, m3, m4 = c2.mean(1), (c2 * c).mean(1), (c2 * c2).mean(1)
    n_chunks = V // CHUNK  # a tail of V % CHUNK tokens is handled by the caller
    chunks = L[:, : n_chunks * CHUNK].reshape(B, n_chunks, CHUNK)
    mask = (L - lse[:, None]) > threshold[None, :]
    return BlockStats(lse, entropy, m2, m3, m4, chunks.amax(2), chunks.amin(2), mask)


_COMPILED: dict[str, object] = {}


def compiled_block_stats(device_type: str):  # type: ignore[no-untyped-def]
    """`block_stats` compiled for a device type, or None if the compiler is unavailable."""
    if device_type not in _COMPILED:
        try:
            fn = torch.compile(block_stats, dynamic=False, fullgraph=True)
        except Exception:  # no compiler toolchain: eager is correct, only slower
            fn = None
        _COMPILED[device_type] = fn
    return _COMPILED[device_type]
