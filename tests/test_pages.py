"""Huge pages for the map's large CPU tensors (flashlens.pages): the LM-head as read from the
checkpoint and the decoder's reused logits block are advised MADV_HUGEPAGE before they are
written, so hosts whose transparent huge pages are `madvise`-only back them with 2 MiB pages."""

from __future__ import annotations

import gc
import mmap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flashlens import pages
from flashlens.decode.engine import Decoder
from flashlens.decode.logits import quantize_head
from flashlens.decode.norm import Readout
from flashlens.weights import Checkpoint

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(
    not THP.is_file(), reason="needs Linux with transparent huge pages built in"
)


def _mapping(t: torch.Tensor) -> tuple[int, int, list[str]] | None:
    """(lo, hi, VmFlags) of the mapping that holds `t`'s first whole page (/proc/self/smaps)."""
    addr = -(-t.untyped_storage().data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    return _mapping_at(addr)


def _mapping_at(addr: int) -> tuple[int, int, list[str]] | None:
    span: tuple[int, int] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        field = line.split()[0]
        if "-" in field and not field.endswith(":"):  # a mapping's header: lo-hi perms ...
            lo, hi = (int(v, 16) for v in field.split("-"))
            span = (lo, hi) if lo <= addr < hi else None
        elif span and field == "VmFlags:":
            return (*span, line.split()[1:])
    return None


def _vm_flags(t: torch.Tensor) -> list[str]:
    found = _mapping(t)
    assert found is not None, "the tensor's memory is not mapped"
    return found[2]


def test_a_large_tensor_gets_huge_pages_in_a_mapping_of_its_own() -> None:
    """Advice on the C allocator's memory would outlive the tensor (a large malloc can come
    from the heap): a large tensor gets a mapping of its own, advised, and unmapped when it is
    freed. A small one is left to torch's allocator. (Whether the small one's pages carry the
    advice is not this code's to say: other libraries in the process may advise theirs.)"""
    n = pages.HUGE_MIN_BYTES // 4
    big = pages.empty((n,), torch.float32)
    small = pages.empty((1 << 18,), torch.float32)  # 1 MiB
    found = _mapping(big)
    assert found is not None
    lo, hi, flags = found
    assert "hg" in flags  # VM_HUGEPAGE: the kernel gives its faults 2 MiB pages
    assert lo == big.data_ptr() and hi - lo == big.numel() * 4  # its own mapping, no neighbours
    # torch's allocator's memory (resizable), not a mapping of its own
    assert small.untyped_storage().resizable() and not big.untyped_storage().resizable()
    big[1:].fill_(3.0)  # an ordinary tensor otherwise
    view = big[1:]
    del big
    gc.collect()
    assert view.numel() == n - 1 and bool((view == 3.0).all())  # a view keeps the mapping
    del view
    gc.collect()
    assert _mapping_at(lo) is None or "hg" not in _mapping_at(lo)[2]  # type: ignore[index]


def test_the_lm_head_is_read_into_huge_pages(tmp_path: Path) -> None:
    """A tensor as large as a head (64 MiB here; 2 GiB in fp32 at Llama-3.1-8B shapes) is
    copied out of the checkpoint into huge pages, converted as it is copied; the same head in
    bf16 (32 MiB) and a layer-norm gain are left to torch's allocator."""
    W_U = torch.randn(8192, 2048).bfloat16()  # 32 MiB stored, 64 MiB in fp32
    gain = torch.randn(2048)
    save_file({"lm_head.weight": W_U, "norm.weight": gain}, tmp_path / "model.safetensors")
    with Checkpoint(tmp_path) as ckpt:
        got = ckpt.get("lm_head.weight", torch.float32)
        assert torch.equal(got, W_U.float()) and "hg" in _vm_flags(got)
        assert not got.untyped_storage().resizable()  # a mapping of its own
        # Below the minimum (32 MiB in bf16) and a norm gain: torch's allocator
        assert ckpt.get("lm_head.weight").untyped_storage().resizable()
        assert ckpt.get("norm.weight").untyped_storage().resizable()


def test_the_decoder_s_logits_block_and_int8_head_copy_are_on_huge_pages() -> None:
    V, d_model, B = 32768, 16, 512  # a (B, V) fp32 block of 64 MiB
    W_U = torch.randn(V, d_model)
    dec = Decoder(
        W_U, Readout(torch.ones(d_model), 1e-5), "model", 5, torch.device("cpu"), torch.float32
    )
    x = torch.randn(B, d_model)
    L = dec.logits(x)
    assert "hg" in _vm_flags(L)
    torch.testing.assert_close(L, x @ W_U.T)
    q_T, _ = quantize_head(torch.randn(V, 2048))  # (2048, V) int8: 64 MiB, as _int_mm reads it
    assert q_T.shape == (2048, V) and q_T.is_contiguous() and "hg" in _vm_flags(q_T)
