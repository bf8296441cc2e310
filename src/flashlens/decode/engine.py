"""The decode engine: neuron blocks x LM-head -> top-k, bottom-k, logsumexp, entropy, moments.

For a block of neuron vectors W (B, d_model):
    x = final_norm(W)                              (B, d_model) fp32
    L = x @ W_U^T                                  (B, d_vocab) in the compute dtype (int8:
                                                   int32 products and scales, decode.logits)
    lse, entropy, moments, chunk max/min,          one fused kernel over L (kernels.block_stats)
    chunk max of L - reverse-index threshold       (locates the entries the reverse index takes)
    top/bottom-k candidates                        from the best chunks, then rescored exactly
                                                   in fp32 against the gathered W_U rows
The full neurons x vocabulary matrix is never held: only one block of it, in a buffer that is
reused from block to block (a fresh 100+ MB allocation per block costs ~10% of the GEMM on CPU
in page faults alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import pages
from . import int8
from .kernels import (
    CHUNK,
    PAIRS,
    BlockStats,
    block_stats,
    block_stats_int8,
    compiled,
    compiled_block_stats,
    exact_logits,
    pair_logits,
)
from .logits import Logits
from .norm import NormMode, Readout, apply_final_norm, head_tail, norm_factors
from .policy import check_device
from .reverse import SPARE, ReverseIndex
from .slices import float_rows


@dataclass
class BlockResult:
    """Per-neuron results of one block, on the CPU. B = neurons in the block."""

    top_ids: Tensor  # (B, k) int32, best first
    top_logits: Tensor  # (B, k) fp32, exact
    top_probs: Tensor  # (B, k) fp32
    bottom_ids: Tensor  # (B, k) int32, most suppressed first
    bottom_logits: Tensor  # (B, k) fp32, exact
    logsumexp: Tensor  # (B,)
    entropy: Tensor  # (B,) nats
    w_norm: Tensor  # (B,) L2 norm of the raw weight vector
    logit_mean: Tensor  # (B,) moments of the logits over the vocabulary
    logit_std: Tensor
    logit_skew: Tensor
    logit_kurtosis: Tensor  # excess kurtosis

    @classmethod
    def cat(cls, results: list[BlockResult]) -> BlockResult:
        """The results of consecutive blocks as one (rows in order)."""
        return cls(**{k: torch.cat([getattr(r, k) for r in results]) for k in vars(results[0])})

    def rows(self, index: Tensor | slice) -> BlockResult:
        """The results of rows `index` only."""
        return BlockResult(**{k: v[index] for k, v in vars(self).items()})


class Decoder:
    """Holds the LM-head on the device and decodes blocks of neuron vectors."""

    def __init__(
        self,
        W_U: Tensor,  # (d_vocab, d_model), stored dtype
        readout: Readout,
        norm: NormMode,
        top_k: int,
        device: torch.device,
        compute_dtype: torch.dtype,
        softcap: float | None = None,
        compile: bool = False,
    ) -> None:
        self.device = device
        self.dtype = compute_dtype
        self.norm, self.top_k, self.softcap = norm, top_k, softcap
        self.readout = readout.to(device)
        check_device(compute_dtype, device)
        # The head's rows for the exact paths (rescoring): the stored dtype, or one fp32 copy
        # that the fp32 GEMM shares (see rows_dtype)
        self.W_U = W_U.to(device, rows_dtype(W_U.dtype, compute_dtype))
        # The GEMM's right operand: W_U^T (d_model, d_vocab) in the compute dtype, a view of
        # the head (the same tensor if the same dtype); for int8, the head quantised per token
        # for this CPU's int8 kernel (decode.int8), with the product itself.
        self.head8: int8.Int8Head | None = None
        if compute_dtype == torch.int8:
            self.head8 = int8.Int8Head(self.W_U, int8.kernel())
        else:
            self.W_UT_c = self.W_U.to(compute_dtype).T
        self.d_vocab, self.d_model = W_U.shape
        self.mean_u = _row_mean(self.W_U)  # (d_model,): mean logit = x . mean_u
        self.exact = exact_path(W_U.dtype, compute_dtype)
        self.n_top, self.n_bottom = candidate_counts(top_k, self.d_vocab, self.exact)
        self._b = self.readout.scaled_logit_bias  # (d_vocab,) the head's bias, or None
        self._dense = bool(softcap) or self._b is not None  # logits transformed past the GEMM
        scaled = scales_in_kernel(compute_dtype, self._dense)
        self._stats = compiled_block_stats(device.type, scaled) if compile else None
        self._exact = compiled(exact_logits, device.type) if compile else None
        self._pairs = compiled(pair_logits, device.type) if compile else None
        self._n_full = self.d_vocab // CHUNK * CHUNK  # tokens in full chunks
        self._tail = torch.arange(self._n_full, self.d_vocab, device=device)  # tokens past them
        self._L: Tensor | None = None  # (B, d_vocab) compute dtype: the reused logits buffer
        self._no_threshold = torch.full((self.d_vocab,), float("inf"), device=device)
        self._dots: dict[str, Tensor] = {}  # _head_dot's cache
        self.set_exact_tokens(torch.empty(0, dtype=torch.int64))

    def set_exact_tokens(self, ids: Tensor) -> None:
        """Compute the logits of tokens `ids` (K,) exactly in fp32 in every block, and put
        their exact mass in the logsumexp, as for the top candidates. For groups of
        near-identical head rows, whose low-precision rounding errors do not average out
        (see decode.pilot). No effect on an exact (fp32) GEMM."""
        self.exact_ids = ids.to(self.device, torch.int64)  # (K,)
        self._U_exact = self.W_U.index_select(0, self.exact_ids).float()  # (K, d_model)
        self._exact_pos = torch.full((self.d_vocab,), -1, dtype=torch.int64, device=self.device)
        self._exact_pos[self.exact_ids] = torch.arange(len(self.exact_ids), device=self.device)

    def logits(self, x: Tensor) -> Tensor:
        """(B, d_model) fp32 normed vectors -> (B, d_vocab) logits in the compute dtype (fp32
        for int8). The result may live in a buffer that the next call overwrites."""
        L = self.block_logits(x)
        return L.data if L.row_scale is None else L.dense()

    def block_logits(self, x: Tensor) -> Logits:
        """(B, d_model) fp32 normed vectors -> the block's logits as the GEMM leaves them, in a
        buffer that the next call overwrites (int8: int32 products, with their scales)."""
        B = x.shape[0]
        if self._L is None or self._L.shape[0] != B:
            self._L = None  # free the old block before allocating the new one
            dtype = self.head8.out_dtype if self.head8 is not None else self.dtype
            self._L = pages.empty((B, self.d_vocab), dtype, self.device)
        if self.head8 is not None:
            L = self.head8.logits(x, self._L)  # integer products, with their scales
        else:
            L = Logits(torch.matmul(x.to(self.dtype), self.W_UT_c, out=self._L))
        if self._dense:
            L = Logits(self._post(L.dense()))
        return L

    def _post(self, out: Tensor, ids: Tensor | None = None) -> Tensor:
        """The head's work past x . W_U on logits `out` of tokens `ids` (norm.head_tail)."""
        return head_tail(out, self._b, self.softcap, ids)

    def _block_stats(self, L: Logits, mu: Tensor, threshold: Tensor) -> BlockStats:
        if L.row_scale is not None and L.col_scale is not None:
            fn = self._stats if self._stats is not None else block_stats_int8
            return fn(L.data, L.row_scale, L.col_scale, mu, threshold)  # type: ignore[no-any-return]
        fn0 = self._stats if self._stats is not None else block_stats
        return fn0(L.data, mu, threshold)  # type: ignore[no-any-return]

    def decode(
        self, W: Tensor, refs: Tensor | None = None, reverse: ReverseIndex | None = None
    ) -> BlockResult:
        """Decode neuron vectors W (B, d_model); offer them to `reverse` under ids `refs`."""
        W = W.to(self.device)
        x = apply_final_norm(W, self.readout, self.norm)  # (B, d_model) fp32
        L = self.block_logits(x)
        mu = x @ self.mean_u  # (B,)
        if self._dense:
            mu = L.data.mean(1)  # (fp32, past the bias and soft-cap)
        threshold = self._no_threshold
        if reverse is not None and refs is not None:
            threshold = reverse.filter_threshold()
        st = self._block_stats(L, mu, threshold)
        lse = st.lse
        top_cand, top_approx0 = self._candidates(L, st.chunk_max, self.n_top, largest=True)
        bot_cand, _ = self._candidates(L, st.chunk_min, self.n_bottom, largest=False)
        n = top_cand.shape[1]
        exact = self._exact_logits(x, torch.cat([top_cand, bot_cand], dim=1))  # (B, n + n_bot)
        top_exact, bot_exact = exact[:, :n], exact[:, n:]
        if self.exact_ids.numel() and not self.exact:
            top_cand, top_exact, top_approx0, bot_cand, bot_exact = self._with_exact_tokens(
                x, L, top_cand, top_exact, top_approx0, bot_cand, bot_exact
            )
        top_ids, top_logits, top_approx = _order(top_cand, top_exact, top_approx0, True)
        bot_ids, bot_logits, _ = _order(bot_cand, bot_exact, None, False)
        if not self.exact:
            # Replace the approximate mass of the rescored candidates by their exact mass.
            assert top_approx is not None
            # (The exact tokens are among the candidates here, each token once.)
            delta = torch.exp(top_logits - lse[:, None]) - torch.exp(top_approx - lse[:, None])
            lse = lse + torch.log1p(delta.sum(1).clamp_min(-0.999999))
        w_norm = W.float().norm(dim=1)  # (B,)
        if reverse is not None and refs is not None:
            # The chunk gaps were reduced against the table as it stands; the reverse index
            # compares them with the corrected logsumexp and checks the flagged chunks exactly.
            # A degenerate neuron (all-zero or non-finite vector: a flat or NaN distribution,
            # NaN sorting first) takes no place in it: its ref is -1, as a padding row's.
            gap = None if reverse.filling else st.chunk_gap
            sound = torch.isfinite(w_norm) & (w_norm > 0)
            reverse.update(L, lse, torch.where(sound, refs.to(self.device), -1), gap)
        k = self.top_k
        var = st.m2.clamp_min(1e-30)
        return BlockResult(
            top_ids=top_ids[:, :k].int().cpu(),
            top_logits=top_logits[:, :k].cpu(),
            top_probs=torch.exp(top_logits[:, :k] - lse[:, None]).cpu(),
            bottom_ids=bot_ids[:, :k].int().cpu(),
            bottom_logits=bot_logits[:, :k].cpu(),
            logsumexp=lse.cpu(),
            entropy=st.entropy.cpu(),
            w_norm=w_norm.cpu(),
            logit_mean=mu.cpu(),
            logit_std=var.sqrt().cpu(),
            logit_skew=(st.m3 / var**1.5).cpu(),
            logit_kurtosis=(st.m4 / var**2 - 3.0).cpu(),
        )

    def decode_padded(
        self,
        W: Tensor,
        block: int,
        refs: Tensor | None = None,
        reverse: ReverseIndex | None = None,
    ) -> BlockResult:
        """`decode` for up to `block` rows W (n, d_model), zero-padded to `block` rows so that
        every call has the one shape the kernels were compiled for; padding refs are -1 (no
        neuron). The result has the n rows of W."""
        n = W.shape[0]
        if n < block:
            W = torch.cat([W, W.new_zeros(block - n, W.shape[1])])
            if refs is not None:
                refs = torch.cat([refs, refs.new_full((block - n,), -1)])
        r = self.decode(W, refs, reverse)
        return r if n == block else r.rows(slice(0, n))

    def _with_exact_tokens(
        self,
        x: Tensor,
        L: Logits,
        top_cand: Tensor,
        top_exact: Tensor,
        top_approx: Tensor,
        bot_cand: Tensor,
        bot_exact: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Append the exact tokens (K) to the top (B, n) and bottom (B, m) candidates, with
        their exact and approximate logits: near-identical rows tie in low precision, so the
        true extremes among them are only known exactly. A token already a candidate is
        appended with logits that sort last and carry no mass (-inf top, +inf bottom)."""
        B, K = L.shape[0], self.exact_ids.numel()
        ex = self._post(x @ self._U_exact.T, self.exact_ids)  # (B, K) fp32
        ids = self.exact_ids.expand(B, -1)
        approx = L.gather(ids)  # (B, K)

        def seen(cand: Tensor) -> Tensor:  # (B, K): exact tokens already among `cand`
            pos = self._exact_pos[cand]  # (B, n): position among the exact tokens, or -1
            hit = torch.zeros((B, K + 1), dtype=torch.bool, device=x.device)
            return hit.scatter_(1, pos.masked_fill(pos < 0, K), True)[:, :K]

        in_top, in_bot = seen(top_cand), seen(bot_cand)
        ninf = torch.tensor(float("-inf"), device=x.device)
        return (
            torch.cat([top_cand, ids], 1),
            torch.cat([top_exact, ex.where(~in_top, ninf)], 1),
            torch.cat([top_approx, approx.where(~in_top, ninf)], 1),
            torch.cat([bot_cand, ids], 1),
            torch.cat([bot_exact, ex.where(~in_bot, -ninf)], 1),
        )

    def _candidates(
        self, L: Logits, chunk_best: Tensor, n: int, largest: bool
    ) -> tuple[Tensor, Tensor]:
        """Token ids (B, n) that hold the top (or bottom) n logits, and their approximate logits.

        The n best chunks by their max (min) hold the n best tokens, plus the tail past the last
        full chunk; the candidates are then cut to n by their approximate logits."""
        B = L.shape[0]
        k_chunks = min(n, chunk_best.shape[1])
        cols, approxs = [], []
        if k_chunks:
            best_chunks = chunk_best.topk(k_chunks, dim=1, largest=largest).indices  # (B, kc)
            offs = torch.arange(CHUNK, device=chunk_best.device)
            cols.append((best_chunks[:, :, None] * CHUNK + offs).reshape(B, -1))
            rows = torch.arange(B, device=chunk_best.device).repeat_interleave(k_chunks)
            approxs.append(L.chunks(rows, best_chunks.reshape(-1), CHUNK).view(B, -1))
        if self._tail.numel():
            cols.append(self._tail.expand(B, -1))
            approxs.append(L.columns(self._n_full, self.d_vocab))
        cand = torch.cat(cols, dim=1)  # (B, c) token ids that must hold the extremes
        approx = torch.cat(approxs, dim=1)  # (B, c) their logits
        key = approx
        if self.exact_ids.numel() and not self.exact:
            # The exact tokens join the candidates anyway (_with_exact_tokens): a group of
            # near-identical rows must not crowd the others out of the n slots (their rounded
            # logits tie with the true top-k, by hundreds on a model's byte tokens).
            fill = float("-inf") if largest else float("inf")
            key = approx.masked_fill(self._exact_pos[cand] >= 0, fill)
        pick = key.topk(min(n, cand.shape[1]), dim=1, largest=largest).indices
        return cand.gather(1, pick), approx.gather(1, pick)

    @property
    def reverse_spare(self) -> int:
        """Spare reverse-index entries per token beyond the N written: none for an exact GEMM;
        reverse.SPARE in low precision, twice that for the "u7" int8 kernel, whose 7-bit
        activations move the logits about twice as far (at d_model 1024, 8 spares let a
        neuron 0.11 nats short of a token's top N in; 16 did not)."""
        if self.exact:
            return 0
        return 2 * SPARE if self.head8 is not None and self.head8.kernel == "u7" else SPARE

    def release_gemm(self) -> None:
        """Free what only the GEMM needs, once the blocks are decoded: the reused logits buffer
        and the head's copy in the compute dtype (int8: 0.5 GiB at Llama-3.1-8B shapes). The
        exact paths (exact_pairs, W_U) still work; decode does not."""
        self._L = None
        if self.head8 is not None:
            self.head8.release()  # any further decode fails loudly
        elif self.W_UT_c.data_ptr() != self.W_U.data_ptr():
            # An empty tensor of its own: any further decode fails loudly. (An empty view,
            # W_UT_c[:, :0], would keep the whole copy's storage alive.)
            self.W_UT_c = self.W_UT_c.new_empty((self.d_model, 0))

    def compile_pairs(self) -> None:
        """Use the compiled pair kernel in exact_pairs, whatever `compile` said."""
        self._pairs = compiled(pair_logits, self.device.type)

    def exact_pairs(self, W: Tensor, rows: Tensor, tokens: Tensor) -> Tensor:
        """Exact fp32 logits (E,) of pairs (neuron W[rows[i]], token tokens[i]) for raw neuron
        vectors W (n, d_model) (the reverse index's entries are made exact with it at the end
        of a low-precision map). Compiled: calls of PAIRS pairs, sorted by row so that each
        neuron's vector stays in cache; eager: slices of ~16 MB of gathered rows."""
        W = W.to(self.device)
        f, g, m, c = norm_factors(W, self.readout, self.norm)  # x = (W - m) * f * g + c
        E = rows.shape[0]
        out = torch.empty(E, dtype=torch.float32, device=self.device)
        if self._pairs is not None and E:
            order = rows.argsort(stable=True)
            pad = -E % PAIRS
            r = torch.cat([rows[order], rows.new_zeros(pad)])
            t = torch.cat([tokens[order], tokens.new_zeros(pad)])
            args = (self.W_U, W, f, g)
            self._pairs.prepare(*args, r[:PAIRS], t[:PAIRS])  # (cached after the first)
            got = torch.cat(
                [
                    self._pairs(*args, r[lo : lo + PAIRS], t[lo : lo + PAIRS])
                    for lo in range(0, E + pad, PAIRS)
                ]
            )
            out[order] = got[:E]
        else:
            step = max(1, (16 << 20) // (4 * self.d_model))
            for lo in range(0, E, step):
                r, t = rows[lo : lo + step], tokens[lo : lo + step]
                out[lo : lo + step] = pair_logits(self.W_U, W, f, g, r, t)
        if m is not None:  # centred (LayerNorm): W_U_t . (m_r f_r g) taken back out
            out -= (m * f)[rows] * self._head_dot("gain", g).index_select(0, tokens)
        if c is not None:  # the norm's bias: + W_U_t . c
            out += self._head_dot("bias", c).index_select(0, tokens)
        return self._post(out, tokens)

    def _head_dot(self, key: str, v: Tensor) -> Tensor:
        """W_U @ v (d_vocab,) fp32 for a vector v (d_model,) that stays the same for this
        decoder under `key` (the LayerNorm's gain, its scaled bias), computed once."""
        if key not in self._dots:
            out = torch.empty(self.d_vocab, dtype=torch.float32, device=self.device)
            for lo, part in float_rows(self.W_U, 2048):
                out[lo : lo + len(part)] = part @ v
            self._dots[key] = out
        return self._dots[key]

    def _exact_logits(self, x: Tensor, ids: Tensor) -> Tensor:
        """fp32 logits of tokens ids (B, n) for vectors x (B, d_model).

        Compiled: one fused gather-and-dot kernel. Eager: in row slices of ~8 MB of gathered
        W_U rows, so no block-sized temporary is made."""
        if self._exact is not None:
            out = self._exact(self.W_U, ids, x)
        else:
            B, n = ids.shape
            out = torch.empty((B, n), dtype=torch.float32, device=x.device)
            step = max(1, (8 << 20) // (4 * n * self.d_model))
            for lo in range(0, B, step):
                i = ids[lo : lo + step]  # index_select: 2.5x faster than W_U[i] for row gathers
                U = self.W_U.index_select(0, i.reshape(-1)).view(*i.shape, -1).float()
                out[lo : lo + step] = torch.bmm(U, x[lo : lo + step, :, None]).squeeze(2)
        return self._post(out, ids)


def rows_dtype(head_dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype a Decoder keeps the head's rows in (its W_U): the stored dtype, except for an
    fp32 GEMM over a bf16/fp16 head (CPUs without fast low-precision kernels). Then one fp32
    copy serves both the GEMM, as a transposed view, and the exact paths: it holds the stored
    values exactly, and the stored head is not kept beside it (1 GiB less at Llama-3.1-8B
    shapes: 2.1 GiB of head instead of 3.1)."""
    low = (torch.bfloat16, torch.float16)
    return torch.float32 if compute_dtype == torch.float32 and head_dtype in low else head_dtype


def exact_path(head_dtype: torch.dtype, compute_dtype: torch.dtype) -> bool:
    """The GEMM itself is fp32 and exact: no margin of extra candidates, no logsumexp fix-up,
    no spare reverse-index entries made exact at the end. So it is over a bf16/fp16 head too,
    whose fp32 copy (rows_dtype) holds the stored values exactly (before 2026-12-06 such maps
    took the low-precision path: the same values, and an end phase of needless work)."""
    return compute_dtype == torch.float32 and rows_dtype(head_dtype, compute_dtype) == torch.float32


def scales_in_kernel(compute_dtype: torch.dtype, dense: bool) -> bool:
    """The statistics kernel reads int32 products and applies their scales (int8 GEMM); where
    the head transforms its logits past the GEMM (`dense`: a soft-cap, a bias) they are
    already fp32 and the plain kernel runs."""
    return compute_dtype == torch.int8 and not dense


def candidate_counts(top_k: int, d_vocab: int, exact: bool) -> tuple[int, int]:
    """Top and bottom candidates rescored in fp32: generous when the GEMM is low precision.

    In low precision, top candidates also carry the logsumexp correction; the bottom ones only
    need their order. The tolerance tests and the benchmark check these margins."""
    return min(d_vocab, top_k if exact else top_k + 8), min(d_vocab, top_k if exact else top_k + 4)


def warm_up(
    block: int,
    d_vocab: int,
    d_model: int,
    head_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    top_k: int,
    softcap: float | None,
    device: torch.device,
    logit_bias: bool = False,
) -> None:
    """Compile the kernels a `Decoder` with these settings will call on blocks of `block` rows,
    for placeholder inputs of the same shapes, dtypes and layouts: `map` does this while the
    LM-head is still being read, so that the first real block finds them compiled. On the CPU
    they come from the ahead-of-time kernel cache (see `aot`): milliseconds once built."""
    n_cand = sum(candidate_counts(top_k, d_vocab, exact_path(head_dtype, compute_dtype)))
    B, V = block, d_vocab
    dense = bool(softcap) or logit_bias  # (as the Decoder decides)
    scaled = scales_in_kernel(compute_dtype, dense)
    products = int8.out_dtype(int8.kernel())  # the int8 GEMM's output: int32 or fp32
    L_dtype = torch.float32 if dense else products if scaled else compute_dtype
    L = torch.empty((B, V), dtype=L_dtype, device=device)  # (never written: no memory used)
    stats = compiled_block_stats(device.type, scaled)
    exact_fn = compiled(exact_logits, device.type)
    if stats is not None:
        mu, thr = torch.zeros(B, device=device), torch.full((V,), float("inf"), device=device)
        if scaled:
            stats.prepare(L, torch.ones(B, device=device), torch.ones(V, device=device), mu, thr)
        else:
            stats.prepare(L, mu, thr)
    if exact_fn is not None:
        # Untouched placeholder pages cost nothing: only row 0 is read.
        rows = rows_dtype(head_dtype, compute_dtype)  # the Decoder's W_U
        W_U = torch.empty((V, d_model), dtype=rows, device=device)
        ids = torch.zeros((B, n_cand), dtype=torch.int64, device=device)
        exact_fn.prepare(W_U, ids, torch.zeros((B, d_model), device=device))


def _order(
    ids: Tensor, exact: Tensor, approx: Tensor | None, largest: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Sort candidates (B, n) by their exact logits, best first."""
    order = exact.argsort(dim=1, descending=largest)
    return (
        ids.gather(1, order),
        exact.gather(1, order),
        approx.gather(1, order) if approx is not None else None,
    )


def _row_mean(W_U: Tensor, rows: int = 2048) -> Tensor:
    """Mean of the rows of W_U (V, d) in fp32, in slices: no fp32 copy of the whole head."""
    total = torch.zeros(W_U.shape[1], dtype=torch.float32, device=W_U.device)
    for _, part in float_rows(W_U, rows):
        total += part.sum(0)
    return total / W_U.shape[0]
