"""LayerNorm families: the final norm centres the vector before rescaling it, and may add a
bias: norm(w) = (w - mean(w)) / sqrt(var(w) + eps) * gain + bias."""

from __future__ import annotations

from .base import Family
from .llama import MLP, llama_like

LAYER_NORM = dict(norm_kind="layer", norm_eps_key="layer_norm_eps", norm_eps_default=1e-5)


def _gated(name: str, architecture: str, **fields: object) -> Family:
    """Llama's tensor names (gate_proj, up_proj, down_proj, model.norm) with a LayerNorm."""
    return llama_like(name, architecture, **{**LAYER_NORM, **fields})


# Cohere (Command R): no bias; logits * config.logit_scale; the head tied by default
_COHERE = dict(logit_scale_key="logit_scale", logit_scale_default=0.0625, tie_default=True)
COHERE = _gated("cohere", "CohereForCausalLM", **_COHERE)
COHERE2 = _gated("cohere2", "Cohere2ForCausalLM", **_COHERE)
STABLELM = _gated("stablelm", "StableLmForCausalLM", final_norm_bias="model.norm.bias")
# OLMo (the first): a LayerNorm without weight or bias, its eps fixed at 1e-5
OLMO = _gated("olmo", "OlmoForCausalLM", final_norm=None, norm_eps_key=None)
# Nemotron: ungated (ReLU^2); its LayerNorm1P multiplies by (1 + weight)
NEMOTRON = _gated(
    "nemotron",
    "NemotronForCausalLM",
    W_gate=None,
    final_norm_bias="model.norm.bias",
    norm_weight_offset=1.0,
    norm_eps_key="norm_eps",
)
STARCODER2 = _gated(
    "starcoder2",
    "Starcoder2ForCausalLM",
    W_up=f"{MLP}.c_fc.weight",
    W_gate=None,
    W_down=f"{MLP}.c_proj.weight",
    final_norm_bias="model.norm.bias",
    norm_eps_key="norm_epsilon",
    tie_default=True,
)
# GPT-NeoX (Pythia): its own prefix, the head saved as embed_out
GPT_NEOX = _gated(
    "gpt_neox",
    "GPTNeoXForCausalLM",
    W_up="gpt_neox.layers.{layer}.mlp.dense_h_to_4h.weight",
    W_gate=None,
    W_down="gpt_neox.layers.{layer}.mlp.dense_4h_to_h.weight",
    final_norm="gpt_neox.final_layer_norm.weight",
    final_norm_bias="gpt_neox.final_layer_norm.bias",
    W_U="embed_out.weight",
    W_E="gpt_neox.embed_in.weight",
    # the causal-mask buffers of older saves, left out of the weights' fingerprint
    buffers=(".inv_freq", ".attention.bias", ".attention.masked_bias"),
)
# Phi (1, 1.5, 2): ungated, and its head has a bias (d_vocab,)
PHI = _gated(
    "phi",
    "PhiForCausalLM",
    W_up=f"{MLP}.fc1.weight",
    W_gate=None,
    W_down=f"{MLP}.fc2.weight",
    final_norm="model.final_layernorm.weight",
    final_norm_bias="model.final_layernorm.bias",
    W_U_bias="lm_head.bias",
)
