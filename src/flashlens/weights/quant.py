"""Which quantised checkpoints flashlens reads, from config.json's `quantization_config`.

Two kinds, both read into the very values transformers' dequantized model holds:
  "fp8"    float8 e4m3 weights with block scales (DeepSeek-V3/R1, Qwen3's FP8 releases; fp8.py)
  "mxfp4"  stacked experts packed as 4-bit e2m1 values with power-of-two scales (gpt-oss; mxfp4.py)
Any other quantisation is refused with what to map instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UnsupportedModelError
from .fp8 import Fp8Blocks
from .mxfp4 import Mxfp4Experts

READ = ("fp8", "mxfp4")  # the quant_method values flashlens reads
Scheme = Fp8Blocks | Mxfp4Experts


def scheme(config: Mapping[str, Any]) -> Scheme | None:
    """The quantisation of config.json's `quantization_config`; None when there is none."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, Mapping) else None
    if method not in READ:  # (Family.check_config refuses these first, with the family's name)
        raise UnsupportedModelError(
            f"quantization_config has quant_method {method!r}: flashlens reads unquantised "
            'checkpoints, FP8 ("fp8") and MXFP4 ("mxfp4") ones; map the model\'s bf16 '
            "release instead"
        )
    assert isinstance(qc, Mapping)
    if method == "mxfp4":
        return Mxfp4Experts()
    if qc.get("expert_dtype", "fp8") != "fp8":
        raise UnsupportedModelError(
            f"quantization_config has expert_dtype {qc['expert_dtype']!r}: flashlens reads "
            "float8 experts only, not FP4-packed ones; map the model's bf16 release instead"
        )
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise UnsupportedModelError(
            f'quantization_config has fmt {fmt!r}: flashlens reads FP8 weights in "e4m3" only; '
            "map the model's bf16 release instead"
        )
    block = qc.get("weight_block_size")
    if block is None:
        return Fp8Blocks(None)
    ok = isinstance(block, list | tuple) and len(block) == 2
    if not ok or not all(isinstance(b, int) and b > 0 for b in block):
        raise UnsupportedModelError(
            f"quantization_config has weight_block_size {block!r}: expected two positive "
            "integers, e.g. [128, 128]; config.json may be damaged"
        )
    return Fp8Blocks((int(block[0]), int(block[1])))
