"""Builders for tiny models and the reference decode every test compares against."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = "models/stories260K"
LLAMA3_TOKENIZER = "tokenizers/llama3"


def shared_path(*parts: str) -> Path:
    """A path under ../shared: fails under CI when missing, skips elsewhere."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        msg = f"{path} is missing (../shared must sit beside the checkout)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def _has_u7() -> bool:
    from flashlens.decode import int8

    return int8._has_u7()


U7_ONLY = pytest.mark.skipif(
    not _has_u7(),
    reason="oneDNN's u8 x s8 kernel needs an x86 CPU with AVX2 or AVX512 and torch with oneDNN",
)


def _has_amx() -> bool:
    from flashlens.decode import int8

    return int8._has_amx()


AMX_ONLY = pytest.mark.skipif(
    not _has_amx(),
    reason="oneDNN runs its s8 x s8 product on AMX tiles only (this CPU has none, or oneDNN"
    " does not use them); elsewhere it is a reference loop or saturates in 16 bits",
)
# The int8 kernels, whatever this CPU's fast one is: _int_mm runs everywhere (a reference loop
# without VNNI: small shapes only), "u7" wherever oneDNN has it, "amx" on AMX CPUs.
INT8_KERNELS = [
    "int_mm",
    pytest.param("u7", marks=U7_ONLY),
    pytest.param("amx", marks=AMX_ONLY),
]


def use_int8_kernel(monkeypatch: pytest.MonkeyPatch, kernel: str) -> None:
    """int8 Decoders made in this test use `kernel` (the map, its warm-up and the pilot)."""
    from flashlens.decode import int8

    monkeypatch.setattr(int8, "kernel", lambda: kernel)


# multimodal checkpoints whose language model flashlens maps (a tiny vision tower beside it)
MULTIMODAL = (
    "gemma3_multimodal",
    "mistral3",
    "qwen2_vl",
    "qwen3_vl",
    "qwen3_5_multimodal",
    "gemma4_multimodal",
)
# families whose MLP is gated, down(act(gate(x)) * up(x)) ...
GATED = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "olmo2",
    "olmo3",
    "helium",
    "exaone4",
    "ministral3",
    "ministral",
    "seed_oss",
    "cwm",
    "hunyuan_v1_dense",
    "olmo_hybrid",
    "smollm3",
    "ernie4_5",
    "phi3",
    "glm",
    "glm4",
    "granite",
    "granitemoehybrid",
    "cohere",
    "cohere2",
    "stablelm",
    "olmo",
    "qwen3_5",
    "gemma4",
    *MULTIMODAL,
)
# ... ungated, down(act(up(x))) ...
UNGATED = (
    "arcee",
    "apertus",
    "jais2",
    "nemotron",
    "starcoder2",
    "gpt_neox",
    "gpt2",
    "phi",
    "gptj",
    "codegen",
    "falcon",
    "bloom",  # (its MLP is 4 * d_model, whatever d_mlp says)
    "opt",
)
# ... or a mixture of gated experts (4 experts of d_mlp units each in the tiny models)
# ... with dense first layers (layer 0 in the tiny models, 2 * d_mlp wide) and a shared expert
# of one expert's width
DEEPSEEK = ("deepseek_v2", "deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1", "mistral4")
# (Qwen3.5's: Qwen2-MoE's layout, also as the language model of a multimodal checkpoint)
QWEN3_5_MOE = ("qwen3_5_moe", "qwen3_5_moe_multimodal")
# (Gemma 4's: experts on the decoder layer beside its MLP, whose units come last)
GEMMA4_MOE = ("gemma4_moe", "gemma4_moe_multimodal")
MOE = (
    "mixtral",
    "olmoe",
    "qwen3_moe",
    "qwen2_moe",
    "gpt_oss",
    *DEEPSEEK,
    *QWEN3_5_MOE,
    *GEMMA4_MOE,
    "solar_open",  # (DeepSeek's shared experts, every layer sparse)
    "flex_olmo",
    "phimoe",  # (Mixtral's experts, a LayerNorm and a biased head)
    "ernie4_5_moe",  # (layer 0 dense, of d_mlp units; a shared expert of one expert's width)
    "hunyuan_v1_moe",  # (a shared MLP as wide as an expert)
    "qwen3_next",  # (Qwen2-MoE's layout)
    "qwen3_vl_moe",  # (experts stored transposed, in a multimodal checkpoint)
    "granitemoehybrid_moe",  # (beside a fused shared MLP, a Mamba layer first)
)
D_SHARED = 16  # the width of Qwen2-MoE's shared expert in the tiny models
# the mixtures whose tiny models have a dense first layer (2 * d_mlp wide)
DENSE_FIRST = (*DEEPSEEK, "ernie4_5_moe")
N_EXPERTS = 4
FAMILIES = GATED + UNGATED + MOE
# config settings that make the tiny models' decoding non-trivial
FAMILY_CONFIG: dict[str, dict[str, Any]] = {
    "granite": {"logits_scaling": 4.0},
    **{
        family: {  # (a Mamba layer first)
            "logits_scaling": 4.0,
            "num_local_experts": N_EXPERTS if family.endswith("_moe") else 0,
            "num_experts_per_tok": 2,
            "mamba_n_heads": 4,
            "mamba_d_state": 8,
        }
        for family in ("granitemoehybrid", "granitemoehybrid_moe")
    },
    # a soft-cap that Gemma3ForConditionalGeneration's forward ignores (its text model's applies)
    "gemma3_multimodal": {"final_logit_softcapping": 5.0},
    "seed_oss": {"mlp_bias": True},  # (biases the map does not decode; clamps see them)
    # every other layer full attention, the others linear (at least one of each in 2 layers)
    "qwen3_5": {"full_attention_interval": 2},
    "qwen3_5_multimodal": {"full_attention_interval": 2},
    "cohere": {"logit_scale": 0.5},
    "cohere2": {"logit_scale": 0.5},
    "mixtral": {"num_local_experts": N_EXPERTS, "num_experts_per_tok": 2},
    "olmoe": {"num_experts": N_EXPERTS, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": N_EXPERTS, "num_experts_per_tok": 2, "mlp_only_layers": []},
    "flex_olmo": {"num_experts": N_EXPERTS, "num_experts_per_tok": 2},
    "hunyuan_v1_moe": {"num_experts": N_EXPERTS, "moe_topk": 2},
    "qwen3_vl_moe": {"num_experts": N_EXPERTS, "num_experts_per_tok": 2, "mlp_only_layers": []},
    "qwen3_next": {
        "num_experts": N_EXPERTS,
        "num_experts_per_tok": 2,
        "mlp_only_layers": [],
        "shared_expert_intermediate_size": D_SHARED,
        "full_attention_interval": 2,
    },
    "ernie4_5_moe": {
        "moe_num_experts": N_EXPERTS,
        "moe_k": 2,
        "moe_num_shared_experts": 1,
        "moe_layer_start_index": 1,
    },
    "phimoe": {"num_local_experts": N_EXPERTS, "num_experts_per_tok": 2, "lm_head_bias": True},
    "solar_open": {"n_routed_experts": N_EXPERTS, "n_shared_experts": 1, "num_experts_per_tok": 2},
    "gpt_oss": {"num_local_experts": N_EXPERTS, "num_experts_per_tok": 2},
    **{
        family: {
            "n_routed_experts": N_EXPERTS,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "num_key_value_heads": 4,
            "kv_lora_rank": 16,
            "q_lora_rank": None,
            "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 4,
            "v_head_dim": 8,
        }
        for family in DEEPSEEK
    },
    "qwen2_moe": {
        "num_experts": N_EXPERTS,
        "num_experts_per_tok": 2,
        "mlp_only_layers": [],
        "shared_expert_intermediate_size": D_SHARED,
    },
    **{
        family: {
            "num_experts": N_EXPERTS,
            "num_experts_per_tok": 2,
            "shared_expert_intermediate_size": D_SHARED,
            "full_attention_interval": 2,
        }
        for family in QWEN3_5_MOE
    },
    **{
        family: {"enable_moe_block": True, "num_experts": N_EXPERTS, "top_k_experts": 2}
        for family in GEMMA4_MOE
    },
}


def matrices_of(family: str) -> tuple[str, ...]:
    return ("up", "down") if family in UNGATED else ("up", "gate", "down")


def _classes(family: str) -> tuple[Any, Any]:
    import transformers as tf

    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
        "gemma3_multimodal": (tf.Gemma3TextConfig, tf.Gemma3ForConditionalGeneration),
        "mistral3": (tf.MistralConfig, tf.Mistral3ForConditionalGeneration),
        "qwen2_vl": (tf.Qwen2_5_VLTextConfig, tf.Qwen2_5_VLForConditionalGeneration),
        "qwen3_vl": (tf.Qwen3VLTextConfig, tf.Qwen3VLForConditionalGeneration),
        "qwen3_5": (tf.Qwen3_5TextConfig, tf.Qwen3_5ForCausalLM),
        "gemma4": (tf.Gemma4TextConfig, tf.Gemma4ForCausalLM),
        "gemma4_multimodal": (tf.Gemma4TextConfig, tf.Gemma4ForConditionalGeneration),
        "gemma4_moe": (tf.Gemma4TextConfig, tf.Gemma4ForCausalLM),
        "gemma4_moe_multimodal": (tf.Gemma4TextConfig, tf.Gemma4ForConditionalGeneration),
        "qwen3_5_multimodal": (tf.Qwen3_5TextConfig, tf.Qwen3_5ForConditionalGeneration),
        "qwen3_5_moe": (tf.Qwen3_5MoeTextConfig, tf.Qwen3_5MoeForCausalLM),
        "qwen3_5_moe_multimodal": (
            tf.Qwen3_5MoeTextConfig,
            tf.Qwen3_5MoeForConditionalGeneration,
        ),
        "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM),
        "olmo3": (tf.Olmo3Config, tf.Olmo3ForCausalLM),
        "helium": (tf.HeliumConfig, tf.HeliumForCausalLM),
        "exaone4": (tf.Exaone4Config, tf.Exaone4ForCausalLM),
        "ministral3": (tf.Ministral3Config, tf.Ministral3ForCausalLM),
        "ministral": (tf.MinistralConfig, tf.MinistralForCausalLM),
        "seed_oss": (tf.SeedOssConfig, tf.SeedOssForCausalLM),
        "cwm": (tf.CwmConfig, tf.CwmForCausalLM),
        "hunyuan_v1_dense": (tf.HunYuanDenseV1Config, tf.HunYuanDenseV1ForCausalLM),
        "olmo_hybrid": (tf.OlmoHybridConfig, tf.OlmoHybridForCausalLM),
        "jais2": (tf.Jais2Config, tf.Jais2ForCausalLM),
        "smollm3": (tf.SmolLM3Config, tf.SmolLM3ForCausalLM),
        "ernie4_5": (tf.Ernie4_5Config, tf.Ernie4_5ForCausalLM),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
        "glm": (tf.GlmConfig, tf.GlmForCausalLM),
        "glm4": (tf.Glm4Config, tf.Glm4ForCausalLM),
        "granite": (tf.GraniteConfig, tf.GraniteForCausalLM),
        "granitemoehybrid": (tf.GraniteMoeHybridConfig, tf.GraniteMoeHybridForCausalLM),
        "granitemoehybrid_moe": (tf.GraniteMoeHybridConfig, tf.GraniteMoeHybridForCausalLM),
        "arcee": (tf.ArceeConfig, tf.ArceeForCausalLM),
        "apertus": (tf.ApertusConfig, tf.ApertusForCausalLM),
        "cohere": (tf.CohereConfig, tf.CohereForCausalLM),
        "cohere2": (tf.Cohere2Config, tf.Cohere2ForCausalLM),
        "stablelm": (tf.StableLmConfig, tf.StableLmForCausalLM),
        "olmo": (tf.OlmoConfig, tf.OlmoForCausalLM),
        "nemotron": (tf.NemotronConfig, tf.NemotronForCausalLM),
        "starcoder2": (tf.Starcoder2Config, tf.Starcoder2ForCausalLM),
        "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM),
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel),
        "phi": (tf.PhiConfig, tf.PhiForCausalLM),
        "gptj": (tf.GPTJConfig, tf.GPTJForCausalLM),
        "codegen": (tf.CodeGenConfig, tf.CodeGenForCausalLM),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM),
        "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
        "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM),
        "deepseek_v2": (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM),
        "deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM),
        "glm4_moe": (tf.Glm4MoeConfig, tf.Glm4MoeForCausalLM),
        "glm4_moe_lite": (tf.Glm4MoeLiteConfig, tf.Glm4MoeLiteForCausalLM),
        "dots1": (tf.Dots1Config, tf.Dots1ForCausalLM),
        "mistral4": (tf.Mistral4Config, tf.Mistral4ForCausalLM),
        "solar_open": (tf.SolarOpenConfig, tf.SolarOpenForCausalLM),
        "flex_olmo": (tf.FlexOlmoConfig, tf.FlexOlmoForCausalLM),
        "phimoe": (tf.PhimoeConfig, tf.PhimoeForCausalLM),
        "hunyuan_v1_moe": (tf.HunYuanMoEV1Config, tf.HunYuanMoEV1ForCausalLM),
        "qwen3_next": (tf.Qwen3NextConfig, tf.Qwen3NextForCausalLM),
        "qwen3_vl_moe": (tf.Qwen3VLMoeTextConfig, tf.Qwen3VLMoeForConditionalGeneration),
        "ernie4_5_moe": (tf.Ernie4_5_MoeConfig, tf.Ernie4_5_MoeForCausalLM),
        "falcon": (tf.FalconConfig, tf.FalconForCausalLM),
        "bloom": (tf.BloomConfig, tf.BloomForCausalLM),
        "opt": (tf.OPTConfig, tf.OPTForCausalLM),
    }[family]


def make_model(
    path: Path,
    family: str = "llama",
    *,
    d_vocab: int = 512,
    d_model: int = 32,
    d_mlp: int = 48,
    n_layers: int = 3,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    shard_size: str | None = None,
    tokenizer: str | None = STORIES,
    seed: int = 0,
    **config: Any,
) -> Path:
    """Save a tiny random model of `family` to `path` (safetensors) and return `path`.

    tokenizer: a folder under ../shared whose tokenizer files are copied (its vocabulary
    size must cover d_vocab), or None for no tokenizer.
    """
    config_cls, model_cls = _classes(family)
    config = {**FAMILY_CONFIG.get(family, {}), **config}
    if family in (
        "qwen3_moe",
        "qwen2_moe",
        "qwen3_next",
        "qwen3_vl_moe",
        "solar_open",
        "ernie4_5_moe",
        *DEEPSEEK,
        *QWEN3_5_MOE,
        *GEMMA4_MOE,
    ):
        config.setdefault("moe_intermediate_size", d_mlp)
    if family in DENSE_FIRST:  # the dense layers' width
        d_mlp *= 2
    if family in ("gemma4", "gemma4_multimodal", *GEMMA4_MOE):
        # per-layer embeddings of 8 dimensions; in the dense models the last layer reuses the
        # first's keys and values (all layers full attention, so that the types match) and is
        # twice as wide
        dense = family not in GEMMA4_MOE
        config = {
            "hidden_size_per_layer_input": 8,
            "vocab_size_per_layer_input": d_vocab,
            "global_head_dim": d_model // 4,
            "layer_types": ["full_attention"] * n_layers,
            "num_kv_shared_layers": int(dense),
            "use_double_wide_mlp": dense,
            "final_logit_softcapping": 5.0,
            **config,
        }
    if family in (
        "qwen2_vl",
        "qwen3_vl",
        "qwen3_vl_moe",
    ):  # rotary sections (time, height, width) of head_dim / 2
        half = d_model // 8
        mrope = {
            "rope_type": "default",
            "rope_theta": 1e4,
            "mrope_section": [half // 2] + 2 * [half // 4],
        }
        config.setdefault("rope_parameters", mrope)
    if family.startswith("granitemoehybrid"):  # (its MLP's width; a Mamba layer first)
        config.setdefault("shared_intermediate_size", d_mlp)
        config.setdefault("layer_types", ["mamba"] + ["attention"] * (n_layers - 1))
    if family == "falcon":
        config.setdefault("ffn_hidden_size", d_mlp)
    if family == "opt":
        config.update(ffn_dim=d_mlp, word_embed_proj_dim=d_model)
    if family in ("gpt2", "gptj", "codegen"):  # their own keys for the MLP's width
        config.setdefault("n_inner", d_mlp)
    if family in ("gptj", "codegen"):
        config.setdefault("rotary_dim", d_model // 8)
    cfg = config_cls(
        vocab_size=d_vocab,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        # (DeepSeek's latent attention sets its own head sizes, one key-value head per head)
        **({} if family in DEEPSEEK else {"num_key_value_heads": 2}),
        **({} if family in ("falcon", *DEEPSEEK) else {"head_dim": d_model // 4}),
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        pad_token_id=0,  # (some configs default to ids past a tiny vocabulary)
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie,
        **config,
    )
    if family in (*MULTIMODAL, "qwen3_5_moe_multimodal", "gemma4_moe_multimodal", "qwen3_vl_moe"):
        cfg = _multimodal_config(family, cfg, tie)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    with torch.no_grad():
        for p in model.parameters():  # larger than the init, so softmaxes are not flat
            p.normal_(0, 0.3)
        norm = final_norm_module(model)
        if getattr(norm, "weight", None) is not None:
            norm.weight.uniform_(0.5, 1.5)  # a non-trivial final-norm gain
    model = model.to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    if tokenizer:
        src = shared_path(*tokenizer.split("/"))
        for f in src.glob("tokenizer*"):
            shutil.copy(f, path / f.name)
    return path


def _multimodal_config(family: str, text: Any, tie: bool) -> Any:
    """A multimodal model's config around the language model's `text`, with a one-layer
    vision tower of 16 dimensions (2 x 2 patches of a 28-pixel image)."""
    import transformers as tf

    vision: dict[str, Any] = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    d_model = text.hidden_size
    qwen = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=d_model)
    if family == "qwen2_vl":
        return tf.Qwen2_5_VLConfig(
            text_config=text.to_dict(),
            vision_config=dict(qwen, fullatt_block_indexes=[0]),
            tie_word_embeddings=tie,
        )
    if family == "qwen3_5_multimodal":
        return tf.Qwen3_5Config(text_config=text, vision_config=dict(qwen), tie_word_embeddings=tie)
    if family == "qwen3_5_moe_multimodal":
        return tf.Qwen3_5MoeConfig(
            text_config=text, vision_config=dict(qwen), tie_word_embeddings=tie
        )
    if family == "qwen3_vl_moe":
        return tf.Qwen3VLMoeConfig(
            text_config=text,
            vision_config=dict(qwen, deepstack_visual_indexes=[0], num_position_embeddings=16),
            tie_word_embeddings=tie,
        )
    if family == "qwen3_vl":
        return tf.Qwen3VLConfig(
            text_config=text,
            vision_config=dict(qwen, deepstack_visual_indexes=[0], num_position_embeddings=16),
            tie_word_embeddings=tie,
        )
    if family in ("gemma4_multimodal", "gemma4_moe_multimodal"):
        gemma4 = dict(num_key_value_heads=2, head_dim=8, hidden_size=16, intermediate_size=32)
        return tf.Gemma4Config(
            text_config=text,
            vision_config=dict(num_hidden_layers=1, num_attention_heads=2, **gemma4),
            audio_config=None,
            tie_word_embeddings=tie,
        )
    if family == "gemma3_multimodal":
        return tf.Gemma3Config(
            text_config=text,
            vision_config=tf.SiglipVisionConfig(**vision),
            mm_tokens_per_image=4,
            tie_word_embeddings=tie,
        )
    return tf.Mistral3Config(
        text_config=text,
        vision_config=tf.PixtralVisionConfig(**vision),
        spatial_merge_size=1,
        tie_word_embeddings=tie,
    )


def reference_probs(model_dir: Path, matrix: str, layer: int, norm: str = "model") -> torch.Tensor:
    """softmax(lm_head(final_norm(w))) for every neuron of a layer, (d_mlp, d_vocab), fp64,
    computed with the model's own modules (transformers, upcast to fp32)."""
    logits = reference_logits(model_dir, matrix, layer, norm)
    return torch.softmax(logits.double(), dim=-1)


_MODELS: dict[Path, Any] = {}


def load_reference_model(model_dir: Path) -> Any:
    import transformers as tf
    from transformers.utils import quantization_config as qcs

    if model_dir not in _MODELS:
        # a quantised checkpoint (FP8, compressed-tensors, MXFP4) dequantized by transformers
        # itself, into fp32 (into a bf16 model's own dtype the values would be rounded to bf16
        # first)
        qc = json.loads((model_dir / "config.json").read_text()).get("quantization_config")
        method = str((qc or {}).get("quant_method"))
        kind = {
            "fp8": qcs.FineGrainedFP8Config,
            "compressed-tensors": qcs.CompressedTensorsConfig,
            "mxfp4": qcs.Mxfp4Config,
        }.get(method)
        kwargs: dict[str, Any] = {}
        if kind:
            kwargs = {"quantization_config": kind(dequantize=True), "dtype": torch.float32}
        try:
            model = tf.AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        except ValueError:  # (Mistral 3 and 4 run as image-text-to-text models only)
            model = tf.AutoModelForImageTextToText.from_pretrained(model_dir, **kwargs)
        _MODELS[model_dir] = model.float().eval()
    return _MODELS[model_dir]


def tokenizer_of(model_dir: Path) -> Any:
    """The model's tokenizer as flashlens loads it to run the model (its pad token inside the
    model's vocabulary: a copied tokenizer read as Qwen3.5's would pad with a new id)."""
    from flashlens.intervene.loading import load_tokenizer

    model = load_reference_model(model_dir)
    return load_tokenizer(model_dir, model.config.get_text_config().vocab_size)


def _body(model: Any) -> Any:
    """The decoder stack of a loaded model (model.model; GPT-NeoX: model.gpt_neox; GPT-2:
    model.transformer; OPT: model.model.decoder)."""
    for name in ("gpt_neox", "transformer"):
        if hasattr(model, name):
            return getattr(model, name)
    body = getattr(model.model, "language_model", model.model)  # (a multimodal model)
    return getattr(body, "decoder", body)


def _layers(model: Any) -> Any:
    body = _body(model)
    return body.h if hasattr(body, "h") else body.layers


def final_norm_module(model: Any) -> Any:
    body = _body(model)
    for name in ("final_layer_norm", "ln_f", "final_layernorm"):
        if hasattr(body, name):
            return getattr(body, name)
    return body.norm


# each matrix's module names across the families' layouts
_MLP_NAMES = {
    "up": ("up_proj", "c_fc", "dense_h_to_4h", "fc1", "fc_in"),
    "gate": ("gate_proj",),
    "down": ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "fc_out", "output_linear"),
}


def neuron_weights(model: Any, matrix: str, layer: int) -> torch.Tensor:
    """One layer's neuron vectors as rows, (d_mlp, d_model) fp32, read from the loaded
    model's modules (independently of flashlens's families)."""
    block = _layers(model)[layer]
    # (OPT: fc1 and fc2 on the layer itself; Granite 4: its shared_mlp)
    mlp = getattr(block, "mlp", getattr(block, "shared_mlp", block))
    experts, shared, _ = moe_parts(block)
    if experts is not None and hasattr(experts, "gate_up_proj"):
        # transformers holds a layer's experts as 3D tensors: gate_up_proj (E, 2m, d), gate's
        # rows first, and down_proj (E, d, m); or transposed, (E, d, 2m) with gate's and up's
        # units alternating, and (E, m, d) (gpt-oss). Expert by expert, as (E * m, d) rows.
        transposed = getattr(experts, "is_transposed", False)
        if matrix == "down":
            down = experts.down_proj.detach().float()
            down = down if transposed else down.transpose(1, 2)  # (E, m, d)
            W = down.reshape(-1, down.shape[2])
            return W if shared is None else torch.cat([W, neuron_weights_of(shared, matrix)])
        gate_up = experts.gate_up_proj.detach().float()
        gate_up = gate_up.transpose(1, 2) if transposed else gate_up  # (E, 2m, d)
        if getattr(experts, "is_concatenated", True):
            gate, up = gate_up.chunk(2, dim=1)
        else:
            gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
        W = (up if matrix == "up" else gate).reshape(-1, gate_up.shape[2])
        return W if shared is None else torch.cat([W, neuron_weights_of(shared, matrix)])
    return neuron_weights_of(mlp, matrix)


def moe_parts(block: Any) -> tuple[Any, Any, Any]:
    """A decoder layer's experts module, shared expert (or None) and the module that calls
    them with (batch, seq, d_model): the MLP's, or Gemma 4's experts on the layer itself beside
    its MLP, which runs on every token as a shared expert does. (None, None, mlp) in a dense
    layer."""
    mlp = getattr(block, "mlp", block)
    if getattr(block, "experts", None) is not None:
        return block.experts, mlp, block
    if getattr(block, "block_sparse_moe", None) is not None:  # (Granite 4: beside shared_mlp)
        return block.block_sparse_moe.experts, block.shared_mlp, block.block_sparse_moe
    return getattr(mlp, "experts", None), _shared(mlp), mlp


def _shared(mlp: Any) -> Any:
    """A sparse layer's shared expert (Qwen2-MoE, DeepSeek; HunYuan's shared_mlp), whose units
    come last; or None."""
    for name in ("shared_expert", "shared_experts", "shared_mlp"):
        if getattr(mlp, name, None) is not None:
            return getattr(mlp, name)
    return None


def neuron_weights_of(mlp: Any, matrix: str) -> torch.Tensor:
    """An MLP module's neuron vectors as rows, (d_mlp, d_model) fp32."""
    fused = getattr(mlp, "gate_up_proj", getattr(mlp, "input_linear", None))  # (Granite 4's)
    if matrix != "down" and fused is not None:  # fused: gate rows, then up rows
        gate, up = fused.weight.detach().float().chunk(2, dim=0)
        return up if matrix == "up" else gate
    module = getattr(mlp, next(n for n in _MLP_NAMES[matrix] if hasattr(mlp, n)))
    W = module.weight.detach().float()
    if type(module).__name__ == "Conv1D":  # GPT-2 stores (in, out): as nn.Linear, (out, in)
        W = W.T
    return W.T if matrix == "down" else W


def reference_logits(model_dir: Path, matrix: str, layer: int, norm: str = "model") -> torch.Tensor:
    """The model's own logits for every neuron of a layer, (d_mlp, d_vocab) fp32: a forward
    of the loaded model whose final norm is handed the neuron vectors in place of the residual
    stream, so the LM-head and whatever the model's forward does to its logits after it (a
    soft-cap, a scale) apply as they do to real text.

    norm: "model" (the final norm module itself), "gain" (w times the gain as the module
    applies it: Gemma's and Nemotron's 1 + weight; no bias) or "none" (w as it is)."""
    model = load_reference_model(model_dir)
    w = neuron_weights(model, matrix, layer)  # (d_mlp, d_model)
    final = final_norm_module(model)
    if norm == "model":
        x = None
    elif norm == "gain":
        # e = +1, -1, ...: mean 0, rms 1, so RMSNorm and LayerNorm both map +-e to
        # +-e * gain / sqrt(1 + eps) + bias, and the difference leaves the gain alone
        e = torch.ones(1, w.shape[1])
        e[:, 1::2] = -1
        eps = getattr(final, "variance_epsilon", getattr(final, "eps", 1e-5))  # (OLMo: 1e-5)
        with torch.no_grad():
            x = w * (final(e) - final(-e)) / (2 * e) * (1 + eps) ** 0.5
    else:
        x = w

    def pre_hook(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (w[None].to(args[0].dtype),)

    def hook(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return x[None].to(output.dtype)  # type: ignore[index]

    handle = final.register_forward_pre_hook(pre_hook) if x is None else None
    handle2 = final.register_forward_hook(hook) if x is not None else None
    # one position per neuron (GPT-2 reshapes the final norm's output to the input's shape;
    # keep d_mlp within a learned-position model's max_position_embeddings, 128 here)
    ids = torch.zeros((1, w.shape[0]), dtype=torch.long)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0]  # (d_mlp, V)
    finally:
        for h in (handle, handle2):
            if h is not None:
                h.remove()
    return logits.float()


def rewrite_weights(model: Path, out: Path, rewrite: Any) -> Path:
    """A copy of the folder `model` (model.safetensors and the rest) at `out` whose weights are
    `rewrite(state)` ({name: tensor} -> {name: tensor}): another spelling or layout of them."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    for f in model.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    save_file(rewrite(load_file(model / "model.safetensors")), out / "model.safetensors")
    return out


def other_weights(model: Path, out: Path, flip: bool = False, part: str = ".layers.4.mlp.") -> Path:
    """A copy of `model` (stories260K) with other weights in the tensors whose names hold
    `part` (default: layer 4's MLP) and the same config.json: noise added, or (`flip`) every
    value's sign flipped, which keeps each neuron's norm."""
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir()
    for f in model.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    tensors = load_file(model / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for name, t in tensors.items():
        if part in name:
            tensors[name] = -t if flip else t + 0.05 * torch.randn(t.shape, generator=gen)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def edit_weights(model: Path, edit: Any) -> None:
    """Apply `edit` ({name: tensor} -> None, in place) to the tensors of model.safetensors."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    edit(tensors)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def check_runs_as_mapped(model: Path, candidates: list[Any], moved_above: float) -> None:
    """flashlens's own load_model (fp32) of `model` holds the MLP weights `map` reads (layer
    1, every matrix); a clamp of the first of `candidates` (flashlens Neurons) that the last
    token reaches (in a mixture: an expert it is routed to) to its natural value leaves the
    logits as they were, and the clamp moved by 5 changes them by more than `moved_above`."""
    from flashlens import clamp, load_model
    from flashlens.intervene import record
    from flashlens.weights import ModelSource

    loaded = load_model(model, dtype="float32")
    with ModelSource.open(model) as source:
        for matrix in ("up", "gate", "down"):
            W = neuron_weights(loaded.model, matrix, 1)  # (d_mlp, d_model), as the map's rows
            assert torch.equal(W, source.neurons(matrix, 1))  # type: ignore[arg-type]
    ids = loaded.tokenizer("Once upon a time", return_tensors="pt")
    with torch.no_grad():
        base = loaded.model(**ids).logits
        with record(loaded.model, candidates) as seen:
            loaded.model(**ids)
    neuron = next(n for n in candidates if not seen[n][0][0, -1].isnan())
    natural = float(seen[neuron][0][0, -1])
    with torch.no_grad(), clamp(loaded.model, neuron, value=natural, positions="last"):
        torch.testing.assert_close(loaded.model(**ids).logits, base, rtol=0, atol=1e-6)
    with torch.no_grad(), clamp(loaded.model, neuron, value=natural + 5, positions="last"):
        assert float((loaded.model(**ids).logits - base).abs().max()) > moved_above


def check_map_refused(model: Path, out: Path, capsys: Any, message: str) -> str:
    """`flashlens map model -o out` exits 2 with one line holding `message`, no traceback,
    and leaves no atlas at `out`; returns that line."""
    from flashlens.cli import main

    capsys.readouterr()  # (the model's set-up)
    assert main(["map", str(model), "-o", str(out), "--dtype", "float32"]) == 2
    err: str = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (out / "atlas.json").exists()
    return err
