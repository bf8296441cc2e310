"""Clamps and recordings of a mixture of experts' units, which no module holds on its own.

transformers (5 and later) runs a layer's experts in one module, `mlp.experts`, whose weights
are 3D: W_gate_up (E, 2 m, d_model), each expert's gate rows then its up rows, and W_down
(E, d_model, m). It is called on the layer's tokens flattened, experts(x (T, d_model),
top_k_index (T, k), top_k_weights (T, k)), and returns, per token, the sum over the k experts
e it is routed to of w_e * W_down[e] @ (act_fn(W_gate[e] x) * W_up[e] x). How it computes that
(a loop over experts, grouped or batched products) is a setting; no tensor of one expert's
activations is there for a hook to edit.

So a clamp corrects the experts' output instead. For a clamped unit i of expert e, on the
tokens routed to e, it recomputes the unit's pre-activations g = W_gate[e, i] . x and
u = W_up[e, i] . x in fp32, edits them as the hooks of a dense MLP would (gate and up, then
act on act_fn(g') * u'), and adds w_e * (a' - a) * W_down[e][:, i] to the output. A unit's
activation depends on x alone, so the corrections of several units add up, and the result is
the experts' output with the units edited inside, up to the rounding of the experts' own
products. A clamp to a unit's natural value adds exactly zero.

A token runs only the experts it is routed to: a clamp leaves a token its unit's expert does
not run on as it is, and a recording holds NaN there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..errors import NeuronError, UnsupportedModelError
from ..families import Family
from .neuron import Mode, Neuron, Site

Take = Callable[[Neuron, torch.Tensor], None]


@dataclass(frozen=True)
class ExpertsRef:
    """One neuron of a layer's experts: the module, the site, and (expert, unit)."""

    module: nn.Module  # the layer's experts: gate_up_proj (E, 2m, d), down_proj (E, d, m)
    name: str  # e.g. "model.layers.3.mlp.experts"
    block: nn.Module  # the MoE block that calls it, whose input is (batch, seq, d_model)
    site: Site
    d_expert: int  # m
    n_experts: int  # E

    def unit(self, neuron: Neuron) -> tuple[int, int]:
        """(expert, unit) of a neuron e * d_expert + i."""
        e, i = divmod(neuron.index, self.d_expert)
        return e, i

    def where(self, neuron: Neuron) -> str:
        """The activation a clamp of `neuron` edits (two clamps of one activation clash)."""
        e, i = self.unit(neuron)
        return f"{self.name}, expert {e} unit {i}, {self.site}"

    def weight_vector(self, neuron: Neuron) -> torch.Tensor:
        """The unit's weight vector (d_model,) at its site: a row of W_up or W_gate, or for
        site act a column of W_down."""
        e, i = self.unit(neuron)
        if self.site == "act":
            return cast(torch.Tensor, self.module.down_proj)[e, :, i]
        row = i + (self.d_expert if self.site == "up" else 0)
        return cast(torch.Tensor, self.module.gate_up_proj)[e, row]


def resolve_experts(model: nn.Module, family: Family, neuron: Neuron, site: Site) -> ExpertsRef:
    """The experts module of `neuron`'s layer; a clear error when the address or the model's
    layout is not one this module can clamp."""
    name = f"model.layers.{neuron.layer}.mlp.experts"
    upgrade = (
        f"neuron {neuron}: clamping an expert's neuron needs a layer's experts held as 3D "
        f"tensors in one module, {name}.gate_up_proj (experts, 2 * d_expert, d_model), as "
        "transformers 5 and later hold them; this model {}: upgrade transformers"
    )
    try:
        module = model.get_submodule(name)
        block = model.get_submodule(name.rsplit(".", 1)[0])
    except AttributeError:
        raise UnsupportedModelError(upgrade.format(f"has no module {name}")) from None
    W = getattr(module, "gate_up_proj", None)
    if not isinstance(W, torch.Tensor) or W.dim() != 3:
        raise UnsupportedModelError(upgrade.format(f"holds a {type(module).__name__} there"))
    layout = [
        getattr(module, "is_concatenated", True),
        not getattr(module, "is_transposed", False),
        not getattr(module, "has_bias", False),
        getattr(module, "has_gate", True),
    ]
    if not all(layout):
        raise UnsupportedModelError(
            f"neuron {neuron}: {name} is not laid out as flashlens clamps experts (gate rows "
            "then up rows, not interleaved or transposed, no bias)"
        )
    n_experts, d_expert = int(W.shape[0]), int(W.shape[1]) // 2
    width = n_experts * d_expert
    if neuron.index >= width:
        raise NeuronError(
            f"neuron {neuron}: index {neuron.index} is out of range: layers have {width} "
            f"neurons (0-{width - 1}: {n_experts} experts of {d_expert} units)"
        )
    return ExpertsRef(module, name, block, site, d_expert, n_experts)


def _edit(mode: Mode, h: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return value.expand_as(h) if mode == "set" else h + value if mode == "add" else h * value


class _Units:
    """The units of one expert that a hook touches, with each site's edit: (k,) tensors."""

    def __init__(self, units: list[int], edits: dict[Site, list[float | None]]) -> None:
        self.units = torch.tensor(units, dtype=torch.long)  # (k,)
        # per site: which units it edits (k,) bool, and the value for each (k,) fp32
        self.edits = {
            site: (
                torch.tensor([v is not None for v in vals]),
                torch.tensor([0.0 if v is None else v for v in vals], dtype=torch.float32),
            )
            for site, vals in edits.items()
            if any(v is not None for v in vals)
        }

    def apply(
        self, site: Site, mode: Mode, h: torch.Tensor, rows: torch.Tensor | None
    ) -> torch.Tensor:  # h: (n, k); rows: (n,) bool, the tokens to edit (None: all)
        if site not in self.edits:
            return h
        mask, value = (t.to(h.device) for t in self.edits[site])
        if rows is not None:
            mask = mask & rows[:, None]
        return torch.where(mask, _edit(mode, h, value), h)


class _Tokens:
    """The (batch, seq) shape of the tokens the experts see flattened, noted by a pre-hook on
    the MoE block; the flat indices of each sequence's last position."""

    def __init__(self, block: nn.Module) -> None:
        self.shape: tuple[int, int] | None = None

        def note(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]  # (batch, seq, d_model)
            self.shape = (int(hidden.shape[0]), int(hidden.shape[1]))

        self.handle = block.register_forward_pre_hook(note, with_kwargs=True)

    def is_last(self, T: int, device: torch.device) -> torch.Tensor:  # (T,) bool
        seq = self.shape[1] if self.shape is not None else T
        return torch.arange(T, device=device) % seq == seq - 1


def _inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    return [*args[:3], *(kwargs[n] for n in names[len(args[:3]) :])]


def _units_of(
    ref: ExpertsRef, items: Sequence[tuple[ExpertsRef, Neuron, float | None]]
) -> dict[int, _Units]:
    """The units each expert's hook handles, grouped by expert, with each site's values."""
    by_expert: dict[int, dict[int, dict[Site, float | None]]] = {}
    for r, n, v in items:
        e, i = ref.unit(n)
        by_expert.setdefault(e, {}).setdefault(i, {})[r.site] = v
    out = {}
    for e, units in by_expert.items():
        order = sorted(units)
        edits: dict[Site, list[float | None]] = {
            s: [units[i].get(s) for i in order] for s in ("gate", "up", "act")
        }
        out[e] = _Units(order, edits)
    return out


def _activations(
    module: nn.Module, e: int, units: Sequence[int], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The units' gate and up pre-activations on tokens x (n, d_model): each (n, k) fp32.

    One product per unit and all the tokens routed to e, whatever else a hook computes: a unit's
    values are the same bits in a recording and in a clamp of the same tokens, so a clamp to a
    recorded value adds exactly zero."""
    W = cast(torch.Tensor, module.gate_up_proj)[e]  # (2m, d_model)
    m, xf = W.shape[0] // 2, x.float()
    g = torch.stack([xf @ W[i].float() for i in units], dim=-1)
    u = torch.stack([xf @ W[m + i].float() for i in units], dim=-1)
    return g, u


def _routed(e: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens routed to expert e (n,) and the slot of e in their top-k (n,)."""
    token, slot = (index == e).nonzero(as_tuple=True)
    return token, slot


def install_clamp(
    ref: ExpertsRef, items: Sequence[tuple[ExpertsRef, Neuron, float]], mode: Mode, last: bool
) -> list[Any]:
    """Hook the clamps of `items` (one layer's experts' neurons) on ref.module; the handles."""
    groups = _units_of(ref, items)
    tokens = _Tokens(ref.block)
    act = cast(Callable[[torch.Tensor], torch.Tensor], ref.module.act_fn)

    def hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor
    ) -> torch.Tensor:
        x, index, weights = _inputs(args, kwargs)  # (T, d), (T, k), (T, k)
        for e, units in groups.items():
            token, slot = _routed(e, index)
            rows = tokens.is_last(index.shape[0], index.device)[token] if last else None
            if token.numel() == 0 or (rows is not None and not rows.any()):
                continue
            g, u = _activations(module, e, units.units.tolist(), x[token])  # (n, k) each
            a = act(g) * u
            g2 = units.apply("gate", mode, g, rows)
            u2 = units.apply("up", mode, u, rows)
            a2 = units.apply("act", mode, act(g2) * u2, rows)
            delta = (a2 - a) * weights[token, slot].float()[:, None]  # (n, k)
            W_down = cast(torch.Tensor, module.down_proj)[e][:, units.units.to(out.device)]
            out = out.index_add(0, token, (delta @ W_down.float().T).to(out.dtype))
        return out

    return [ref.module.register_forward_hook(hook, with_kwargs=True), tokens.handle]


def install_record(
    ref: ExpertsRef, items: Sequence[tuple[ExpertsRef, Neuron]], take: Take
) -> list[Any]:
    """Hook a read-only recording of `items`: take(neuron, (batch, seq) fp32) per forward, NaN
    on the tokens the neuron's expert does not run on."""
    by_expert: dict[int, list[tuple[Site, int, Neuron]]] = {}
    for r, n in items:
        e, i = ref.unit(n)
        by_expert.setdefault(e, []).append((r.site, i, n))
    tokens = _Tokens(ref.block)
    act = cast(Callable[[torch.Tensor], torch.Tensor], ref.module.act_fn)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        x, index, _ = _inputs(args, kwargs)
        T = x.shape[0]
        shape = tokens.shape or (1, T)
        for e, entries in by_expert.items():
            token, _ = _routed(e, index)
            g, u = _activations(module, e, [i for _, i, _ in entries], x[token])  # (n, k)
            by_site = {"gate": g, "up": u, "act": act(g) * u}
            for j, (site, _, n) in enumerate(entries):
                full = torch.full((T,), float("nan"))
                full[token.cpu()] = by_site[site][:, j].detach().cpu()
                take(n, full.view(shape))

    return [ref.module.register_forward_hook(hook, with_kwargs=True), tokens.handle]
