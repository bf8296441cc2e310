"""Which quantised checkpoints flashlens reads, from config.json's `quantization_config`.

Three kinds, all read into the very values transformers' dequantized model holds:
  "fp8"                 float8 e4m3 weights with block scales (DeepSeek-V3/R1, Qwen3's FP8
                        releases; scaled.py)
  "compressed-tensors"  llm-compressor's 8-bit formats: float8 e4m3 or int8 weights with one
                        scale per tensor, output channel, group or block (Red Hat AI's FP8 and
                        W8A8 releases; scaled.py)
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
            'checkpoints, FP8 ("fp8"), 8-bit compressed-tensors and MXFP4 ("mxfp4") ones; '
            + BF16_RELEASE
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
    """llm-compressor's 8-bit formats: each config group's weights, as their scales tile them."""
    groups = qc.get("config_groups") or {}
    weights = [
        (g.get("format") or qc.get("format"), g["weights"])
        for g in groups.values()
        if isinstance(g, Mapping) and g.get("weights")
    ]
    if not weights:
        raise UnsupportedModelError(
            "quantization_config (compressed-tensors) quantises no weights (no config group "
            "has `weights`): config.json may be damaged; " + BF16_RELEASE
        )
    if qc.get("sparsity_config"):
        raise UnsupportedModelError(
            "quantization_config (compressed-tensors) has a sparsity_config: flashlens reads "
            "dense 8-bit compressed-tensors checkpoints only; " + BF16_RELEASE
        )
    blocks: list[tuple[Side, Side]] = []
    types: set[str] = set()
    for fmt, w in weights:
        what = (
            f"compressed-tensors weights ({w.get('type')} {w.get('num_bits')}-bit, format {fmt!r})"
        )
        if fmt not in CT_FORMATS or w.get("num_bits") != 8 or w.get("type") not in ("float", "int"):
            raise UnsupportedModelError(
                f"quantization_config has {what}: flashlens reads compressed-tensors' 8-bit "
                f"formats ({', '.join(CT_FORMATS)}), not packed 4-bit ones; " + BF16_RELEASE
            )
        if w.get("symmetric") is False:
            raise UnsupportedModelError(
                f"quantization_config has asymmetric {what} (zero points): flashlens reads "
                "symmetric ones only; " + BF16_RELEASE
            )
        strategy = w.get("strategy")
        if strategy == "tensor":
            blocks.append((None, None))
        elif strategy == "channel":
            blocks.append((1, None))
        elif strategy == "group" and isinstance(w.get("group_size"), int) and w["group_size"] > 0:
            blocks.append((1, w["group_size"]))
        elif strategy == "block":
            blocks.append(_pair(w.get("block_structure"), "block_structure"))
        else:
            raise UnsupportedModelError(
                f"quantization_config has {what} with strategy {strategy!r}"
                f"{' and group_size ' + repr(w.get('group_size')) if strategy == 'group' else ''}"
                ': flashlens reads the "tensor", "channel", "group" and "block" strategies; '
                + BF16_RELEASE
            )
        types.add(w["type"])
    values = tuple(torch.float8_e4m3fn if t == "float" else torch.int8 for t in sorted(types))
    return BlockScales(
        tuple(dict.fromkeys(blocks)),  # (in order, once each)
        values=values,
        suffix="_scale",
        in_scale_dtype=True,
        label=" / ".join("fp8 e4m3" if t == "float" else "int8" for t in sorted(types)),
        method="compressed-tensors",
    )


def _pair(block: Any, key: str) -> tuple[int, int]:
    ok = isinstance(block, list | tuple) and len(block) == 2
    if not ok or not all(isinstance(b, int) and b > 0 for b in block):
        raise UnsupportedModelError(
            f"quantization_config has {key} {block!r}: expected two positive integers, e.g. "
            "[128, 128]; config.json may be damaged"
        )
    return int(block[0]), int(block[1])
