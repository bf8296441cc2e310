"""The pilot: before a low-precision map, the engine is checked on the model's own neurons.

A bf16 GEMM moves each logit by up to half a bf16 step (an int8 one, by the rounding of its
operands). Over most heads these errors average
out in the logsumexp, but near-identical head rows (untrained or reserved tokens, for example)
round alike, and when such a group carries probability its error adds up: on the real
stories260K stored in bf16, probabilities end up to 3% off (see bench/RESULTS.md). So before
it maps in low precision, `map` decodes a seeded sample of PILOT neurons both with the engine
and exactly in fp32, and then:

1. every pilot neuron is within MARGIN of issue 2's tolerances: the GEMM is used as it is;
2. otherwise the groups of near-identical head rows (`twin_tokens`) among the tokens that
   carry those neurons' probability are computed exactly in every block
   (`Decoder.set_exact_tokens`), and a second, fresh sample must then be within MARGIN;
3. otherwise `--dtype auto` steps down to the next more precise dtype (int8 -> bf16 -> fp32,
   policy.fallback_dtype), whose own pilot decides again; an explicit dtype is kept, and the
   report says so.

The report goes in the map's summary and atlas.json (`pilot`); the audit after the map still
checks the atlas itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .audit import Errors, compare, exact_reference
from .engine import BlockResult, Decoder
from .policy import dtype_label
from .slices import float_rows

PILOT = 64  # neurons per pilot sample
MARGIN = 0.5  # a pilot neuron passes within this fraction of each tolerance
TWIN_COS = 0.9  # cosine of mean-centred head rows above which two rows are near-identical
MIN_GROUP = 8  # rows in a group worth computing exactly
MASS = 1e-4  # a token is examined if it holds this probability in some pilot neuron
MAX_EXAMINED = 4096  # most probable tokens examined for groups
MAX_EXACT = 8192  # exact tokens at most (more: the fix would cost too much; fall back)


@dataclass
class PilotReport:
    """What the pilot measured and decided."""

    dtype: str  # the compute dtype checked
    sample: int  # neurons in the first sample
    over: int  # of them outside MARGIN of the tolerances with the plain GEMM
    max_rel_prob: float  # worst probability error with the plain GEMM
    # "gemm", "exact tokens", "kept" (explicit dtype, failing), or the dtype auto steps down
    # to ("bfloat16", "float32")
    decision: str
    exact_tokens: int = 0  # tokens computed exactly in every block
    check_over: int | None = None  # the second sample, with the exact tokens
    check_max_rel_prob: float | None = None

    @property
    def steps_down(self) -> bool:
        return self.decision not in ("gemm", "exact tokens", "kept")

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "margin": MARGIN}


def pilot_errors(decoder: Decoder, w: Tensor, block: int) -> tuple[Errors, Tensor]:
    """Errors of the engine on raw neuron vectors w (n, d_model), and the exact logits (n, V).

    The rows are decoded in blocks of `block` rows (zero-padded), as the map decodes them."""
    r = BlockResult.cat(
        [decoder.decode_padded(w[lo : lo + block], block) for lo in range(0, len(w), block)]
    )
    ref = exact_reference(w, decoder.W_U, decoder.readout, decoder.norm, decoder.softcap)
    return compare(ref, r.top_ids, r.top_logits, r.top_probs, r.logsumexp), ref


def twin_tokens(W_U: Tensor, mean: Tensor, ref: Tensor) -> Tensor:
    """Token ids (K,) in groups of near-identical head rows that carry probability.

    W_U: (V, d_model) head; mean: (d_model,) its mean row; ref: (n, V) exact logits of the
    neurons that showed the error.
    Rows are compared after removing the head's mean row (a direction every logit shares
    shifts all of them alike and does not correlate their rounding). Examined: the tokens
    holding at least MASS of some neuron's probability; grouped: those with at least
    MIN_GROUP - 1 others above TWIN_COS, joined through such neighbours; then every token of
    the vocabulary as close to a group's centroid as its loosest member joins that group."""
    p_max = torch.softmax(ref, 1).amax(0)  # (V,)
    held = (p_max >= MASS).nonzero().squeeze(1)
    examined = held[p_max[held].argsort(descending=True)[:MAX_EXAMINED]]
    U = _unit(W_U.index_select(0, examined.to(W_U.device)).float() - mean)  # (T, d)
    near = (U @ U.T) > TWIN_COS  # (T, T)
    core = (near.sum(1) - 1) >= MIN_GROUP - 1
    if not core.any():
        return torch.empty(0, dtype=torch.int64)
    labels = _components(near[core][:, core])
    members, U_core = examined[core.cpu()], U[core]  # (G,), (G, d)
    found = []
    for g in labels.unique():
        group = (labels == g).nonzero().squeeze(1)
        if group.numel() < MIN_GROUP:
            continue
        rows = U_core[group.to(U.device)]
        c = _unit(rows.mean(0, keepdim=True))[0]
        floor = float((rows @ c).min())
        found.append(_near_centroid(W_U, mean, c, floor))
        found.append(members[group])
    if not found:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat([f.cpu() for f in found]).unique()


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def _components(adj: Tensor) -> Tensor:
    """Connected-component labels (n,) of a symmetric boolean adjacency (n, n): each node
    takes the smallest index it reaches."""
    n = adj.shape[0]
    labels = torch.arange(n, dtype=torch.int32, device=adj.device)
    big = torch.full((n, n), n, dtype=torch.int32, device=adj.device)
    while True:
        new = torch.where(adj, labels[None, :], big).amin(1).minimum(labels)
        if torch.equal(new, labels):
            return labels.cpu()
        labels = new


def _near_centroid(W_U: Tensor, mean: Tensor, c: Tensor, floor: float, rows: int = 2048) -> Tensor:
    """Token ids whose centred, normalised head row has cosine >= floor with unit vector c."""
    out = []
    for lo, part in float_rows(W_U, rows):
        cos = _unit(part.sub_(mean)) @ c
        out.append((cos >= floor).nonzero().squeeze(1) + lo)
    return torch.cat(out)


def run_pilot(
    decoder: Decoder,
    first: Tensor,
    second: Callable[[], Tensor],
    block: int,
    fallback: str | None,
) -> PilotReport:
    """Check `decoder` (low precision) on raw neuron vectors `first` (n, d_model); on failure,
    set its exact tokens and check again on the fresh sample that `second()` reads. Decides as
    the module docstring says. `fallback`: the dtype --dtype auto would step down to (the
    decision then names it: the caller maps in it instead); None for an explicit dtype, which
    is kept."""
    errors, ref = pilot_errors(decoder, first, block)
    bad = errors.over(MARGIN)
    report = PilotReport(
        dtype=dtype_label(decoder.dtype),
        sample=first.shape[0],
        over=int(bad.sum()),
        max_rel_prob=float(errors.rel_prob.max()),
        decision="gemm",
    )
    if not bad.any():
        return report
    twins = twin_tokens(decoder.W_U, decoder.mean_u, ref[bad])
    if 0 < twins.numel() <= MAX_EXACT:
        decoder.set_exact_tokens(twins)
        check, _ = pilot_errors(decoder, second(), block)
        report.exact_tokens = int(twins.numel())
        report.check_over = int(check.over(MARGIN).sum())
        report.check_max_rel_prob = float(check.rel_prob.max())
        if report.check_over == 0:
            report.decision = "exact tokens"
            return report
    # auto: the caller steps down; an explicit dtype keeps the exact tokens, if any (their
    # mass is exact instead of rounded: never further off)
    report.decision = fallback or "kept"
    return report
