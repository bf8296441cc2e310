"""Which quantised checkpoints flashlens reads, from config.json's `quantization_config`.

Three kinds, all read into the very values transformers' dequantized model holds:
  "fp8"                 float8 e4m3 weights with block scales (DeepSeek-V3/R1, Qwen3's FP8
                        releases; scaled.py)
  "compressed-tensors"  llm-compressor's formats of float8 e4m3, int8 or packed int4 weights
                        with one scale per tensor, output channel, group or block (Red Hat AI's
                        FP8, W8A8 and W4A16 releases; scaled.py)
  "mxfp4"               stacked experts packed as 4-bit e2m1 values with power-of-two scales
                        (gpt-oss; mxfp4.py)
Any other quantisation is refused with what to map instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import UnsupportedModelError
from .mxfp4 import Mxfp4Experts
from .scaled import BlockScales, Side

READ = ("fp8", "compressed-tensors", "mxfp4")  # the quant_method values flashlens reads
Scheme = BlockScales | Mxfp4Experts
# compressed-tensors' formats whose weights are 8-bit values beside their scales (naive:
# the fallback format, which stores them the same way)
CT_FORMATS = ("float-quantized", "int-quantized", "naive-quantized")
PACK_FORMAT = "pack-quantized"  # its int4 or int8 values packed in int32 words
BF16_RELEASE = "map the model's bf16 release instead"


def scheme(config: Mapping[str, Any]) -> Scheme | None:
    """The quantisation of config.json's `quantization_config`; None when there is none."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, Mapping) else None
    if method not in READ:  # (Family.check_config refuses these first, with the family's name)
        raise UnsupportedModelError(
            f"quantization_config has quant_method {method!r}: flashlens reads unquantised "
            'checkpoints, FP8 ("fp8"), compressed-tensors and MXFP4 ("mxfp4") ones; ' + BF16_RELEASE
        )
    assert isinstance(qc, Mapping)
    if method == "mxfp4":
        return Mxfp4Experts()
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    return _fp8(qc)


def _fp8(qc: Mapping[str, Any]) -> BlockScales:
    """transformers' FineGrainedFP8: float8 e4m3 values, `_scale_inv` scales per block."""
    if qc.get("expert_dtype", "fp8") != "fp8":
        raise UnsupportedModelError(
            f"quantization_config has expert_dtype {qc['expert_dtype']!r}: flashlens reads "
            "float8 experts only, not FP4-packed ones; " + BF16_RELEASE
        )
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise UnsupportedModelError(
            f'quantization_config has fmt {fmt!r}: flashlens reads FP8 weights in "e4m3" only; '
            + BF16_RELEASE
        )
    block = qc.get("weight_block_size")
    if block is None:
        return BlockScales(((None, None),))
    return BlockScales((_pair(block, "weight_block_size"),))


def _compressed_tensors(qc: Mapping[str, Any]) -> BlockScales:
    """llm-compressor's formats: each config group's weights, as their scales tile them."""
    groups = qc.get("config_groups")
    groups = groups if isinstance(groups, Mapping) else {}  # (damaged: quantises nothing)
    weights = [
        (g.get("format") or qc.get("format"), g["weights"])
        for g in groups.values()
        if isinstance(g, Mapping) and isinstance(g.get("weights"), Mapping)
    ]
    if not weights:
        raise UnsupportedModelError(
            "quantization_config (compressed-tensors) quantises no weights (no config group "
            "has `weights`): config.json may be damaged; " + BF16_RELEASE
        )
    if qc.get("sparsity_config"):
        raise UnsupportedModelError(
            "quantization_config (compressed-tensors) has a sparsity_config: flashlens reads "
            "dense compressed-tensors checkpoints only; " + BF16_RELEASE
        )
    schemes: dict[tuple[str, tuple[Side, Side]], None] = {}  # (kind, block), in order, once
    values: set[torch.dtype] = set()
    bits: set[int] = set()
    for fmt, w in weights:
        n_bits, kind = w.get("num_bits"), w.get("type")
        what = f"compressed-tensors weights ({kind} {n_bits}-bit, format {fmt!r})"
        packed = fmt == PACK_FORMAT and kind == "int" and n_bits in (4, 8)
        if not packed and (fmt not in CT_FORMATS or n_bits != 8 or kind not in ("float", "int")):
            raise UnsupportedModelError(
                f"quantization_config has {what}: flashlens reads compressed-tensors' 8-bit "
                f"formats ({', '.join(CT_FORMATS)}) and {PACK_FORMAT!r} int4 and int8; "
                + BF16_RELEASE
            )
        asymmetric = w.get("symmetric") is False
        if asymmetric and kind != "int":
            raise UnsupportedModelError(
                f"quantization_config has asymmetric {what} (zero points): flashlens reads "
                "zero points of int weights only; " + BF16_RELEASE
            )
        if w.get("actorder") not in (None, "weight"):
            raise UnsupportedModelError(
                f"quantization_config has {what} with actorder {w['actorder']!r} (groups in "
                "activation order, through a g_idx): flashlens reads groups in column order "
                "only; " + BF16_RELEASE
            )
        label = f"int{n_bits}" if kind == "int" else "fp8 e4m3"
        schemes[label + (" with zero points" if asymmetric else ""), _strategy(w, what)] = None
        if packed:
            bits.add(int(n_bits))
        else:
            values.add(torch.float8_e4m3fn if kind == "float" else torch.int8)
    return BlockScales(
        tuple(block for _, block in schemes),
        values=tuple(sorted(values, key=str)),
        suffix="_scale",
        in_scale_dtype=True,
        kinds=tuple(kind for kind, _ in schemes),
        packed_bits=tuple(sorted(bits)),
    )


def _strategy(w: Mapping[str, Any], what: str) -> tuple[Side, Side]:
    """The block of entries per scale of compressed-tensors weights `w` (a config group's)."""
    strategy = w.get("strategy")
    if strategy == "tensor":
        return None, None
    if strategy == "channel":
        return 1, None
    if strategy == "group" and isinstance(w.get("group_size"), int) and w["group_size"] > 0:
        return 1, w["group_size"]
    if strategy == "block":
        return _pair(w.get("block_structure"), "block_structure")
    raise UnsupportedModelError(
        f"quantization_config has {what} with strategy {strategy!r}"
        f"{' and group_size ' + repr(w.get('group_size')) if strategy == 'group' else ''}"
        ': flashlens reads the "tensor", "channel", "group" and "block" strategies; ' + BF16_RELEASE
    )


def _pair(block: Any, key: str) -> tuple[int, int]:
    ok = isinstance(block, list | tuple) and len(block) == 2
    if not ok or not all(isinstance(b, int) and b > 0 for b in block):
        raise UnsupportedModelError(
            f"quantization_config has {key} {block!r}: expected two positive integers, e.g. "
            "[128, 128]; config.json may be damaged"
        )
    return int(block[0]), int(block[1])
