"""fp32 copies of a large matrix's row slices, made one slice at a time in one reused buffer.

Converting a 1 GiB bf16 LM-head to fp32 in fresh 128 MB slices costs more in page faults than
in arithmetic (1.4 s against 0.14 s through one buffer, Llama-3.1-8B shapes on the benchmark
machine): each large allocation is a fresh memory map that the kernel zero-fills page by page.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def float_rows(W: Tensor, rows: int) -> Iterator[tuple[int, Tensor]]:
    """(lo, W[lo : lo + rows] as fp32) for consecutive slices of W (n, d), on W's device.

    The slice is a view of a buffer that the next step overwrites: use it before moving on."""
    n = W.shape[0]
    buf = torch.empty((min(rows, n), *W.shape[1:]), dtype=torch.float32, device=W.device)
    for lo in range(0, n, rows):
        part = buf[: min(rows, n - lo)]
        part.copy_(W[lo : lo + rows])
        yield lo, part
