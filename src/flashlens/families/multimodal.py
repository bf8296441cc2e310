"""Multimodal checkpoints whose language model is a Llama-style decoder (Gemma 3 4B-27B,
Gemma 4, Mistral Small 3.1 and 3.2, Ministral 3, Qwen2.5-VL, Qwen3-VL, Qwen3.5): flashlens maps
the language model's MLP neurons through its own final norm and LM-head, and leaves the vision
tower and projector alone.

transformers 5 builds the language model at `model.language_model` and the head at `lm_head`;
the hub's files (and transformers 5's `save_pretrained`, which writes the original layout)
may name them otherwise (Gemma 3: `language_model.model` and `language_model.lm_head`;
Qwen2.5-VL: `model`): either spelling reads. The sizes and settings come from config.json's
`text_config`, as transformers resolves it."""

from __future__ import annotations

from .gemma import GEMMA4_LAYOUT, gemma4_moe
from .llama import llama_like
from .moe import stacked_experts

LM = "model.language_model"
_LANGUAGE_MODEL: dict[str, object] = dict(
    W_up=f"{LM}.layers.{{layer}}.mlp.up_proj.weight",
    W_gate=f"{LM}.layers.{{layer}}.mlp.gate_proj.weight",
    W_down=f"{LM}.layers.{{layer}}.mlp.down_proj.weight",
    final_norm=f"{LM}.norm.weight",
    W_E=f"{LM}.embed_tokens.weight",
    text_config="text_config",
    tie_default=True,  # (the config classes tie when config.json omits the key)
)
# the LLaVA layout's original spelling (Gemma 3, Mistral 3)
_MULTIMODAL: dict[str, object] = dict(
    _LANGUAGE_MODEL,
    renames=((f"{LM}.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
)

# Gemma 3 4B, 12B, 27B (the 1B and 270M are Gemma3ForCausalLM): Gemma's (1 + weight) norm;
# no logit soft-cap, whatever text_config says (this class's forward applies none)
GEMMA3_MULTIMODAL = llama_like(
    "gemma3_multimodal", "Gemma3ForConditionalGeneration", norm_weight_offset=1.0, **_MULTIMODAL
)
# Mistral Small 3.1 and 3.2 (24B), Ministral 3, Magistral Small 1.2: a Mistral decoder
MISTRAL3 = llama_like("mistral3", "Mistral3ForConditionalGeneration", **_MULTIMODAL)
# Qwen2.5-VL (3B-72B): its files name the language model "model." (the vision tower is
# "visual."); config.json may hold the text settings at its top level, which transformers
# moves into text_config
QWEN2_VL = llama_like(
    "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration",
    **dict(_LANGUAGE_MODEL, renames=((f"{LM}.", "model."),)),
)
# Qwen3-VL's dense models (2B-32B), whose files use transformers' module names
QWEN3_VL = llama_like("qwen3_vl", "Qwen3VLForConditionalGeneration", **_LANGUAGE_MODEL)
# Qwen3.5's multimodal release of its dense models: Gemma's (1 + weight) final norm
QWEN3_5_MULTIMODAL = llama_like(
    "qwen3_5_multimodal",
    "Qwen3_5ForConditionalGeneration",
    norm_weight_offset=1.0,
    **dict(_LANGUAGE_MODEL, tie_default=False),
)
# Gemma 4's multimodal release (its forward soft-caps the logits, as the text model's does)
GEMMA4_MULTIMODAL = llama_like(
    "gemma4_multimodal", "Gemma4ForConditionalGeneration", **{**_LANGUAGE_MODEL, **GEMMA4_LAYOUT}
)
GEMMA4_MOE_MULTIMODAL = llama_like(
    "gemma4_moe_multimodal",
    "Gemma4ForConditionalGeneration",
    **{**_LANGUAGE_MODEL, **gemma4_moe(f"{LM}.layers.{{layer}}")},
)
# Qwen3-VL's mixtures (30B-A3B, 235B-A22B): each layer's experts in two 3D tensors, which the
# hub's files hold transposed (gate_up_proj (E, d_model, 2 m), gate's units first; down_proj
# (E, m, d_model)) and transformers 5's saves do not; dense layers where mlp_only_layers or
# decoder_sparse_step say
_LM_MLP = f"{LM}.layers.{{layer}}.mlp"
QWEN3_VL_MOE = llama_like(
    "qwen3_vl_moe",
    "Qwen3VLMoeForConditionalGeneration",
    **{
        **_LANGUAGE_MODEL,
        **stacked_experts(_LM_MLP),
        "conv1d": True,
        "experts_either_way": True,
        "experts_keys": ("num_experts", "num_local_experts"),
        "d_mlp_key": "moe_intermediate_size",
        "moe_block": _LM_MLP,
        "dense_mlp": _LM_MLP,
        "dense_list_key": "mlp_only_layers",
        "sparse_step_key": "decoder_sparse_step",
        "tie_default": False,
    },
)
