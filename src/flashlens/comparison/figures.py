"""Per-neuron agreement figures computable from two atlases alone (their top-k lists).

For one neuron decoded by model A and by model B, the atlases hold the top-k token ids and
probabilities of each, p_A and p_B (sorted, best first). From these alone:

    same_top1   ids_A[0] == ids_B[0]
    jaccard     |K_A ∩ K_B| / |K_A ∪ K_B|, K = the set of top-k ids
    tv_lo/hi    bounds on the total-variation distance TV = ½ Σ_t |p_A(t) - p_B(t)| over the
                full vocabulary, using only what the atlases prove: a token outside a list has
                a probability between 0 and that list's k-th probability.

Bounds (all sums run over the stated token sets; x⁺ = max(x, 0)):
    TV = Σ_t (p_A(t) - p_B(t))⁺ = Σ_t (p_B(t) - p_A(t))⁺ over all tokens, hence
    tv_lo = max over X in {A, B} of  Σ_{t∈K_X∩K_Y} (p_X(t) - p_Y(t))⁺ + Σ_{t∈U_X} p_X(t)
                                   - min(r_Y, Σ_{t∈U_X} min(p_X(t), k-th p_Y)),
            U_X = K_X∖K_Y (X's tokens Y does not list),
            r_Y = 1 - Σ_{K_Y} p_Y (Y's mass outside its list, spread over tokens of at most its
            k-th probability: the least (p_X - p_Y)⁺ those tokens can have);
    tv_hi = min over X of  Σ_{t∈K_X} (p_X(t) - lo_Y(t))⁺                 (lo_Y: p_Y(t) or 0)
                         + min(r_X,                                        (X's mass outside K_X)
                               Σ_{t∈K_Y∖K_X} (k-th p_X - p_Y(t))⁺ + (V - |K_A ∪ K_B|) · k-th p_X)
    and 0 ≤ tv_lo ≤ TV ≤ tv_hi ≤ 1 (up to the fp32 rounding of the stored probabilities, ~1e-6).
    When the lists hold all of the mass both bounds equal TV; the interval is tight when the
    top-k lists carry most of the mass, loose when the distributions are flat (then the exact
    distance needs the weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class TopKFigures:
    """Per-neuron figures of one layer, n = neurons."""

    same_top1: NDArray[np.bool_]  # (n,)
    jaccard: NDArray[np.float64]  # (n,) in [0, 1]
    tv_lo: NDArray[np.float64]  # (n,) lower bound on the total-variation distance
    tv_hi: NDArray[np.float64]  # (n,) upper bound


def topk_figures(
    ids_a: NDArray[np.integer],  # (n, k) top-k token ids of A, best first
    p_a: NDArray[np.floating],  # (n, k) their probabilities
    ids_b: NDArray[np.integer],  # (n, k)
    p_b: NDArray[np.floating],  # (n, k)
    d_vocab: int,
) -> TopKFigures:
    if ids_a.shape != ids_b.shape or p_a.shape != ids_a.shape or p_b.shape != ids_b.shape:
        raise ValueError(f"top-k shapes differ: {ids_a.shape} vs {ids_b.shape}")
    k = ids_a.shape[1]
    pa, pb = p_a.astype(np.float64), p_b.astype(np.float64)
    match = ids_a[:, :, None] == ids_b[:, None, :]  # (n, k, k): A's i-th token is B's j-th
    b_knows = match.any(2)  # (n, k) A's i-th token is in B's list
    a_knows = match.any(1)  # (n, k) B's j-th token is in A's list
    pb_at_a = (match * pb[:, None, :]).sum(2)  # (n, k) p_B of A's tokens (0 where unknown)
    pa_at_b = (match * pa[:, :, None]).sum(1)  # (n, k) p_A of B's tokens
    n_common = b_knows.sum(1)  # (n,)
    n_union = 2 * k - n_common
    kth_a, kth_b = pa[:, -1:], pb[:, -1:]  # (n, 1) the k-th (smallest listed) probability

    rest_a = np.clip(1.0 - pa.sum(1), 0, None)  # (n,) mass outside each top-k list
    rest_b = np.clip(1.0 - pb.sum(1), 0, None)

    def lower(px, py_at_x, y_knows_x, kth_y, rest_y):  # type: ignore[no-untyped-def]
        known = np.where(y_knows_x, np.clip(px - py_at_x, 0, None), 0.0).sum(1)
        # X's tokens Y does not list: each has p_Y <= Y's k-th, all together <= Y's rest.
        unknown = np.where(y_knows_x, 0.0, px)
        absorbed = np.minimum(rest_y, np.minimum(unknown, kth_y).sum(1))
        return known + unknown.sum(1) - absorbed

    lo = np.maximum(
        lower(pa, pb_at_a, b_knows, kth_b, rest_b), lower(pb, pa_at_b, a_knows, kth_a, rest_a)
    )

    def upper(px, py_at_x, kth_x, rest_x, py, x_knows_y):  # type: ignore[no-untyped-def]
        listed = np.clip(px - py_at_x, 0, None).sum(1)  # tokens of K_X, p_Y at least py_at_x
        room = (
            np.where(x_knows_y, 0.0, np.clip(kth_x - py, 0, None)).sum(1)
            + (d_vocab - n_union) * kth_x[:, 0]
        )
        return listed + np.minimum(rest_x, room)

    hi = np.minimum(
        upper(pa, pb_at_a, kth_a, rest_a, pb, a_knows),
        upper(pb, pa_at_b, kth_b, rest_b, pa, b_knows),
    )
    return TopKFigures(
        same_top1=ids_a[:, 0] == ids_b[:, 0],
        jaccard=n_common / n_union,
        tv_lo=np.clip(lo, 0.0, 1.0),
        tv_hi=np.clip(hi, 0.0, 1.0),
    )
