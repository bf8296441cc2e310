"""Gemma families: Llama-style gated MLP, but the final RMSNorm multiplies by (1 + weight), the
head is tied by default, and Gemma 2 soft-caps the logits with tanh."""

from __future__ import annotations

from .base import Family
from .registry import register

_MLP = "model.layers.{layer}.mlp"


def _gemma(name: str, architecture: str, softcap_key: str | None = None) -> Family:
    return register(
        Family(
            name=name,
            architectures=(architecture,),
            W_up=f"{_MLP}.up_proj.weight",
            W_gate=f"{_MLP}.gate_proj.weight",
            W_down=f"{_MLP}.down_proj.weight",
            final_norm="model.norm.weight",
            norm_weight_offset=1.0,
            logit_softcap_key=softcap_key,
            tie_default=True,
        )
    )


GEMMA = _gemma("gemma", "GemmaForCausalLM")
GEMMA2 = _gemma("gemma2", "Gemma2ForCausalLM", softcap_key="final_logit_softcapping")
GEMMA3 = _gemma("gemma3", "Gemma3ForCausalLM", softcap_key="final_logit_softcapping")
