"""Weights stored as 8-bit values with scales, dequantized as transformers does.

Two kinds of checkpoint store a quantized matrix W (..., R, C) as 8-bit values q of the same
shape and, beside it, one scale per block of (bm, bn) entries, s (..., ceil(R / bm),
ceil(C / bn)):

  "fp8"                 transformers' FineGrainedFP8 (DeepSeek-V3/R1, Qwen3's and GLM's FP8
                        releases): float8 e4m3 values, scales under name + "_scale_inv", one
                        block size (`weight_block_size`) or one scale per tensor
  "compressed-tensors"  llm-compressor's 8-bit formats ("float-quantized": float8 e4m3;
                        "int-quantized", "naive-quantized": int8; the FP8 and W8A8 releases of
                        Red Hat AI and others): scales under name + "_scale", one per tensor
                        ("tensor"), per output channel ("channel": blocks of 1 x C), per group
                        of a row's columns ("group": 1 x g) or per block ("block": bm x bn)

The weight is

    W[..., i, j] = q[..., i, j] * s[..., i // bm, j // bn]

computed in fp32, as transformers' `Fp8Dequantize` does; compressed-tensors computes the
product in the scale's dtype (`q.to(s.dtype) * s`), so with bf16 or fp16 scales each weight
is that product rounded to the scale's dtype, as here, except in a mixture's routed experts
(names holding EXPERTS), which transformers fuses into one module as it loads them and
dequantizes itself, in fp32, as FP8's. q converts to fp32 exactly (float8 and
int8 alike), and the product of a float8 or int8 value and a bf16 or fp16 scale is exact in
fp32 before that rounding: flashlens decodes the very values the dequantized model runs with.
Tensors stored in another dtype (the embedding, norms, usually the LM-head) are read as they
are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import CheckpointError, UnsupportedModelError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
EXPERTS = ".experts."  # in the names of a mixture's routed experts' weights (not shared ones')
# Rows dequantized at once, in entries: bounds the fp32 scale grid expanded beside them.
SLICE_ENTRIES = 1 << 24
# A block's side: entries of W per scale along a dimension; None: the whole dimension.
Side = int | None


@dataclass(frozen=True)
class BlockScales:
    """How a checkpoint's scales map onto its quantized weights."""

    # (bm, bn) entries of W per scale, one pair per scheme the config names (compressed-tensors
    # may quantize layers differently); each weight takes the one its scale tensor tiles.
    blocks: tuple[tuple[Side, Side], ...]
    values: tuple[torch.dtype, ...] = (torch.float8_e4m3fn,)  # the dtypes of quantized weights
    suffix: str = "_scale_inv"  # a weight's scales are stored under its name + suffix
    in_scale_dtype: bool = False  # the product is rounded to the scale's dtype
    label: str = "fp8 e4m3"  # the values, as describe() names them
    method: str = "fp8"  # config.json's quant_method

    def describe(self) -> str:
        """As atlas.json records it: "fp8 e4m3, 128 x 128 blocks"."""
        return "; ".join(f"{self.label}, {_describe_block(b)}" for b in self.blocks)

    def block(
        self, name: str, shape: tuple[int, ...], scale_shape: tuple[int, ...]
    ) -> tuple[int, int]:
        """(bm, bn) of weight `name` (..., R, C) whose scales have `scale_shape`: the first of
        the config's blocks that they tile; a checkpoint whose scales tile none is refused."""
        for bm, bn in self.blocks:
            if len(shape) < 2:
                break
            R, C = shape[-2:]
            if bm is None and bn is None and math.prod(scale_shape) == 1:
                return R, C  # (one scale for the tensor, stored as (), (1,) or (1, 1))
            side = (bm or R, bn or C)
            if tuple(scale_shape) == grid(shape, side):
                return side
        raise CheckpointError(
            f"tensor {name} {list(shape)} has scales {name + self.suffix} "
            f"{list(scale_shape)}, but config.json's quantization_config "
            f"({self.describe()}) needs {self._wanted(shape)}: the checkpoint and its "
            "config.json do not match (download them again)"
        )

    def _wanted(self, shape: tuple[int, ...]) -> str:
        if len(shape) < 2:
            return "a matrix"
        R, C = shape[-2:]
        sides = [(bm or R, bn or C) for bm, bn in self.blocks]
        return " or ".join(str(list(grid(shape, side))) for side in sides)

    def check_experts(
        self, name: str, shape: tuple[int, ...], stored: torch.dtype, block: tuple[int, int]
    ) -> None:
        """Refuse a compressed-tensors routed expert that transformers cannot load dequantized
        (it dequantizes float8 experts with one scale per tensor or output channel only), so
        that no atlas holds weights no model runs with."""
        if not self.in_scale_dtype or EXPERTS not in name:
            return
        R, C = shape[-2:]
        if stored != torch.float8_e4m3fn or block not in ((R, C), (1, C)):
            raise UnsupportedModelError(
                f"tensor {name} is a routed expert stored in {str(stored).removeprefix('torch.')}"
                f" with {block[0]} x {block[1]} scale blocks: transformers loads "
                "compressed-tensors experts dequantized only in float8 with a scale per tensor "
                "or output channel, and flashlens maps no weights the model cannot run with; "
                "map the model's bf16 release instead"
            )

    def rounds(self, name: str) -> bool:
        """Whether weight `name`'s products are rounded to its scales' dtype."""
        return self.in_scale_dtype and EXPERTS not in name

    def dequantize(
        self, q: Tensor, s: Tensor, block: tuple[int, int], row0: int = 0, rounded: bool = False
    ) -> Tensor:
        """fp32 weights from 8-bit values q (..., r, c) and the scales s of the whole tensor's
        blocks (leading dims matching q's) of `block` entries, for q's entries at rows row0 ..
        row0 + r of each matrix; `rounded`: each product rounded to the scales' dtype."""
        out = torch.empty(q.shape, dtype=torch.float32)
        s32 = _as_fp32(s)
        bm, bn = block
        r, c = q.shape[-2:]
        if s.numel() == 1:
            out.copy_(q).mul_(s32.reshape(()))
            return _round(out, s.dtype) if rounded else out
        cols = torch.arange(c) // bn  # (c,) each column's block
        step = max(1, SLICE_ENTRIES // max(1, q[..., :1, :].numel()))  # (all leading dims)
        for lo in range(0, r, step):
            rows = torch.arange(row0 + lo, row0 + min(lo + step, r)) // bm  # (r',)
            scale = s32.index_select(-2, rows).index_select(-1, cols)  # (..., r', c)
            part = out[..., lo : lo + step, :]
            part.copy_(q[..., lo : lo + step, :]).mul_(scale)
            if rounded:
                _round(part, s.dtype)
        return out

    def dequantize_index(
        self,
        q: Tensor,
        s: Tensor,
        block: tuple[int, int],
        index: Tensor,
        dim: int,
        rounded: bool = False,
    ) -> Tensor:
        """fp32 weights from 8-bit values q (R', C) or (R, C'): the rows (dim 0) or columns
        (dim 1) `index` of a matrix whose scales, of `block` entries each, are s."""
        s32 = _as_fp32(s)
        if s.numel() == 1:
            W = q.float() * s32.reshape(())
            return _round(W, s.dtype) if rounded else W
        bm, bn = block
        R, C = q.shape
        if dim == 0:
            scale = s32.index_select(0, index // bm).index_select(1, torch.arange(C) // bn)
        else:
            scale = s32.index_select(0, torch.arange(R) // bm).index_select(1, index // bn)
        W = q.float() * scale
        return _round(W, s.dtype) if rounded else W


def _round(W: Tensor, scale_dtype: torch.dtype) -> Tensor:
    """W (fp32, in place) rounded to the scales' dtype where that is narrower (bf16, fp16):
    the product compressed-tensors computes in it."""
    if scale_dtype in (torch.bfloat16, torch.float16):
        W.copy_(W.to(scale_dtype))
    return W


def grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The scale tensor's shape for a weight of `shape` in blocks of `block` entries."""
    (bm, bn), (R, C) = block, shape[-2:]
    return (*shape[:-2], math.ceil(R / bm), math.ceil(C / bn))


def _describe_block(block: tuple[Side, Side]) -> str:
    bm, bn = block
    if bm is None and bn is None:
        return "one scale per tensor"
    if bm == 1 and bn is None:
        return "one scale per output channel"
    if bm == 1:
        return f"one scale per {bn} columns of a row"
    return f"{bm} x {bn} blocks"


def _as_fp32(s: Tensor) -> Tensor:
    """Scales in fp32: stored as fp32, bf16, fp16 or float8 e8m0 (powers of two), converted as
    they are; as raw uint8 exponents (e8m0 bytes), 2 ** (byte - 127), as transformers reads
    them."""
    if s.dtype == torch.uint8:
        return (s.float() - 127.0).exp2()
    return s.float()
