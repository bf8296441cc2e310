"""`clamp`: PyTorch hooks that set, shift or scale neuron activations while a model runs.

A clamp acts at one of three sites of a layer's gated MLP, down_proj(act_fn(gate) * up):

    up    forward hook on up_proj: its output, (batch, seq, d_mlp)
    gate  forward hook on gate_proj: its output before act_fn, (batch, seq, d_mlp)
          (a fused gate_up_proj: one hook on its (batch, seq, 2 * d_mlp) output, gate's units
          first, then up's)
    act   forward pre-hook on down_proj: its input, the neuron's activation, (batch, seq, d_mlp)

Module paths come from the model's architecture family (flashlens.families), so the hooks land
exactly on the weights the atlas decoded. Hooks are grouped per module (one hook per layer and
site whatever the number of neurons) and edit the tensor in place, so a clamp costs one small
indexed write per hooked module and step.

A mixture of experts runs a layer's experts in one module, with no tensor of one expert's
activations to edit: its clamps correct that module's output (flashlens.intervene.experts).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import nn

from ..errors import FlashlensError, NeuronError, UnsupportedModelError
from ..families import Family, family_for
from .experts import (
    ExpertsRef,
    Tokens,
    install_clamp,
    install_record,
    resolve_experts,
    routed_width,
)
from .neuron import SITES, Mode, Neuron, Site

Positions = Literal["all", "last"]
MODES: tuple[Mode, ...] = ("set", "add", "scale")
POSITIONS: tuple[Positions, ...] = ("all", "last")

NeuronsLike = Neuron | str | Iterable[Neuron | str]


@dataclass(frozen=True)
class SiteRef:
    """Where one neuron's clamp lands: a module, whether it is a pre-hook, the neuron's slot."""

    module: nn.Module
    name: str  # e.g. "model.layers.12.mlp.up_proj"
    pre: bool  # True: the module's input (site "act"); False: its output
    width: int  # d_mlp
    offset: int = 0  # where the site's d_mlp units start in the tensor (up in a fused gate_up)
    conv1d: bool = False  # the module's weight is (in, out) (GPT-2's Conv1D)
    # the decoder layer whose input says (batch, seq) where the MLP sees its tokens flattened
    # to (batch * seq, d_mlp) (OPT); None where it sees (batch, seq, d_mlp)
    block: nn.Module | None = None

    def slot(self, neuron: Neuron) -> int:
        """The neuron's position in the hooked tensor's last dimension."""
        return self.offset + neuron.index

    def where(self, neuron: Neuron) -> str:
        """The activation a clamp of `neuron` edits (two clamps of one activation clash)."""
        return f"{self.name}[{self.slot(neuron)}]"

    def weight_vector(self, neuron: Neuron) -> torch.Tensor:
        """The neuron's weight vector (d_model,) in the hooked module: a row of its output
        weights, or for site act a column of W_down's (Conv1D: the other way round)."""
        W = cast(torch.Tensor, self.module.weight)
        return W[:, self.slot(neuron)] if self.pre != self.conv1d else W[self.slot(neuron)]


def model_family(model: nn.Module) -> Family:
    """The flashlens family of a loaded transformers model (refuses unsupported ones)."""
    return _described(model)[0]


def _described(model: nn.Module) -> tuple[Family, dict[str, Any]]:
    """A loaded transformers model's family and its config as a dict (read once per call of
    clamp or record: 70 us a read, which dozens of neurons would repeat)."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a transformers model "
            "(it has no .config); load it with AutoModelForCausalLM"
        )
    data = config.to_dict()
    if not data.get("architectures"):
        data["architectures"] = [type(model).__name__]
    family = family_for(data)
    if family.text_config is not None:  # a multimodal model: its language model's settings
        data = {**config.get_text_config().to_dict(), "architectures": data["architectures"]}
    return family, data


def as_neurons(neurons: NeuronsLike) -> list[Neuron]:
    """A Neuron, an 'up:12:1234' string or an iterable of them -> list[Neuron]."""
    if isinstance(neurons, (Neuron, str)):
        neurons = [neurons]
    out = [n if isinstance(n, Neuron) else Neuron.parse(n) for n in neurons]
    if not out:
        raise NeuronError("no neurons given")
    return out


def resolve_site(
    model: nn.Module,
    neuron: Neuron,
    site: Site | None = None,
    described: tuple[Family, dict[str, Any]] | None = None,
) -> SiteRef | ExpertsRef:
    """The module a clamp of `neuron` hooks; a clear NeuronError when the address is invalid.
    described: the model's family and config dict, where the caller has them."""
    site = site or neuron.default_site
    if site not in SITES:
        raise NeuronError(f"unknown site {site!r}: use {', '.join(SITES)}")
    family, config = described or _described(model)
    n_layers = int(cast(Any, model).config.get_text_config().num_hidden_layers)
    if not 0 <= neuron.layer < n_layers:
        raise NeuronError(
            f"neuron {neuron}: layer {neuron.layer} is out of range: the model "
            f"has layers 0-{n_layers - 1}"
        )
    matrix = "down" if site == "act" else site
    dense = family.is_dense(config, neuron.layer)
    if family.experts_keys and not dense:
        shared = _shared_width(model, family, neuron.layer)
        ref = resolve_experts(model, family, neuron, site, shared)
        if ref is not None:
            return ref
        # one of the shared expert's units, past the routed experts' (an MLP of its own)
        name = family.shared_tensor(matrix, neuron.layer).removesuffix(".weight")
        moe = family.moe_block.format(layer=neuron.layer)
        routed = routed_width(model.get_submodule(f"{moe}.experts"))
        mlp = model.get_submodule(moe)  # (the shared expert may see (T, d))
        module = model.get_submodule(name)
        offset = family.shared_offset(matrix, shared) - routed  # (past gate's in a fused one)
        return SiteRef(module, name, site == "act", shared, offset, False, mlp)
    try:  # (a dense layer of a mixture of experts: a Llama-style MLP)
        tensor = family.dense_tensor if dense else family.tensor
        name = tensor(matrix, neuron.layer).removesuffix(".weight")
    except UnsupportedModelError:
        others = " or ".join(s for s in SITES if s != site)
        raise NeuronError(
            f"neuron {neuron}: site {site!r} does not exist in {family.name} "
            f"models (no {matrix}_proj); use site {others}"
        ) from None
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise NeuronError(
            f"neuron {neuron}: site {site!r} does not exist in this model (no module {name})"
        ) from None
    weight = cast(torch.Tensor, module.weight)  # (out, in); Conv1D (GPT-2): (in, out)
    # (a mixture's dense layers are Llama-style nn.Linear, whatever its experts' layout)
    conv1d = family.conv1d and not dense
    width = int(weight.shape[1 if (site == "act") != conv1d else 0])
    offset = 0
    if family.gate_up_fused and not dense and site != "act":  # (2 d_mlp) outputs: gate's, up's
        width //= 2
        offset = family.row_offset(matrix, width)  # type: ignore[arg-type]
    if neuron.index >= width:
        raise NeuronError(
            f"neuron {neuron}: index {neuron.index} is out of range: layers have "
            f"{width} neurons (0-{width - 1})"
        )
    block = model.get_submodule(name.rsplit(".", 1)[0]) if family.mlp_flat else None
    return SiteRef(module, name, site == "act", width, offset, conv1d, block)


def _shared_width(model: nn.Module, family: Family, layer: int) -> int:
    """The width of a layer's shared expert (its W_down's inputs); 0 where there is none."""
    if family.shared_expert is None:
        return 0
    try:
        W_down = model.get_submodule(family.shared_tensor("down", layer).removesuffix(".weight"))
    except AttributeError:
        raise UnsupportedModelError(
            f"this {family.name} model has no module {family.shared_expert.format(layer=layer)}"
            " (its shared expert): it is not the layout flashlens clamps"
        ) from None
    return int(cast(torch.Tensor, W_down.weight).shape[1])


def check_neurons(model: nn.Module, neurons: NeuronsLike, site: Site | None = None) -> list[Neuron]:
    """The neurons, each checked against the model (layer, index, site) before any work."""
    chosen = as_neurons(neurons)
    described = _described(model)
    for n in chosen:
        resolve_site(model, n, site, described)
    return chosen


def clamp_sites(neurons: Iterable[Neuron], site: Site | None = None) -> dict[str, Site]:
    """Where each neuron's clamp acts: {"up:12:1234": "up", ...} (`site`, else by matrix)."""
    return {str(n): site or n.default_site for n in neurons}


class _Edit:
    """The in-place edit one hook makes: h[..., idx] (set|add|scale) values."""

    def __init__(self, index: list[int], values: list[float], mode: Mode, last: bool) -> None:
        self.index = torch.tensor(index, dtype=torch.long)  # (k,)
        self.values = torch.tensor(values, dtype=torch.float64)  # (k,)
        self.mode, self.last = mode, last
        self._cache: tuple[torch.device, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def _on(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._cache
        if c is None or c[0] != h.device or c[1] != h.dtype:
            c = (h.device, h.dtype, self.index.to(h.device), self.values.to(h.device, h.dtype))
            self._cache = c
        return c[2], c[3]

    def __call__(self, h: torch.Tensor) -> None:  # h: (batch, seq, d_mlp), edited in place
        index, values = self._on(h)
        view = h[..., -1:, :] if self.last else h  # during cached decoding seq == 1: the new token
        if self.mode == "set":
            view[..., index] = values
        elif self.mode == "add":
            view[..., index] += values
        else:
            view[..., index] *= values


def _values(value: float | Sequence[float] | torch.Tensor, n: int) -> list[float]:
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if isinstance(value, (int, float)):
        value = [value] * n
    values = [float(v) for v in value]
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise FlashlensError(f"clamp values must be finite numbers, not {bad[0]}")
    if len(values) != n:
        raise FlashlensError(
            f"{len(values)} clamp values for {n} neurons: give one value, or one per neuron"
        )
    return values


@contextmanager
def clamp(
    model: nn.Module,
    neurons: NeuronsLike,
    value: float | Sequence[float] | torch.Tensor,
    mode: Mode = "set",
    positions: Positions = "all",
    site: Site | None = None,
) -> Iterator[list[Neuron]]:
    """Clamp neurons while the model runs inside the `with` block; hooks always come off.

        with flashlens.clamp(model, [Neuron(12, 1234, "up")], value=10.0):
            model.generate(...)

    value: one number for all neurons, or one per neuron. mode: set (h = v), add (h + v),
    scale (h * v). positions: all, or last (the last position of each forward: the prompt's
    next-token position, then every newly generated token under KV-cached generation; pad
    on the left when batching). site: up, gate or act (default: follows each neuron's matrix).
    """
    if mode not in MODES:
        raise FlashlensError(f"unknown clamp mode {mode!r}: use {', '.join(MODES)}")
    if positions not in POSITIONS:
        raise FlashlensError(f"unknown positions {positions!r}: use {', '.join(POSITIONS)}")
    chosen = as_neurons(neurons)
    values = _values(value, len(chosen))
    groups: dict[str, list[tuple[Any, Neuron, float]]] = {}  # by hooked module
    seen: dict[str, Neuron] = {}
    described = _described(model)
    for neuron, v in zip(chosen, values, strict=True):
        ref = resolve_site(model, neuron, site, described)
        where = ref.where(neuron)
        if where in seen:
            raise NeuronError(
                f"neurons {seen[where]} and {neuron} clamp the same activation ({where}); "
                "give it once"
            )
        seen[where] = neuron
        groups.setdefault(ref.name, []).append((ref, neuron, v))
    handles: list[Any] = []
    try:
        for items in groups.values():
            ref = items[0][0]
            if isinstance(ref, ExpertsRef):
                handles.append(_Handles(*install_clamp(ref, items, mode, positions == "last")))
                continue
            index, vals = [ref.slot(n) for _, n, _ in items], [v for _, _, v in items]
            handles.append(_install(ref, _Edit(index, vals, mode, positions == "last")))
        yield chosen
    finally:
        for handle in handles:
            handle.remove()


class _Handles:
    """Removable handles of the hooks one site needed, removed together."""

    def __init__(self, *handles: Any) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _install(ref: SiteRef, edit: Any) -> Any:
    """Hook `edit(h)` on the site's tensor h, (batch, seq, d_mlp); returns a removable handle.

    Where the MLP sees its tokens flattened (ref.block), a pre-hook on the layer notes its
    input's (batch, seq) and the site's (batch * seq, d_mlp) tensor is edited through a view
    of that shape, so that "last position" and recorded activations mean what they do
    elsewhere."""
    noted = Tokens(ref.block) if ref.block is not None else None
    extra = [noted.handle] if noted is not None else []

    def tokens(h: torch.Tensor) -> torch.Tensor:
        shape = noted.shape if noted is not None else None
        return h.view(*shape, h.shape[-1]) if shape is not None and h.dim() == 2 else h

    if ref.pre:

        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            edit(tokens(args[0]))

        return _Handles(ref.module.register_forward_pre_hook(pre_hook), *extra)

    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        edit(tokens(output))
        return output

    return _Handles(ref.module.register_forward_hook(hook), *extra)


@contextmanager
def record(
    model: nn.Module, neurons: NeuronsLike, site: Site | None = None
) -> Iterator[dict[Neuron, list[torch.Tensor]]]:
    """Record neurons' activations at their site: {neuron: [(batch, seq) fp32 per forward]}.
    A neuron of a mixture of experts reads NaN on the tokens its expert does not run on.

    Hooks are read-only and always removed on exit.
    """
    chosen = as_neurons(neurons)
    seen: dict[Neuron, list[torch.Tensor]] = {n: [] for n in chosen}
    by_module: dict[str, list[tuple[Any, Neuron]]] = {}
    described = _described(model)
    for neuron in seen:
        ref = resolve_site(model, neuron, site, described)
        by_module.setdefault(ref.name, []).append((ref, neuron))
    handles: list[Any] = []

    def take(neuron: Neuron, acts: torch.Tensor) -> None:  # acts: (batch, seq)
        seen[neuron].append(acts)

    def recorder(ref: SiteRef, group: list[Neuron]) -> Any:
        index = [ref.slot(n) for n in group]

        def take_all(h: torch.Tensor) -> None:  # h: (batch, seq, d_mlp)
            acts = h[..., index].detach().float().cpu()  # (batch, seq, k)
            for j, n in enumerate(group):
                take(n, acts[..., j])

        return take_all

    try:
        for items in by_module.values():
            ref = items[0][0]
            if isinstance(ref, ExpertsRef):
                handles.append(_Handles(*install_record(ref, items, take)))
            else:
                handles.append(_install(ref, recorder(ref, [n for _, n in items])))
        yield seen
    finally:
        for handle in handles:
            handle.remove()
