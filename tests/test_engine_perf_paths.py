"""The engine's fast paths against brute force: the fused block kernel (eager and compiled), the
chunked top/bottom-k search with a vocabulary tail, padding rows, the reused logits buffer, and
the reverse index's token filter and compaction."""

from __future__ import annotations

import pytest
import torch

from flashlens.decode.engine import Decoder
from flashlens.decode.kernels import CHUNK, block_stats, compiled_block_stats
from flashlens.decode.reverse import ReverseIndex


def _brute_stats(L: torch.Tensor, mu: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    L64 = L.double()
    lse = torch.logsumexp(L64, 1)
    p = torch.softmax(L64, 1)
    c = L64 - mu.double()[:, None]
    n = L.shape[1] // CHUNK * CHUNK
    logp = (L64 - lse[:, None])[valid]
    return {
        "lse": lse,
        "entropy": -(p * torch.log(p)).sum(1),
        "m2": (c**2).mean(1),
        "m3": (c**3).mean(1),
        "m4": (c**4).mean(1),
        "chunk_max": L64[:, :n].reshape(L.shape[0], -1, CHUNK).amax(2),
        "chunk_min": L64[:, :n].reshape(L.shape[0], -1, CHUNK).amin(2),
        "col_best": logp.amax(0),
    }


@pytest.mark.parametrize("V", [200, 256, 40])  # tail of 8 tokens; no tail; smaller than a chunk
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_stats_matches_brute_force(V: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(V)
    L = (torch.randn(6, V, generator=g) * 3).to(dtype)
    mu = L.double().mean(1).float()
    valid = torch.tensor([True, True, False, True, True, False])  # padding rows excluded
    st = block_stats(L, mu, valid)
    ref = _brute_stats(L, mu, valid)
    for name, want in ref.items():
        got = getattr(st, name).double()
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_block_stats_col_best_ignores_padding() -> None:
    L = torch.zeros(3, 128)
    L[2, 5] = 50.0  # a padding row with a huge logit must not reach the reverse index
    st = block_stats(L, L.mean(1), torch.tensor([True, True, False]))
    assert float(st.col_best[5]) == pytest.approx(-torch.log(torch.tensor(128.0)).item())


def test_compiled_block_stats_equals_eager() -> None:
    fn = compiled_block_stats("cpu")
    if fn is None:
        pytest.skip("no C compiler for inductor")
    g = torch.Generator().manual_seed(1)
    L = (torch.randn(8, 200, generator=g) * 4).bfloat16()
    mu, valid = L.float().mean(1), torch.arange(8) < 6
    got, want = fn(L, mu, valid), block_stats(L, mu, valid)
    for name in want._fields:
        torch.testing.assert_close(
            getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5, msg=name
        )


def _decoder(V: int, dtype: torch.dtype, seed: int = 0) -> tuple[Decoder, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = 32
    W_U = (torch.randn(V, d, generator=g) * 0.3).to(dtype)
    gain = 1 + torch.rand(d, generator=g)
    dec = Decoder(W_U, gain, 1e-6, "model", 5, torch.device("cpu"), dtype)
    return dec, W_U


def _reference(dec: Decoder, W_U: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    w = W.double()
    x = w * torch.rsqrt(w.pow(2).mean(-1, keepdim=True) + 1e-6) * dec.gain.double()
    return x @ W_U.double().T  # (B, V)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_finds_extremes_in_the_vocabulary_tail(dtype: torch.dtype) -> None:
    V = 3 * CHUNK + 37  # d_vocab % 64 != 0: the last 37 tokens are outside every chunk
    dec, W_U = _decoder(V, dtype)
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


@pytest.mark.parametrize("n", [1, 4])
def test_reverse_index_matches_brute_force_across_filter_paths(n: int) -> None:
    """Blocks offered with the kernel's col_best go through the dense (filling), the dense
    column (many hits), and the sparse (few hits + compaction) paths; the result must be the
    exact top-n per token over every valid row seen."""
    V, B = 300, 16
    g = torch.Generator().manual_seed(n)
    rev = ReverseIndex(V, n, torch.device("cpu"))
    all_logp, all_logit, all_ref = [], [], []
    for blk in range(24):
        scale = 1.0 if blk < 12 else 3.0  # later blocks are peakier: fewer, sparser hits
        L = torch.randn(B, V, generator=g) * scale
        refs = torch.arange(blk * B, (blk + 1) * B)
        if blk % 5 == 4:
            refs[-3:] = -1  # padding rows
        valid = refs >= 0
        st = block_stats(L, L.mean(1), valid)
        rev.update(L, st.lse, refs, st.col_best)
        all_logp.append((L - st.lse[:, None])[valid])
        all_logit.append(L[valid])
        all_ref.append(refs[valid])
    logp, logit, ref = torch.cat(all_logp), torch.cat(all_logit), torch.cat(all_ref)
    top, rows = logp.topk(n, dim=0)  # (n, V)
    state = rev.state()
    got = state["logp"].sort(0, descending=True)
    torch.testing.assert_close(got.values, top)
    assert state["ref"].gather(0, got.indices).tolist() == ref[rows].tolist()
    torch.testing.assert_close(state["logit"].gather(0, got.indices), logit.gather(0, rows))


def test_reverse_compaction_equals_one_dense_merge() -> None:
    V, n = 64, 3
    g = torch.Generator().manual_seed(9)
    L = torch.randn(40, V, generator=g)
    lse = torch.logsumexp(L, 1)
    refs = torch.arange(40)
    dense = ReverseIndex(V, n, torch.device("cpu"))
    dense.update(L, lse, refs)  # no col_best: one dense merge
    sparse = ReverseIndex(V, n, torch.device("cpu"))
    sparse.update(L[:8], lse[:8], refs[:8])  # fills the table
    for lo in range(8, 40, 4):  # then filtered blocks, pending + compaction
        blk = slice(lo, lo + 4)
        col_best = (L[blk] - lse[blk, None]).amax(0)
        sparse.update(L[blk], lse[blk], refs[blk], col_best)
    a, b = dense.state(), sparse.state()
    sa, sb = a["logp"].sort(0), b["logp"].sort(0)
    torch.testing.assert_close(sa.values, sb.values)
    assert a["ref"].gather(0, sa.indices).tolist() == b["ref"].gather(0, sb.indices).tolist()
