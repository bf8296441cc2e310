"""The engine's fast paths against brute force: the fused block kernel (eager and compiled), the
chunked top/bottom-k search with a vocabulary tail, padding rows, the reused logits buffer, and
the reverse index's chunk filter and compaction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashlens.decode import aot
from flashlens.decode import reverse as reverse_mod
from flashlens.decode.engine import Decoder, warm_up
from flashlens.decode.kernels import (
    CHUNK,
    BlockStats,
    block_stats,
    block_stats_int8,
    compiled,
    compiled_block_stats,
    exact_logits,
)
from flashlens.decode.logits import Logits
from flashlens.decode.norm import NormMode, Readout
from flashlens.decode.reverse import ReverseIndex
from flashlens.decode.slices import float_rows


def _brute_stats(L: torch.Tensor, mu: torch.Tensor, thr: torch.Tensor) -> dict[str, torch.Tensor]:
    L64 = L.double()
    lse = torch.logsumexp(L64, 1)
    p = torch.softmax(L64, 1)
    c = L64 - mu.double()[:, None]
    n = L.shape[1] // CHUNK * CHUNK
    return {
        "lse": lse,
        "entropy": -(p * torch.log(p)).sum(1),
        "m2": (c**2).mean(1),
        "m3": (c**3).mean(1),
        "m4": (c**4).mean(1),
        "chunk_max": L64[:, :n].reshape(L.shape[0], -1, CHUNK).amax(2),
        "chunk_min": L64[:, :n].reshape(L.shape[0], -1, CHUNK).amin(2),
        "chunk_gap": (L64[:, :n] - thr.double()[:n]).reshape(L.shape[0], -1, CHUNK).amax(2),
    }


@pytest.mark.parametrize("V", [200, 256, 40])  # tail of 8 tokens; no tail; smaller than a chunk
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_stats_matches_brute_force(V: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(V)
    L = (torch.randn(6, V, generator=g) * 3).to(dtype)
    mu = L.double().mean(1).float()
    thr = torch.linspace(-9.0, -4.0, V)
    thr[3] = float("-inf")  # a token whose table is not full yet: every chunk holding it passes
    st = block_stats(L, mu, thr)
    ref = _brute_stats(L, mu, thr)
    if V >= CHUNK:
        assert torch.isinf(st.chunk_gap[:, 0]).all() and torch.isfinite(st.chunk_gap[:, 1:]).all()
    for name, want in ref.items():
        got = getattr(st, name).double()
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_block_stats_int8_is_block_stats_of_the_scaled_products() -> None:
    """The int8 GEMM's int32 products, scaled per row and per token inside the kernel, give
    the statistics of the dequantised logits (every field, the tail and chunk gaps included)."""
    g = torch.Generator().manual_seed(3)
    B, V = 5, 200
    Lq = torch.randint(-30000, 30000, (B, V), generator=g, dtype=torch.int32)
    s_row, s_col = torch.rand(B, generator=g) * 1e-4, 0.5 + torch.rand(V, generator=g)
    L = Lq.float() * s_row[:, None] * s_col  # (as Logits.at scales them)
    mu, thr = L.mean(1), torch.linspace(-9.0, -4.0, V)
    got, want = block_stats_int8(Lq, s_row, s_col, mu, thr), _brute_stats(L, mu, thr)
    for name, ref in want.items():
        torch.testing.assert_close(getattr(got, name).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["package", "jit"])
def test_compiled_block_stats_equals_eager(path: str) -> None:
    """Both compiled paths: the ahead-of-time package (for the shapes `prepare` was given; these
    are the warm-up test's, so the session builds it once) and torch.compile (any other)."""
    fn = compiled_block_stats("cpu")
    if fn is None:
        pytest.skip("no C compiler for inductor")
    V = 203 if path == "package" else 200
    g = torch.Generator().manual_seed(1)
    L = (torch.randn(8, V, generator=g) * 4).bfloat16()
    mu = L.float().mean(1)
    thr = torch.linspace(-8.0, -3.0, V)
    thr[70] = float("-inf")
    if path == "package":
        fn.prepare(L, mu, thr)
    calls = fn.package_calls
    got, want = fn(L, mu, thr), block_stats(L, mu, thr)
    assert fn.package_calls == calls + (path == "package")
    assert isinstance(got, BlockStats)
    for name in want._fields:
        torch.testing.assert_close(
            getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5, msg=name
        )


def _decoder(
    V: int, dtype: torch.dtype, seed: int = 0, compute: torch.dtype | None = None
) -> tuple[Decoder, torch.Tensor]:
    """A decoder over a random head stored in `dtype`, computing in `compute` (default: the
    same)."""
    g = torch.Generator().manual_seed(seed)
    d = 32
    W_U = (torch.randn(V, d, generator=g) * 0.3).to(dtype)
    gain = 1 + torch.rand(d, generator=g)
    dec = Decoder(W_U, Readout(gain, 1e-6), "model", 5, torch.device("cpu"), compute or dtype)
    return dec, W_U


def _reference(dec: Decoder, W_U: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    w = W.double()
    x = w * torch.rsqrt(w.pow(2).mean(-1, keepdim=True) + 1e-6) * dec.readout.gain.double()
    return x @ W_U.double().T  # (B, V)


@pytest.mark.parametrize(
    ("dtype", "compute"),
    [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.int8)],
)
def test_decoder_finds_extremes_in_the_vocabulary_tail(
    dtype: torch.dtype, compute: torch.dtype | None
) -> None:
    V = 3 * CHUNK + 37  # d_vocab % 64 != 0: the last 37 tokens are outside every chunk
    dec, W_U = _decoder(V, dtype, compute=compute)
    g = torch.Generator().manual_seed(2)
    W = torch.randn(7, 32, generator=g)
    W[0] = W_U[V - 1].float() * 5  # neuron 0 points at the last token: top-1 lives in the tail
    W[1] = -W_U[V - 2].float() * 5  # neuron 1: bottom-1 in the tail
    r = dec.decode(W.to(dtype))
    L = _reference(dec, W_U, W.to(dtype))
    assert int(r.top_ids[0, 0]) == V - 1 and int(r.bottom_ids[1, 0]) == V - 2
    assert r.top_ids.tolist() == L.topk(5, 1).indices.tolist()
    assert r.bottom_ids.tolist() == L.topk(5, 1, largest=False).indices.tolist()
    torch.testing.assert_close(r.top_logits.double(), L.topk(5, 1).values, rtol=1e-4, atol=1e-4)
    lse = torch.logsumexp(L, 1)
    torch.testing.assert_close(r.logsumexp.double(), lse, rtol=2e-3, atol=2e-3)


def test_padding_rows_and_buffer_reuse_do_not_leak_between_blocks() -> None:
    V = 2 * CHUNK + 5
    dec, _ = _decoder(V, torch.bfloat16, seed=3)
    g = torch.Generator().manual_seed(4)
    A = torch.randn(6, 32, generator=g).bfloat16()
    Bk = torch.randn(6, 32, generator=g).bfloat16()
    padded = torch.cat([A[:4], torch.zeros(2, 32, dtype=torch.bfloat16)])
    refs = torch.tensor([0, 1, 2, 3, -1, -1])
    rev = ReverseIndex(V, 2, torch.device("cpu"))
    r_pad = dec.decode(padded, refs, rev)
    r_b = dec.decode(Bk)  # overwrites the logits buffer of the first call
    fresh, _ = _decoder(V, torch.bfloat16, seed=3)
    r_a = fresh.decode(A)
    assert r_pad.top_ids[:4].tolist() == r_a.top_ids[:4].tolist()
    torch.testing.assert_close(r_pad.logsumexp[:4], r_a.logsumexp[:4])
    assert r_b.top_ids.tolist() == fresh.decode(Bk).top_ids.tolist()
    assert set(rev.state()["ref"].unique().tolist()) <= {0, 1, 2, 3}  # padding never indexed


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> list[int]:
    """Count the calls of owner.name (a one-element list, updated in place)."""
    count, fn = [0], getattr(owner, name)

    def counted(*args: object, **kwargs: object) -> object:
        count[0] += 1
        return fn(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return count


def _offer(
    rev: ReverseIndex, L: torch.Tensor | Logits, refs: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """Offer a block as the engine does: chunk gaps from the statistics kernel against the
    table as it stands, then a corrected logsumexp, here the kernel's moved by `shift` (B,) per
    row (the correction may go either way). Returns the corrected logsumexp."""
    if isinstance(L, Logits):  # int32 products and their scales, as the int8 GEMM leaves them
        assert L.row_scale is not None and L.col_scale is not None
        dense = L.dense()
        st = block_stats_int8(
            L.data, L.row_scale, L.col_scale, dense.mean(1), rev.filter_threshold()
        )
    else:
        st = block_stats(L, L.mean(1), rev.filter_threshold())
    lse = st.lse + shift
    rev.update(L, lse, refs, None if rev.filling else st.chunk_gap)
    return lse


def _as_int8_products(L: torch.Tensor, g: torch.Generator) -> tuple[Logits, torch.Tensor]:
    """L (B, V) moved onto the grid of int32 products with random row and token scales, as
    Logits, and the logits they stand for (B, V)."""
    s_row = (1 + torch.rand(L.shape[0], generator=g)) * 2e-4
    s_col = 0.5 + torch.rand(L.shape[1], generator=g)
    q = torch.round(L / (s_row[:, None] * s_col)).int()
    return Logits(q, s_row, s_col), q.float() * s_row[:, None] * s_col


def _assert_brute_force(
    rev: ReverseIndex,
    logp: torch.Tensor,
    logit: torch.Tensor,
    ref: torch.Tensor,
    k: int | None = None,
) -> None:
    """The table's best k entries per token (all n by default) are the exact top k of every
    valid row offered: logp (R, V)."""
    k = rev.n if k is None else k
    top, rows = logp.topk(k, dim=0)  # (k, V)
    state = rev.state()
    assert state["logp"].shape == (rev.n, logp.shape[1])
    got = state["logp"].sort(0, descending=True).indices[:k]
    torch.testing.assert_close(state["logp"].gather(0, got), top)
    assert state["ref"].gather(0, got).tolist() == ref[rows].tolist()
    torch.testing.assert_close(state["logit"].gather(0, got), logit.gather(0, rows))


def _offer_random(
    rev: ReverseIndex, g: torch.Generator, blk: int, B: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Offer block `blk` of B random rows (refs blk * B ...); returns logp, L (B, V), refs."""
    L = torch.randn(B, rev.d_vocab, generator=g)
    refs = torch.arange(blk * B, (blk + 1) * B)
    lse = _offer(rev, L, refs, torch.zeros(B))
    return L - lse[:, None], L, refs


@pytest.mark.parametrize("int8", [False, True])  # fp32 logits; int32 products with scales
@pytest.mark.parametrize("dense_above", [reverse_mod.DENSE_ABOVE, 1.0])  # 1.0: sparse only
@pytest.mark.parametrize("n", [1, 4, 6])
def test_reverse_index_matches_brute_force_across_paths(
    n: int, dense_above: float, int8: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks go through the dense merge (first block), the chunk filter (flagged chunks
    gathered in several slices, a vocabulary tail past the last full chunk, logsumexp
    corrections up and down), the candidate merge (tokens with at most n and with more than n
    candidates), padding rows, and a state()/load() round trip in the middle; the result must
    be the exact top-n per token over every valid row seen. With int8, every path reads the
    logits through their row and token scales."""
    monkeypatch.setattr(reverse_mod, "GATHER", 3 * CHUNK)  # 3 chunks per gathered slice
    monkeypatch.setattr(reverse_mod, "DENSE_ABOVE", dense_above)
    dense = _count_calls(monkeypatch, ReverseIndex, "_update_dense")
    sparse = _count_calls(monkeypatch, ReverseIndex, "_hits")
    V, B = 296, 16  # 4 full chunks and a tail of 40 tokens
    g = torch.Generator().manual_seed(n)
    rev = ReverseIndex(V, n, torch.device("cpu"))
    all_logp, all_logit, all_ref = [], [], []
    for blk in range(30):
        scale = 1.0 if blk < 12 else 3.0  # later blocks are peakier: fewer, sparser hits
        L = torch.randn(B, V, generator=g) * scale
        if blk == 7:
            L[:, 11] += 30.0  # token 11: every row of this block beats the table
        refs = torch.arange(blk * B, (blk + 1) * B)
        if blk % 5 == 4:
            refs[-3:] = -1  # padding rows, with huge logits that must never enter
            L[-3:] += 40.0
        shift = (torch.rand(B, generator=g) - 0.5) * 0.02
        if blk == 15:
            shift[2], shift[5] = -0.7, 0.7  # large corrections either way
        if int8:
            products, L = _as_int8_products(L, g)
            lse = _offer(rev, products, refs, shift)
        else:
            lse = _offer(rev, L, refs, shift)
        if blk == 17:  # resume from a saved state, as the atlas writer does
            state = rev.state()
            rev = ReverseIndex(V, n, torch.device("cpu"))
            rev.load(state)
        valid = refs >= 0
        all_logp.append((L - lse[:, None])[valid])
        all_logit.append(L[valid])
        all_ref.append(refs[valid])
    _assert_brute_force(rev, torch.cat(all_logp), torch.cat(all_logit), torch.cat(all_ref))
    if dense_above < 1:  # both merges ran: dense for the first and the most flagged blocks
        assert dense[0] > 1 and sparse[0] > 0 and dense[0] + sparse[0] == 30
    else:
        assert (dense[0], sparse[0]) == (1, 29)


def test_reverse_index_fills_across_blocks_with_few_valid_rows() -> None:
    """A first block with fewer valid rows than N leaves the table partly empty (threshold
    -inf); later blocks must still fill it exactly, and empty slots keep ref -1."""
    V, B, n = 136, 8, 5
    g = torch.Generator().manual_seed(5)
    rev = ReverseIndex(V, n, torch.device("cpu"))
    refs = torch.tensor([0, 1, 2, -1, -1, -1, -1, -1])
    L = torch.randn(B, V, generator=g)
    lse = _offer(rev, L, refs, torch.zeros(B))
    assert (rev.state()["ref"] == -1).sum() == 2 * V  # 3 of 5 slots filled
    logps, logits, all_refs = [(L - lse[:, None])[:3]], [L[:3]], [refs[:3]]
    for blk in range(1, 6):
        for seen, new in zip((logps, logits, all_refs), _offer_random(rev, g, blk, B), strict=True):
            seen.append(new)
    assert not rev.filling
    _assert_brute_force(rev, torch.cat(logps), torch.cat(logits), torch.cat(all_refs))


def test_reverse_sparse_merge_equals_one_dense_merge() -> None:
    V, n = 64, 3
    g = torch.Generator().manual_seed(9)
    L = torch.randn(40, V, generator=g)
    refs = torch.arange(40)
    dense = ReverseIndex(V, n, torch.device("cpu"))
    dense.update(L, torch.logsumexp(L, 1), refs)  # no chunk gaps: one dense merge
    sparse = ReverseIndex(V, n, torch.device("cpu"))
    for lo in range(0, 40, 4):  # the first block fills the table, then candidate merges
        blk = slice(lo, lo + 4)
        _offer(sparse, L[blk], refs[blk], torch.zeros(4))
    a, b = dense.state(), sparse.state()
    sa, sb = a["logp"].sort(0), b["logp"].sort(0)
    torch.testing.assert_close(sa.values, sb.values)
    assert a["ref"].gather(0, sa.indices).tolist() == b["ref"].gather(0, sb.indices).tolist()


@pytest.mark.parametrize(
    ("compute", "softcap"),
    [
        (torch.bfloat16, None),
        (torch.bfloat16, 20.0),
        (torch.int8, None),
        (torch.int8, 20.0),
        (torch.float32, None),  # over the bf16 head: CPUs with no fast bf16 or int8
    ],
)
def test_warm_up_compiles_exactly_what_the_decoder_calls(
    compute: torch.dtype, softcap: float | None
) -> None:
    """`map` compiles the kernels on placeholders while the head loads: the decoder's first
    blocks (filling, then chunk filter and sparse merge) must then run the ahead-of-time
    packages it prepared and compile nothing new, and agree with the eager decoder. (int8
    with a softcap: the logits are dequantised before it, so the plain kernel runs.)"""
    from torch._dynamo.utils import counters

    scaled = compute == torch.int8 and softcap is None
    stats, exact = compiled_block_stats("cpu", scaled), compiled(exact_logits, "cpu")
    if stats is None or exact is None:
        pytest.skip("no C compiler for inductor")
    # shapes no other test compiles
    V = 203 + (softcap is not None) + 2 * (compute == torch.int8) + 4 * (compute == torch.float32)
    d, B, k = 24, 8, 4
    g = torch.Generator().manual_seed(11)
    W_U = (torch.randn(V, d, generator=g) * 0.5).bfloat16()
    gain = 1 + torch.rand(d, generator=g)
    args: tuple[torch.Tensor, Readout, NormMode, int, torch.device, torch.dtype, float | None]
    args = (W_U, Readout(gain, 1e-6), "model", k, torch.device("cpu"), compute, softcap)
    graphs = lambda: counters["stats"]["unique_graphs"]  # noqa: E731
    warm_up(B, V, d, torch.bfloat16, compute, k, softcap, torch.device("cpu"))
    fast, slow = Decoder(*args, compile=True), Decoder(*args, compile=False)
    rev_fast = ReverseIndex(V, 3, torch.device("cpu"))
    rev_slow = ReverseIndex(V, 3, torch.device("cpu"))
    warmed, builds = graphs(), len(aot.BUILDS)
    calls = stats.package_calls, exact.package_calls
    for blk in range(3):
        W = (torch.randn(B, d, generator=g) * 2).bfloat16()
        refs = torch.arange(blk * B, (blk + 1) * B)
        a, b = fast.decode(W, refs, rev_fast), slow.decode(W, refs, rev_slow)
        assert a.top_ids.tolist() == b.top_ids.tolist()
        assert a.bottom_ids.tolist() == b.bottom_ids.tolist()
        torch.testing.assert_close(a.top_logits, b.top_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.logsumexp, b.logsumexp, rtol=1e-4, atol=1e-4)
    assert graphs() == warmed and len(aot.BUILDS) == builds  # nothing compiled after warm-up
    assert (stats.package_calls, exact.package_calls) == (calls[0] + 3, calls[1] + 3)
    assert not rev_fast.filling
    assert rev_fast.state()["ref"].sort(0).values.tolist() == (
        rev_slow.state()["ref"].sort(0).values.tolist()
    )


def test_reverse_index_with_a_vocabulary_smaller_than_a_chunk() -> None:
    """V < CHUNK and one row per block: there are no chunks, only the tail (B * V < CHUNK too)."""
    V, n = CHUNK - 24, 2
    g = torch.Generator().manual_seed(12)
    rev = ReverseIndex(V, n, torch.device("cpu"))
    logps, logits, refs = [], [], []
    for i in range(6):
        L = torch.randn(1, V, generator=g)
        ref = torch.tensor([i])
        lse = _offer(rev, L, ref, torch.zeros(1))
        logps.append(L - lse[:, None])
        logits.append(L)
        refs.append(ref)
    _assert_brute_force(rev, torch.cat(logps), torch.cat(logits), torch.cat(refs))


@pytest.mark.parametrize(("n_saved", "n"), [(4, 12), (12, 4)])
def test_reverse_index_resumes_a_saved_table_of_another_width(n_saved: int, n: int) -> None:
    """A resume state that kept another number of entries per token (a run interrupted on
    another CPU's int8 kernel: "u7" keeps twice the spares) is cut to each token's best
    entries, or padded with empty slots that later blocks fill; either way the table's best
    min(n_saved, n) entries are then the exact top ones over every row offered."""
    from flashlens.errors import FlashlensError

    V, B = 136, 8
    g = torch.Generator().manual_seed(11)
    rev = ReverseIndex(V, n_saved, torch.device("cpu"))
    seen: tuple[list[torch.Tensor], ...] = ([], [], [])  # logp, logits, refs of every block
    for blk in range(6):
        if blk == 3:  # interrupted: the next run keeps n entries per token
            state = rev.state()
            rev = ReverseIndex(V, n, torch.device("cpu"))
            rev.load(state)
            assert rev.filling == (n > n_saved)  # padded slots are empty (-inf) until filled
        for so_far, new in zip(seen, _offer_random(rev, g, blk, B), strict=True):
            so_far.append(new)
    logp, logit, ref = (torch.cat(t) for t in seen)
    _assert_brute_force(rev, logp, logit, ref, k=min(n_saved, n))
    # a table of another vocabulary is another model's: refused, with the way out
    with pytest.raises(FlashlensError, match="rerun with --overwrite"):
        ReverseIndex(V + 1, n, torch.device("cpu")).load(rev.state())


@pytest.mark.parametrize("compiled", [False, True])
def test_exact_pairs_before_and_after_the_gemm_is_released(compiled: bool) -> None:
    """exact_pairs gives fp32-exact logits of (neuron, token) pairs, eagerly and compiled, and
    still does once release_gemm has freed the int8 head copy (the end of a map); decode then
    fails rather than use a freed operand."""
    dec, W_U = _decoder(300, torch.bfloat16, seed=4, compute=torch.int8)
    if compiled:
        dec.compile_pairs()
    g = torch.Generator().manual_seed(5)
    W = torch.randn(7, W_U.shape[1], generator=g).to(torch.bfloat16)
    rows = torch.randint(0, 7, (50,), generator=g)
    tokens = torch.randint(0, 300, (50,), generator=g)
    want = _reference(dec, W_U, W.float())[rows, tokens]  # fp64
    before = dec.exact_pairs(W, rows, tokens)
    torch.testing.assert_close(before.double(), want, rtol=1e-5, atol=1e-5)
    assert dec.head8 is not None and dec.head8.operand.numel() == W_U.numel()
    dec.release_gemm()
    assert dec.head8.operand.numel() == 0  # the int8 copy is gone, its memory too
    assert dec.head8.operand.untyped_storage().nbytes() == 0  # (not an empty view of it)
    torch.testing.assert_close(dec.exact_pairs(W, rows, tokens), before, rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        dec.decode(W.float())


def test_heap_trim_runs_where_glibc_is() -> None:
    """The map gives freed heap memory back at layer boundaries; on glibc (Linux, CI) the call
    must reach malloc_trim, elsewhere it is a no-op."""
    import platform

    from flashlens import heap

    result = heap.trim()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert result is True
    else:
        assert result is False


def test_float_rows_converts_every_row_through_one_buffer() -> None:
    W = torch.randn(1000, 24).bfloat16()  # 1000 = 3 x 256 + a partial slice of 232
    parts = list(float_rows(W, 256))
    assert [lo for lo, _ in parts] == [0, 256, 512, 768]
    assert {p.data_ptr() for _, p in parts} == {parts[0][1].data_ptr()}  # one reused buffer
    seen = torch.empty(1000, 24)
    for lo, part in float_rows(W, 256):  # each slice is used before the next overwrites it
        assert part.dtype == torch.float32
        seen[lo : lo + part.shape[0]] = part
    assert torch.equal(seen, W.float())


def test_an_fp32_gemm_over_a_bf16_head_keeps_one_fp32_copy() -> None:
    """Computing in fp32 from a bf16 head (CPUs without fast bf16/int8), the decoder keeps one
    fp32 copy of the head, holding the stored values exactly, that the GEMM reads as a
    transposed view: the bf16 head is not kept beside it. Decoding matches the fp64 reference,
    and release_gemm leaves the shared copy in place (the exact paths read it)."""
    from flashlens.decode.engine import rows_dtype

    assert rows_dtype(torch.bfloat16, torch.float32) == torch.float32
    assert rows_dtype(torch.float16, torch.float32) == torch.float32
    for head, compute in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.int8)):
        assert rows_dtype(head, compute) == head
    assert rows_dtype(torch.float32, torch.bfloat16) == torch.float32

    dec, W_U = _decoder(700, torch.bfloat16, seed=3, compute=torch.float32)
    assert dec.W_U.dtype == torch.float32 and torch.equal(dec.W_U, W_U.float())
    assert dec.W_UT_c.data_ptr() == dec.W_U.data_ptr() and dec.W_UT_c.shape == (32, 700)
    g = torch.Generator().manual_seed(9)
    W_n = torch.randn(9, W_U.shape[1], generator=g)
    want = _reference(dec, W_U, W_n)
    res = dec.decode(W_n)
    assert torch.equal(res.top_ids.long(), want.topk(5, dim=1).indices)
    torch.testing.assert_close(
        res.top_logits.double(), want.topk(5, dim=1).values, rtol=1e-5, atol=1e-5
    )
    assert dec.exact and dec.n_top == 5  # an fp32 GEMM: no low-precision margins
    torch.testing.assert_close(
        res.logsumexp.double(), torch.logsumexp(want, 1), rtol=1e-5, atol=1e-5
    )
    dec.release_gemm()
    assert dec.W_U.untyped_storage().nbytes() == 700 * 32 * 4


def test_a_sparse_update_merges_its_hits_a_batch_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Early in a run millions of entries beat the table in one block; they are checked and
    merged a batch of at most GATHER gathered entries at a time, each batch against the
    thresholds the ones before it raised, so that they are never all held at once (0.4 GiB of
    a map's peak memory at Llama-3.1-8B shapes). The table stays the exact top-n."""
    monkeypatch.setattr(reverse_mod, "GATHER", 2 * CHUNK)
    monkeypatch.setattr(reverse_mod, "DENSE_ABOVE", 1.0)  # sparse after the first block
    sizes: list[int] = []
    merge = ReverseIndex._merge_hits

    def spy(self: ReverseIndex, L: Logits, lse: torch.Tensor, refs: torch.Tensor,
            b: torch.Tensor, v: torch.Tensor) -> None:  # fmt: skip
        sizes.append(b.numel())
        merge(self, L, lse, refs, b, v)

    monkeypatch.setattr(ReverseIndex, "_merge_hits", spy)
    V, B, n = 8 * CHUNK, 64, 2  # no vocabulary tail
    g = torch.Generator().manual_seed(4)
    rev = ReverseIndex(V, n, torch.device("cpu"))
    logps, logits, all_refs = [], [], []
    for blk in range(3):
        L = torch.randn(B, V, generator=g) * (1.0 if blk == 0 else 1.5)  # wider: many hits
        refs = torch.arange(blk * B, (blk + 1) * B)
        lse = _offer(rev, L, refs, torch.zeros(B))
        logps.append(L - lse[:, None])
        logits.append(L)
        all_refs.append(refs)
    assert len(sizes) > 4 and max(sizes) <= 2 * CHUNK, sizes  # many batches, none too big
    _assert_brute_force(rev, torch.cat(logps), torch.cat(logits), torch.cat(all_refs))


def test_cpu_map_trims_the_heap_every_few_blocks(
    monkeypatch: pytest.MonkeyPatch, stories: Path, tmp_path: Path
) -> None:
    """A CPU map returns freed heap memory after every BLOCKS_PER_TRIM-th block and at each
    layer boundary: never more than that many blocks' temporaries are held, and no trim is
    paid per block."""
    import flashlens.mapping as mapping_mod
    from flashlens import heap, map_model

    blocks = _count_calls(monkeypatch, Decoder, "decode_padded")
    at_trim: list[int] = []

    def trim() -> bool:  # records how many blocks were decoded when the heap was trimmed
        at_trim.append(blocks[0])
        return True

    monkeypatch.setattr(mapping_mod.heap, "trim", trim)
    # (fp32: no pilot, whose blocks would come before the first trim)
    map_model(
        stories,
        tmp_path / "a",
        matrices="up",
        layers="0-1",
        dtype="float32",
        block=16,
        compile="off",
    )
    per_layer = -(-172 // 16)  # stories260K: d_mlp 172 -> 11 blocks a layer
    assert blocks[0] == 2 * per_layer
    mapped = [b for b in at_trim if b > 0]  # (trims before the first block held nothing)
    gaps = [b - a for a, b in zip([0, *mapped], mapped, strict=False)]
    assert max(gaps) <= heap.BLOCKS_PER_TRIM
    assert len(mapped) < 2 * per_layer  # not after every block
