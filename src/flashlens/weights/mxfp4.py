"""MXFP4 experts (quantization_config quant_method "mxfp4": gpt-oss's release), unpacked as
transformers does.

A layer's stacked experts tensor X (E, C, R) as transformers' modules hold it (gpt-oss:
gate_up_proj (E, d_model, 2 m), down_proj (E, m, d_model)) is stored transposed and packed, as
X + "_blocks" (E, R, C / 32, 16) uint8, two 4-bit e2m1 values per byte (the low nibble first),
and X + "_scales" (E, R, C / 32) uint8, one power of two per 32 values, 2 ** (byte - 127):

    X[e, c, r] = E2M1[nibble c of row (e, r)] * 2 ** (scales[e, r, c // 32] - 127)

Every such value is exact in bf16 (a 1-bit mantissa times a power of two within bf16's
exponent range), so flashlens unpacks them into bf16, losing nothing and holding half of fp32's
memory: the very weights transformers' dequantized model runs with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import CheckpointError

BLOCKS, SCALES = "_blocks", "_scales"
PER_SCALE = 32  # values per scale: a block of 16 bytes
# The 16 values of an e2m1 nibble (sign, two exponent bits, one mantissa bit)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class Mxfp4Experts:
    """How an MXFP4 checkpoint packs its stacked experts' tensors."""

    def describe(self) -> str:
        """As atlas.json records it."""
        return "mxfp4 e2m1, one e8m0 scale per 32 values"

    def shape(self, name: str, blocks: tuple[int, ...], scales: tuple[int, ...]) -> tuple[int, ...]:
        """The unpacked tensor's shape (E, C, R), from its blocks' (E, R, C / 32, 16) and its
        scales' (E, R, C / 32), which must agree."""
        if len(blocks) != 4 or blocks[-1] != PER_SCALE // 2 or tuple(scales) != blocks[:-1]:
            raise CheckpointError(
                f"{name}{BLOCKS} {list(blocks)} and {name}{SCALES} {list(scales)} are not an "
                "MXFP4 tensor's blocks (E, R, G, 16) and scales (E, R, G): the checkpoint is "
                "damaged or of another layout; download it again"
            )
        E, R, G, _ = blocks
        return (E, G * PER_SCALE, R)

    def unpack(self, blocks: Tensor, scales: Tensor) -> Tensor:
        """bf16 (E', C, R) from blocks (E', R, G, 16) uint8 and scales (E', R, G) uint8 (each
        value and each power of two exact in bf16, so is their product)."""
        lut = torch.tensor(E2M1, dtype=torch.bfloat16)
        E, R, G, B = blocks.shape
        out = torch.empty((E, R, G, 2 * B), dtype=torch.bfloat16)
        out[..., 0::2] = lut[(blocks & 0x0F).long()]
        out[..., 1::2] = lut[(blocks >> 4).long()]
        out.mul_(torch.exp2(scales.float() - 127.0).bfloat16()[..., None])
        return out.view(E, R, G * 2 * B).transpose(1, 2).contiguous()
