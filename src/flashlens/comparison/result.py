"""The result of a comparison: per-neuron figures and their means by matrix, by layer, overall."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..atlas.tokens import readable
from ..errors import FlashlensError

EXACT = (
    "jsd: exact Jensen-Shannon divergence (bits, 0-1) between the two full decoded "
    "distributions, computed from both models' weights; tv: exact total-variation distance"
)
BOUNDS = (
    "tv_lo/tv_hi: bounds on the total-variation distance proved by the atlases' top-k "
    "lists alone (unlisted tokens have at most the list's k-th probability); the exact "
    "distance needs both models' weights"
)


def percent(share: float) -> str:
    """A share as a percentage with one decimal, or more where that would round a share
    below 1 up to 100.0% (one changed neuron in thousands must show)."""
    if not math.isfinite(share):
        return "n/a"
    for digits in (1, 2, 3):
        text = f"{100 * share:.{digits}f}%"
        if share >= 1 or float(text[:-1]) < 100:
            return text
    return ">99.999%"


@dataclass(frozen=True)
class Figures:
    """Agreement of a set of neurons (a layer, a matrix, or all), as means over its neurons."""

    neurons: int
    same_top1: float  # share of neurons whose top-1 token is the same in A and B
    jaccard: float  # mean Jaccard overlap of the two top-k token sets
    tv_lo: float  # mean lower bound on the total-variation distance (from the atlases)
    tv_hi: float  # mean upper bound
    jsd: float | None  # mean exact Jensen-Shannon divergence, bits (None: no weights)
    tv: float | None  # mean exact total-variation distance (None: no weights)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class NeuronTable:
    """One row per compared neuron (n rows), columns as arrays."""

    matrix: NDArray[np.str_]  # (n,)
    layer: NDArray[np.int64]  # (n,)
    index: NDArray[np.int64]  # (n,)
    same_top1: NDArray[np.bool_]  # (n,)
    jaccard: NDArray[np.float64]  # (n,)
    tv_lo: NDArray[np.float64]  # (n,)
    tv_hi: NDArray[np.float64]  # (n,)
    jsd: NDArray[np.float64]  # (n,) NaN without weights
    tv: NDArray[np.float64]  # (n,) NaN without weights
    top_ids_a: NDArray[np.int32]  # (n, k)
    top_probs_a: NDArray[np.float32]  # (n, k)
    top_ids_b: NDArray[np.int32]  # (n, k)
    top_probs_b: NDArray[np.float32]  # (n, k)

    @classmethod
    def concat(cls, parts: list[NeuronTable]) -> NeuronTable:
        return cls(
            **{f: np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__}
        )

    def __len__(self) -> int:
        return len(self.index)


@dataclass
class Comparison:
    """Model A against model B, neuron by neuron (`flashlens.compare(a, b)`)."""

    atlas_a: str
    atlas_b: str
    model_a: str
    model_b: str
    matrices: list[str]
    layers: list[int]
    top_k: int
    exact: bool  # jsd/tv were computed from the weights
    neurons: NeuronTable
    texts: list[str]  # decoded text of every token id (shared vocabulary)
    tokens: list[str]  # tokenizer form of every token id (e.g. <0xE2>)
    notes: list[str] = field(default_factory=list)

    @property
    def distance(self) -> str:
        """The distance the ranking uses: 'jsd' (exact) or 'tv_lo' (atlas bound)."""
        return "jsd" if self.exact else "tv_lo"

    # --- figures -----------------------------------------------------------------------------
    def figures(self, matrix: str | None = None, layer: int | None = None) -> Figures:
        """Mean figures over all neurons, one matrix, one layer of all matrices, or one layer."""
        t = self.neurons
        mask = np.ones(len(t), dtype=bool)
        if matrix is not None:
            mask &= t.matrix == matrix
        if layer is not None:
            mask &= t.layer == layer
        n = int(mask.sum())
        if n == 0:
            raise KeyError(f"no compared neurons for matrix={matrix} layer={layer}")

        def mean(x: NDArray[Any]) -> float:  # over the neurons where x is defined (not NaN)
            v = x[mask]
            v = v[~np.isnan(v)] if v.dtype.kind == "f" else v
            return float(v.mean()) if len(v) else math.nan

        return Figures(
            neurons=n,
            same_top1=mean(t.same_top1),
            jaccard=mean(t.jaccard),
            tv_lo=mean(t.tv_lo),
            tv_hi=mean(t.tv_hi),
            jsd=mean(t.jsd) if self.exact else None,
            tv=mean(t.tv) if self.exact else None,
        )

    def by_layer(self) -> list[dict[str, Any]]:
        return [
            {"matrix": m, "layer": x, **self.figures(m, x).to_dict()}
            for m in self.matrices
            for x in self.layers
        ]

    def by_matrix(self) -> dict[str, Figures]:
        return {m: self.figures(m) for m in self.matrices}

    # --- neurons -----------------------------------------------------------------------------
    def changed(self, limit: int | None = 20, matrix: str | None = None) -> list[dict[str, Any]]:
        """Neurons that moved most: by exact JSD, else by the TV lower bound; then Jaccard."""
        return self._ranked(limit, matrix, most=True)

    def unchanged(self, limit: int | None = 20, matrix: str | None = None) -> list[dict[str, Any]]:
        """Neurons that moved least (same ordering, reversed)."""
        return self._ranked(limit, matrix, most=False)

    def _ranked(self, limit: int | None, matrix: str | None, most: bool) -> list[dict[str, Any]]:
        if limit is not None and limit < 0:
            raise FlashlensError(f"limit must be 0 (all) or a number of neurons, not {limit}")
        t = self.neurons
        score = t.jsd if self.exact else t.tv_lo
        sign = -1.0 if most else 1.0
        # lexsort: last key is primary; stable, so ties keep (matrix, layer, index) order
        order = np.lexsort((-sign * t.jaccard, sign * score))
        if matrix is not None:
            order = order[t.matrix[order] == matrix]
        if limit:
            order = order[:limit]
        return [self.neuron(int(i)) for i in order]

    def neuron(self, row: int) -> dict[str, Any]:
        """One row of the neuron table with its top tokens before (A) and after (B)."""
        t = self.neurons

        def tokens(ids: NDArray[Any], probs: NDArray[Any]) -> list[dict[str, Any]]:
            return [
                {
                    "token_id": int(i),
                    "token": self.tokens[int(i)],
                    "text": self.texts[int(i)],
                    "prob": float(p),
                }
                for i, p in zip(ids, probs, strict=True)
            ]

        return {
            "matrix": str(t.matrix[row]),
            "layer": int(t.layer[row]),
            "index": int(t.index[row]),
            "same_top1": bool(t.same_top1[row]),
            "jaccard": float(t.jaccard[row]),
            "tv_lo": float(t.tv_lo[row]),
            "tv_hi": float(t.tv_hi[row]),
            "jsd": _opt(t.jsd[row]),
            "tv": _opt(t.tv[row]),
            "top_a": tokens(t.top_ids_a[row], t.top_probs_a[row]),
            "top_b": tokens(t.top_ids_b[row], t.top_probs_b[row]),
        }

    # --- output ------------------------------------------------------------------------------
    def to_dict(self, neurons: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "a": {"atlas": self.atlas_a, "model": self.model_a},
            "b": {"atlas": self.atlas_b, "model": self.model_b},
            "top_k": self.top_k,
            "distance": {
                "exact": self.exact,
                "ranking": self.distance,
                "meaning": (EXACT + "; ") * self.exact + BOUNDS,
            },
            "notes": self.notes,
            "overall": self.figures().to_dict(),
            "matrices": {m: f.to_dict() for m, f in self.by_matrix().items()},
            "layers": self.by_layer(),
        }
        if neurons is not None:
            out["neurons"] = neurons
        return out

    def layers_csv(self) -> str:
        rows = self.by_layer() + [
            {"matrix": m, "layer": "all", **f.to_dict()} for m, f in self.by_matrix().items()
        ]
        rows.append({"matrix": "all", "layer": "all", **self.figures().to_dict()})
        return _csv(rows)

    def neurons_csv(self, neurons: list[dict[str, Any]]) -> str:
        rows = []
        for n in neurons:
            row = {k: v for k, v in n.items() if k not in ("top_a", "top_b")}
            for side in ("top_a", "top_b"):  # a JSON list in one cell, as `search --csv`
                shown = [readable(t["text"], t["token"]) for t in n[side]]
                row[side] = json.dumps(shown, ensure_ascii=False)
            rows.append(row)
        return _csv(rows)


def _opt(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return buf.getvalue()
