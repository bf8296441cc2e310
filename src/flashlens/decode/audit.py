"""The accuracy audit: a sample of a map's neurons decoded again exactly, and compared.

The engine computes in low precision where that is fast and corrects what it can (exact fp32
rescoring of the top candidates and of their share of the logsumexp), but the rest of the
vocabulary stays in the GEMM's precision: how far that moves the probabilities depends on the
model's head (near-identical rows, such as untrained reserved tokens, round alike and do not
average out). So every map checks itself on its own model: `map` keeps a seeded sample of the
neurons it decodes, decodes them again over the whole vocabulary in fp32 (the head in slices,
so no fp32 copy of it is made), and compares the atlas records with issue 2's tolerances:
identical top-1 except where the fp32 top-2 logits are within TOP1_TIE, top-k logits within
REL_LOGIT relative, probabilities within REL_PROB relative: each stored value against its
token's exact value, and against the exact value at its rank (so a true top-k token missing
from the list counts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .norm import NormMode, Readout, apply_final_norm, head_tail
from .slices import float_rows

TOP1_TIE = 1e-3
REL_LOGIT = 1e-3
REL_PROB = 0.01
LOGIT_FLOOR = 0.1  # |logit| below this: the logit error is taken relative to 0.1 (1e-4 abs.)
PROB_FLOOR = 1e-5  # likewise for probabilities (1e-7 absolute)
SLICE = 2048  # head rows converted to fp32 at a time (decode.slices)


@dataclass
class Audit:
    """How a sample of decoded neurons compares with an exact fp32 decode."""

    sample: int  # neurons checked
    top1_mismatch: int  # top-1 differs where the fp32 top-2 are not tied
    over_tolerance: int  # neurons outside any of the tolerances
    max_rel_logit: float  # over the top-k logits of the sample
    max_rel_prob: float  # over the top-k probabilities
    max_abs_logsumexp: float
    compute_dtype: str

    @property
    def ok(self) -> bool:
        return self.over_tolerance == 0

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "ok": self.ok, "reference": "fp32"}


class AuditSample:
    """The neurons a map audits: `n` (job, row) pairs drawn with a fixed seed, and what the
    engine gave for them. Jobs are the map's (matrix, layer) units, mapped in order."""

    def __init__(self, widths: Sequence[int], n: int, seed: int = 0) -> None:
        # widths: each job's neurons; the neurons of all jobs are numbered one after another
        ends = torch.tensor(widths, dtype=torch.int64).cumsum(0)  # (n_jobs,)
        total = int(ends[-1]) if len(widths) else 0
        g = torch.Generator().manual_seed(seed)
        picks = torch.randperm(total, generator=g)[: min(n, total)].sort().values
        job_of = torch.searchsorted(ends, picks, right=True)
        starts = ends - torch.tensor(widths, dtype=torch.int64)
        self._rows = {j: picks[job_of == j] - starts[j] for j in job_of.unique().tolist()}
        self.w: list[Tensor] = []  # (n_i, d_model) raw weight vectors
        self.top_ids: list[Tensor] = []  # (n_i, k)
        self.top_logits: list[Tensor] = []
        self.top_probs: list[Tensor] = []
        self.lse: list[Tensor] = []  # (n_i,)

    def rows(self, job: int) -> Tensor:
        """Rows of job `job` in the sample (possibly none)."""
        return self._rows.get(job, torch.empty(0, dtype=torch.int64))

    def add(
        self,
        w: Tensor,
        top_ids: Tensor,
        top_logits: Tensor,
        top_probs: Tensor,
        lse: Tensor,
    ) -> None:
        """Record sampled neurons: raw vectors w (n_i, d) and the engine's results for them."""
        self.w.append(w.detach().float().cpu())
        self.top_ids.append(top_ids.long())
        self.top_logits.append(top_logits.double())
        self.top_probs.append(top_probs.double())
        self.lse.append(lse.double())

    def __len__(self) -> int:
        return sum(w.shape[0] for w in self.w)


def exact_decode(
    W_U: Tensor,
    x: Tensor,
    softcap: float | None = None,
    logit_bias: Tensor | None = None,
) -> Tensor:
    """fp32 logits (n, V) of normed vectors x (n, d) against W_U (V, d) of any dtype, with the
    head converted to fp32 SLICE rows at a time, through one reused buffer."""
    n, V = x.shape[0], W_U.shape[0]
    x = x.to(W_U.device, torch.float32)
    out = torch.empty((n, V), dtype=torch.float32, device=W_U.device)
    for lo, part in float_rows(W_U, SLICE):
        out[:, lo : lo + SLICE] = x @ part.T
    bias = None if logit_bias is None else logit_bias.to(out.device)  # (V,), times the scale
    return head_tail(out, bias, softcap)


@dataclass
class Errors:
    """Per-neuron errors of decoded records against exact logits; each (n,)."""

    mismatch: Tensor  # bool: top-1 differs where the exact top-2 are not tied
    rel_logit: Tensor  # worst over the top-k logits, relative (LOGIT_FLOOR near zero)
    rel_prob: Tensor  # worst over the top-k probabilities, relative (PROB_FLOOR near zero)
    abs_lse: Tensor

    def over(self, fraction: float = 1.0) -> Tensor:
        """bool (n,): neurons outside `fraction` of the tolerances (or with a wrong top-1)."""
        return (
            self.mismatch
            | (self.rel_logit > fraction * REL_LOGIT)
            | (self.rel_prob > fraction * REL_PROB)
        )


def compare(
    ref: Tensor,  # (n, V) exact logits, fp64
    ids: Tensor,  # (n, k) the records' top-k token ids
    logits: Tensor,  # (n, k)
    probs: Tensor,  # (n, k)
    lse: Tensor,  # (n,)
) -> Errors:
    """How far decoded records are from exact logits `ref`, neuron by neuron."""
    ref_lse = torch.logsumexp(ref, 1)
    ids = ids.long()
    top2 = ref.topk(min(2, ref.shape[1]), dim=1).values  # (n, 2); one column if V == 1
    tied = (top2[:, 0] - top2[:, -1]) < TOP1_TIE  # (with one column: always tied)
    # Each stored value against the exact value of its own token, and the j-th stored value
    # against the exact j-th best: a true top-k token left out of the list shows in the second
    # (near-ties swap places within the tolerances, and pass).
    ref_logit = ref.gather(1, ids)  # (n, k)
    ref_top = ref.topk(ids.shape[1], dim=1).values  # (n, k) exact, best first
    logits, probs = logits.double(), probs.double()

    def rel(got: Tensor, want: Tensor, floor: float) -> Tensor:
        return ((got - want).abs() / want.abs().clamp_min(floor)).amax(1)

    def prob(logit: Tensor) -> Tensor:
        return torch.exp(logit - ref_lse[:, None])

    return Errors(
        mismatch=(ids[:, 0] != ref.argmax(1)) & ~tied,
        rel_logit=torch.maximum(
            rel(logits, ref_logit, LOGIT_FLOOR), rel(logits, ref_top, LOGIT_FLOOR)
        ),
        rel_prob=torch.maximum(
            rel(probs, prob(ref_logit), PROB_FLOOR), rel(probs, prob(ref_top), PROB_FLOOR)
        ),
        abs_lse=(lse.double() - ref_lse).abs(),
    )


def exact_reference(
    w: Tensor, W_U: Tensor, readout: Readout, norm: NormMode, softcap: float | None
) -> Tensor:
    """Exact fp64 logits (n, V), on the CPU, of raw neuron vectors w (n, d_model)."""
    readout = readout.to(W_U.device)
    x = apply_final_norm(w.to(W_U.device), readout, norm)
    return exact_decode(W_U, x, softcap, readout.scaled_logit_bias).double().cpu()


def run_audit(
    sample: AuditSample,
    W_U: Tensor,  # (V, d_model), stored dtype
    readout: Readout,
    norm: NormMode,
    softcap: float | None,
    compute_dtype: str,
) -> Audit | None:
    """Compare the sampled records with an exact fp32 decode; None for an empty sample."""
    if len(sample) == 0:
        return None
    ref = exact_reference(torch.cat(sample.w), W_U, readout, norm, softcap)  # (n, V)
    ids = torch.cat(sample.top_ids)
    e = compare(
        ref, ids, torch.cat(sample.top_logits), torch.cat(sample.top_probs), torch.cat(sample.lse)
    )
    return Audit(
        sample=len(ids),
        top1_mismatch=int(e.mismatch.sum()),
        over_tolerance=int(e.over().sum()),
        max_rel_logit=float(e.rel_logit.max()),
        max_rel_prob=float(e.rel_prob.max()),
        max_abs_logsumexp=float(e.abs_lse.max()),
        compute_dtype=compute_dtype,
    )
