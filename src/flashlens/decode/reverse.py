"""The reverse index: for every vocabulary token, the N neurons that give it the most probability.

The table is token-major, (V, N) per field, so a token's N entries are contiguous. Each token's
threshold is its current N-th best log-probability: only entries above it can enter.

Per block (B neurons x V tokens), work is proportional to the block's candidate entries (about
V * N / t in block t of a run), not to B x V:
  1. the engine's statistics kernel (kernels.block_stats) reduces L - filter_threshold() to
     its maximum over each vocabulary chunk of CHUNK tokens: (B, V / CHUNK) `chunk_gap`;
  2. an entry can beat its token's threshold (L - lse > threshold) only in a chunk whose gap
     exceeds the row's logsumexp; those chunks alone are gathered and checked exactly;
  3. the entries that pass are sorted by (token, row) with one integer key and merged into
     the rows of the tokens they touch: by insertion rounds for tokens with at most ROUNDS
     candidates (nearly all, once the table has filled), otherwise packed next to the
     token's row in a dense buffer and cut to the top N.
The chunk test uses the logsumexp the caller passes (the exact, corrected one), so no bound on
how far it moved from the kernel's own is needed. The first block (every threshold -inf), and
any block where most chunks are flagged, is merged densely, per token, in vocabulary slices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ..errors import FlashlensError
from .kernels import CHUNK
from .logits import Logits

# nats below the threshold that the chunk test also lets through: it covers fp32 rounding of
# L - threshold (summed in the kernel) against L - lse (the exact check), with a relative term
# for rows whose logsumexp is large.
MARGIN = 1e-4
REL_MARGIN = 1e-6
ROUNDS = 4  # tokens with at most this many candidates in a block take them by insertion
GATHER = 1 << 22  # entries gathered at once from flagged chunks (16 MB of fp32)
# Above this fraction of flagged chunks a block is merged densely (a per-token top-N over the
# block): early in a run, when most chunks hold a hit, that is up to 3x faster than gathering
# and merging millions of candidates (512 x 128,256 blocks: 0.6 s dense; 2.2 s sparse in the
# second block, 0.7 s at 71% flagged, 0.25 s at 61%).
DENSE_ABOVE = 0.66
# Spare entries per token that a low-precision map keeps beyond the N it writes: the GEMM's
# rounding can swap neurons near the N-th place; the entries are made exact at the end
# (ReverseIndex.rescore) and the best N written, so a swap needs an error past the spares.
SPARE = 8


class ReverseIndex:
    def __init__(self, d_vocab: int, n: int, device: torch.device) -> None:
        self.n = n
        self.d_vocab = d_vocab
        self.device = device
        self.logp = torch.full((d_vocab, n), float("-inf"), device=device)  # (V, N)
        self.logit = torch.zeros((d_vocab, n), device=device)  # (V, N)
        self.ref = torch.full((d_vocab, n), -1, dtype=torch.int64, device=device)  # (V, N)
        self.threshold = torch.full((d_vocab,), float("-inf"), device=device)  # (V,)

    @property
    def filling(self) -> bool:
        return bool(torch.isinf(self.threshold).any())

    def filter_threshold(self) -> Tensor:
        """(V,) the per-token bound the statistics kernel subtracts from the logits."""
        return self.threshold - MARGIN

    def update(
        self, L: Tensor | Logits, lse: Tensor, refs: Tensor, chunk_gap: Tensor | None = None
    ) -> None:
        """Offer a block: logits L (B, V) (a tensor, or the engine's Logits), exact row
        logsumexp (B,), neuron refs (B,) (-1 = padding).

        chunk_gap (B, V // CHUNK): max of L - filter_threshold() over each full chunk of CHUNK
        tokens (kernels.block_stats), computed against the table as it is now. None merges the
        block densely.
        """
        if isinstance(L, Tensor):
            L = Logits(L)
        if not L.data.is_contiguous():  # (the engine's buffer is)
            L = Logits(L.data.contiguous(), L.row_scale, L.col_scale)
        valid = refs >= 0
        if chunk_gap is None or int(torch.isinf(self.threshold).sum()) > self.d_vocab // 2:
            self._update_dense(L, lse, refs, valid)
            return
        bound = lse - (MARGIN + REL_MARGIN * lse.abs())  # (B,)
        flag = (chunk_gap > bound[:, None]) & valid[:, None]  # (B, n_chunks): may hold a hit
        if flag.numel() and float(flag.float().mean()) > DENSE_ABOVE:
            self._update_dense(L, lse, refs, valid)  # early in a run: most chunks hold a hit
            return
        for b, v in self._hits(L, lse, valid, flag):  # (C,) rows and tokens that beat the table
            self._merge_hits(L, lse, refs, b, v)

    def _merge_hits(self, L: Logits, lse: Tensor, refs: Tensor, b: Tensor, v: Tensor) -> None:
        """Merge the entries at rows b and tokens v (C,) of the block into the table."""
        B = L.shape[0]
        key = v * B + b  # token-major: sorted, it groups by token, then row
        key = key.sort().values if B * self.d_vocab >= 2**31 else key.int().sort().values.long()
        v, b = key // B, key % B
        logit = L.at(L.data.view(-1).index_select(0, b * L.shape[1] + v), b, v)
        self._merge_candidates(v, logit - lse[b], logit, refs[b])

    def _hits(
        self, L: Logits, lse: Tensor, valid: Tensor, flag: Tensor
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Rows and tokens (C,) of the entries whose log-probability L - lse beats the table,
        given the chunks (B, n_chunks) that may hold one, in batches of at most GATHER
        entries checked: the caller merges each batch before the next is checked (against
        thresholds it may have raised), so that early in a run, when millions of entries
        pass, they are never all held at once (0.4 GiB at Llama-3.1-8B shapes)."""
        V = L.shape[1]
        n_chunks = flag.shape[1]
        n_full = n_chunks * CHUNK
        rows, chunks = flag.nonzero(as_tuple=True)  # (F,) ascending by row, then chunk
        if rows.numel():  # (with no flagged chunk, L may be too small for the window view)
            offs = torch.arange(CHUNK, device=lse.device)
            step = max(1, GATHER // CHUNK)
            for lo in range(0, rows.numel(), step):
                r, c = rows[lo : lo + step], chunks[lo : lo + step]
                logp = L.chunks(r, c, CHUNK).sub_(lse[r, None])  # (F, CHUNK), a new tensor
                thr_chunks = self.threshold[:n_full].view(n_chunks, CHUNK)  # (as of now)
                ok = logp > thr_chunks.index_select(0, c)  # the exact check
                del logp
                i, j = ok.nonzero(as_tuple=True)
                if i.numel():
                    yield r[i], c[i] * CHUNK + offs[j]
        if n_full < V:  # the tail past the last full chunk: checked directly
            ok = (L.columns(n_full, V) - lse[:, None] > self.threshold[n_full:]) & valid[:, None]
            i, j = ok.nonzero(as_tuple=True)
            if i.numel():
                yield i, j + n_full

    def _merge_candidates(self, v: Tensor, logp: Tensor, logit: Tensor, ref: Tensor) -> None:
        """Merge candidates sorted by token v (C,) into the table rows of the tokens they touch.

        Tokens with at most ROUNDS candidates (nearly all of them once the table has filled)
        take them in rounds of one candidate per token, each replacing its row's minimum if
        larger; busier tokens go through a top-N over their row and their candidates."""
        tokens, counts = torch.unique_consecutive(v, return_counts=True)  # (T,)
        starts = torch.cumsum(counts, 0) - counts
        few = counts <= ROUNDS
        sel = few.nonzero().squeeze(1)
        if sel.numel():
            self._insert_in_rounds(tokens[sel], starts[sel], counts[sel], logp, logit, ref)
        if sel.numel() < tokens.numel():
            busy = torch.repeat_interleave(~few, counts)  # (C,) candidates of busy tokens
            self._merge_top_n(v[busy], logp[busy], logit[busy], ref[busy])

    def _insert_in_rounds(
        self, t: Tensor, starts: Tensor, counts: Tensor, logp: Tensor, logit: Tensor, ref: Tensor
    ) -> None:
        """Distinct tokens t (T,) whose candidates are logp[starts : starts + counts]: round r
        offers each token its r-th candidate, which replaces the row's minimum if larger (a
        top-N by insertion; within a round no token repeats, so the writes never collide)."""
        # Writes go through flat positions token * N + slot (index_copy_: faster than a
        # two-index put).
        table = self.logp.view(-1), self.logit.view(-1), self.ref.view(-1)
        for r in range(int(counts.max())):
            act = counts > r
            t_r, i_r = (t, starts) if r == 0 else (t[act], starts[act] + r)
            lp = logp[i_r]
            low, j = self.logp.index_select(0, t_r).min(1)  # (T_r,) row minima and slots
            ok = lp > low
            at, i_ok = (t_r * self.n + j)[ok], i_r[ok]
            for dst, src in zip(table, (lp[ok], logit[i_ok], ref[i_ok]), strict=True):
                dst.index_copy_(0, at, src)
        self.threshold[t] = self.logp.index_select(0, t).amin(1)

    def _merge_top_n(self, v: Tensor, logp: Tensor, logit: Tensor, ref: Tensor) -> None:
        """Merge candidates sorted by token v (C,) by a top-N over rows and candidates.

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
            both[:, :N] = self.logp.index_select(0, t)
            both.view(-1)[r * W + N + sl] = lp
            best, pick = both.topk(N, dim=1, sorted=False)  # (T, N)
            old = pick < N
            cand = (starts[sel, None] + pick - N).clamp_(0, v.numel() - 1)  # candidate index
            self.logit[t] = torch.where(
                old, self.logit.index_select(0, t).gather(1, pick.clamp(max=N - 1)), logit[cand]
            )
            self.ref[t] = torch.where(
                old, self.ref.index_select(0, t).gather(1, pick.clamp(max=N - 1)), ref[cand]
            )
            self.logp[t] = best
            self.threshold[t] = best.amin(1)

    def _update_dense(self, L: Logits, lse: Tensor, refs: Tensor, valid: Tensor) -> None:
        """Merge the block's top-N per token for every token, in vocabulary slices."""
        k = min(self.n, int(valid.sum()))
        if k == 0:
            return
        B, V = L.shape
        step = max(1, (16 << 20) // (4 * B))  # ~16 MB of fp32 log-probabilities per slice
        for lo in range(0, V, step):
            cols = torch.arange(lo, min(lo + step, V), device=lse.device)
            logpT = L.log_probs_T(lo, lo + step, lse)  # (c, B)
            logpT[:, ~valid] = float("-inf")
            top, rows = logpT.topk(k, dim=1, sorted=False)  # (c, k)
            logit = L.at(L.data[rows, cols[:, None]], rows, cols[:, None])
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

    def rescore(self, base: int, count: int, exact: Callable[[Tensor, Tensor], Tensor]) -> None:
        """Make the entries of neurons base .. base + count - 1 exact: exact(rows, tokens) gives
        the fp32 logits (E,) of neuron base + rows[i] for token tokens[i]; each log-probability
        moves with its logit (the neuron's logsumexp, corrected, is already exact enough).
        Which neurons a token keeps is not revisited: only near-ties could change."""
        t, j = ((self.ref >= base) & (self.ref < base + count)).nonzero(as_tuple=True)
        if t.numel() == 0:
            return
        new = exact(self.ref[t, j] - base, t)
        self.logp[t, j] += new - self.logit[t, j]
        self.logit[t, j] = new
        touched = t.unique()
        self.threshold[touched] = self.logp.index_select(0, touched).amin(1)

    def state(self) -> dict[str, Tensor]:
        """The table as CPU tensors "logp", "logit", "ref", each (N, V); rows are not sorted."""
        return {
            "logp": self.logp.T.contiguous().cpu(),
            "logit": self.logit.T.contiguous().cpu(),
            "ref": self.ref.T.contiguous().cpu(),
        }

    def load(self, state: dict[str, Tensor]) -> None:
        """Restore a table saved by `state()`. One saved with another number of spare entries
        per token (an interrupted run on another CPU's int8 kernel: "u7" keeps twice the
        spares) is cut to this table's best entries, or padded with empty slots, which the
        next blocks fill."""
        n_saved, d_vocab = state["logp"].shape
        if d_vocab != self.d_vocab:
            raise FlashlensError(
                f"the saved reverse index covers {d_vocab} tokens, this model has "
                f"{self.d_vocab}: it was started by another version or with other settings; "
                "rerun with --overwrite"
            )
        dev = self.device
        logp, logit, ref = (state[k].to(dev).T for k in ("logp", "logit", "ref"))  # (V, n)
        if n_saved > self.n:  # the best n of each token's entries
            keep = logp.topk(self.n, dim=1).indices
            logp, logit, ref = (t.gather(1, keep) for t in (logp, logit, ref))
        elif n_saved < self.n:  # empty slots (as a new table's) after the saved entries
            pad = self.n - n_saved
            logp = torch.cat([logp, logp.new_full((d_vocab, pad), float("-inf"))], 1)
            logit = torch.cat([logit, logit.new_zeros((d_vocab, pad))], 1)
            ref = torch.cat([ref, ref.new_full((d_vocab, pad), -1)], 1)
        self.logp, self.logit, self.ref = (t.contiguous() for t in (logp, logit, ref))
        self.threshold = self.logp.amin(1)
