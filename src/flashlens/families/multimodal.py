"""Multimodal checkpoints whose language model is a Llama-style decoder (Gemma 3 4B-27B,
Mistral Small 3.1 and 3.2, Ministral 3): flashlens maps the language model's MLP neurons
through its own final norm and LM-head, and leaves the vision tower and projector alone.

transformers 5 builds the language model at `model.language_model` and the head at `lm_head`;
the hub's files (and transformers 5's `save_pretrained`, which writes the original layout)
name them `language_model.model` and `language_model.lm_head`: either spelling reads. The
sizes and settings come from config.json's `text_config`, as transformers resolves it."""

from __future__ import annotations

from .llama import llama_like

LM = "model.language_model"
_MULTIMODAL: dict[str, object] = dict(
    W_up=f"{LM}.layers.{{layer}}.mlp.up_proj.weight",
    W_gate=f"{LM}.layers.{{layer}}.mlp.gate_proj.weight",
    W_down=f"{LM}.layers.{{layer}}.mlp.down_proj.weight",
    final_norm=f"{LM}.norm.weight",
    W_E=f"{LM}.embed_tokens.weight",
    renames=((f"{LM}.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
    text_config="text_config",
    tie_default=True,  # (both config classes tie when config.json omits the key)
)

# Gemma 3 4B, 12B, 27B (the 1B and 270M are Gemma3ForCausalLM): Gemma's (1 + weight) norm;
# no logit soft-cap, whatever text_config says (this class's forward applies none)
GEMMA3_MULTIMODAL = llama_like(
    "gemma3_multimodal", "Gemma3ForConditionalGeneration", norm_weight_offset=1.0, **_MULTIMODAL
)
# Mistral Small 3.1 and 3.2 (24B), Ministral 3, Magistral Small 1.2: a Mistral decoder
MISTRAL3 = llama_like("mistral3", "Mistral3ForConditionalGeneration", **_MULTIMODAL)
