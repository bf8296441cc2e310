"""Gemma families: Llama-style gated MLP, but the final RMSNorm multiplies by (1 + weight), the
head is tied by default, and Gemma 2 soft-caps the logits with tanh."""

from __future__ import annotations

from .base import Family
from .llama import llama_like
from .moe import stacked_experts


def _gemma(
    name: str,
    architecture: str,
    softcap_key: str | None = None,
    softcap_default: float | None = None,
) -> Family:
    return llama_like(
        name,
        architecture,
        norm_weight_offset=1.0,
        logit_softcap_key=softcap_key,
        logit_softcap_default=softcap_default,
        tie_default=True,
    )


GEMMA = _gemma("gemma", "GemmaForCausalLM")
# transformers' Gemma2Config caps at 30.0 when config.json omits the key; Gemma3's default is
# no cap
GEMMA2 = _gemma(
    "gemma2", "Gemma2ForCausalLM", softcap_key="final_logit_softcapping", softcap_default=30.0
)
GEMMA3 = _gemma("gemma3", "Gemma3ForCausalLM", softcap_key="final_logit_softcapping")
# Qwen3.5's dense models: Gemma's (1 + weight) final norm on a Llama-style MLP (its hybrid
# linear attention is not on the MLP's path); no tie when config.json omits the key
QWEN3_5 = llama_like("qwen3_5", "Qwen3_5ForCausalLM", norm_weight_offset=1.0)
# Gemma 4's dense models: a plain weight on the final norm (not Gemma's 1 + weight), the
# logit soft-cap, the head tied; the layers that reuse others' keys and values twice as wide
# where use_double_wide_mlp. Its per-layer embeddings are off the MLP's path.
GEMMA4_LAYOUT: dict[str, object] = dict(
    logit_softcap_key="final_logit_softcapping",
    tie_default=True,
    wide_keys=("use_double_wide_mlp", "num_kv_shared_layers"),
)
GEMMA4 = llama_like("gemma4", "Gemma4ForCausalLM", **GEMMA4_LAYOUT)


def gemma4_moe(layers: str) -> dict[str, object]:
    """Gemma 4's mixtures (enable_moe_block, 26B-A4B), their layers at `layers` (with
    {layer}): beside each layer's MLP, experts held in two 3D tensors (gate_up_proj (E, 2m,
    d_model), gate's rows first; down_proj (E, d_model, m)) on the layer itself. A layer's
    neurons are its experts' units, then its MLP's (as a shared expert's: it runs on every
    token)."""
    return dict(
        **stacked_experts(layers),
        experts_keys=("num_experts",),
        d_mlp_key="moe_intermediate_size",
        shared_expert=f"{layers}.mlp",
        shared_width_keys=("intermediate_size",),
        moe_block=layers,
        logit_softcap_key="final_logit_softcapping",
        tie_default=True,
        when=(("enable_moe_block", True),),
        require=(("use_double_wide_mlp", False),),  # (wide MLPs beside experts: not decoded)
    )


GEMMA4_MOE = llama_like("gemma4_moe", "Gemma4ForCausalLM", **gemma4_moe("model.layers.{layer}"))
