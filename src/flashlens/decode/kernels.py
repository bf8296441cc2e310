"""The per-block reductions over a (neurons, vocabulary) logit block, as one fusable function.

`block_stats` is plain PyTorch: eager it is the reference; under `torch.compile` (inductor) it
becomes one or two fused loops over each row, which is what keeps `map` near the GEMM's peak.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import aot
from .policy import has_c_compiler

CHUNK = 64  # vocabulary chunk whose max/min locate the top-/bottom-k candidates
LOG2_E = 1.0 / math.log(2.0)


class BlockStats(NamedTuple):
    lse: Tensor  # (B,) logsumexp of the row
    entropy: Tensor  # (B,) of softmax(row), nats
    m2: Tensor  # (B,) central moments of the logits over the vocabulary, about `mu`
    m3: Tensor
    m4: Tensor
    chunk_max: Tensor  # (B, V // CHUNK) max of each full chunk of CHUNK tokens
    chunk_min: Tensor  # (B, V // CHUNK)
    chunk_gap: Tensor  # (B, V // CHUNK) max of L - threshold over each full chunk


def block_stats(L: Tensor, mu: Tensor, threshold: Tensor) -> BlockStats:
    """Reductions of logits L (B, V; any float dtype) computed in fp32.

    mu (B,): the exact mean logit of each row (x . mean(W_U)), so moments are central.
    threshold (V,): the reverse index's per-token bound on log-probabilities. An entry can beat
    it (L - lse > threshold) only in a chunk whose `chunk_gap` exceeds the row's lse, so the
    reverse index looks at those chunks alone, and no (B, V) hit mask is ever written.

    Written so that inductor fuses it into one parallel loop nest that reads L twice, row by
    row (chunk reductions; sums): the row max comes from the chunk maxima.
    """
    Lf = L.float()
    B, V = Lf.shape
    n_chunks = V // CHUNK  # a tail of V % CHUNK tokens is handled by the caller
    n_full = n_chunks * CHUNK
    chunks = Lf[:, :n_full].reshape(B, n_chunks, CHUNK)
    thr = threshold[:n_full].reshape(n_chunks, CHUNK)
    # An identity that reads the threshold: it gives the three chunk reductions the same loop
    # nest, so inductor fuses them into one pass over L (without it the extremes' loop is
    # flattened to (B * n_chunks, CHUNK) and the gap takes a pass of its own, ~25% slower).
    same = torch.where(thr < float("inf"), chunks, chunks)
    chunk_max, chunk_min = same.amax(2), same.amin(2)  # (B, n_chunks)
    chunk_gap = (chunks - thr).amax(2)  # (B, n_chunks)
    if n_chunks == 0:
        m = Lf.amax(1)
    else:
        m = chunk_max.amax(1)  # (B,)
        if n_full < V:
            m = torch.maximum(m, Lf[:, n_full:].amax(1))
    # exp(z) as exp2(z * log2(e)): inductor's vectorised exp2 is twice as fast as its exp on
    # AVX512 (12 vs 25 ms for a 512 x 128256 block); the product's rounding moves each term by
    # under 1e-5 relative for z > -100, far inside the map's tolerances.
    e = torch.exp2((Lf - m[:, None]) * LOG2_E)
    s = e.sum(1)
    lse = m + torch.log(s)
    entropy = lse - (e * Lf).sum(1) / s
    c = Lf - mu[:, None]
    c2 = c * c
    m2, m3, m4 = c2.mean(1), (c2 * c).mean(1), (c2 * c2).mean(1)
    return BlockStats(lse, entropy, m2, m3, m4, chunk_max, chunk_min, chunk_gap)


def block_stats_int8(
    Lq: Tensor, s_row: Tensor, s_col: Tensor, mu: Tensor, threshold: Tensor
) -> BlockStats:
    """block_stats of the logits Lq * s_row[:, None] * s_col[None, :]: the int8 GEMM's integer
    products (B, V) (int32, or fp32 holding them: decode.int8) and their row (B,) and token
    (V,) scales (see decode.logits). Compiled,
    the scaling fuses into the reductions' loops: about the cost of block_stats on bf16."""
    return block_stats(Lq.float() * s_row[:, None] * s_col, mu, threshold)


def exact_logits(W_U: Tensor, ids: Tensor, x: Tensor) -> Tensor:
    """fp32 logits (B, n) of tokens ids (B, n) for fp32 vectors x (B, d), W_U (V, d) any dtype.

    Compiled, the row gather, the conversion and the dot products fuse into one loop that reads
    each gathered W_U row once: no (B, n, d) temporary (eager, callers pass row slices)."""
    return (W_U[ids].float() * x[:, None, :]).sum(-1)


PAIRS = 1 << 16  # pairs per call of pair_logits: its one compiled shape


def pair_logits(
    W_U: Tensor, W: Tensor, f: Tensor, g: Tensor, rows: Tensor, tokens: Tensor
) -> Tensor:
    """fp32 logits (E,) of pairs (neuron rows[i], token tokens[i]): W_U (V, d) and raw neuron
    vectors W (n, d) in any dtype, normed as x = W * f[:, None] * g (norm.norm_factors).
    Compiled, both row gathers, the norm and the dot fuse into one loop: no (E, d) temporary
    and no fp32 copy of W."""
    return (W_U[tokens].float() * W[rows].float() * g).sum(-1) * f[rows]


class Kernel:
    """One of this module's kernels, compiled for a device type.

    `prepare(*args)` compiles it for arguments shaped like `args`: on the CPU an ahead-of-time
    package from the on-disk cache (built once per machine and shape, loaded in milliseconds;
    see `aot`), elsewhere, or when that fails, `torch.compile` run once on them. A call whose
    arguments match a loaded package runs the package; any other goes through `torch.compile`
    (compiled on first use, specialised per shape)."""

    def __init__(self, fn: Callable[..., Any], device_type: str) -> None:
        self.fn, self.device_type = fn, device_type
        self.packages: dict[aot.Signature, aot.Runner] = {}
        self.package_calls = 0  # calls served by a package (tests check the warm-up's reach)
        self._jit: Callable[..., Any] | None = None

    def prepare(self, *args: Tensor) -> None:
        sig = aot.signature(args)
        if sig in self.packages:
            return
        runner = aot.load_or_build(self.fn, args) if self.device_type == "cpu" else None
        if runner is not None:
            self.packages[sig] = runner
        else:
            self(*args)

    def __call__(self, *args: Tensor) -> Any:
        runner = self.packages.get(aot.signature(args)) if self.packages else None
        if runner is not None:
            self.package_calls += 1
            out = runner(list(args))
            return _PACK.get(self.fn.__name__, _single)(out)
        if self._jit is None:
            self._jit = torch.compile(self.fn, dynamic=False, fullgraph=True)
        return self._jit(*args)


def _single(out: list[Tensor]) -> Tensor:
    return out[0]


_PACK: dict[str, Callable[[list[Tensor]], Any]] = {
    "block_stats": lambda out: BlockStats(*out),
    "block_stats_int8": lambda out: BlockStats(*out),
}
_COMPILED: dict[tuple[str, str], Kernel | None] = {}
_LOCK = threading.Lock()


def compiled(fn: Callable[..., Any], device_type: str) -> Kernel | None:
    """`fn` (one of this module's kernels) compiled for a device type, or None without a
    compiler (eager is correct, only slower). One Kernel per function and device type, shared
    by `warm_up` and every Decoder."""
    key = (fn.__name__, device_type)
    with _LOCK:  # `map` asks from two threads at once (warm-up, and the Decoder being built)
        if key not in _COMPILED:
            usable = device_type != "cpu" or has_c_compiler()
            _COMPILED[key] = Kernel(fn, device_type) if usable else None
        return _COMPILED[key]


def compiled_block_stats(device_type: str, int8: bool = False) -> Kernel | None:
    return compiled(block_stats_int8 if int8 else block_stats, device_type)
