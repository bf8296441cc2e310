"""FP8 checkpoints: float8 weights with a scale per block, dequantized as transformers does.

A config.json whose `quantization_config` has `"quant_method": "fp8"` (transformers'
FineGrainedFP8: DeepSeek-V3/R1, Qwen3's and GLM's FP8 releases) stores each quantized matrix
W (..., R, C) as float8 e4m3 values q and, beside it under the name + "_scale_inv", one scale
per block of `weight_block_size` (bm, bn) entries, s (..., ceil(R / bm), ceil(C / bn)) (one
scale for the whole tensor without a block size). The weight is

    W[..., i, j] = q[..., i, j] * s[..., i // bm, j // bn]

computed in fp32, as transformers' `Fp8Dequantize` does when it loads such a model without an
FP8 GPU: flashlens decodes the very values the model then runs with (to fp32 rounding of one
product). Tensors stored in another dtype (the embedding, norms, usually the LM-head) are read
as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import CheckpointError

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Rows dequantized at once, in entries: bounds the fp32 scale grid expanded beside them.
SLICE_ENTRIES = 1 << 24


@dataclass(frozen=True)
class Fp8Blocks:
    """How an FP8 checkpoint's scales map onto its weights."""

    block: tuple[int, int] | None  # (bm, bn) entries of W per scale; None: one per tensor

    def describe(self) -> str:
        """As atlas.json records it: "fp8 e4m3, 128 x 128 blocks"."""
        if self.block is None:
            return "fp8 e4m3, one scale per tensor"
        return f"fp8 e4m3, {self.block[0]} x {self.block[1]} blocks"

    def grid(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The scale tensor's shape for a weight of `shape`."""
        if self.block is None:
            return ()
        (bm, bn), (R, C) = self.block, shape[-2:]
        return (*shape[:-2], math.ceil(R / bm), math.ceil(C / bn))

    def check(self, name: str, shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> None:
        """Refuse a scale tensor that does not tile weight `name` in this config's blocks."""
        want = self.grid(shape)
        if self.block is None and math.prod(scale_shape) == 1:
            return
        if tuple(scale_shape) != want or len(shape) < 2:
            raise CheckpointError(
                f"tensor {name} {list(shape)} has scales {name + SCALE_SUFFIX} "
                f"{list(scale_shape)}, but config.json's weight_block_size "
                f"{list(self.block) if self.block else None} needs {list(want)}: the "
                "checkpoint and its config.json do not match (download them again)"
            )

    def dequantize(self, q: Tensor, s: Tensor, row0: int = 0) -> Tensor:
        """fp32 weights from float8 values q (..., r, c) and the scales s of the whole
        tensor's blocks (leading dims matching q's), for q's entries at rows row0 .. row0 + r
        of each matrix."""
        out = torch.empty(q.shape, dtype=torch.float32)
        s = _as_fp32(s)
        if self.block is None:
            return out.copy_(q).mul_(s.reshape(()))
        bm, bn = self.block
        r, c = q.shape[-2:]
        cols = torch.arange(c) // bn  # (c,) each column's block
        step = max(1, SLICE_ENTRIES // max(1, q[..., :1, :].numel()))  # (all leading dims)
        for lo in range(0, r, step):
            rows = torch.arange(row0 + lo, row0 + min(lo + step, r)) // bm  # (r',)
            grid = s.index_select(-2, rows).index_select(-1, cols)  # (..., r', c)
            out[..., lo : lo + step, :].copy_(q[..., lo : lo + step, :]).mul_(grid)
        return out

    def dequantize_index(self, q: Tensor, s: Tensor, index: Tensor, dim: int) -> Tensor:
        """fp32 weights from float8 values q (R', C) or (R, C'): the rows (dim 0) or columns
        (dim 1) `index` of a matrix whose block scales are s."""
        s = _as_fp32(s)
        if self.block is None:
            return q.float() * s.reshape(())
        bm, bn = self.block
        R, C = q.shape
        if dim == 0:
            grid = s.index_select(0, index // bm).index_select(1, torch.arange(C) // bn)
        else:
            grid = s.index_select(0, torch.arange(R) // bm).index_select(1, index // bn)
        return q.float() * grid


def _as_fp32(s: Tensor) -> Tensor:
    """Scales in fp32: stored as fp32, bf16 or float8 e8m0 (powers of two), converted as they
    are; as raw uint8 exponents (e8m0 bytes), 2 ** (byte - 127), as transformers reads them."""
    if s.dtype == torch.uint8:
        return (s.float() - 127.0).exp2()
    return s.float()
