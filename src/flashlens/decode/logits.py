"""A block of logits as the GEMM leaves it, and the int8 quantisation behind the int8 GEMM.

With int8 operands the GEMM's output is the exact integer dot products of the quantised rows
(int32, or fp32 from decode.int8's "u7" kernel):
    x ~ q_x * s_x[:, None]        (B, d_model) neuron vectors, one scale per row
    W_U ~ q_U * s_U[:, None]      (d_vocab, d_model) head, one scale per token
    L = (q_x @ q_U^T) * s_x[:, None] * s_U[None, :]
The scales are applied where the logits are read (inside the statistics kernel; on the few
entries gathered for candidates and the reverse index): no fp32 copy of the block is written.
The output is not rounded (int32 is exact); only the operands are, to 8 bits of their row's
largest entry (7 for the "u7" kernel's activations). The map's pilot and audit measure what
that does on each model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import pages

INT8_MAX = 127


def quantize_rows(x: Tensor, levels: int = INT8_MAX) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: x (n, d) -> q (n, d) int8 in [-levels, levels] and scales s (n,)
    fp32, x ~ q * s (levels 63: the 7-bit activations of decode.int8's "u7" kernel).

    An all-zero row gets a tiny scale (and q = 0), never a division by zero."""
    xf = x.float()
    s = xf.abs().amax(1).clamp_min(1e-30) / levels  # (n,)
    q = torch.round(xf / s[:, None]).clamp_(-levels, levels).to(torch.int8)
    return q, s


def quantize_head(W_U: Tensor, rows: int = 256, transposed: bool = True) -> tuple[Tensor, Tensor]:
    """quantize_rows over the head W_U (V, d) in slices of `rows`: no fp32 copy of it (256
    rows: the slice's temporaries stay in cache; 0.6 s for Llama-3.1-8B's head, 0.9 s with
    1,024).

    Returns the quantised head and its scales s (V,). Transposed (the default): q_T (d, V),
    contiguous, as `_int_mm`'s right operand; it runs about 5% faster on it than on a
    transposed view of (V, d) rows (1561 vs 1476 GFLOP/s median, interleaved, at
    Llama-3.1-8B shapes). Otherwise q (V, d) contiguous, as oneDNN's prepack reads it."""
    V, d = W_U.shape
    shape = (d, V) if transposed else (V, d)
    q_all = pages.empty(shape, torch.int8, W_U.device)  # (huge pages where large, on CPU)
    s = torch.empty(V, dtype=torch.float32, device=W_U.device)
    for lo in range(0, V, rows):
        q, s[lo : lo + rows] = quantize_rows(W_U[lo : lo + rows])
        if transposed:
            q_all[:, lo : lo + rows] = q.T
        else:
            q_all[lo : lo + rows] = q
    return q_all, s


@dataclass
class Logits:
    """A (B, V) block of logits: `data` in the GEMM's dtype, or, from the int8 GEMM, integer
    products (int32, or fp32 holding them) whose logits are
    data * row_scale[:, None] * col_scale[None, :]."""

    data: Tensor  # (B, V)
    row_scale: Tensor | None = None  # (B,) fp32
    col_scale: Tensor | None = None  # (V,) fp32

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def at(self, raw: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """fp32 logits of `raw`, entries of `data` taken at (rows, cols): index tensors that
        broadcast to raw's shape."""
        v = raw.float()
        if self.row_scale is None or self.col_scale is None:
            return v
        return v * self.row_scale[rows] * self.col_scale[cols]

    def gather(self, ids: Tensor) -> Tensor:
        """fp32 logits (B, n) of tokens ids (B, n), row by row."""
        rows = torch.arange(self.data.shape[0], device=ids.device)[:, None]
        return self.at(self.data.gather(1, ids), rows, ids)

    def columns(self, lo: int, hi: int) -> Tensor:
        """fp32 logits (B, hi - lo) of tokens lo:hi (the scales sliced, as `at` applies them)."""
        v = self.data[:, lo:hi].float()
        if self.row_scale is None or self.col_scale is None:
            return v
        return v * self.row_scale[:, None] * self.col_scale[lo:hi]

    def chunks(self, rows: Tensor, chunks: Tensor, size: int) -> Tensor:
        """fp32 logits (F, size) of chunk chunks[i] (tokens chunks[i] * size onwards) of row
        rows[i], for index tensors (F,) and full chunks only. Whole rows of an overlapping
        window view are copied (index_select: 5x faster than indexing (F, size) positions) and
        scaled by whole chunks of token scales: no (F, size) index tensor is built."""
        V = self.data.shape[1]
        flat = self.data.contiguous().view(-1)  # (the engine's buffer is contiguous)
        # row k of this view is flat[k : k + size]: chunk c of row b starts at b * V + c * size
        windows = flat.as_strided((flat.numel() - size + 1, size), (1, 1))
        out = windows.index_select(0, rows * V + chunks * size).float()  # a new tensor
        if self.row_scale is not None and self.col_scale is not None:
            col = self.col_scale[: V // size * size].view(-1, size)  # (V // size, size)
            out.mul_(self.row_scale[rows, None]).mul_(col.index_select(0, chunks))  # in place
        return out

    def log_probs_T(self, lo: int, hi: int, lse: Tensor) -> Tensor:
        """fp32 log-probabilities (hi - lo, B) of tokens lo:hi, token-major: logits minus the
        rows' logsumexp lse (B,). Transposed as stored into one new buffer, then scaled in
        place: the values of (columns(lo, hi) - lse).T without a second (c, B) copy."""
        part = self.data[:, lo:hi]
        out = torch.empty((part.shape[1], part.shape[0]), dtype=torch.float32, device=part.device)
        out.copy_(part.T)  # a new buffer: the in-place ops below never touch `data`
        if self.row_scale is not None and self.col_scale is not None:
            out.mul_(self.row_scale).mul_(self.col_scale[lo:hi, None])
        return out.sub_(lse)

    def dense(self) -> Tensor:
        """The whole block in fp32 (a new (B, V) tensor: for small uses only)."""
        return self.columns(0, self.data.shape[1])
