"""The whole model at a glance: `Atlas.stats()`, per layer and matrix, from the atlas alone.

- top-1 probability and entropy (nats): quantiles 10/25/50/75/90 and the mean;
- the kind of each neuron's top token (see `token_kind`);
- prediction and suppression neurons (Gurnee et al. 2024, "Universal neurons in GPT2 language
  models"): the distribution of a neuron's logits over the vocabulary is heavy-tailed (excess
  kurtosis > KURTOSIS) with a long right tail (skew > SKEW: it promotes a small set of tokens,
  prediction) or left tail (skew < -SKEW: it suppresses a small set, suppression). A neuron whose
  logits are Gaussian over the vocabulary has excess kurtosis 0 and skew 0.

A degenerate neuron (all-zero or non-finite weight vector, `atlas.is_degenerate`) says nothing:
it is counted as kind `degenerate` and left out of the means, quantiles and the prediction and
suppression counts (`skipped` says how many neurons were left out).
"""

from __future__ import annotations

import math
import numbers
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ..errors import FlashlensError
from .query import AtlasDB, degenerate_sql, layer_notes, select

if TYPE_CHECKING:
    from .atlas import Atlas, LayerSpec

KURTOSIS = 10.0  # excess kurtosis above which a neuron's vocabulary logits are heavy-tailed
SKEW = 1.0  # |skew| above which the heavy tail is one-sided
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
# Kinds of a neuron's top token (`token_kind`), and `degenerate` for a neuron whose weight
# vector is all zero or not finite (its "top token" is a tie-break or NaN).
KINDS = ("word", "subword", "number", "punctuation", "whitespace", "byte", "other", "degenerate")
_SINGLE_LETTER_WORDS = {"a", "A", "I"}


def token_kind(token: str, text: str) -> str:
    """word: a leading space then letters (' dog', ' a'); subword: letters with no leading
    space ('ing') or a lone word-start letter (' t'); number: digits; punctuation: symbols only;
    whitespace; byte: byte-fallback, special or undecodable tokens; other: mixed ("'s", ' 3D')."""
    if (token.startswith("<") and token.endswith(">") and len(token) > 2) or "\ufffd" in text:
        return "byte"
    core = text.strip()
    if not core:
        return "whitespace"
    if not core.isprintable():
        return "byte"
    if core.isalpha():
        if text[0].isspace() and (len(core) > 1 or core in _SINGLE_LETTER_WORDS):
            return "word"
        return "subword"
    if core.isdigit():
        return "number"
    if all(unicodedata.category(c)[0] in "PS" for c in core):
        return "punctuation"
    return "other"


class StatsError(FlashlensError):
    """A threshold of `stats` that defines no prediction or suppression neurons."""


def thresholds(kurtosis: object = None, skew: object = None) -> tuple[float, float]:
    """The kurtosis and skew thresholds (None: the defaults), checked: finite numbers, and a
    skew threshold of at least 0 (suppression is skew below minus it)."""
    k = KURTOSIS if kurtosis is None else _finite(kurtosis, "kurtosis")
    s = SKEW if skew is None else _finite(skew, "skew")
    if s < 0:
        raise StatsError(
            f"the skew threshold must be at least 0, not {s:g}: prediction is skew above it "
            "and suppression skew below minus it"
        )
    return k, s


def _finite(value: object, what: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise StatsError(f"the {what} threshold must be a number, e.g. 1.0, not {value!r}")
    if not math.isfinite(value):
        raise StatsError(f"the {what} threshold must be a finite number, not {value}")
    return float(value)


@dataclass
class LayerStats:
    matrix: str
    layer: int
    neurons: int
    skipped: int  # left out of the means, quantiles and pred/supp counts (degenerate neurons)
    top1_prob_mean: float
    top1_prob_q: list[float]  # at QUANTILES
    entropy_mean: float
    entropy_q: list[float]
    kinds: dict[str, int]  # top-token kind -> neurons
    prediction: int
    suppression: int


@dataclass
class AtlasStats:
    kurtosis: float
    skew: float
    quantiles: list[float] = field(default_factory=lambda: list(QUANTILES))
    rows: list[LayerStats] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. layers of a range not in the atlas

    def to_dict(self) -> dict[str, Any]:
        return {
            "thresholds": {
                "kurtosis": self.kurtosis,
                "skew": self.skew,
                "prediction": f"excess kurtosis > {self.kurtosis} and skew > {self.skew}",
                "suppression": f"excess kurtosis > {self.kurtosis} and skew < -{self.skew}",
            },
            "quantiles": self.quantiles,
            "rows": [asdict(r) for r in self.rows],
            "notes": self.notes,
        }


def kinds_table(tokens: list[str], texts: list[str]) -> pa.Table:
    return pa.table(
        {
            "token_id": pa.array(range(len(tokens)), pa.int32()),
            "kind": pa.array(
                [token_kind(t, x) for t, x in zip(tokens, texts, strict=True)], pa.string()
            ),
        }
    )


def atlas_stats(
    atlas: Atlas,
    *,
    matrix: str | None = None,
    layers: LayerSpec | None = None,
    kurtosis: float | None = None,
    skew: float | None = None,
) -> AtlasStats:
    kurtosis, skew = thresholds(kurtosis, skew)
    db = AtlasDB.of(atlas)
    matrices, chosen = select(atlas, matrix, layers)
    files = db.layer_files(matrices, chosen)
    db.register("token_kind", kinds_table(atlas.tokens, atlas.texts))
    kind_cols = ", ".join(["count(*) FILTER (WHERE kind = ?)"] * len(KINDS))
    # ok: a neuron whose statistics count (DuckDB sorts NaN above every number, and NaN > x
    # is true there, so a non-finite value must be filtered, not compared).
    rows = db.rows(
        f"""
        WITH n AS (
            SELECT n.matrix, n.layer, n.top_probs[1] AS top1, n.entropy,
                   n.logit_kurtosis AS kurt, n.logit_skew AS skew,
                   {degenerate_sql("n.w_norm")} AS degenerate, k.kind AS token_kind
            FROM read_parquet(?) n LEFT JOIN token_kind k ON k.token_id = n.top_ids[1]
        ), m AS (
            SELECT *, NOT degenerate AND isfinite(top1) AND isfinite(entropy) AS ok,
                   CASE WHEN degenerate THEN 'degenerate' ELSE token_kind END AS kind
            FROM n
        )
        SELECT matrix, layer, count(*), count(*) FILTER (WHERE NOT ok),
               avg(top1) FILTER (WHERE ok), quantile_cont(top1, ?::DOUBLE[]) FILTER (WHERE ok),
               avg(entropy) FILTER (WHERE ok),
               quantile_cont(entropy, ?::DOUBLE[]) FILTER (WHERE ok),
               count(*) FILTER (WHERE ok AND isfinite(kurt) AND isfinite(skew)
                                AND kurt > ? AND skew > ?),
               count(*) FILTER (WHERE ok AND isfinite(kurt) AND isfinite(skew)
                                AND kurt > ? AND skew < -?),
               {kind_cols}
        FROM m GROUP BY matrix, layer
        """,
        [files, list(QUANTILES), list(QUANTILES), kurtosis, skew, kurtosis, skew, *KINDS],
    )
    order = {m: i for i, m in enumerate(matrices)}
    out = AtlasStats(kurtosis, skew, notes=layer_notes(layers, chosen, "the table shows"))
    for r in sorted(rows, key=lambda r: (order[r[0]], r[1])):
        out.rows.append(
            LayerStats(
                matrix=r[0],
                layer=int(r[1]),
                neurons=int(r[2]),
                skipped=int(r[3]),
                top1_prob_mean=_float(r[4]),
                top1_prob_q=_quantiles(r[5]),
                entropy_mean=_float(r[6]),
                entropy_q=_quantiles(r[7]),
                prediction=int(r[8]),
                suppression=int(r[9]),
                kinds={k: int(v) for k, v in zip(KINDS, r[10:], strict=True)},
            )
        )
    return out


def _float(x: float | None) -> float:
    """NaN for no value (every neuron of the row was skipped)."""
    return math.nan if x is None else float(x)


def _quantiles(q: list[float] | None) -> list[float]:
    return [math.nan] * len(QUANTILES) if q is None else [float(x) for x in q]


def plot_stats(stats: AtlasStats, path: str) -> None:
    """A PNG: per-layer boxes of top-1 prob and entropy per matrix, top-token kinds, and the
    prediction/suppression neuron counts by layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrices = list(dict.fromkeys(r.matrix for r in stats.rows))
    colors = dict(zip(matrices, ("tab:blue", "tab:orange", "tab:green"), strict=False))
    layers = sorted({r.layer for r in stats.rows})
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), constrained_layout=True)
    width = 0.8 / max(1, len(matrices))
    for ax, key, title, unit in (
        (axes[0, 0], "top1_prob_q", "top-1 token probability", "probability"),
        (axes[0, 1], "entropy_q", "entropy of the decoded distribution", "nats"),
    ):
        for j, m in enumerate(matrices):
            rows = [r for r in stats.rows if r.matrix == m]
            boxes = []
            for r in rows:
                q = getattr(r, key)
                boxes.append(
                    {
                        "whislo": q[0],
                        "q1": q[1],
                        "med": q[2],
                        "q3": q[3],
                        "whishi": q[4],
                        "fliers": [],
                        "label": "",
                    }
                )
            pos = [r.layer + (j - (len(matrices) - 1) / 2) * width for r in rows]
            ax.bxp(
                boxes,
                positions=pos,
                widths=width * 0.9,
                patch_artist=True,
                showfliers=False,
                boxprops={"facecolor": colors[m], "alpha": 0.55},
                medianprops={"color": "black"},
                manage_ticks=False,
            )
            ax.plot(pos, [getattr(r, key)[2] for r in rows], color=colors[m], lw=1.2, label=m)
        ax.set_title(f"{title} (boxes: 25-75%, whiskers: 10-90%)")
        ax.set_xlabel("layer")
        ax.set_ylabel(unit)
        ax.legend(title="matrix (median)", fontsize=8, framealpha=0.6)
        _layer_ticks(ax, layers)
    axes[0, 0].set_ylim(bottom=0)
    ax = axes[1, 0]
    for m in matrices:
        rows = [r for r in stats.rows if r.matrix == m]
        x = [r.layer for r in rows]
        ax.plot(
            x, [r.prediction for r in rows], "-o", ms=3, color=colors[m], label=f"{m} prediction"
        )
        ax.plot(
            x, [r.suppression for r in rows], "--s", ms=3, color=colors[m], label=f"{m} suppression"
        )
    ax.set_title(
        f"prediction / suppression neurons (excess kurtosis > {stats.kurtosis:g}, "
        f"skew > {stats.skew:g} / < -{stats.skew:g})"
    )
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, framealpha=0.6)
    _layer_ticks(ax, layers)
    ax = axes[1, 1]
    totals = {k: sum(r.kinds[k] for r in stats.rows) for k in KINDS}
    kinds = [k for k in KINDS if totals[k]]
    for j, m in enumerate(matrices):
        rows = [r for r in stats.rows if r.matrix == m]
        n = sum(r.neurons for r in rows)
        share = [100 * sum(r.kinds[k] for r in rows) / n for k in kinds]
        xs = [i + (j - (len(matrices) - 1) / 2) * width for i in range(len(kinds))]
        ax.bar(xs, share, width=width * 0.9, color=colors[m], label=m)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_title("kind of each neuron's top token (all layers)")
    ax.set_ylabel("% of neurons")
    ax.legend(title="matrix")
    fig.suptitle("flashlens stats", fontsize=13)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _layer_ticks(ax: Any, layers: list[int]) -> None:
    step = max(1, len(layers) // 16)
    ax.set_xticks(layers[::step])
