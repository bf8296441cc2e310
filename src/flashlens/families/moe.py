"""Mixtures of experts with gated experts and RMSNorm: a sparse layer's neurons are its routed
experts' units in order, neuron e * d_expert + i being unit i of expert e, then a shared
expert's units where it has one (Qwen2-MoE, DeepSeek). Tensor names hold {expert}, or a tensor
holds all of a layer's experts (gpt-oss). DeepSeek's first layers are dense MLPs, of another
width."""

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
# Phi-3.5-MoE: Mixtral's expert names, a final LayerNorm with a bias (its eps under
# rms_norm_eps), and a bias on the head where lm_head_bias says
PHIMOE = llama_like(
    "phimoe",
    "PhimoeForCausalLM",
    W_up=MIXTRAL.W_up,
    W_gate=MIXTRAL.W_gate,
    W_down=MIXTRAL.W_down,
    experts_keys=MIXTRAL.experts_keys,
    norm_kind="layer",
    final_norm_bias="model.norm.bias",
    W_U_bias="lm_head.bias",
    W_U_bias_key="lm_head_bias",
)
# experts named as Llama's MLP; transformers 5 writes num_experts as num_local_experts
_EXPERTS = dict(
    W_up=f"{MLP}.experts.{{expert}}.up_proj.weight",
    W_gate=f"{MLP}.experts.{{expert}}.gate_proj.weight",
    W_down=f"{MLP}.experts.{{expert}}.down_proj.weight",
    experts_keys=("num_experts", "num_local_experts"),
)


def stacked_experts(block: str) -> dict[str, object]:
    """The tensors of a layer's experts held in two 3D tensors, `{block}.experts.gate_up_proj`
    (gate's and up's units) and `{block}.experts.down_proj`, as transformers 5 holds them."""
    return dict(
        W_up=f"{block}.experts.gate_up_proj",
        W_gate=f"{block}.experts.gate_up_proj",
        W_down=f"{block}.experts.down_proj",
        experts_stacked=True,
        gate_up_fused=True,
    )


OLMOE = llama_like("olmoe", "OlmoeForCausalLM", **_EXPERTS)
# Qwen3-MoE: one expert's width is moe_intermediate_size; layers listed in mlp_only_layers, or
# off decoder_sparse_step, are dense MLPs of intermediate_size
_QWEN_DENSE = dict(dense_list_key="mlp_only_layers", sparse_step_key="decoder_sparse_step")
QWEN3_MOE = llama_like(
    "qwen3_moe",
    "Qwen3MoeForCausalLM",
    d_mlp_key="moe_intermediate_size",
    **_QWEN_DENSE,
    **_EXPERTS,
)
# Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen3-MoE's routed experts plus a shared expert
# of shared_expert_intermediate_size units, whose output a sigmoid gate scales per token
_QWEN2_MOE: dict[str, object] = dict(
    d_mlp_key="moe_intermediate_size",
    shared_expert=f"{MLP}.shared_expert",
    shared_width_keys=("shared_expert_intermediate_size",),
    **_QWEN_DENSE,
    **_EXPERTS,
)
QWEN2_MOE = llama_like("qwen2_moe", "Qwen2MoeForCausalLM", **_QWEN2_MOE)
# Qwen3-Next: Qwen2-MoE's layout (dense layers where mlp_only_layers or decoder_sparse_step
# say) with Gemma's (1 + weight) final norm; its hybrid linear attention is off the MLP's path
QWEN3_NEXT = llama_like("qwen3_next", "Qwen3NextForCausalLM", norm_weight_offset=1.0, **_QWEN2_MOE)
# Qwen3.5's mixtures (35B-A3B and larger): Qwen2-MoE's layout (every layer sparse) with Gemma's
# (1 + weight) final norm, and their multimodal release, whose language model transformers
# builds under model.language_model (its files use that name too)
_QWEN3_5_MOE = dict(
    d_mlp_key="moe_intermediate_size",
    shared_width_keys=("shared_expert_intermediate_size",),
    norm_weight_offset=1.0,
    experts_keys=_EXPERTS["experts_keys"],
)
QWEN3_5_MOE = llama_like(
    "qwen3_5_moe",
    "Qwen3_5MoeForCausalLM",
    W_up=_EXPERTS["W_up"],
    W_gate=_EXPERTS["W_gate"],
    W_down=_EXPERTS["W_down"],
    shared_expert=f"{MLP}.shared_expert",
    **_QWEN3_5_MOE,
)
_LM_MLP = "model.language_model.layers.{layer}.mlp"
QWEN3_5_MOE_MULTIMODAL = llama_like(
    "qwen3_5_moe_multimodal",
    "Qwen3_5MoeForConditionalGeneration",
    W_up=f"{_LM_MLP}.experts.{{expert}}.up_proj.weight",
    W_gate=f"{_LM_MLP}.experts.{{expert}}.gate_proj.weight",
    W_down=f"{_LM_MLP}.experts.{{expert}}.down_proj.weight",
    shared_expert=f"{_LM_MLP}.shared_expert",
    moe_block=_LM_MLP,
    final_norm="model.language_model.norm.weight",
    W_E="model.language_model.embed_tokens.weight",
    text_config="text_config",
    **_QWEN3_5_MOE,
)
# DeepSeek-V2 and V3 (and Kimi K2), GLM-4.5: the first first_k_dense_replace layers are dense
# MLPs (intermediate_size units); the others route to n_routed_experts experts of
# moe_intermediate_size units beside shared experts of n_shared_experts times that width
_DEEPSEEK = dict(
    W_up=_EXPERTS["W_up"],
    W_gate=_EXPERTS["W_gate"],
    W_down=_EXPERTS["W_down"],
    experts_keys=("n_routed_experts",),
    d_mlp_key="moe_intermediate_size",
    shared_expert=f"{MLP}.shared_experts",
    shared_width_keys=("moe_intermediate_size", "n_shared_experts"),
    dense_layers_key="first_k_dense_replace",
    require=(("moe_layer_freq", 1),),  # every layer past the dense ones sparse
)
DEEPSEEK_V2 = llama_like("deepseek_v2", "DeepseekV2ForCausalLM", **_DEEPSEEK)
# (transformers' configs make the first 3 and 1 layers dense where config.json omits the count)
DEEPSEEK_V3 = llama_like(
    "deepseek_v3", "DeepseekV3ForCausalLM", **{**_DEEPSEEK, "dense_layers_default": 3}
)
GLM4_MOE = llama_like("glm4_moe", "Glm4MoeForCausalLM", **{**_DEEPSEEK, "dense_layers_default": 1})
DOTS1 = llama_like("dots1", "Dots1ForCausalLM", **_DEEPSEEK)  # (dots.llm1)
SOLAR_OPEN = llama_like("solar_open", "SolarOpenForCausalLM", **_DEEPSEEK)  # (every layer sparse)
# GLM-4.7-Flash: DeepSeek's layout, each layer's kind listed in mlp_layer_types (the first
# dense, the others sparse, when config.json omits it)
GLM4_MOE_LITE = llama_like(
    "glm4_moe_lite",
    "Glm4MoeLiteForCausalLM",
    **{**_DEEPSEEK, "dense_layers_key": None, "layer_kinds_key": ("mlp_layer_types", 1)},
)
# Mistral 4: DeepSeek's layout, its routed experts held in two 3D tensors (as transformers
# holds them; its files have no per-expert spelling)
MISTRAL4 = llama_like(
    "mistral4",
    "Mistral4ForCausalLM",
    **{**_DEEPSEEK, **stacked_experts(MLP), "experts_keys": ("n_routed_experts",)},
)
# ERNIE 4.5's mixtures (21B-A3B, 300B-A47B): sparse layers from moe_layer_start_index (1 when
# omitted) to moe_layer_end_index, every moe_layer_interval-th, beside shared experts of
# moe_num_shared_experts times an expert's width; the others dense MLPs
ERNIE4_5_MOE = llama_like(
    "ernie4_5_moe",
    "Ernie4_5_MoeForCausalLM",
    **{**_EXPERTS, "experts_keys": ("moe_num_experts", "num_experts")},
    d_mlp_key="moe_intermediate_size",
    shared_expert=f"{MLP}.shared_experts",
    shared_width_keys=("moe_intermediate_size", "moe_num_shared_experts"),
    dense_layers_key="moe_layer_start_index",
    dense_layers_default=1,
    sparse_step_key="moe_layer_interval",
    sparse_end_key="moe_layer_end_index",
    tie_default=True,
)
# Hunyuan-A13B: experts and a shared MLP (shared_mlp) each of intermediate_size units
HUNYUAN_MOE = llama_like(
    "hunyuan_v1_moe",
    "HunYuanMoEV1ForCausalLM",
    **_EXPERTS,
    shared_expert=f"{MLP}.shared_mlp",
    shared_width_keys=("intermediate_size",),
)
# FlexOlmo: OLMoE's layout (routed experts only)
FLEX_OLMO = llama_like("flex_olmo", "FlexOlmoForCausalLM", **_EXPERTS)


# gpt-oss: a layer's experts in two 3D tensors, stored transposed (a neuron is a column of
# gate_up_proj, a row of down_proj) with gate's and up's units alternating; both have biases
# (past the weight vectors the map decodes), and the experts' act is gpt-oss's clamped SwiGLU
GPT_OSS = llama_like(
    "gpt_oss",
    "GptOssForCausalLM",
    **stacked_experts(MLP),
    experts_keys=("num_local_experts",),
    conv1d=True,
    gate_up_interleaved=True,
)
