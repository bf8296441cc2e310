"""Architecture families: one declarative entry each, looked up by `family_for(config)`."""

from . import gemma as _gemma  # noqa: F401  (registers the Gemma families)
from . import gpt as _gpt  # noqa: F401  (GPT-2, GPT-J, CodeGen)
from . import layernorm as _layernorm  # noqa: F401  (LayerNorm families)
from . import llama as _llama  # noqa: F401  (Llama-style families)
from . import moe as _moe  # noqa: F401  (mixtures of experts)
from . import multimodal as _multimodal  # noqa: F401  (Gemma 3, Mistral 3 language models)
from .base import MATRICES, Family, Matrix
from .registry import families, family_for, register, supported_architectures

__all__ = [
    "MATRICES",
    "Family",
    "Matrix",
    "families",
    "family_for",
    "register",
    "supported_architectures",
]
