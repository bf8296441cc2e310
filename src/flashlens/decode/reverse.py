"""The reverse index: for every vocabulary token, the N neurons that give it the most probability.

The table is token-major, (V, N) per field, so a token's N entries are contiguous. Each token's
threshold is its current N-th best log-probability: only entries above it can enter.

Per block (B neurons x V tokens), work is proportional to the block's candidate entries (about
V * N / t in block t of a run), not to B x V:
  1. the engine's hit-mask kernel (kernels.hit_mask) writes a (B, V) uint8 mask of entries
     above filter_threshold(), from the corrected row logsumexp;
  2. nonzero on the mask gives the candidates; they are re-checked with the exact row
     logsumexp, sorted by (token, row) with one integer key, packed into a dense (T, K) buffer
     for the T touched tokens, concatenated with those tokens' table rows, and cut to the top N.
The first block (every threshold -inf) is merged densely, per token, in vocabulary slices. A
caller whose mask came from a different logsumexp passes the largest difference as `slack`; a
block whose slack exceeds the margin is merged densely too, and the margin widened.
"""

from __future__ import annotations

import torch
from torch import Tensor

# nats below the threshold that the hit mask also marks. The mask is made from the same logits
# and logsumexp as the exact check, so this only guards fp32 rounding; it is widened when a
# caller's mask came from a logsumexp that differs by more (`slack`).
INITIAL_MARGIN = 1e-4


class ReverseIndex:
    def __init__(self, d_vocab: int, n: int, device: torch.device) -> None:
        self.n = n
        self.d_vocab = d_vocab
        self.device = device
        self.logp = torch.full((d_vocab, n), float("-inf"), device=device)  # (V, N)
        self.logit = torch.zeros((d_vocab, n), device=device)  # (V, N)
        self.ref = torch.full((d_vocab, n), -1, dtype=torch.int64, device=device)  # (V, N)
        self.threshold = torch.full((d_vocab,), float("-inf"), device=device)  # (V,)
        self.margin = INITIAL_MARGIN
        self._sparse_hits = False  # last block had few hits: scan the mask by 8-byte words

    @property
    def filling(self) -> bool:
        return bool(torch.isinf(self.threshold).any())

    def filter_threshold(self) -> Tensor:
        """(V,) the per-token bound the block kernel compares log-probabilities with."""
        return self.threshold - self.margin

    def update(
        self,
        L: Tensor,
        lse: Tensor,
        refs: Tensor,
        hits: Tensor | None = None,
        slack: float = 0.0,
    ) -> None:
        """Offer a block: logits L (B, V), exact row logsumexp (B,), neuron refs (B,) (-1 =
        padding).

        hits (B, V) uint8: nonzero where L - lse' > filter_threshold() for valid rows, with lse'
        the kernel's logsumexp; slack: max(lse' - lse), which must not exceed the margin for
        the mask to hold every entry that beats its threshold. None merges the block densely.
        """
        valid = refs >= 0
        late = slack >= 0.5 * self.margin  # keep well clear of fp32 rounding at the bound
        dense = hits is None or late
        if late:
            self.margin = max(2 * self.margin, 4 * slack)
        if dense or int(torch.isinf(self.threshold).sum()) > self.d_vocab // 2:
            self._update_dense(L, lse, refs, valid)
            return
        assert hits is not None
        pos = self._hit_positions(hits)  # (C,) flat b * V + v, ascending
        if pos.numel() == 0:
            return
        B, V = L.shape
        key = (pos % V) * B + pos // V  # token-major: sorted, it groups by token, then row
        key = key.sort().values if B * V >= 2**31 else key.int().sort().values.long()
        v, b = key // B, key % B
        logit = L.reshape(-1)[b * V + v].float()
        logp = logit - lse[b]
        ok = logp > self.threshold[v]  # exact check with the corrected logsumexp
        self._merge_candidates(
            v,
            torch.where(ok, logp, float("-inf")),
            torch.where(ok, logit, 0.0),
            torch.where(ok, refs[b], -1),
        )

    def _hit_positions(self, hits: Tensor) -> Tensor:
        flat = hits.view(-1)
        if self._sparse_hits and flat.numel() % 8 == 0 and flat.is_contiguous():
            words = flat.view(torch.int64)
            w = words.nonzero().squeeze(1)  # words holding at least one hit
            r, j = words[w].view(torch.uint8).view(-1, 8).nonzero(as_tuple=True)
            pos = w[r] * 8 + j
        else:
            pos = flat.nonzero().squeeze(1)
        self._sparse_hits = pos.numel() * 64 < flat.numel()
        return pos

    def _merge_candidates(self, v: Tensor, logp: Tensor, logit: Tensor, ref: Tensor) -> None:
        """Merge candidates sorted by token v (C,) into the table rows of the tokens they touch.

        The candidates' log-probabilities are packed next to their tokens' table rows in a
        (T, N + K) buffer, K the largest count of a token, and cut to the top N; tokens with
        more than N candidates go in a second buffer so that one busy token does not widen
        every row."""
        N, dev = self.n, v.device
        tokens, counts = torch.unique_consecutive(v, return_counts=True)  # (T,)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(v.numel(), device=dev) - torch.repeat_interleave(starts, counts)
        row = torch.repeat_interleave(torch.arange(tokens.numel(), device=dev), counts)
        few = counts <= N
        if bool(few.all()):
            groups = [(torch.arange(tokens.numel(), device=dev), row, slot, logp)]
        else:
            groups = []
            for g in (few, ~few):
                sel = g.nonzero().squeeze(1)  # rows of `tokens` in this group
                index = torch.full((tokens.numel(),), -1, dtype=torch.int64, device=dev)
                index[sel] = torch.arange(sel.numel(), device=dev)
                in_g = g[row]
                groups.append((sel, index[row[in_g]], slot[in_g], logp[in_g]))
        for sel, r, sl, lp in groups:
            if sel.numel() == 0:
                continue
            t, W = tokens[sel], N + int(counts[sel].max())
            both = torch.full((sel.numel(), W), float("-inf"), device=dev)
            both[:, :N] = self.logp[t]
            both.view(-1)[r * W + N + sl] = lp
            best, pick = both.topk(N, dim=1, sorted=False)  # (T, N)
            old = pick < N
            cand = (starts[sel, None] + pick - N).clamp_(0, v.numel() - 1)  # candidate index
            self.logit[t] = torch.where(
                old, self.logit[t].gather(1, pick.clamp(max=N - 1)), logit[cand]
            )
            self.ref[t] = torch.where(old, self.ref[t].gather(1, pick.clamp(max=N - 1)), ref[cand])
            self.logp[t] = best
            self.threshold[t] = best.amin(1)

    def _update_dense(self, L: Tensor, lse: Tensor, refs: Tensor, valid: Tensor) -> None:
        """Merge the block's top-N per token for every token, in vocabulary slices."""
        k = min(self.n, int(valid.sum()))
        if k == 0:
            return
        B, V = L.shape
        step = max(1, (16 << 20) // (4 * B))  # ~16 MB of fp32 log-probabilities per slice
        for lo in range(0, V, step):
            cols = torch.arange(lo, min(lo + step, V), device=L.device)
            logpT = (L[:, lo : lo + step].float() - lse[:, None]).T.contiguous()  # (c, B)
            logpT[:, ~valid] = float("-inf")
            top, rows = logpT.topk(k, dim=1, sorted=False)  # (c, k)
            logit = L[rows, cols[:, None]].float()
            if k == self.n and bool((self.ref[lo : lo + step] < 0).all()):
                # empty rows (the first block): the block's top N is the table
                self.logp[lo : lo + step], self.logit[lo : lo + step] = top, logit
                self.ref[lo : lo + step] = refs[rows]
                self.threshold[lo : lo + step] = top.amin(1)
                continue
            self._merge_rows(cols, top, logit, refs[rows])

    def _merge_rows(self, tokens: Tensor, logp: Tensor, logit: Tensor, ref: Tensor) -> None:
        """Table rows of `tokens` (T,) := top-N of themselves and candidates (T, K) each."""
        both = torch.cat([self.logp[tokens], logp], dim=1)  # (T, N + K)
        best, pick = both.topk(self.n, dim=1, sorted=False)
        self.logit[tokens] = torch.cat([self.logit[tokens], logit], dim=1).gather(1, pick)
        self.ref[tokens] = torch.cat([self.ref[tokens], ref], dim=1).gather(1, pick)
        self.logp[tokens] = best
        self.threshold[tokens] = best.amin(1)

    def state(self) -> dict[str, Tensor]:
        """The table as CPU tensors "logp", "logit", "ref", each (N, V); rows are not sorted."""
        return {
            "logp": self.logp.T.contiguous().cpu(),
            "logit": self.logit.T.contiguous().cpu(),
            "ref": self.ref.T.contiguous().cpu(),
        }

    def load(self, state: dict[str, Tensor]) -> None:
        """Restore a table saved by `state()`."""
        dev = self.device
        self.logp = state["logp"].to(dev).T.contiguous()
        self.logit = state["logit"].to(dev).T.contiguous()
        self.ref = state["ref"].to(dev).T.contiguous()
        self.threshold = self.logp.amin(1)
