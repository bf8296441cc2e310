"""Llama-style families: gated MLP (gate_proj, up_proj, down_proj), RMSNorm, LM-head; and the
variants that only rename, fuse or drop the gate, or scale the logits."""

from __future__ import annotations

from .base import Family
from .registry import register

_MLP = "model.layers.{layer}.mlp"


def _llama_like(name: str, *architectures: str, **overrides: object) -> Family:
    fields: dict[str, object] = dict(
        W_up=f"{_MLP}.up_proj.weight",
        W_gate=f"{_MLP}.gate_proj.weight",
        W_down=f"{_MLP}.down_proj.weight",
        final_norm="model.norm.weight",
    )
    fields.update(overrides)
    return register(Family(name=name, architectures=architectures, **fields))  # type: ignore[arg-type]


LLAMA = _llama_like("llama", "LlamaForCausalLM")
MISTRAL = _llama_like("mistral", "MistralForCausalLM")
QWEN2 = _llama_like("qwen2", "Qwen2ForCausalLM")
QWEN3 = _llama_like("qwen3", "Qwen3ForCausalLM")
OLMO2 = _llama_like("olmo2", "Olmo2ForCausalLM")
OLMO3 = _llama_like("olmo3", "Olmo3ForCausalLM")
HELIUM = _llama_like("helium", "HeliumForCausalLM")
EXAONE4 = _llama_like("exaone4", "Exaone4ForCausalLM")
MINISTRAL3 = _llama_like("ministral3", "Ministral3ForCausalLM")
# transformers' configs of these tie the head to the embedding when config.json omits the key
SMOLLM3 = _llama_like("smollm3", "SmolLM3ForCausalLM", tie_default=True)
ERNIE4_5 = _llama_like("ernie4_5", "Ernie4_5ForCausalLM", tie_default=True)

# gate_proj and up_proj fused into gate_up_proj (2 * d_mlp, d_model): gate rows, then up rows
_FUSED = dict(
    W_up=f"{_MLP}.gate_up_proj.weight", W_gate=f"{_MLP}.gate_up_proj.weight", gate_up_fused=True
)
PHI3 = _llama_like("phi3", "Phi3ForCausalLM", **_FUSED)  # Phi-3, Phi-3.5, Phi-4
GLM = _llama_like("glm", "GlmForCausalLM", **_FUSED)
GLM4 = _llama_like("glm4", "Glm4ForCausalLM", **_FUSED)

# Granite divides its logits by config.logits_scaling
GRANITE = _llama_like(
    "granite",
    "GraniteForCausalLM",
    logit_scale_key="logits_scaling",
    logit_scale_divides=True,
)
# ungated MLPs, down(act(up(x))): no gate matrix
ARCEE = _llama_like("arcee", "ArceeForCausalLM", W_gate=None)  # AFM (ReLU^2)
APERTUS = _llama_like("apertus", "ApertusForCausalLM", W_gate=None)  # (xIELU)

# Mixtures of experts (routed experts only; no shared expert): a layer's neurons are its
# experts' units in order, neuron e * d_expert + i being unit i of expert e
_EXPERT = f"{_MLP}.experts.{{expert}}"
MIXTRAL = _llama_like(
    "mixtral",
    "MixtralForCausalLM",
    W_up="model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
    W_gate="model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
    W_down="model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
    experts_keys=("num_local_experts",),
)
OLMOE = _llama_like(
    "olmoe",
    "OlmoeForCausalLM",
    W_up=f"{_EXPERT}.up_proj.weight",
    W_gate=f"{_EXPERT}.gate_proj.weight",
    W_down=f"{_EXPERT}.down_proj.weight",
    experts_keys=("num_experts", "num_local_experts"),
)
# Qwen3-MoE: one expert's width is moe_intermediate_size; layers listed in mlp_only_layers, or
# off decoder_sparse_step, would be dense MLPs
QWEN3_MOE = _llama_like(
    "qwen3_moe",
    "Qwen3MoeForCausalLM",
    W_up=f"{_EXPERT}.up_proj.weight",
    W_gate=f"{_EXPERT}.gate_proj.weight",
    W_down=f"{_EXPERT}.down_proj.weight",
    experts_keys=("num_experts", "num_local_experts"),
    d_mlp_key="moe_intermediate_size",
    require=(("mlp_only_layers", []), ("decoder_sparse_step", 1)),
)
