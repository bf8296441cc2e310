"""Llama-style families: gated MLP (gate_proj, up_proj, down_proj), RMSNorm, LM-head; and the
variants that only rename, fuse or drop the gate, or scale the logits."""

from __future__ import annotations

from .base import Family
from .registry import register

MLP = "model.layers.{layer}.mlp"


def llama_like(name: str, *architectures: str, **overrides: object) -> Family:
    """Register a family with Llama's tensor names (gate_proj, up_proj, down_proj, model.norm),
    its fields overridden by `overrides`."""
    fields: dict[str, object] = dict(
        W_up=f"{MLP}.up_proj.weight",
        W_gate=f"{MLP}.gate_proj.weight",
        W_down=f"{MLP}.down_proj.weight",
        final_norm="model.norm.weight",
    )
    fields.update(overrides)
    return register(Family(name=name, architectures=architectures, **fields))  # type: ignore[arg-type]


LLAMA = llama_like("llama", "LlamaForCausalLM")
MISTRAL = llama_like("mistral", "MistralForCausalLM")
QWEN2 = llama_like("qwen2", "Qwen2ForCausalLM")
QWEN3 = llama_like("qwen3", "Qwen3ForCausalLM")
OLMO2 = llama_like("olmo2", "Olmo2ForCausalLM")
OLMO3 = llama_like("olmo3", "Olmo3ForCausalLM")
HELIUM = llama_like("helium", "HeliumForCausalLM")
EXAONE4 = llama_like("exaone4", "Exaone4ForCausalLM")
MINISTRAL3 = llama_like("ministral3", "Ministral3ForCausalLM")
MINISTRAL = llama_like("ministral", "MinistralForCausalLM")  # (Ministral 8B)
# (their MLPs may have biases, per mlp_bias: past the weight vectors the map decodes)
SEED_OSS = llama_like("seed_oss", "SeedOssForCausalLM")  # (Seed-OSS-36B)
CWM = llama_like("cwm", "CwmForCausalLM")  # (Code World Model 32B)
HUNYUAN_DENSE = llama_like("hunyuan_v1_dense", "HunYuanDenseV1ForCausalLM")
# transformers' configs of these tie the head to the embedding when config.json omits the key
SMOLLM3 = llama_like("smollm3", "SmolLM3ForCausalLM", tie_default=True)
ERNIE4_5 = llama_like("ernie4_5", "Ernie4_5ForCausalLM", tie_default=True)

# gate_proj and up_proj fused into gate_up_proj (2 * d_mlp, d_model): gate rows, then up rows
_FUSED = dict(
    W_up=f"{MLP}.gate_up_proj.weight", W_gate=f"{MLP}.gate_up_proj.weight", gate_up_fused=True
)
PHI3 = llama_like("phi3", "Phi3ForCausalLM", **_FUSED)  # Phi-3, Phi-3.5, Phi-4
GLM = llama_like("glm", "GlmForCausalLM", **_FUSED)
GLM4 = llama_like("glm4", "Glm4ForCausalLM", **_FUSED)

# Granite divides its logits by config.logits_scaling
_GRANITE: dict[str, object] = dict(logit_scale_key="logits_scaling", logit_scale_divides=True)
GRANITE = llama_like("granite", "GraniteForCausalLM", **_GRANITE)
# Granite 4.0 (its Mamba layers are off the MLP's path): each layer's MLP is shared_mlp, gate's
# and up's rows fused in input_linear (gate's first), beside, in its mixtures (H-Small,
# H-Tiny: num_local_experts > 0, 8 when config.json omits it), experts in 3D tensors
# (block_sparse_moe's input_linear and output_linear), whose units come first. The dense
# models (H-Micro, Micro) have num_local_experts 0.
_SHARED_MLP = "model.layers.{layer}.shared_mlp"
GRANITE4 = llama_like(
    "granitemoehybrid",
    "GraniteMoeHybridForCausalLM",
    W_up=f"{_SHARED_MLP}.input_linear.weight",
    W_gate=f"{_SHARED_MLP}.input_linear.weight",
    W_down=f"{_SHARED_MLP}.output_linear.weight",
    gate_up_fused=True,
    d_mlp_key="shared_intermediate_size",
    **_GRANITE,
)
_GRANITE_MOE = "model.layers.{layer}.block_sparse_moe"
GRANITE4_MOE = llama_like(
    "granitemoehybrid_moe",
    "GraniteMoeHybridForCausalLM",
    W_up=f"{_GRANITE_MOE}.input_linear.weight",
    W_gate=f"{_GRANITE_MOE}.input_linear.weight",
    W_down=f"{_GRANITE_MOE}.output_linear.weight",
    experts_stacked=True,
    gate_up_fused=True,
    experts_keys=("num_local_experts",),
    moe_block=_GRANITE_MOE,
    shared_expert=_SHARED_MLP,
    shared_width_keys=("shared_intermediate_size",),
    shared_fused=("input_linear", "output_linear"),
    when=(("num_local_experts", True),),
    defaults=(("num_local_experts", 8),),
    **_GRANITE,
)
OLMO_HYBRID = llama_like(
    "olmo_hybrid", "OlmoHybridForCausalLM"
)  # (its linear attention: off the MLP's path)
# ungated MLPs, down(act(up(x))): no gate matrix
ARCEE = llama_like("arcee", "ArceeForCausalLM", W_gate=None)  # AFM (ReLU^2)
APERTUS = llama_like("apertus", "ApertusForCausalLM", W_gate=None)  # (xIELU)
# Jais 2: an ungated MLP (its biases, per mlp_bias, past the weight vectors) and a final
# LayerNorm with a bias
JAIS2 = llama_like(
    "jais2",
    "Jais2ForCausalLM",
    W_gate=None,
    norm_kind="layer",
    final_norm_bias="model.norm.bias",
    norm_eps_key="layer_norm_eps",
    norm_eps_default=1e-5,
)
