"""GPT-style families: a transformer.h stack, sizes under n_embd / n_inner / n_layer (n_inner
null: 4 * n_embd), an ungated MLP, a LayerNorm with bias (ln_f), the embedding transformer.wte.
GPT-2 stores its weights transposed (Conv1D); GPT-J and CodeGen give their head a bias. Falcon,
BLOOM and OPT: the same shape under other names."""

from __future__ import annotations

from .base import Family
from .layernorm import LAYER_NORM
from .registry import register

_H = "transformer.h.{layer}.mlp"


def _gpt_like(name: str, architecture: str, up: str, down: str, **fields: object) -> Family:
    layout: dict[str, object] = dict(
        W_up=f"{_H}.{up}.weight",
        W_gate=None,
        W_down=f"{_H}.{down}.weight",
        final_norm="transformer.ln_f.weight",
        final_norm_bias="transformer.ln_f.bias",
        W_E="transformer.wte.weight",
        **{**LAYER_NORM, "norm_eps_key": "layer_norm_epsilon"},
        d_model_key="n_embd",
        d_mlp_key="n_inner",
        n_layers_key="n_layer",
        d_mlp_factor=4,
        # the causal-mask and position buffers that some saves hold (left out of fingerprints)
        buffers=(".attn.bias", ".attn.masked_bias", ".causal_mask", ".embed_positions"),
    )
    layout.update(fields)
    return register(Family(name=name, architectures=(architecture,), **layout))  # type: ignore[arg-type]


# GPT-2: Conv1D weights stored (in, out); hub files without the "transformer." prefix; the
# head tied to the embedding by default
GPT2 = _gpt_like(
    "gpt2",
    "GPT2LMHeadModel",
    "c_fc",
    "c_proj",
    conv1d=True,
    renames=(("transformer.", ""),),
    tie_default=True,
)
GPTJ = _gpt_like("gptj", "GPTJForCausalLM", "fc_in", "fc_out", W_U_bias="lm_head.bias")
CODEGEN = _gpt_like("codegen", "CodeGenForCausalLM", "fc_in", "fc_out", W_U_bias="lm_head.bias")
# Falcon (the original 7B/40B/180B; Falcon 3 is a Llama): ffn_hidden_size, 4 * hidden_size
# when null; the head tied to the embedding
FALCON = _gpt_like(
    "falcon",
    "FalconForCausalLM",
    "dense_h_to_4h",
    "dense_4h_to_h",
    W_E="transformer.word_embeddings.weight",
    d_model_key="hidden_size",
    d_mlp_key="ffn_hidden_size",
    n_layers_key="num_hidden_layers",
    tie_default=True,
)
# BLOOM: an MLP of 4 * hidden_size (no key); hub files without the "transformer." prefix
BLOOM = _gpt_like(
    "bloom",
    "BloomForCausalLM",
    "dense_h_to_4h",
    "dense_4h_to_h",
    W_E="transformer.word_embeddings.weight",
    d_model_key="hidden_size",
    d_mlp_key="ffn_hidden_size",  # (never set: 4 * hidden_size)
    renames=(("transformer.", ""),),
    tie_default=True,
)
# OPT: fc1 / fc2 on the decoder layer itself; hub files without the "model." prefix; the
# final LayerNorm's eps fixed at 1e-5; OPT-350m's post-norm layout and projected embeddings
# (do_layer_norm_before false) are refused
OPT = register(
    Family(
        name="opt",
        architectures=("OPTForCausalLM",),
        W_up="model.decoder.layers.{layer}.fc1.weight",
        W_gate=None,
        W_down="model.decoder.layers.{layer}.fc2.weight",
        final_norm="model.decoder.final_layer_norm.weight",
        final_norm_bias="model.decoder.final_layer_norm.bias",
        W_E="model.decoder.embed_tokens.weight",
        norm_kind="layer",
        norm_eps_key=None,
        norm_eps_default=1e-5,
        d_mlp_key="ffn_dim",
        renames=(("model.", ""),),
        tie_default=True,
        require=(("do_layer_norm_before", True), ("_remove_final_layer_norm", False)),
        mlp_flat=True,
    )
)
