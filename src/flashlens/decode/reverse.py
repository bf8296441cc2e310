"""The reverse index: for every vocabulary token, the N neurons that give it the most probability.

Candidates are filtered per block against each token's current N-th best log-probability
(a stale, hence conservative, threshold): first by token, with the block kernel's per-token best
log-probability (V,), then by entry, on the few tokens that pass. They wait in a pending list and
are merged into the dense (N, V) table, on the tokens they touch, when the list grows. Blocks seen
while the table is still filling are merged densely, in column slices.
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

    def update(self, L: Tensor, lse: Tensor, refs: Tensor, col_best: Tensor | None = None) -> None:
        """Offer a block: logits L (B, V), row logsumexp (B,), neuron refs (B,) (-1 = padding).

        col_best (V,): an upper bound on each token's best log-probability in the block (from
        the fused block kernel); only tokens where it beats the threshold are looked at.
        None, or a table still filling, merges the block densely.
        """
        valid = refs >= 0
        if col_best is None or self.filling:
            self._update_dense(L, lse, refs, valid, torch.arange(self.d_vocab, device=L.device))
            return
        cols = (col_best > self.threshold).nonzero().squeeze(1)  # (h,) tokens with a candidate
        if cols.numel() == 0:
            return
        if cols.numel() > self.d_vocab // 4:  # most tokens hit: a dense merge is cheaper
            self._update_dense(L, lse, refs, valid, cols)
            return
        logit = L[:, cols].float()  # (B, h)
        logp = logit - lse[:, None]
        b, j = ((logp > self.threshold[cols]) & valid[:, None]).nonzero(as_tuple=True)
        self._pending.append((cols[j], logp[b, j], logit[b, j], refs[b]))
        self._n_pending += b.numel()
        if self._n_pending > self.n * self.d_vocab // 4:
            self.compact()

    def _update_dense(
        self, L: Tensor, lse: Tensor, refs: Tensor, valid: Tensor, cols: Tensor
    ) -> None:
        """Merge the block's top-N per token for tokens `cols` (h,), in column slices."""
        k = min(self.n, int(valid.sum()))
        if k == 0:
            return
        self.compact()
        step = max(1, (16 << 20) // (4 * L.shape[0]))  # ~16 MB of fp32 logits per slice
        for lo in range(0, cols.numel(), step):
            c = cols[lo : lo + step]
            logit = L[:, c].float()  # (B, h)
            logp = logit - lse[:, None]
            logp[~valid] = float("-inf")
            top, rows = logp.topk(k, dim=0)  # (k, h)
            both = torch.cat([self.logp[:, c], top])  # (N + k, h)
            best, pick = both.topk(self.n, dim=0)
            new_logit = logit.gather(0, rows)
            self.logit[:, c] = torch.cat([self.logit[:, c], new_logit]).gather(0, pick)
            self.ref[:, c] = torch.cat([self.ref[:, c], refs[rows]]).gather(0, pick)
            self.logp[:, c] = best
        self.threshold = self.logp.min(0).values

    def compact(self) -> None:
        """Merge pending candidates into the table (exact top-N per token they touch)."""
        if not self._pending:
            return
        V, N = self.d_vocab, self.n
        v_new = torch.cat([p[0] for p in self._pending])
        touched = torch.zeros(V, dtype=torch.bool, device=v_new.device)
        touched[v_new] = True
        cols = touched.nonzero().squeeze(1)  # (h,)
        v = torch.cat([cols.expand(N, -1).reshape(-1), v_new])
        logp = torch.cat([self.logp[:, cols].reshape(-1)] + [p[1] for p in self._pending])
        logit = torch.cat([self.logit[:, cols].reshape(-1)] + [p[2] for p in self._pending])
        ref = torch.cat([self.ref[:, cols].reshape(-1)] + [p[3] for p in self._pending])
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
        self.threshold[cols] = self.logp[:, cols].min(0).values

    def state(self) -> dict[str, Tensor]:
        self.compact()
        return {"logp": self.logp.cpu(), "logit": self.logit.cpu(), "ref": self.ref.cpu()}

    def load(self, state: dict[str, Tensor]) -> None:
        dev = self.logp.device
        self.logp, self.logit = state["logp"].to(dev), state["logit"].to(dev)
        self.ref = state["ref"].to(dev)
        self.threshold = self.logp.min(0).values
