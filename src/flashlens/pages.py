"""Large CPU tensors backed by transparent huge pages (2 MiB) where the OS allows it.

The map's big operands, the LM-head (2 GiB in fp32 at Llama-3.1-8B shapes) and the reused
logits block (256 MB), are streamed through by every block's GEMM and reductions. In 4 KiB
pages that is half a million TLB entries' worth of memory; many Linux hosts (most cloud VMs)
set transparent huge pages to `madvise`, so memory gets 2 MiB pages only where a program
asks. `empty()` gives such a tensor a private anonymous mapping of its own, advised
MADV_HUGEPAGE before its first write, so its pages are huge from their first fault. A mapping
of its own, not the C allocator's memory: a large malloc can be carved out of the heap, and
advice given there would outlive the tensor and reach the small allocations that reuse those
pages. The mapping is unmapped when the tensor's storage is freed. Measured on a 2-core AVX2
host, 1-layer fp32 maps ran 13% faster (bench/RESULTS.md, run 24). Where the OS has no
transparent huge pages, on other platforms and on GPUs, `empty()` is `torch.empty`.
"""

from __future__ import annotations

import math
import mmap

import torch

# Smaller tensors are left to torch's allocator: a mapping of their own would cost a system
# call and page faults per allocation for no measurable gain.
HUGE_MIN_BYTES = 64 << 20


def empty(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """`torch.empty`, on huge pages where the OS offers them (see the module's docstring)."""
    nbytes = math.prod(shape) * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
    if torch.device(device).type != "cpu" or nbytes < HUGE_MIN_BYTES or advice is None:
        return torch.empty(shape, dtype=dtype, device=device)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(advice)
    except OSError:  # a kernel without transparent huge pages
        buf.close()
        return torch.empty(shape, dtype=dtype, device=device)
    # The tensor holds the mapping (a buffer export) until its storage is freed.
    return torch.frombuffer(buf, dtype=dtype).view(shape)
