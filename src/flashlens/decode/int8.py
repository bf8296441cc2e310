"""The int8 GEMM's three CPU kernels: which one this CPU has, the head's operand, the product.

Each computes the exact integer products of per-row quantised operands (decode.logits):
    L = (q_x @ q_U^T) * s_x[:, None] * s_U[None, :]
- "amx": oneDNN's s8 x s8 product (`onednn::qlinear_pointwise`, zero point 0) on CPUs with
  AMX, where oneDNN runs it on the AMX tiles (its brgemm kernel), which accumulate in int32:
  1.3-1.4x `_int_mm`'s rate on a 2-core AMX Xeon (2.7-2.9 against 2.1 TFLOP/s at
  Llama-3.1-8B shapes, bench/RESULTS.md). Its operands are `_int_mm`'s (8 bits each), its
  output fp32 holding the integer products, as "u7"'s below. Without the tiles oneDNN runs
  s8 x s8 in a reference loop (100x slower) or, capped at AVX2, in a kernel that saturates;
  a probe keeps "amx" to CPUs where oneDNN runs it on them (`_amx_runs`).
- "int_mm": `torch._int_mm`, int8 x int8 -> int32, fast with VNNI (AVX512-VNNI, AVX-VNNI).
  On AMX CPUs it takes oneDNN's VNNI path, not the tiles. Without VNNI it is a reference loop
  (1 GFLOP/s on a 2-core AVX2 CPU).
- "u7": oneDNN's u8 x s8 product (`onednn::qlinear_pointwise`), fast on AVX2 and AVX512
  without VNNI (2.1-2.4x the fp32 GEMM on a 2-core AVX2 CPU, bench/RESULTS.md). Its kernel
  (vpmaddubsw) adds each pair of u8 * s8 products in int16 and saturates past 32,767: with
  8-bit activations (255 * 127 * 2 = 64,770) the products of large entries come out wrong
  (measured: 32 for a true 4,094). So the activations take 7 bits: x is quantised to
  +-63 per row and stored as u8 with a zero point of 64 (values 1..127: 127 * 127 * 2 =
  32,258 fits), while the head keeps its 8 bits. The output is fp32 holding the integer
  products (exact up to 2**24; beyond, rounded by under 6e-8 relative), written into the
  engine's reused buffer through the op's "sum" post-op (the buffer is zeroed first: 12 ms
  for a 512 x 128,256 block). The head is prepacked into oneDNN's own opaque layout once.
  "amx" is called the same way.
The map's pilot and audit measure what the rounding does on each model, as for any low
precision GEMM, and auto steps down to a more precise dtype where it misses the tolerances.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import Tensor

from .logits import INT8_MAX, Logits, quantize_head, quantize_rows

U7_MAX = 63  # the "u7" kernel's activations: +-63 ...
U7_ZERO = 64  # ... stored as u8 64 + q (1..127)
KERNELS = ("amx", "int_mm", "u7")


def _has_vnni() -> bool:
    try:
        return bool(torch.cpu._is_vnni_supported())
    except Exception:
        return False


def _has_onednn_qlinear() -> bool:
    """torch has oneDNN and its quantised linear op (both the "u7" and "amx" kernels use it)."""
    try:
        op = torch.ops.onednn.qlinear_pointwise  # noqa: F841 (raises where not built)
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.backends.mkldnn.is_available())


def _has_amx() -> bool:
    """This CPU has AMX tiles (Sapphire Rapids and later Xeons), torch has oneDNN's op, and
    oneDNN runs s8 x s8 on the tiles here (`_amx_runs`)."""
    try:
        amx = bool(torch.cpu._is_amx_tile_supported())
    except Exception:
        return False
    return amx and _has_onednn_qlinear() and _amx_runs()


# The probe's product, (16, 512) @ (512, 2048): 16.8 M multiply-adds, under 1 ms on the tiles
# and about 250 ms in oneDNN's reference kernel; a product slower than this is not on them.
AMX_PROBE_SECONDS = 0.01


def _amx_runs() -> bool:
    """oneDNN's s8 x s8 product, as the "amx" kernel calls it, is exact and fast here. Where
    the CPU has AMX but oneDNN does not use it (the OS withholds the tiles, or
    ONEDNN_MAX_CPU_ISA caps it), oneDNN takes another kernel: a reference loop, exact and 100x
    slower, or an AVX2 one whose 16-bit pair sums saturate (measured: wrong products). The
    probe holds that worst case: rows at +-127 against activations at +-127, signs matching."""
    g = torch.Generator().manual_seed(0)
    W_U = torch.randn(2048, 512, generator=g)
    W_U[:4] = torch.sign(W_U[:4])  # rows at +-127 once quantised
    x = torch.randn(16, 512, generator=g)
    x[:4] = W_U[:4]  # and activations at +-127, signs matching
    try:
        head = Int8Head(W_U, "amx")
        q_x, _ = head.quantize(x)
        out = torch.empty((16, 2048), dtype=head.out_dtype)
        seconds = []
        for _ in range(3):
            t = time.perf_counter()
            head.mm(q_x, out)
            seconds.append(time.perf_counter() - t)
    except RuntimeError:
        return False
    q_U, _ = quantize_head(W_U, transposed=False)
    exact = torch.equal(out.long(), q_x.long() @ q_U.long().T)
    return exact and min(seconds) < AMX_PROBE_SECONDS


def _has_u7() -> bool:
    """oneDNN's u8 x s8 product is built in and this CPU has AVX2 or AVX512 for it."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False
    return capability in ("AVX2", "AVX512") and _has_onednn_qlinear()


@functools.cache
def fast_kernel() -> str | None:
    """The fast int8 kernel this CPU has: "amx" with AMX, else "int_mm" with VNNI, else "u7" on
    AVX2/AVX512 with oneDNN, else None (int8 would run tens of times slower than fp32)."""
    if _has_amx():
        return "amx"
    if _has_vnni():
        return "int_mm"
    return "u7" if _has_u7() else None


def kernel() -> str:
    """The kernel an int8 Decoder uses: the fast one, or `_int_mm`'s reference loop (correct,
    slow: small jobs only, see policy.check_gemm_dtype)."""
    return fast_kernel() or "int_mm"


def out_dtype(kernel: str) -> torch.dtype:
    """The dtype of the products a kernel writes: int32, or fp32 holding integers (oneDNN's)."""
    return torch.int32 if kernel == "int_mm" else torch.float32


class Int8Head:
    """The LM-head W_U (V, d) quantised per token (8 bits) as `kernel`'s right operand, and the
    block product x (B, d) fp32 -> Logits of integer products with their scales."""

    def __init__(self, W_U: Tensor, kernel: str) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"unknown int8 kernel {kernel!r}")
        self.kernel = kernel
        self.released = False
        self.d_vocab, self.d_model = W_U.shape
        if kernel != "int_mm":  # oneDNN's
            # Packed into oneDNN's opaque blocked layout (the op needs it: a plain tensor
            # crashes it) from contiguous (V, d) rows (the prepack ignores strides: a
            # transposed view comes out wrong); the plain copy is freed once packed.
            q, self.s_U = quantize_head(W_U, transposed=False)  # (V, d) int8, (V,) fp32
            self.operand = torch.ops.onednn.qlinear_prepack(q, None)
            del q
            self._w_scale = torch.ones(self.d_vocab, dtype=torch.float32)
            self._w_zero = torch.zeros(self.d_vocab, dtype=torch.int64)
        else:
            self.operand, self.s_U = quantize_head(W_U)  # (d, V) int8, (V,) fp32

    @property
    def out_dtype(self) -> torch.dtype:
        return out_dtype(self.kernel)

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """fp32 vectors x (B, d) -> the kernel's left operand (B, d) and row scales s_x (B,)."""
        if self.kernel == "u7":
            q, s = quantize_rows(x, U7_MAX)
            return q.add_(U7_ZERO).view(torch.uint8), s  # (1..127 in int8 and u8 alike)
        return quantize_rows(x, INT8_MAX)

    def mm(self, q_x: Tensor, out: Tensor) -> Tensor:
        """out (B, V) <- the integer products q_x @ q_U^T, in `out_dtype`."""
        if self.released:  # (never hand oneDNN a tensor that is not its packed head)
            raise RuntimeError("the int8 head was released (Decoder.release_gemm)")
        if self.kernel == "int_mm":
            return torch._int_mm(q_x, self.operand, out=out)
        x_zero = U7_ZERO if self.kernel == "u7" else 0
        out.zero_()  # the "sum" post-op adds the product to what is there
        return torch.ops.onednn.qlinear_pointwise.binary(  # type: ignore[no-any-return]
            q_x, 1.0, x_zero, self.operand, self._w_scale, self._w_zero, out, None,
            1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], "",
        )  # fmt: skip

    def logits(self, x: Tensor, out: Tensor) -> Logits:
        """The block's logits of fp32 vectors x (B, d), as integer products in `out`."""
        q_x, s_x = self.quantize(x)
        return Logits(self.mm(q_x, out), s_x, self.s_U)

    def release(self) -> None:
        """Free the quantised head (0.5 GiB at Llama-3.1-8B shapes): any later product fails."""
        self.operand = torch.empty((self.d_model, 0), dtype=torch.int8)
        self.released = True
