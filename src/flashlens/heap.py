"""Giving freed C-heap memory back to the operating system.

glibc serves allocations of up to 32 MB (its dynamic mmap threshold) from the heap, and keeps
the pages of freed ones resident: a map's per-block temporaries (gathers, merges, the dense
reverse-index slices) and each layer's write leave ~0.3 GiB of freed memory counted in the
process's resident set at Llama-3.1-8B shapes. `trim()` returns it (malloc_trim): a CPU map
calls it after every BLOCKS_PER_TRIM-th block and at each layer boundary. A no-op where the
C library has no malloc_trim.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

# A trim costs ~8 ms at Llama-3.1-8B shapes (~1% of a CPU block), and the pages it returns are
# faulted in again by the next block's temporaries. Every 4th block: 3-4 ms a block, and about
# the same peak RSS on an 8-layer map (2.64-2.67 GiB trimming every block, 2.66-2.71 every 4th;
# docs/performance.md, "Memory").
BLOCKS_PER_TRIM = 4


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl) or no C library found
        return None
    if fn is None:
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn  # type: ignore[no-any-return]


def trim() -> bool:
    """Return the heap's free pages to the OS; True where the C library has malloc_trim (it
    ran), False where this is a no-op."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)  # (its result says whether any page was released: often none)
    return True
