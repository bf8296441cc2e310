"""Mixtures of experts with Llama-style gated experts and RMSNorm (routed experts only, no
shared expert): a layer's neurons are its experts' units in order, neuron e * d_expert + i
being unit i of expert e. Tensor names hold {expert}."""

from __future__ import annotations

from .llama import MLP, llama_like

MIXTRAL = llama_like(
    "mixtral",
    "MixtralForCausalLM",
    W_up="model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
    W_gate="model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
    W_down="model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
    experts_keys=("num_local_experts",),
)
# experts named as Llama's MLP; transformers 5 writes num_experts as num_local_experts
_EXPERTS = dict(
    W_up=f"{MLP}.experts.{{expert}}.up_proj.weight",
    W_gate=f"{MLP}.experts.{{expert}}.gate_proj.weight",
    W_down=f"{MLP}.experts.{{expert}}.down_proj.weight",
    experts_keys=("num_experts", "num_local_experts"),
)
OLMOE = llama_like("olmoe", "OlmoeForCausalLM", **_EXPERTS)
# Qwen3-MoE: one expert's width is moe_intermediate_size; layers listed in mlp_only_layers, or
# off decoder_sparse_step, would be dense MLPs
QWEN3_MOE = llama_like(
    "qwen3_moe",
    "Qwen3MoeForCausalLM",
    d_mlp_key="moe_intermediate_size",
    require=(("mlp_only_layers", []), ("decoder_sparse_step", 1)),
    **_EXPERTS,
)
