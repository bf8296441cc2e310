"""A model as flashlens sees it: config + family + lazily read weights, by maths role."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..decode.norm import Readout
from ..errors import CheckpointError, NeuronError, UnsupportedModelError
from ..families import Family, Matrix, family_for
from . import quant
from .checkpoint import Checkpoint
from .resolve import resolve_model
from .scaled import FP8_DTYPES


def config_hash(config: dict[str, Any]) -> str:
    """A short, stable fingerprint of config.json (keys sorted)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def language_settings(folder: Path, config: dict[str, Any], family: Family) -> dict[str, Any]:
    """The settings a family's config keys are read from: config.json itself, or in a
    multimodal checkpoint its language model's config as transformers resolves it (defaults
    filled in: Gemma 3's files omit vocab_size), with the tie flag of the whole model, which
    is the one transformers 5 ties the head by."""
    if family.text_config is None:
        return config
    from transformers import AutoConfig

    if not isinstance(config.get(family.text_config, {}), dict):
        raise CheckpointError(
            f"{folder / 'config.json'} has a {family.text_config!r} that is not an object "
            f"(got {config[family.text_config]!r}); the file may be damaged"
        )
    try:
        resolved = AutoConfig.from_pretrained(folder)
        settings: dict[str, Any] = resolved.get_text_config().to_dict()
    except Exception as err:  # (transformers' own validation errors are of several kinds)
        raise CheckpointError(
            f"transformers cannot read {folder / 'config.json'} ({err}); the file may be "
            "damaged, or need a newer transformers"
        ) from None
    settings["tie_word_embeddings"] = getattr(resolved, "tie_word_embeddings", family.tie_default)
    family.check_config(settings)
    return settings


@dataclass
class ModelSource:
    """Everything `map` reads from a model folder, without building the model."""

    model: str  # hub id as the user passed it, or the local folder as an absolute path
    folder: Path
    config: dict[str, Any]
    family: Family
    checkpoint: Checkpoint
    # the language model's settings, which the family's config keys name: config.json itself,
    # or in a multimodal checkpoint its text_config as transformers resolves it
    settings: dict[str, Any]

    @classmethod
    def open(cls, model: str | Path) -> ModelSource:
        folder = resolve_model(model)
        try:
            config = json.loads((folder / "config.json").read_text())
        except ValueError as err:
            raise CheckpointError(f"{folder / 'config.json'} is not valid JSON ({err})") from None
        family = family_for(config)
        settings = language_settings(folder, config, family)
        name = str(model)
        if Path(model).expanduser().is_dir():  # a local folder: usable from any directory
            name = os.path.abspath(Path(model).expanduser())
        checkpoint = Checkpoint(folder, quant.scheme(config))
        source = cls(name, folder, config, family, checkpoint, settings)
        source._check_shapes()
        return source

    # --- sizes -------------------------------------------------------------------------
    @property
    def d_model(self) -> int:
        return int(self._size(self.family.d_model_key))

    @property
    def d_mlp(self) -> int:
        """Neurons per layer and matrix: in a mixture of experts, every expert's units, expert
        by expert (neuron e * d_expert + i is unit i of expert e), then the shared expert's.
        Where layers differ (a mixture with dense layers, Gemma 4's wide layers), the widest
        layer's count: `width` gives each layer's."""
        return max(self.widths)

    @property
    def widths(self) -> list[int]:
        """Each layer's neurons per matrix."""
        return [self.width(layer) for layer in range(self.n_layers)]

    def width(self, layer: int) -> int:
        """Layer `layer`'s neurons per matrix."""
        if self.is_dense(layer):
            return self._size(self.family.dense_width_key)
        if self.family.is_wide(self.settings, self.n_layers, layer):
            return 2 * self.d_expert
        return self.n_experts * self.d_expert + self.d_shared

    @property
    def dense_layers(self) -> list[int]:
        """The layers of a mixture of experts that are dense MLPs ([] in a dense model)."""
        key = self.family.dense_layers_key
        if key is not None and self.settings.get(key) is not None:
            n = self._size(key)
            if not 0 <= n <= self.n_layers:
                raise CheckpointError(
                    f"{self._where} sets {key}={n}, outside 0-{self.n_layers} "
                    "(the number of layers); the file may be damaged"
                )
        return [layer for layer in range(self.n_layers) if self.is_dense(layer)]

    def is_dense(self, layer: int) -> bool:
        """Whether a layer of a mixture of experts is a dense MLP (False in a dense model)."""
        return self.family.is_dense(self.settings, layer)

    @property
    def d_shared(self) -> int:
        """The shared expert's width in a mixture of experts that has one, else 0."""
        keys = self.family.shared_width_keys
        if not self.family.shared_expert or not all(self.settings.get(k) for k in keys):
            return 0  # (none, or a count of 0 or null)
        return math.prod(self._size(k) for k in keys)

    @property
    def d_expert(self) -> int:
        """One MLP's width: d_mlp, or one expert's in a mixture of experts."""
        f = self.family
        if self.settings.get(f.d_mlp_key) is None and f.d_mlp_factor is not None:
            return f.d_mlp_factor * self.d_model  # (GPT-2: n_inner null, 4 * n_embd)
        return int(self._size(f.d_mlp_key))

    @property
    def n_experts(self) -> int:
        """Experts per layer (1: a dense MLP)."""
        keys = self.family.experts_keys
        if not keys:
            return 1
        return int(self._size(next((k for k in keys if k in self.settings), keys[0])))

    @property
    def n_layers(self) -> int:
        return int(self._size(self.family.n_layers_key))

    @property
    def _where(self) -> str:
        """Where the family's settings are read from, for error messages."""
        where = str(self.folder / "config.json")
        return f"{where} ({self.family.text_config})" if self.family.text_config else where

    def _size(self, key: str) -> int:
        try:
            return int(self.settings[key])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{self._where} has no usable {key!r} (got "
                f"{self.settings.get(key)!r}), which a {self.family.name} config holds; the file "
                "may be damaged or from another model"
            ) from None

    @property
    def d_vocab(self) -> int:
        return self._size("vocab_size")

    @functools.cached_property
    def tied(self) -> bool:
        """Whether the model's head is its embedding, as transformers 5 loads it: the config
        ties them (tie_word_embeddings, else the family's default) and the checkpoint holds no
        head of other values (a tied config whose saved head differs from the embedding, as
        Mistral Small 3.1's does, runs that head untied)."""
        if not self.settings.get("tie_word_embeddings", self.family.tie_default):
            return False
        head, embedding = self.name(self.family.W_U), self.name(self.family.W_E)
        if head in self.checkpoint and embedding in self.checkpoint:
            return self.checkpoint.same_sample(head, embedding)  # (a copy: a torch.save's)
        return True

    @property
    def norm_eps(self) -> float:
        f = self.family
        if f.norm_eps_key is None:  # (a fixed eps: OLMo's)
            return f.norm_eps_default
        return float(self.settings.get(f.norm_eps_key, f.norm_eps_default))

    @property
    def logit_scale(self) -> float:
        """The factor the model's forward puts on its logits (1: none), from config.json or
        the family's default, as transformers reads it."""
        f = self.family
        if f.logit_scale_key is None:
            return 1.0
        value = self.settings.get(f.logit_scale_key)
        value = f.logit_scale_default if value is None else float(value)
        if not value or not math.isfinite(value):
            raise UnsupportedModelError(
                f"config.json sets {f.logit_scale_key}={value!r}, which gives no usable "
                "logits; fix the config"
            )
        return 1.0 / value if f.logit_scale_divides else value

    @property
    def logit_softcap(self) -> float | None:
        """The tanh soft-cap on the logits, as transformers reads it: the config's value (null:
        none), or the family's default when config.json omits the key."""
        key = self.family.logit_softcap_key
        if key is None:
            return None
        value = self.settings.get(key, self.family.logit_softcap_default)  # (null: no cap)
        return float(value) if value else None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the MLP weights are read in: the stored one; for quantised weights, read
        dequantized, fp32 (FP8, as transformers computes it), the scales' dtype or fp32
        (compressed-tensors: BlockScales.into) or bf16 (MXFP4, which holds it exactly)."""
        return self.checkpoint.dtype(self.name(self._tensor("up", self.n_layers - 1)))

    @property
    def run_dtype(self) -> torch.dtype:
        """The dtype transformers gives the MLP weights when it loads the model, which the
        dtype policy reads: the stored one; in a quantised checkpoint, whose weights
        transformers dequantizes into the model's dtype, config.json's `dtype` (`torch_dtype`
        in older files), or bfloat16 where it names none."""
        if self.quantization is None:
            return self.dtype
        for where in (self.settings, self.config):
            name = where.get("dtype") or where.get("torch_dtype")
            if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)  # type: ignore[no-any-return]
        return torch.bfloat16

    @property
    def quantization(self) -> str | None:
        """How the checkpoint is quantised, as config.json's quantization_config says and
        flashlens reads it ("fp8 e4m3, 128 x 128 blocks"); None: it is not."""
        scheme = self.checkpoint.quant
        return None if scheme is None else scheme.describe()

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)

    def fingerprint(self) -> str:
        """The weights' own fingerprint (`Checkpoint.fingerprint`): config.json says what the
        model is shaped like, this says which trained weights it holds. Left out: what one
        save of a model holds and another not, the tied head's copy of the embedding (in a
        `torch.save(state_dict)`, not in `save_pretrained`'s files) and buffers such as
        rotary `inv_freq`."""
        copy = self.name(self.family.W_U) if self.tied else None
        buffers = self.family.buffers
        return self.checkpoint.fingerprint(lambda n: n == copy or n.endswith(buffers))

    def name(self, name: str) -> str:
        """A family's tensor name as this checkpoint spells it: the first of the family's
        spellings (`Family.renames`) that the checkpoint holds, else the name as given."""
        if name in self.checkpoint:
            return name
        for prefix, other in self.family.renames:
            if name.startswith(prefix):
                renamed = other + name.removeprefix(prefix)
                if renamed in self.checkpoint:
                    return renamed
        return name

    # --- tensors by role ---------------------------------------------------------------
    @property
    def W_U_name(self) -> str:
        """The head the model runs: the embedding where it is tied (`tied`), else the
        LM-head (or an untied config's head saved as the embedding)."""
        f = self.family
        if not self.tied and self.name(f.W_U) in self.checkpoint:
            return self.name(f.W_U)
        return self.name(f.W_E)

    @property
    def W_U_bias_name(self) -> str | None:
        """The LM-head's bias as the checkpoint names it, where the model's head has one."""
        f = self.family
        if f.W_U_bias is None or (f.W_U_bias_key and not self.settings.get(f.W_U_bias_key)):
            return None
        return self.name(f.W_U_bias)

    def W_U(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The LM-head / unembedding, (d_vocab, d_model), in its stored dtype or converted to
        `dtype` while read (no stored-dtype copy of the whole head beside it)."""
        return self.checkpoint.get(self.W_U_name, dtype)

    def norm_weight(self) -> torch.Tensor:
        """The final norm's weight as the model applies it, (d_model,), fp32 (ones for a norm
        without a weight)."""
        if self.family.final_norm is None:
            return torch.ones(self.d_model)
        g = self.checkpoint.get(self.name(self.family.final_norm)).float()
        return g + self.family.norm_weight_offset

    def readout(self) -> Readout:
        """How the model reads logits out of a residual vector past W_U's rows, as it does it:
        the final norm (kind, gain, bias, eps), the logits' scale and the head's bias."""
        f = self.family
        bias = None
        if f.final_norm_bias is not None:
            bias = self.checkpoint.get(self.name(f.final_norm_bias)).float()
        head_bias = None
        if self.W_U_bias_name is not None:
            head_bias = self.checkpoint.get(self.W_U_bias_name).float()
        return Readout(
            self.norm_weight(), self.norm_eps, f.norm_kind, bias, self.logit_scale, head_bias
        )

    def neurons(self, matrix: Matrix, layer: int) -> torch.Tensor:
        """One layer's neuron vectors as rows, (d_mlp, d_model), in the dtype they read in
        (quantised weights dequantized; a mixture of experts: each expert's copied in turn into
        one tensor, of the wider dtype where its shared expert's differs)."""
        self.check_layer(layer)
        if self.n_experts == 1:
            return self._expert(matrix, layer, 0)
        if self.is_dense(layer):
            return self._mlp(self.family.dense_tensor(matrix, layer), matrix)
        m = self.d_expert
        out = torch.empty(0)
        for e in range(self.n_experts):
            W = self._expert(matrix, layer, e)  # (d_expert, d_model)
            if e == 0:
                out = torch.empty((self.d_mlp, W.shape[1]), dtype=self._layer_dtype(matrix, layer))
            out[e * m : (e + 1) * m] = W
        if self.d_shared:
            out[self.n_experts * m :] = self._shared(matrix, layer)
        return out

    def _layer_dtype(self, matrix: Matrix, layer: int) -> torch.dtype:
        """The dtype that holds a mixture layer's neurons as read: its experts' and its shared
        expert's, the wider where they differ (a quantised checkpoint may leave one of them
        unquantised)."""
        dtype = self.checkpoint.dtype(self.name(self.family.tensor(matrix, layer)))
        if self.d_shared:
            shared = self.checkpoint.dtype(self.name(self.family.shared_tensor(matrix, layer)))
            dtype = torch.promote_types(dtype, shared)
        return dtype

    def _shared(self, matrix: Matrix, layer: int) -> torch.Tensor:
        """The shared expert's neuron vectors as rows, (d_shared, d_model)."""
        name = self.family.shared_tensor(matrix, layer)
        if self.family.shared_fused is not None and matrix != "down":  # its half, read alone
            lo = self.family.shared_offset(matrix, self.d_shared)
            return self.checkpoint.get(self.name(name), rows=(lo, lo + self.d_shared))
        return self._mlp(name, matrix)

    def _mlp(self, name: str, matrix: Matrix) -> torch.Tensor:
        """A Llama-style MLP's neuron vectors as rows (a shared expert's, a dense layer's)."""
        W = self.checkpoint.get(self.name(name))
        return W.T if matrix == "down" else W

    def _tensor(self, matrix: Matrix, layer: int) -> str:
        """The name of a tensor that holds `matrix`'s neurons in `layer` (the first expert's)."""
        if self.is_dense(layer):
            return self.family.dense_tensor(matrix, layer)
        return self.family.tensor(matrix, layer)

    def _expert(self, matrix: Matrix, layer: int, expert: int) -> torch.Tensor:
        """One MLP's (one expert's) neuron vectors as rows, (d_expert, d_model)."""
        f, m = self.family, self.d_expert
        name = self.name(f.tensor(matrix, layer, expert))
        if f.experts_stacked:  # the expert's slice of the layer's tensor, read alone
            W = self.checkpoint.get(name, rows=(expert, expert + 1))[0]
            if self._column(matrix):
                return W[:, f.units(matrix, m)].T
            return W[f.units(matrix, m)]
        if self._column(matrix):  # W_down (d_model, d_mlp); Conv1D's W_up
            return self.checkpoint.get(name).T
        if f.gate_up_fused:  # its half of the fused tensor, read alone
            lo = f.row_offset(matrix, m)
            return self.checkpoint.get(name, rows=(lo, lo + m))
        return self.checkpoint.get(name)

    def neuron_rows(self, matrix: Matrix, layer: int, index: torch.Tensor) -> torch.Tensor:
        """Neurons `index` (n,) of one layer as rows, (n, d_model), in the dtype they read in
        (`neurons`'), read without the rest of the layer."""
        self.check_layer(layer)
        if self.n_experts == 1:
            return self._expert_rows(matrix, layer, 0, index)
        if self.is_dense(layer):
            return self._mlp_rows(self.family.dense_tensor(matrix, layer), matrix, index)
        routed = self.n_experts * self.d_expert
        experts, units = index // self.d_expert, index % self.d_expert
        out = torch.empty((len(index), self.d_model), dtype=self._layer_dtype(matrix, layer))
        for e in experts[index < routed].unique().tolist():
            at = (experts == e).nonzero().squeeze(1)
            out[at] = self._expert_rows(matrix, layer, e, units[at]).to(out.dtype)
        shared = (index >= routed).nonzero().squeeze(1)
        if len(shared):  # the shared expert's units
            name = self.family.shared_tensor(matrix, layer)
            at = index[shared] - routed + self.family.shared_offset(matrix, self.d_shared)
            out[shared] = self._mlp_rows(name, matrix, at).to(out.dtype)
        return out

    def _mlp_rows(self, name: str, matrix: Matrix, index: torch.Tensor) -> torch.Tensor:
        """Neurons `index` of a Llama-style MLP (a shared expert, a dense layer) as rows,
        (n, d_model), read without the rest of its tensor."""
        name = self.name(name)
        if matrix == "down":
            return self.checkpoint.gather(name, index, dim=1).T.contiguous()
        return self.checkpoint.gather(name, index)

    def _expert_rows(
        self, matrix: Matrix, layer: int, expert: int, index: torch.Tensor
    ) -> torch.Tensor:
        f = self.family
        name = self.name(f.tensor(matrix, layer, expert))
        if f.experts_stacked:
            return self._expert(matrix, layer, expert)[index].contiguous()
        if self._column(matrix):
            return self.checkpoint.gather(name, index, dim=1).T.contiguous()
        return self.checkpoint.gather(name, index + f.row_offset(matrix, self.d_expert))

    def _column(self, matrix: Matrix) -> bool:
        """Whether a neuron of `matrix` is a column of its stored tensor (an expert's, or a
        dense model's): `Family.neuron_is_column`, with the orientation this checkpoint's
        experts are stored in."""
        return (matrix == "down") != self._transposed

    @functools.cached_property
    def _transposed(self) -> bool:
        """Whether the MLP tensors are stored transposed: the family's layout (`conv1d`), or
        where its checkpoints come either way (`experts_either_way`), what the first sparse
        layer's tensors say: gate_up (E, d_model, 2 m) or (E, 2 m, d_model), down (E, m,
        d_model) or (E, d_model, m) (the family's layout where both are square)."""
        f = self.family
        sparse = [layer for layer in range(self.n_layers) if not self.is_dense(layer)]
        if not f.experts_either_way or not sparse:
            return f.conv1d
        d = self.d_model
        for matrix in ("up", "down"):
            name = self.name(f.tensor(matrix, sparse[0]))
            rows = f.tensor_rows(matrix, self.d_expert)  # (2 m for gate_up)
            if name not in self.checkpoint or rows == d:
                continue  # (missing: the shape check says so; square: says nothing)
            stored = tuple(self.checkpoint.shape(name)[-2:])
            if stored in ((d, rows), (rows, d)):
                return stored == ((d, rows) if matrix == "up" else (rows, d))
        return f.conv1d

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise NeuronError(
                f"layer {layer} is out of range: the model has layers 0-{self.n_layers - 1}"
            )

    def _check_shapes(self) -> None:
        """Fail before any compute if a tensor the map needs is absent or misshapen."""
        d, m, v = self.d_model, self.d_expert, self.d_vocab
        if not self.tied and self.name(self.family.W_U) not in self.checkpoint:
            raise CheckpointError(
                f"config says tie_word_embeddings=false but {self.family.W_U} is not in the "
                f"checkpoint at {self.folder}; a shard may be missing"
            )
        expected: dict[str, tuple[int, ...]] = {self.W_U_name: (v, d)}
        if self.W_U_bias_name is not None:
            expected[self.W_U_bias_name] = (v,)
        for vector in (self.family.final_norm, self.family.final_norm_bias):
            if vector is not None:
                expected[self.name(vector)] = (d,)
        f = self.family
        self.dense_layers  # noqa: B018  (refuses a count of dense layers past the model's)
        stacked: tuple[int, ...] = (self.n_experts,) if f.experts_stacked else ()
        for layer in range(self.n_layers):
            if self.is_dense(layer):  # a dense layer of a mixture: a Llama-style MLP
                w = self.width(layer)
                for matrix in f.matrices:
                    dense = (d, w) if matrix == "down" else (w, d)
                    expected[self.name(f.dense_tensor(matrix, layer))] = dense
                continue
            if self.n_experts == 1:  # (a dense model's layers may differ: Gemma 4's)
                m = self.width(layer)
            for matrix in f.matrices:
                rows = f.tensor_rows(matrix, m)  # (2 m for a fused gate_up)
                shape: tuple[int, ...] = (d, rows) if self._column(matrix) else (rows, d)
                for e in range(1 if f.experts_stacked else self.n_experts):
                    expected[self.name(f.tensor(matrix, layer, e))] = stacked + shape
                if self.d_shared:
                    s = self.d_shared
                    fused = f.shared_fused is not None and matrix != "down"
                    shared = (d, s) if matrix == "down" else (2 * s if fused else s, d)
                    expected[self.name(f.shared_tensor(matrix, layer))] = shared
        for name, shape in expected.items():
            if name not in self.checkpoint:
                raise CheckpointError(
                    f"tensor {name} is missing from the checkpoint at {self.folder}; "
                    "a shard may be missing or the download incomplete"
                )
            got = self.checkpoint.shape(name)
            if got != shape:
                raise CheckpointError(f"tensor {name} has shape {got}, config implies {shape}")
            stored = self.checkpoint.dtype(name)  # (as read: 8-bit only where no scheme reads it)
            if stored in (*FP8_DTYPES, torch.int8, torch.uint8):
                raise CheckpointError(
                    f"tensor {name} is stored in {str(stored).removeprefix('torch.')}, but "
                    "config.json has no quantization_config saying how it is scaled (or one "
                    "that does not cover it): restore the model's own config.json, or map its "
                    "bf16 release"
                )

    def close(self) -> None:
        self.checkpoint.close()

    def __enter__(self) -> ModelSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
