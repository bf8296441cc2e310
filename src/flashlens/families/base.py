"""What an architecture family is: where its MLP weights, final norm and LM-head live.

A family is data, not code: one `Family` entry per architecture, registered in
`flashlens.families.registry`. The decode engine only ever reads these fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import UnsupportedModelError

Matrix = Literal["up", "gate", "down"]
MATRICES: tuple[Matrix, ...] = ("up", "gate", "down")


@dataclass(frozen=True)
class Family:
    """Declarative description of one architecture family.

    Tensor names are templates with `{layer}`. Shapes as stored by Hugging Face (nn.Linear):
      W_up, W_gate: (d_mlp, d_model)  - a neuron is a row
      W_down:       (d_model, d_mlp)  - a neuron is a column
      W_U:          (d_vocab, d_model)
      norm weight, norm bias:  (d_model,)
    A family without a gate (W_gate None) has an ungated MLP, down(act(up(x))).
    """

    name: str
    architectures: tuple[str, ...]
    W_up: str
    W_gate: str | None
    W_down: str
    final_norm: str | None  # its weight (None: a norm without one, OLMo's)
    W_U: str = "lm_head.weight"
    W_E: str = "model.embed_tokens.weight"  # the tied LM-head when tie_word_embeddings
    W_U_bias: str | None = None  # the LM-head's bias (d_vocab,), where it has one
    # the config flag that says whether the head has that bias (Phi-3.5-MoE: lm_head_bias,
    # false when config.json omits it); None: it always has
    W_U_bias_key: str | None = None
    norm_kind: Literal["rms", "layer"] = "rms"  # layer: centred first, then an optional bias
    final_norm_bias: str | None = None
    norm_eps_key: str | None = "rms_norm_eps"
    norm_eps_default: float = 1e-6  # when config.json omits the key (or the family has none)
    norm_weight_offset: float = 0.0  # Gemma-style norms multiply by (1 + weight)
    logit_softcap_key: str | None = None  # config key of a tanh soft-cap on logits, if any
    # the cap transformers applies when config.json omits that key (its config class default;
    # an explicit null turns the cap off)
    logit_softcap_default: float | None = None
    tie_default: bool = False  # value of tie_word_embeddings when the config omits it
    # config key of a factor the forward puts on the logits (Cohere: logits * logit_scale;
    # Granite: logits / logits_scaling, logit_scale_divides), and its default when omitted
    logit_scale_key: str | None = None
    logit_scale_default: float = 1.0
    logit_scale_divides: bool = False
    # config.json keys of the sizes (GPT-2: n_embd, n_inner, n_layer), and the MLP's width as
    # a multiple of d_model where config.json leaves it null (GPT-2: 4)
    d_model_key: str = "hidden_size"
    d_mlp_key: str = "intermediate_size"
    n_layers_key: str = "num_hidden_layers"
    d_mlp_factor: int | None = None
    # weights stored transposed (GPT-2's Conv1D): W_up (d_model, d_mlp), a neuron a column;
    # W_down (d_mlp, d_model), a neuron a row
    conv1d: bool = False
    # other spellings of tensor names that checkpoints use: (prefix in the names above, which
    # are transformers' module paths; the prefix a checkpoint may have instead). GPT-2's hub
    # files drop "transformer." (("transformer.", "")); a multimodal checkpoint saved in the
    # original layout names its language model "language_model.model." and its head
    # "language_model.lm_head." where transformers 5 builds "model.language_model." and
    # "lm_head.". A name is read as the first spelling the checkpoint holds.
    renames: tuple[tuple[str, str], ...] = ()
    # the key of config.json that holds the language model's own config in a multimodal
    # checkpoint (Gemma 3 4B-27B, Mistral Small 3.1: "text_config"); sizes, norm and head
    # settings are then read from it as transformers resolves it, defaults included
    text_config: str | None = None
    # name endings of buffers that some saves hold and others not (left out of the weights'
    # fingerprint)
    buffers: tuple[str, ...] = (".inv_freq",)
    # Mixture of experts: the config keys of the number of experts per layer (the first that
    # config.json holds: transformers renames some). Tensor names then hold {expert},
    # d_mlp_key is one expert's width, and a layer's neurons are its experts' in order
    # (neuron e * d_expert + i is unit i of expert e).
    experts_keys: tuple[str, ...] = ()
    # the module path (with {layer}) of a sparse layer's MoE block in transformers 5's model,
    # which holds its experts module ("experts", 3D tensors) and, where any, the shared expert
    moe_block: str = "model.layers.{layer}.mlp"
    # config settings the entry needs as given (a mixture whose every layer is sparse, OPT's
    # pre-norm layout), as (key, value) pairs checked where config.json sets the key
    require: tuple[tuple[str, Any], ...] = ()
    # the values transformers gives keys of `when` and `require` that config.json omits, where
    # they matter (Granite 4: num_local_experts, 8)
    defaults: tuple[tuple[str, Any], ...] = ()
    # the MLP sees its tokens flattened to (batch * seq, d) (OPT): clamps read (batch, seq)
    # from the input of the layer that holds it
    mlp_flat: bool = False
    # gate_proj and up_proj fused into one (2 * d_mlp, d_model) tensor, gate rows first (Phi-3,
    # GLM): W_up and W_gate then both name it, and row_offset says where each matrix starts
    gate_up_fused: bool = False
    # A shared expert beside the routed ones (Qwen2-MoE), a gated MLP with Llama's tensor names
    # under this module path (with {layer}), run on every token: its units follow the routed
    # experts' in a layer's neurons (neuron E * d_expert + j is its unit j). Its width is the
    # product of these config keys (one expert's width times a count, or a width of its own).
    shared_expert: str | None = None
    shared_width_keys: tuple[str, ...] = ()
    # the shared expert's gate and up rows fused in one tensor, gate's first, and its tensors
    # named (gate and up, down) under shared_expert (Granite 4: input_linear, output_linear)
    shared_fused: tuple[str, str] | None = None
    # A mixture with dense MLP layers among the sparse ones: the config keys that say which,
    # the count of dense first layers (DeepSeek-V2/V3, GLM-4.5: first_k_dense_replace), a
    # list of dense layers (Qwen-MoE: mlp_only_layers) and a step, every step-th layer sparse
    # (decoder_sparse_step). Dense layers are gated MLPs with Llama's tensor names under
    # `dense_mlp` (with {layer}), of dense_width_key units: a layer's width depends on its kind.
    dense_layers_key: str | None = None
    dense_layers_default: int = 0  # (that count where config.json omits it, as transformers)
    dense_list_key: str | None = None
    sparse_step_key: str | None = None
    # the last sparse layer's index (ERNIE 4.5: moe_layer_end_index; -1 or omitted: the last)
    sparse_end_key: str | None = None
    # or a list of each layer's kind, "dense" or "sparse" (GLM-4.7-Flash: mlp_layer_types),
    # and how many first layers are dense when config.json omits it (transformers' default)
    layer_kinds_key: tuple[str, int] | None = None
    dense_mlp: str = "model.layers.{layer}.mlp"
    dense_width_key: str = "intermediate_size"
    # a dense model whose last layers are twice as wide (Gemma 4: the num_kv_shared_layers
    # layers that reuse earlier layers' keys and values, where use_double_wide_mlp): the
    # config keys of the flag and of the count of those last layers
    wide_keys: tuple[str, str] | None = None
    # a fused gate_up tensor whose units alternate, gate's then up's (gpt-oss: gate_up[..., 0::2]
    # is gate, [..., 1::2] up), instead of all of gate's then all of up's
    gate_up_interleaved: bool = False
    # a layer's experts stacked in one tensor per matrix, experts first (gpt-oss:
    # gate_up_proj (E, d_model, 2 m), down_proj (E, m, d_model)); its names hold no {expert}
    experts_stacked: bool = False
    # stacked experts that checkpoints hold either way round (Qwen3-VL's: the hub's files
    # transposed, as `conv1d` says, transformers 5's saves not): their shape decides
    experts_either_way: bool = False
    # config settings that select this entry among those of its architecture (Gemma 4's
    # mixtures: enable_moe_block true), as (key, value) pairs; a key config.json leaves out
    # reads as its `defaults` value, else false. Read from config.json and, in a multimodal
    # one, its text_config.
    when: tuple[tuple[str, Any], ...] = ()
    # Config keys this family cannot decode faithfully when set (truthy); of quantisations,
    # weights with scales (FP8, compressed-tensors) and MXFP4 experts are read (weights.quant)
    refuse_keys: tuple[str, ...] = ("quantization_config",)

    def tensor(self, matrix: Matrix, layer: int, expert: int = 0) -> str:
        """Checkpoint name of a layer's MLP weight matrix (of one expert, in a mixture)."""
        template = {"up": self.W_up, "gate": self.W_gate, "down": self.W_down}[matrix]
        if template is None:
            raise UnsupportedModelError(
                f"architecture family {self.name!r} has no {matrix!r} matrix; "
                f"choose from {', '.join(self.matrices)}"
            )
        return template.format(layer=layer, expert=expert)

    def shared_tensor(self, matrix: Matrix, layer: int) -> str:
        """Checkpoint name of the shared expert's weight matrix in a layer."""
        if self.shared_expert is None:
            raise UnsupportedModelError(f"architecture family {self.name!r} has no shared expert")
        if self.shared_fused is not None:
            proj = self.shared_fused[matrix == "down"]
            return f"{self.shared_expert.format(layer=layer)}.{proj}.weight"
        return _mlp_tensor(self.shared_expert, matrix, layer)

    def shared_offset(self, matrix: Matrix, d_shared: int) -> int:
        """The first row of `matrix`'s units in the shared expert's tensor: d_shared for up in
        a fused one, else 0."""
        return d_shared if self.shared_fused is not None and matrix == "up" else 0

    def is_dense(self, config: Mapping[str, Any], layer: int) -> bool:
        """Whether `layer` of a mixture of experts is a dense MLP, as transformers builds it
        from `config` (False in a dense model's family)."""
        if not self.experts_keys:
            return False
        if self.layer_kinds_key is not None:
            key, first_dense = self.layer_kinds_key
            kinds = config.get(key)
            return kinds[layer] == "dense" if kinds is not None else layer < first_dense
        if self.dense_layers_key:
            first = config.get(self.dense_layers_key)
            if layer < int(self.dense_layers_default if first is None else first):
                return True
        end = config.get(self.sparse_end_key) if self.sparse_end_key else None
        if end is not None and end >= 0 and layer > end:
            return True
        if self.dense_list_key and layer in (config.get(self.dense_list_key) or []):
            return True
        step = int(config.get(self.sparse_step_key) or 1) if self.sparse_step_key else 1
        return (layer + 1) % step != 0

    def is_wide(self, config: Mapping[str, Any], n_layers: int, layer: int) -> bool:
        """Whether `layer` of a dense model is twice as wide as the others (`wide_keys`)."""
        if self.wide_keys is None or not config.get(self.wide_keys[0]):
            return False
        return layer >= n_layers - int(config.get(self.wide_keys[1]) or 0)

    def dense_tensor(self, matrix: Matrix, layer: int) -> str:
        """Checkpoint name of a dense layer's weight matrix in a mixture with dense layers."""
        return _mlp_tensor(self.dense_mlp, matrix, layer)

    def row_offset(self, matrix: Matrix, d_mlp: int) -> int:
        """The first row of `matrix`'s neurons in its tensor: d_mlp for up in a fused gate_up
        tensor, else 0."""
        return d_mlp if self.gate_up_fused and matrix == "up" else 0

    def units(self, matrix: Matrix, d_mlp: int) -> slice:
        """Where `matrix`'s d_mlp neurons lie along its tensor's neuron axis: all of it, a half
        of a fused gate_up tensor, or every other unit of an interleaved one."""
        if not self.gate_up_fused or matrix == "down":
            return slice(0, d_mlp)
        if self.gate_up_interleaved:
            return slice(int(matrix == "up"), 2 * d_mlp, 2)
        lo = self.row_offset(matrix, d_mlp)
        return slice(lo, lo + d_mlp)

    def neuron_is_column(self, matrix: Matrix) -> bool:
        """Whether a neuron of `matrix` is a column of its stored tensor (W_down; with Conv1D
        weights, W_up and W_gate instead)."""
        return (matrix == "down") != self.conv1d

    def tensor_rows(self, matrix: Matrix, d_mlp: int) -> int:
        """Rows of the tensor that holds `matrix` (d_mlp, or 2 * d_mlp when fused); W_down's
        shape is (d_model, d_mlp)."""
        return 2 * d_mlp if self.gate_up_fused and matrix != "down" else d_mlp

    @property
    def matrices(self) -> tuple[Matrix, ...]:
        return tuple(m for m in MATRICES if m != "gate" or self.W_gate is not None)

    def matches(self, config: Mapping[str, Any]) -> bool:
        """Whether `config` (config.json as a dict) selects this entry (`when`)."""
        text = config.get(self.text_config or "text_config")
        given = {**dict(self.defaults), **config, **(text if isinstance(text, Mapping) else {})}
        return all(bool(given.get(k, False)) == v for k, v in self.when)

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Refuse config features this family does not decode faithfully."""
        given = {**dict(self.defaults), **config}
        odd = [f"{k}={given[k]!r}" for k, v in self.require if k in given and given[k] != v]
        if odd:
            need = ", ".join(f"{k}={v!r}" for k, v in self.require)
            raise UnsupportedModelError(
                f"{self.name} config has {'; '.join(odd)}: flashlens decodes this family's "
                f"standard layout only ({need})"
            )
        named = (_setting(k, config[k]) for k in self.refuse_keys if config.get(k))
        bad = [b for b in named if b is not None]
        if bad:
            raise UnsupportedModelError(
                f"{self.name} config has unsupported settings: {'; '.join(bad)}. "
                "flashlens decodes unquantised floating-point checkpoints of the standard "
                'layout, FP8 ("fp8"), compressed-tensors and MXFP4 ("mxfp4") ones: map '
                "the model's bf16, fp16 or fp32 release instead"
            )


def _setting(key: str, value: Any) -> str | None:
    """A refused config setting as the error names it; None for the kinds of quantisation
    flashlens reads (weights with scales, MXFP4 experts: weights.quant checks the rest)."""
    from ..weights.quant import READ  # (here: flashlens.weights imports the families)

    if key != "quantization_config":
        return key
    method = value.get("quant_method") if isinstance(value, Mapping) else None
    return None if method in READ else f"quantization_config (quant_method {method!r})"


def _mlp_tensor(prefix: str, matrix: Matrix, layer: int) -> str:
    """A Llama-style MLP's weight under module path `prefix` (with {layer})."""
    proj = {"up": "up_proj", "gate": "gate_proj", "down": "down_proj"}[matrix]
    return f"{prefix.format(layer=layer)}.{proj}.weight"
