"""Large CPU tensors backed by transparent huge pages (2 MiB) where the OS allows it.

The map's two big operands, the LM-head (2 GiB in fp32 at Llama-3.1-8B shapes) and the
reused logits block (256 MB), are streamed through by every block's GEMM and reductions. In
4 KiB pages that is half a million TLB entries' worth of memory; many Linux hosts (most
cloud VMs) set transparent huge pages to `madvise`, so memory gets 2 MiB pages only where
a program asks. `empty()` asks (madvise MADV_HUGEPAGE) before the first write, so the pages
are huge from their first fault. Measured on a 2-core AVX2 host, the fp32 head product ran
1-13% faster (bench/RESULTS.md). Where the OS has no transparent huge pages, where they are
`never`, on other platforms and on GPUs, `empty()` is `torch.empty`.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from collections.abc import Callable

import torch

# Tensors below this size are left to the allocator as they are: glibc serves allocations
# up to 32 MiB from its shared heap, whose pages must not be advised on another's behalf.
HUGE_MIN_BYTES = 64 << 20
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)  # Linux's value where Python lacks it


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn  # type: ignore[no-any-return]


def advise_huge(t: torch.Tensor) -> bool:
    """Ask for huge pages for the whole pages of `t`'s storage (CPU, at least HUGE_MIN_BYTES);
    True if the OS accepted. Only pages not yet touched are affected: call before writing."""
    fn = _madvise()
    nbytes = t.untyped_storage().nbytes()
    if fn is None or t.device.type != "cpu" or nbytes < HUGE_MIN_BYTES:
        return False
    page = mmap.PAGESIZE
    start = t.untyped_storage().data_ptr()
    lo, hi = -(-start // page) * page, (start + nbytes) // page * page
    return fn(lo, hi - lo, MADV_HUGEPAGE) == 0  # EINVAL where THP is not built in: no-op


def empty(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """`torch.empty`, on huge pages where the OS offers them (see the module's docstring)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    advise_huge(t)
    return t
