"""Weights stored as 8- or 4-bit values with scales, dequantized as transformers does.

Two kinds of checkpoint store a quantized matrix W (..., R, C) as 8- or 4-bit values q of the
same shape and, beside it, one scale per block of (bm, bn) entries, s (..., ceil(R / bm),
ceil(C / bn)):

  "fp8"                 transformers' FineGrainedFP8 (DeepSeek-V3/R1, Qwen3's and GLM's FP8
                        releases): float8 e4m3 values, scales under name + "_scale_inv", one
                        block size (`weight_block_size`) or one scale per tensor
  "compressed-tensors"  llm-compressor's formats ("float-quantized": float8 e4m3;
                        "int-quantized", "naive-quantized": int8; "pack-quantized": int4 or
                        int8 packed in int32 words, X_packed beside X_shape; the FP8, W8A8 and
                        W4A16 releases of Red Hat AI and others): scales under name +
                        "_scale", one per tensor ("tensor"), per output channel ("channel":
                        blocks of 1 x C), per group of a row's columns ("group": 1 x g) or per
                        block ("block": bm x bn); asymmetric int weights also store integer
                        zero points z under name + "_zero_point", one per scale

The weight is

    W[..., i, j] = (q[..., i, j] - z[..., i // bm, j // bn]) * s[..., i // bm, j // bn]

(z = 0 where there are no zero points) computed in fp32, as transformers' `Fp8Dequantize`
does. compressed-tensors computes it in the scale's dtype (`(q - z).to(s.dtype) * s`), so
with bf16 or fp16 scales each weight is that product rounded to the scale's dtype, as here
(and held in that dtype, which holds it exactly), except in a mixture's routed experts (names
holding EXPERTS) stored unpacked, which transformers fuses into one module as it loads them
and dequantizes itself, in fp32, as FP8's. q - z is exact in fp32 (and in bf16: at most 255
in magnitude), and its product with a bf16 or fp16 scale is exact in fp32 before that
rounding: flashlens decodes the very values the dequantized model runs with. Tensors stored
in another dtype (the embedding, norms, usually the LM-head) are read as they are.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import CheckpointError, UnsupportedModelError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# compressed-tensors' pack-quantized weight X: its words X_packed and shape X_shape; X_g_idx:
# its columns' groups in activation order (not read)
PACKED, SHAPE, G_IDX = "_packed", "_shape", "_g_idx"
ZERO = "_zero_point"  # X_zero_point: compressed-tensors' asymmetric int weights' zero points
EXPERTS = ".experts."  # in the names of a mixture's routed experts' weights (not shared ones')
# Rows dequantized at once, in entries: bounds the fp32 scale grid expanded beside them.
SLICE_ENTRIES = 1 << 22
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
    kinds: tuple[str, ...] = ("fp8 e4m3",)  # each block's values, as describe() names them
    # compressed-tensors' pack-quantized groups: their bits per value (4 or 8), packed in int32
    # words as X + PACKED, with X + SHAPE the weight's shape
    packed_bits: tuple[int, ...] = ()

    def describe(self) -> str:
        """As atlas.json records it: "fp8 e4m3, 128 x 128 blocks"."""
        named = (f"{k}, {_describe_block(b)}" for k, b in zip(self.kinds, self.blocks, strict=True))
        return "; ".join(dict.fromkeys(named))

    def packing(
        self, name: str, words: tuple[int, ...], shape: tuple[int, ...]
    ) -> tuple[int, int, int]:
        """(R, C, bits) of packed weight `name` of `shape` (its X + SHAPE) stored as int32 words
        of shape `words`; refused unless they are a matrix packed in one of the config's widths."""
        if len(shape) == 2 and len(words) == 2 and words[0] == shape[0]:
            for bits in self.packed_bits:
                if words[1] == math.ceil(shape[1] * bits / 32):
                    return shape[0], shape[1], bits
        raise CheckpointError(
            f"tensor {name + PACKED} {list(words)} does not hold a weight of shape {list(shape)} "
            f"({name + SHAPE}) packed {' or '.join(map(str, self.packed_bits))} bits a value: "
            "the checkpoint and its config.json do not match (download them again)"
        )

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
        self,
        name: str,
        shape: tuple[int, ...],
        stored: str,
        block: tuple[int, int],
        zeros: bool = False,
    ) -> None:
        """Refuse a compressed-tensors routed expert that transformers cannot load dequantized
        (it dequantizes packed experts without zero points, and float8 ones with one scale
        per tensor or output channel, not others), so that no atlas holds weights no model
        runs with. stored: how its values are stored, as Checkpoint.stored_as names it
        ("float8_e4m3fn", "int4 (packed)"); zeros: it has zero points."""
        if not self.in_scale_dtype or EXPERTS not in name:
            return
        R, C = shape[-2:]
        fp8_rows = stored == "float8_e4m3fn" and block in ((R, C), (1, C))
        if zeros or not (stored.endswith("(packed)") or fp8_rows):
            raise UnsupportedModelError(
                f"tensor {name} is a routed expert stored in {stored} with {block[0]} x "
                f"{block[1]} scale blocks{' and zero points' if zeros else ''}: transformers "
                "loads compressed-tensors experts dequantized only packed without zero points, "
                "or in float8 with a scale per tensor or output channel, and flashlens maps no "
                "weights the model cannot run with; map the model's bf16 release instead"
            )

    def into(self, name: str, packed: bool, scale_dtype: torch.dtype) -> torch.dtype:
        """The dtype weight `name` (`packed`: stored packed; scales in `scale_dtype`) is
        dequantized into. compressed-tensors computes each product in the scales' dtype, so
        with bf16 or fp16 scales the weights are the products rounded to it, which that dtype
        holds exactly, in half of fp32's memory; routed experts stored unpacked are the
        exception (transformers dequantizes those itself, in fp32; packed ones through the
        library). Otherwise fp32."""
        narrow = scale_dtype in (torch.bfloat16, torch.float16)
        if self.in_scale_dtype and narrow and (packed or EXPERTS not in name):
            return scale_dtype
        return torch.float32

    def dequantize(
        self,
        q: Tensor,
        s: Tensor,
        block: tuple[int, int],
        row0: int = 0,
        into: torch.dtype = torch.float32,
        z: Tensor | None = None,
    ) -> Tensor:
        """Weights from 8-bit values q (..., r, c) and the scales s of the whole tensor's
        blocks (leading dims matching q's) of `block` entries, for q's entries at rows row0 ..
        row0 + r of each matrix: each (q - z) * s computed in fp32, then rounded `into` that
        dtype (`into`: as BlockScales.into says). z: integer zero points, one per scale (as
        s), or None (symmetric)."""
        out = torch.empty(q.shape, dtype=into)
        s32, z32 = _as_fp32(s), None if z is None else z.float()
        bm, bn = block
        r, c = q.shape[-2:]
        if s.numel() == 1:
            W = q.float() if z32 is None else q.float().sub_(z32.reshape(()))
            return out.copy_(W.mul_(s32.reshape(())))
        cols = torch.arange(c) // bn  # (c,) each column's block
        step = max(1, SLICE_ENTRIES // max(1, q[..., :1, :].numel()))  # (all leading dims)
        for lo in range(0, r, step):
            rows = torch.arange(row0 + lo, row0 + min(lo + step, r)) // bm  # (r',)
            W = q[..., lo : lo + step, :].float()  # (..., r', c): exact
            if z32 is not None:
                W.sub_(z32.index_select(-2, rows).index_select(-1, cols))  # (exact)
            W.mul_(s32.index_select(-2, rows).index_select(-1, cols))
            out[..., lo : lo + step, :].copy_(W)  # (rounded into `into`)
        return out

    def dequantize_index(
        self,
        q: Tensor,
        s: Tensor,
        block: tuple[int, int],
        index: Tensor,
        dim: int,
        into: torch.dtype = torch.float32,
        z: Tensor | None = None,
    ) -> Tensor:
        """Weights (in `into`, as dequantize) from 8-bit values q (R', C) or (R, C'): the rows
        (dim 0) or columns (dim 1) `index` of a matrix whose scales, of `block` entries each,
        are s (and zero points z, or None)."""
        bm, bn = block
        R, C = q.shape
        W = q.float()
        # (zero points are integers, converted as they are; scales as _as_fp32 reads them)
        for apply, t32 in ((W.sub_, None if z is None else z.float()), (W.mul_, _as_fp32(s))):
            if t32 is None:
                continue
            if t32.numel() == 1:
                apply(t32.reshape(()))
            elif dim == 0:
                apply(t32.index_select(0, index // bm).index_select(1, torch.arange(C) // bn))
            else:
                apply(t32.index_select(0, torch.arange(R) // bm).index_select(1, index // bn))
        return W.to(into)


def unpack(words: Tensor, bits: int, cols: int) -> Tensor:
    """int8 values (r, cols) from compressed-tensors' int32 words (r, w): `bits` (4 or 8) bits a
    value, the lowest bits first, each value stored plus 2 ** (bits - 1)."""
    r, w = words.shape
    b = words.contiguous().view(torch.uint8)  # (r, 4 w): the words' bytes, low byte first
    if sys.byteorder == "big":
        b = b.view(r, w, 4).flip(-1).reshape(r, 4 * w)
    if bits == 4:  # the low nibble first; 0..15 less 8, in int8
        b = torch.stack((b & 0xF, b >> 4), dim=-1).view(r, 8 * w)
        return b[:, :cols].contiguous().view(torch.int8).sub_(8)
    return (b[:, :cols] ^ 0x80).view(torch.int8)  # (0..255 less 128: the top bit flipped)


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
