"""Dose-response: the concept's next-token probability as a function of the clamp value."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .hooks import Mode, NeuronsLike, Positions, as_neurons, clamp, clamp_sites, record
from .neuron import Neuron, Site
from .prompts import next_token_probs

# Default clamp values, in units of the neurons' largest natural |activation| on the prompts.
# Both signs: in a gated MLP act = act_fn(gate) * up, and act_fn(gate) is often negative, so
# an up neuron may need a negative clamp to write its decoded direction.
DEFAULT_MULTIPLES = (-20.0, -10.0, -5.0, -2.0, 0.0, 2.0, 5.0, 10.0, 20.0)
DEFAULT_SCALES = (-10.0, -5.0, -2.0, 0.0, 2.0, 5.0, 10.0)


@dataclass(frozen=True)
class ActivationRange:
    """A neuron's activation at its clamp site over the prompts' real tokens."""

    min: float
    max: float
    absmax: float
    # mean at the last prompt position (where the next token is predicted); None where the
    # neuron ran on no prompt's last position (an expert no such token was routed to)
    next_mean: float | None
    # real tokens the neuron ran on, of `total`: all of them in a dense MLP; in a mixture of
    # experts the tokens routed to its expert (0: min, max and absmax are 0)
    tokens: int
    total: int


@dataclass
class DoseResponse:
    """Concept probability at the next position, mean over prompts, unclamped and per value."""

    neurons: list[str]  # "up:12:1234"
    concept_ids: list[int]
    mode: str
    positions: str
    n_prompts: int
    baseline: float
    values: list[float]
    probs: list[float]
    ranges: dict[str, ActivationRange]  # at each neuron's clamp site
    site: str | None = None  # the site asked for; None: each neuron's default (by matrix)
    sites: dict[str, str] = field(default_factory=dict)  # where each neuron's clamp acted

    @property
    def ratios(self) -> list[float]:
        return [p / self.baseline if self.baseline > 0 else float("inf") for p in self.probs]

    def best(self) -> tuple[float, float, float]:
        """(value, prob, ratio) at the value that raises the concept most."""
        i = max(range(len(self.probs)), key=self.probs.__getitem__)
        return self.values[i], self.probs[i], self.ratios[i]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratios"] = self.ratios
        value, prob, ratio = self.best()
        data["best"] = {"value": value, "prob": prob, "ratio": ratio}
        return data


def concept_prob(model: Any, batch: dict[str, torch.Tensor], concept_ids: Sequence[int]) -> float:
    """P(next token is one of concept_ids), averaged over the batch's prompts."""
    probs = next_token_probs(model, batch)  # (batch, d_vocab)
    ids = torch.tensor(list(concept_ids), device=probs.device)
    return float(probs[:, ids].sum(-1).double().mean())


@torch.no_grad()
def activation_ranges(
    model: Any, batch: dict[str, torch.Tensor], neurons: NeuronsLike, site: Site | None = None
) -> dict[Neuron, ActivationRange]:
    """Each neuron's natural activation range on the batch (padding excluded)."""
    chosen = as_neurons(neurons)
    with record(model, chosen, site) as seen:
        model(**batch, use_cache=False, logits_to_keep=1)
    real = batch["attention_mask"].bool().cpu()  # (batch, seq)
    out = {}
    for n in chosen:
        # (batch, seq); NaN where an expert's neuron did not run. A model may run only the
        # last positions through a layer (Gemma 4's layers that reuse earlier layers' keys and
        # values, under logits_to_keep=1): then (batch, those positions)
        acts = seen[n][0]
        vals = acts[real[:, real.shape[1] - acts.shape[1] :] & ~acts.isnan()]
        last = acts[:, -1][~acts[:, -1].isnan()]
        lo, hi = (float(vals.min()), float(vals.max())) if len(vals) else (0.0, 0.0)
        out[n] = ActivationRange(
            lo,
            hi,
            max(abs(lo), abs(hi)),
            float(last.mean()) if len(last) else None,
            tokens=len(vals),
            total=int(real.sum()),
        )
    return out


def default_values(
    mode: str, ranges: dict[Neuron, ActivationRange], multiples: Sequence[float] = DEFAULT_MULTIPLES
) -> list[float]:
    """Clamp values: `multiples` of the neurons' largest natural |activation| (scale mode:
    plain factors)."""
    if mode == "scale":
        return list(DEFAULT_SCALES)
    unit = max((r.absmax for r in ranges.values()), default=1.0) or 1.0  # a dead neuron: 1
    return [round(m * unit, 4) for m in multiples]


def clamped_probs(
    model: Any,
    batch: dict[str, torch.Tensor],
    neurons: NeuronsLike,
    concept_ids: Sequence[int],
    values: Sequence[float],
    mode: Mode = "set",
    positions: Positions = "all",
    site: Site | None = None,
    advance: Callable[[], None] | None = None,
) -> list[float]:
    """The concept's mean next-token probability with `neurons` clamped at each value."""
    probs = []
    for v in values:
        with clamp(model, neurons, value=v, mode=mode, positions=positions, site=site):
            probs.append(concept_prob(model, batch, concept_ids))
        if advance:
            advance()
    return probs


def dose_response(
    model: Any,
    batch: dict[str, torch.Tensor],
    neurons: NeuronsLike,
    concept_ids: Sequence[int],
    values: Sequence[float] | None = None,
    mode: Mode = "set",
    positions: Positions = "all",
    site: Site | None = None,
    advance: Callable[[], None] | None = None,
) -> DoseResponse:
    """Clamp `neurons` (all together) at each value and measure the concept's probability.

    values: None for `default_values` (multiples of the largest natural |activation|).
    advance: called once per forward pass (for a progress bar).
    """
    chosen = as_neurons(neurons)
    ranges = activation_ranges(model, batch, chosen, site)
    values = list(values) if values is not None else default_values(mode, ranges)
    baseline = concept_prob(model, batch, concept_ids)
    if advance:
        advance()
    probs = clamped_probs(model, batch, chosen, concept_ids, values, mode, positions, site, advance)
    return DoseResponse(
        neurons=[str(n) for n in chosen],
        concept_ids=list(concept_ids),
        mode=mode,
        positions=positions,
        n_prompts=int(batch["input_ids"].shape[0]),
        baseline=baseline,
        values=[float(v) for v in values],
        probs=probs,
        ranges={str(n): r for n, r in ranges.items()},
        site=site,
        sites=dict(clamp_sites(chosen, site)),
    )


# The x axis of a dose-response plot, by mode: what the clamp value is.
X_LABELS = {
    "set": "clamp value: the activation set (activation units)",
    "add": "shift added to the activation (activation units)",
    "scale": "factor multiplying the activation",
}


def dose_figure(dose: DoseResponse, title: str) -> Any:
    """A matplotlib figure of the concept's probability against the clamp value, baseline
    dashed; in set mode (where the x axis is an activation) each neuron's natural range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    order = sorted(range(len(dose.values)), key=dose.values.__getitem__)
    ax.plot(
        [dose.values[i] for i in order],
        [dose.probs[i] for i in order],
        "o-",
        label=f"clamped ({dose.mode})",
    )
    ax.axhline(dose.baseline, color="grey", linestyle="--", label="unclamped")
    shade = dose.mode == "set"  # add: the axis is a shift; scale: a factor
    for r in dose.ranges.values() if shade else ():
        if r.tokens:
            ax.axvspan(r.min, r.max, color="tab:green", alpha=0.12)
    ax.set_xlabel(X_LABELS[dose.mode])
    ax.set_ylabel(f"P(concept) at next token, mean of {dose.n_prompts} prompts")
    ax.set_title(title)
    ax.legend(title="shaded: natural range" if shade else None)
    fig.tight_layout()
    return fig


def plot_dose(dose: DoseResponse, path: str, title: str) -> None:
    """A PNG of `dose_figure`."""
    import matplotlib.pyplot as plt

    fig = dose_figure(dose, title)
    fig.savefig(path)
    plt.close(fig)
