"""Clamps and recordings of a mixture of experts' units, which no module holds on its own.

transformers (5 and later) runs a layer's experts in one module, `mlp.experts`, whose weights
are 3D: W_gate_up (E, 2 m, d_model), each expert's gate rows then its up rows, and W_down
(E, d_model, m); or, in gpt-oss, stored transposed, (E, d_model, 2 m) with gate's and up's
units alternating and (E, m, d_model), each with a bias. It is called on the layer's tokens
flattened, experts(x (T, d_model), top_k_index (T, k), top_k_weights (T, k)), and returns, per
token, the sum over the k experts e it is routed to of w_e * W_down[e] @ act(gate, up), where
gate = W_gate[e] x (+ bias), up = W_up[e] x (+ bias) and act is the module's own
`_apply_gate` (act_fn(gate) * up; gpt-oss's clamped SwiGLU). How it computes that (a loop over
experts, grouped or batched products) is a setting; no tensor of one expert's activations is
there for a hook to edit.

So a clamp corrects the experts' output instead. For a clamped unit i of expert e, on the
tokens routed to e, it recomputes the unit's gate g and up u in fp32, edits them as the hooks
of a dense MLP would (gate and up, then the activation a' = act(g', u')), and adds
w_e * (a' - a) * (unit i's W_down vector) to the output. A unit's activation depends on x
alone, so the corrections of several units add up, and the result is the experts' output with
the units edited inside, up to the rounding of the experts' own products. A clamp to a unit's
natural value adds exactly zero.

A token runs only the experts it is routed to: a clamp leaves a token its unit's expert does
not run on as it is, and a recording holds NaN there.
"""

from __future__ import annotations

import functools
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

    module: nn.Module  # the layer's experts (gate_up_proj, down_proj: see the module doc)
    name: str  # e.g. "model.layers.3.mlp.experts"
    block: nn.Module  # the MoE block that calls it, whose input is (batch, seq, d_model)
    site: Site
    d_expert: int  # m

    def unit(self, neuron: Neuron) -> tuple[int, int]:
        """(expert, unit) of a neuron e * d_expert + i."""
        e, i = divmod(neuron.index, self.d_expert)
        return e, i

    def where(self, neuron: Neuron) -> str:
        """The activation a clamp of `neuron` edits (two clamps of one activation clash)."""
        e, i = self.unit(neuron)
        return f"{self.name}, expert {e} unit {i}, {self.site}"

    def weight_vector(self, neuron: Neuron) -> torch.Tensor:
        """The unit's weight vector (d_model,) at its site: its W_up or W_gate vector, or for
        site act its W_down one."""
        e, i = self.unit(neuron)
        if self.site == "act":
            return _down(self.module, e, [i])[0]
        return _gate_up(self.module, e, [_column(self.module, self.site, i)])[0]


def _transposed(module: nn.Module) -> bool:
    return bool(getattr(module, "is_transposed", False))


def _column(module: nn.Module, site: str, i: int) -> int:
    """Where unit i's gate or up lies along gate_up_proj's 2m units."""
    m = _width(module)
    if getattr(module, "is_concatenated", True):
        return i + (m if site == "up" else 0)
    return 2 * i + (site == "up")


def _width(module: nn.Module) -> int:
    """d_expert, from gate_up_proj (E, 2m, d), or (E, d, 2m) transposed."""
    W = cast(torch.Tensor, module.gate_up_proj)
    return int(W.shape[2 if _transposed(module) else 1]) // 2


def _gate_up(module: nn.Module, e: int, columns: Sequence[int]) -> torch.Tensor:
    """Expert e's gate_up vectors at `columns` (of 2m), (k, d_model), as stored."""
    W = cast(torch.Tensor, module.gate_up_proj)[e]
    return W[:, list(columns)].T if _transposed(module) else W[list(columns)]


def _down(module: nn.Module, e: int, units: Sequence[int]) -> torch.Tensor:
    """Expert e's W_down vectors of `units`, (k, d_model), as stored."""
    W = cast(torch.Tensor, module.down_proj)[e]
    return W[list(units)] if _transposed(module) else W[:, list(units)].T


def routed_width(module: nn.Module) -> int:
    """A layer's routed experts' units, E * d_expert."""
    return int(cast(torch.Tensor, module.gate_up_proj).shape[0]) * _width(module)


def resolve_experts(
    model: nn.Module, family: Family, neuron: Neuron, site: Site, shared: int = 0
) -> ExpertsRef | None:
    """The experts module of `neuron`'s layer; None for one of the `shared` units of a shared
    expert, which follow the routed experts' in a layer's neurons. A clear error when the
    address or the model's layout is not one this module can clamp."""
    name = f"{family.moe_block.format(layer=neuron.layer)}.experts"
    upgrade = (
        f"neuron {neuron}: clamping an expert's neuron needs a layer's experts held as 3D "
        f"tensors in one module, {name}.gate_up_proj, as transformers 5 and later hold "
        "them; this model {}: upgrade transformers"
    )
    try:
        module = model.get_submodule(name)
        block = model.get_submodule(name.rsplit(".", 1)[0])
    except AttributeError:
        raise UnsupportedModelError(upgrade.format(f"has no module {name}")) from None
    W = getattr(module, "gate_up_proj", None)
    if not isinstance(W, torch.Tensor) or W.dim() != 3:
        raise UnsupportedModelError(upgrade.format(f"holds a {type(module).__name__} there"))
    if not getattr(module, "has_gate", True):
        raise UnsupportedModelError(
            f"neuron {neuron}: {name} has no gate (up_proj only), which flashlens does not "
            "clamp yet"
        )
    n_experts, d_expert = int(W.shape[0]), _width(module)
    routed = n_experts * d_expert
    width = routed + shared
    if neuron.index >= width:
        also = f" and a shared expert of {shared}" if shared else ""
        raise NeuronError(
            f"neuron {neuron}: index {neuron.index} is out of range: layers have {width} "
            f"neurons (0-{width - 1}: {n_experts} experts of {d_expert} units{also})"
        )
    if neuron.index >= routed:
        return None
    return ExpertsRef(module, name, block, site, d_expert)


def _edit(mode: Mode, h: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return value.expand_as(h) if mode == "set" else h + value if mode == "add" else h * value


class _Units:
    """Units of one expert that a hook touches: their weight vectors in fp32, read once as the
    hook goes on, and each site's edit as (k,) tensors."""

    def __init__(
        self,
        module: nn.Module,
        e: int,
        units: list[int],
        edits: dict[Site, list[float | None]] | None = None,
    ) -> None:
        self.units = units
        has_bias = getattr(module, "has_bias", False)
        bias = cast(torch.Tensor, getattr(module, "gate_up_proj_bias", None))
        with torch.no_grad():
            columns = {site: [_column(module, site, i) for i in units] for site in ("gate", "up")}
            # each vector its own (d_model,) tensor: a unit's product is then one and the same
            # GEMV in every hook, whatever other units it sits beside
            self.V = {
                site: [v.float().contiguous() for v in _gate_up(module, e, cols)]
                for site, cols in columns.items()
            }
            self.bias = {site: bias[e, cols].float() for site, cols in columns.items() if has_bias}
            self.W_down = _down(module, e, units).float()  # (k, d_model)
        device = self.W_down.device
        # per site: which units it edits (k,) bool, and the value for each (k,) fp32
        self.edits = {
            site: (
                torch.tensor([v is not None for v in vals], device=device),
                torch.tensor([0.0 if v is None else v for v in vals], device=device),
            )
            for site, vals in (edits or {}).items()
            if any(v is not None for v in vals)
        }
        self.pre = "gate" in self.edits or "up" in self.edits  # edits before the activation
        self.every = {site for site, vals in (edits or {}).items() if None not in vals}

    def activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The units' gate and up (their biases added) on tokens x (n, d_model): (n, k) each."""
        xf = x.float()
        out = []
        for site in ("gate", "up"):
            h = torch.stack([xf @ v for v in self.V[site]], dim=-1)
            out.append(h + self.bias[site] if site in self.bias else h)
        return out[0], out[1]

    def apply(
        self, site: Site, mode: Mode, h: torch.Tensor, rows: torch.Tensor | None
    ) -> torch.Tensor:  # h: (n, k); rows: (n,) bool, the tokens to edit (None: all)
        if site not in self.edits:
            return h
        mask, value = self.edits[site]
        if rows is None and site in self.every:  # every unit, every token: no mask
            return _edit(mode, h, value)
        if rows is not None:
            mask = mask & rows[:, None]
        return torch.where(mask, _edit(mode, h, value), h)


class Tokens:
    """The (batch, seq) shape of the tokens a module sees flattened (the experts; OPT's MLP),
    noted by a pre-hook on the block that calls it with (batch, seq, d_model); the flat
    indices of each sequence's last position."""

    def __init__(self, block: nn.Module) -> None:
        self.shape: tuple[int, int] | None = None
        self._last: tuple[tuple[int, int, torch.device], torch.Tensor] | None = None

        def note(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]  # (batch, seq, d_model)
            self.shape = (int(hidden.shape[0]), int(hidden.shape[1]))

        self.handle = block.register_forward_pre_hook(note, with_kwargs=True)

    @property
    def all_last(self) -> bool:
        """Whether every token is its sequence's last (one new token each, as in decoding)."""
        return self.shape is not None and self.shape[1] == 1

    def is_last(self, T: int, device: torch.device) -> torch.Tensor:  # (T,) bool
        seq = self.shape[1] if self.shape is not None else T
        key = (T, seq, device)
        if self._last is None or self._last[0] != key:  # (the same every decoding step)
            self._last = (key, torch.arange(T, device=device) % seq == seq - 1)
        return self._last[1]


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
        out[e] = _Units(ref.module, e, order, edits)
    return out


@functools.cache
def _default_gate() -> Any:
    """transformers' default `_apply_gate` (act_fn(gate) * up), where it has one. Looked up
    when a hook first runs, not on import: the module imports torch's compiler stack, which
    flashlens keeps out of processes that only map (tests/test_kernel_cache.py)."""
    try:
        from transformers.integrations import moe
    except ImportError:  # (an older transformers: its experts are refused before any hook)
        return None
    return getattr(moe, "_default_apply_gate", None)


def _act(module: nn.Module, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The units' activations from their gate and up (n, k): the module's own `_apply_gate` on
    them laid out as its gate_up product is (act_fn(g) * u directly where it is the default
    one: the same arithmetic, without joining and splitting them)."""
    apply = getattr(module, "_apply_gate", None)
    if apply is None or getattr(apply, "__func__", None) is _default_gate():
        return cast(Callable[[torch.Tensor], torch.Tensor], module.act_fn)(g) * u
    if getattr(module, "is_concatenated", True):
        return cast(torch.Tensor, apply(torch.cat([g, u], dim=-1)))
    return cast(torch.Tensor, apply(torch.stack([g, u], dim=-1).flatten(-2)))  # g0 u0 g1 u1


def _routed(e: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens routed to expert e (n,) and the slot of e in their top-k (n,)."""
    token, slot = (index == e).nonzero(as_tuple=True)
    return token, slot


def install_clamp(
    ref: ExpertsRef, items: Sequence[tuple[ExpertsRef, Neuron, float]], mode: Mode, last: bool
) -> list[Any]:
    """Hook the clamps of `items` (one layer's experts' neurons) on ref.module; the handles."""
    groups = _units_of(ref, items)
    tokens = Tokens(ref.block) if last else None

    def hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor
    ) -> torch.Tensor:
        x, index, weights = _inputs(args, kwargs)  # (T, d), (T, k), (T, k)
        for e, units in groups.items():
            token, slot = _routed(e, index)
            rows = None  # the tokens to edit among those routed to e: all of them
            if tokens is not None and not tokens.all_last:
                rows = tokens.is_last(index.shape[0], index.device)[token]
            if token.numel() == 0 or (rows is not None and not rows.any()):
                continue
            g, u = units.activations(x[token])  # (n, k) each
            a = _act(module, g, u)
            if units.pre:  # gate or up edited: the activation they give
                g, u = units.apply("gate", mode, g, rows), units.apply("up", mode, u, rows)
                a2 = units.apply("act", mode, _act(module, g, u), rows)
            else:
                a2 = units.apply("act", mode, a, rows)
            delta = (a2 - a) * weights[token, slot].float()[:, None]  # (n, k)
            change = (delta @ units.W_down).to(out.dtype)  # (n, d_model)
            if torch.is_grad_enabled():  # an autograd graph may hold the output
                out = out.index_add(0, token, change)
            else:
                out.index_add_(0, token, change)
        return out

    handles = [ref.module.register_forward_hook(hook, with_kwargs=True)]
    return handles + ([tokens.handle] if tokens else [])


def install_record(
    ref: ExpertsRef, items: Sequence[tuple[ExpertsRef, Neuron]], take: Take
) -> list[Any]:
    """Hook a read-only recording of `items`: take(neuron, (batch, seq) fp32) per forward, NaN
    on the tokens the neuron's expert does not run on."""
    by_expert: dict[int, list[tuple[Site, int, Neuron]]] = {}
    for r, n in items:
        e, i = ref.unit(n)
        by_expert.setdefault(e, []).append((r.site, i, n))
    groups = {
        e: _Units(ref.module, e, sorted({i for _, i, _ in entries}))
        for e, entries in by_expert.items()
    }
    tokens = Tokens(ref.block)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        x, index, _ = _inputs(args, kwargs)
        T = x.shape[0]
        shape = tokens.shape or (1, T)
        for e, entries in by_expert.items():
            units = groups[e]
            token, _ = _routed(e, index)
            g, u = units.activations(x[token])  # (n, k) each
            by_site = {"gate": g, "up": u, "act": _act(module, g, u)}
            for site, i, n in entries:
                full = torch.full((T,), float("nan"))
                full[token.cpu()] = by_site[site][:, units.units.index(i)].detach().cpu()
                take(n, full.view(shape))

    return [ref.module.register_forward_hook(hook, with_kwargs=True), tokens.handle]
