"""Llama-style families: gated MLP (gate_proj, up_proj, down_proj), RMSNorm, LM-head."""

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
