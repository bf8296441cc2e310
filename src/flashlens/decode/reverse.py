"""The reverse index: for every vocabulary token, the N neurons that give it the most probability.

Candidates are filtered per block against each token's current N-th best log-probability
(a stale, hence conservative, threshold), kept in a pending list, and merged into the dense
(N, V) table when the list grows. Blocks seen while the table is still filling are merged densely.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ReverseIndex:
    def __init__(self, d_vocab: int, n: int, device: torch.device) -> None:
        self.n = n
        self.d_vocab = d_vocab
        self.logp = torch.full((n, d_vocab), float("-inf"), device=device)  # (N, V)
        self.logit = torch.zeros((n, d_vocab), device=device)  # (N, V)
        self.ref = torch.full((n, d_vocab), -1, dtype=torch.int64, device=device)  # (N, V)
        self.threshold = torch.full((d_vocab,), float("-inf"), device=device)  # (V,)
        self._pending: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self._n_pending = 0

    @property
    def filling(self) -> bool:
        return bool(torch.isinf(self.threshold).any())

    def update(self, L: Tensor, lse: Tensor, refs: Tensor, mask: Tensor | None) -> None:
        """Offer a block: logits L (B, V), row logsumexp (B,), neuron refs (B,) (-1 = padding).

        mask (B, V) marks entries above the threshold; None means merge the block densely.
        """
        valid = refs >= 0
        if mask is None or int(mask.sum()) > self.n * self.d_vocab // 2:
            k = min(self.n, int(valid.sum()))
            logp = L.float() - lse[:, None]
            logp[~valid] = float("-inf")
            top, rows = logp.topk(k, dim=0)  # (k, V)
            self._merge_dense(top, L.float().gather(0, rows), refs[rows])
            return
        b, v = (mask & valid[:, None]).nonzero(as_tuple=True)
        logit = L[b, v].float()
        self._pending.append((v, logit - lse[b], logit, refs[b]))
        self._n_pending += v.numel()
        if self._n_pending > self.n * self.d_vocab:
            self.compact()

    def _merge_dense(self, logp: Tensor, logit: Tensor, ref: Tensor) -> None:
        all_logp = torch.cat([self.logp, logp])  # (N + k, V)
        top, rows = all_logp.topk(self.n, dim=0)
        self.logit = torch.cat([self.logit, logit]).gather(0, rows)
        self.ref = torch.cat([self.ref, ref]).gather(0, rows)
        self.logp = top
        self.threshold = top[-1].clone()

    def compact(self) -> None:
        """Merge pending candidates into the table (exact top-N per token)."""
        if not self._pending:
            return
        V, N = self.d_vocab, self.n
        tok = torch.arange(V, device=self.logp.device).expand(N, V).reshape(-1)
        v = torch.cat([tok] + [p[0] for p in self._pending])
        logp = torch.cat([self.logp.reshape(-1)] + [p[1] for p in self._pending])
        logit = torch.cat([self.logit.reshape(-1)] + [p[2] for p in self._pending])
        ref = torch.cat([self.ref.reshape(-1)] + [p[3] for p in self._pending])
        self._pending, self._n_pending = [], 0
        order = torch.argsort(logp, descending=True, stable=True)
        order = order[torch.argsort(v[order], stable=True)]  # by token, then logp descending
        v, logp, logit, ref = v[order], logp[order], logit[order], ref[order]
        counts = torch.bincount(v, minlength=V)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(v.numel(), device=v.device) - starts[v]
        keep = rank < N
        rank, v = rank[keep], v[keep]
        self.logp[rank, v] = logp[keep]
        self.logit[rank, v] = logit[keep]
        self.ref[rank, v] = ref[keep]
        self.threshold = self.logp.min(0).values

    def state(self) -> dict[str, Tensor]:
        self.compact()
        return {"logp": self.logp.cpu(), "logit": self.logit.cpu(), "ref": self.ref.cpu()}

    def load(self, state: dict[str, Tensor]) -> None:
        dev = self.logp.device
        self.logp, self.logit = state["logp"].to(dev), state["logit"].to(dev)
        self.ref = state["ref"].to(dev)
        self.threshold = self.logp.min(0).values
