"""The int8 GEMM's CPU kernels (decode.int8): exact integer products, including inputs that
would saturate the "u7" kernel's int16 pair sums with 8-bit activations; which kernel a CPU
gets, and the probe that keeps "amx" off CPUs where oneDNN does not run it on the tiles; and a
Decoder on each of them against the fp64 reference."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from flashlens.decode import int8, policy
from flashlens.decode.engine import Decoder
from flashlens.decode.logits import quantize_head
from flashlens.decode.norm import Readout

from .helpers import AMX_ONLY, INT8_KERNELS, make_model, use_int8_kernel


def _exact_products(q_x: torch.Tensor, q_T: torch.Tensor) -> torch.Tensor:
    """The integer products in int64: q_x (B, d) (int8, or the u7 kernel's u8 with its zero
    point) @ q_T (d, V) int8."""
    x = q_x.long() - (int8.U7_ZERO if q_x.dtype == torch.uint8 else 0)
    return x @ q_T.long()


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_kernels_compute_exact_integer_products(kernel: str) -> None:
    """Random rows, rows of a different length than a cache block, and the worst case for
    vpmaddubsw: every activation at its row's largest magnitude against head rows at +-127
    with the same signs (8-bit activations give 255 * 127 * 2 = 64,770 per pair, past int16:
    measured 32 for a true 4,094 before the activations took 7 bits)."""
    g = torch.Generator().manual_seed(0)
    V, d = 1000, 256  # V not a multiple of any kernel block
    W_U = torch.randn(V, d, generator=g)
    W_U[:8] = torch.sign(torch.randn(d, generator=g))  # rows at +-127 once quantised
    head = int8.Int8Head(W_U, kernel)
    q_T, s_U = quantize_head(W_U)
    x = torch.randn(37, d, generator=g)
    x[:8] = W_U[:8] * 3.0  # each entry at its row's max, signs matching rows 0-7
    q_x, _ = head.quantize(x)
    levels = int8.U7_MAX if kernel == "u7" else int8.INT8_MAX
    assert q_x.dtype == (torch.uint8 if kernel == "u7" else torch.int8)
    if kernel == "u7":  # 1..127: 127 * 127 * 2 = 32,258 fits int16
        assert int(q_x.min()) >= 1 and int(q_x.max()) <= 2 * levels + 1
    out = torch.empty((37, V), dtype=head.out_dtype)
    got = head.mm(q_x, out)
    assert got.data_ptr() == out.data_ptr()  # into the engine's reused buffer
    want = _exact_products(q_x, q_T)
    assert int(want[:8].diagonal().min()) == levels * 127 * d  # the extreme case is there
    assert torch.equal(got.long(), want)
    # A second product into the same (now dirty) buffer is not added to the first.
    assert torch.equal(head.mm(q_x, out).long(), want)
    torch.testing.assert_close(s_U, head.s_U, rtol=0, atol=0)
    # and the logits are the products scaled back: within the operands' rounding of x @ W_U^T
    L = head.logits(x, out).dense()
    ref = x @ W_U.T
    tol = (x.abs().amax(1, keepdim=True) / levels) * W_U.abs().sum(1) + 1e-3  # (37, V) bound
    assert bool(((L - ref).abs() <= tol).all())


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_released_head_refuses_to_multiply(kernel: str) -> None:
    """After release (the end of a map) a product fails with an error, not a crash: oneDNN is
    never handed a tensor that is not its packed head."""
    head = int8.Int8Head(torch.randn(300, 64), kernel)
    q_x, _ = head.quantize(torch.randn(4, 64))
    head.release()
    assert head.operand.untyped_storage().nbytes() == 0
    with pytest.raises(RuntimeError, match="released"):
        head.mm(q_x, torch.empty((4, 300), dtype=head.out_dtype))


def test_each_cpu_gets_its_fast_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """AMX (where oneDNN runs on it) -> "amx"; VNNI -> _int_mm; AVX2 or AVX512 without it ->
    oneDNN's u7; none -> no fast int8, and auto maps in fp32 (or bf16 where that is fast)."""
    cases = [
        (True, True, "AVX512", "amx"),
        (False, True, "AVX512", "int_mm"),
        (False, False, "AVX2", "u7"),
        (False, False, "AVX512", "u7"),
        (False, False, "DEFAULT", None),
    ]
    monkeypatch.setattr(policy, "cpu_has_fast_bf16", lambda: False)
    try:
        for amx, vnni, capability, want in cases:
            monkeypatch.setattr(int8, "_has_amx", lambda a=amx: a)
            monkeypatch.setattr(int8, "_has_vnni", lambda v=vnni: v)
            monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
            int8.fast_kernel.cache_clear()
            assert int8.fast_kernel() == want
            assert int8.kernel() == (want or "int_mm")
            assert policy.fastest_cpu_dtype() == (torch.int8 if want else torch.float32)
    finally:
        int8.fast_kernel.cache_clear()


def _wrong(mm: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def product(self: int8.Int8Head, q_x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        mm(self, q_x, out)
        out[0, 0] += 1  # one product off by one (as a saturating kernel's would be)
        return out

    return product


def _slow(mm: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def product(self: int8.Int8Head, q_x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        time.sleep(int8.AMX_PROBE_SECONDS)  # (as oneDNN's reference loop: exact, slow)
        return mm(self, q_x, out)

    return product


def _failing(mm: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def product(self: int8.Int8Head, q_x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("could not create a primitive")

    return product


@AMX_ONLY
@pytest.mark.parametrize("fault", [_wrong, _slow, _failing])
def test_amx_probe_keeps_the_kernel_off_where_onednn_misses_the_tiles(
    fault: Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On this AMX CPU the probe passes; the same probe refuses a product with one wrong entry,
    one slower than the tiles, or one oneDNN cannot run: "amx" is chosen only where oneDNN
    runs s8 x s8 on the tiles, exactly."""
    assert int8._amx_runs()
    monkeypatch.setattr(int8.Int8Head, "mm", fault(int8.Int8Head.mm))
    assert not int8._amx_runs()
    int8.fast_kernel.cache_clear()
    try:
        assert int8.fast_kernel() != "amx"
    finally:
        int8.fast_kernel.cache_clear()


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_decoder_on_each_kernel_matches_the_reference(
    kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Top and bottom tokens and their logits exact (rescored in fp32), the logsumexp within
    the low-precision tolerance, with the vocabulary's tail outside every chunk."""
    use_int8_kernel(monkeypatch, kernel)
    g = torch.Generator().manual_seed(3)
    V, d = 3 * 64 + 37, 256
    W_U = (torch.randn(V, d, generator=g) * 0.3).bfloat16()
    gain = 1 + torch.rand(d, generator=g)
    dec = Decoder(W_U, Readout(gain, 1e-6), "model", 5, torch.device("cpu"), torch.int8)
    assert dec.head8 is not None and dec.head8.kernel == kernel
    assert dec.reverse_spare == (16 if kernel == "u7" else 8)
    W = torch.randn(9, d, generator=g)
    W[0] = W_U[V - 1].float() * 5  # top-1 in the tail
    w = W.double()
    x = w * torch.rsqrt(w.pow(2).mean(-1, keepdim=True) + 1e-6) * gain.double()
    ref = x @ W_U.double().T
    r = dec.decode(W)
    assert int(r.top_ids[0, 0]) == V - 1
    assert r.top_ids.tolist() == ref.topk(5, 1).indices.tolist()
    assert r.bottom_ids.tolist() == ref.topk(5, 1, largest=False).indices.tolist()
    torch.testing.assert_close(r.top_logits.double(), ref.topk(5, 1).values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r.logsumexp.double(), torch.logsumexp(ref, 1), rtol=0, atol=5e-3)


@AMX_ONLY
def test_amx_maps_the_same_atlas_as_int_mm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The "amx" kernel is `_int_mm` on other silicon: the same 8-bit operands and the same
    integer products (fp32 holds them exactly at these sizes), so an int8 map on either kernel
    writes the same atlas, value for value: top and bottom tokens, probabilities, statistics
    and reverse index."""
    from flashlens import map_model

    model = make_model(
        tmp_path / "m", d_vocab=4096, d_model=256, d_mlp=64, n_layers=2, dtype=torch.bfloat16
    )
    atlases = {}
    for kernel in ("int_mm", "amx"):
        use_int8_kernel(monkeypatch, kernel)
        out = tmp_path / kernel
        summary = map_model(model, out, matrices="up,down", dtype="int8", block=32)
        assert (summary.compute_dtype, summary.int8_kernel) == ("int8", kernel)
        atlases[kernel] = {
            p.relative_to(out): pq.read_table(p) for p in sorted(out.rglob("*.parquet"))
        }
    assert len(atlases["amx"]) >= 5  # (2 layers x 2 matrices, the reverse index, ...)
    assert atlases["amx"].keys() == atlases["int_mm"].keys()
    for rel, table in atlases["amx"].items():
        assert table.equals(atlases["int_mm"][rel]), rel


def test_cli_map_names_the_int8_kernel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An int8 map says which of this CPU's kernels computed it, in its summary line and in
    --json ("u7" rounds the neuron vectors to 7 bits, the others to 8)."""
    from flashlens.cli import main

    model = make_model(tmp_path / "m", n_layers=1, dtype=torch.bfloat16)
    argv = ["map", str(model), "-o", str(tmp_path / "a"), "--dtype", "int8", "--compile", "off"]
    assert main(argv) == 0
    assert f"int8 ({int8.kernel()})" in " ".join(capsys.readouterr().err.split())
    assert main([*argv[:3], str(tmp_path / "b"), *argv[4:], "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["compute_dtype"], s["int8_kernel"]) == ("int8", int8.kernel())
