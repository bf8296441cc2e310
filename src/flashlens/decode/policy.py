"""Device, dtype, block-size and compile choices for the engine (see README: dtype policy)."""

from __future__ import annotations

import shutil

import torch

from ..errors import FlashlensError
from . import int8

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,  # CPU: int8 operands with per-row scales, exact integer products
}


def dtype_label(dtype: torch.dtype) -> str:
    """ "bfloat16" for torch.bfloat16: the name atlas.json, the summary and --dtype use."""
    return str(dtype).removeprefix("torch.")


def check_device(dtype: torch.dtype, device: torch.device) -> None:
    """int8 is a CPU path (oneDNN kernels, decode.int8); refuse it elsewhere, with the way out."""
    if dtype == torch.int8 and device.type != "cpu":
        raise FlashlensError("--dtype int8 is a CPU path; on a GPU use bfloat16 or float16")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FlashlensError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FlashlensError("--device cuda asked for, but no CUDA device is available")
    return dev


def cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def cpu_has_fast_fp16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except Exception:
        return False


def cpu_has_fast_int8() -> bool:
    """A fast int8 product (decode.int8): oneDNN's on AMX tiles, or `_int_mm` with VNNI
    (AVX512-VNNI, AVX-VNNI), about twice the bf16 rate; or, without VNNI, oneDNN's AVX2/AVX512
    u8 x s8 kernel with 7-bit activations, 2.1-2.4x the fp32 rate on a 2-core AVX2 CPU."""
    return int8.fast_kernel() is not None


# Below this many FLOPs a map is quick in fp32, so auto computes exactly rather than fast: low
# precision only pays on big jobs, and on some heads (e.g. many near-identical rows) it misses
# the 1% probability tolerance (see decode.audit).
LOW_PRECISION_FLOPS = 1e12


def resolve_dtype(
    dtype: str, weight_dtype: torch.dtype, device: torch.device, flops: float | None = None
) -> torch.dtype:
    """auto: the fastest dtype the hardware has, where the weights are low precision and the
    job (`flops` of GEMM, when given) is big enough to gain from it: bf16/fp16 on CUDA; on
    the CPU int8 where it is fast (VNNI, or AVX2/AVX512 through oneDNN), else bf16 with
    AVX512-BF16 or AMX; fp32 otherwise. `map` then
    checks a low-precision choice on the model's own neurons before it maps (decode.pilot),
    and steps down (`fallback_dtype`) when it misses the tolerances."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise FlashlensError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
        check_device(DTYPES[dtype], device)
        return DTYPES[dtype]
    if weight_dtype not in (torch.bfloat16, torch.float16):
        return torch.float32
    if flops is not None and flops < LOW_PRECISION_FLOPS:
        return torch.float32
    if device.type == "cuda":
        return weight_dtype
    return fastest_cpu_dtype()


def fastest_cpu_dtype() -> torch.dtype:
    """The fastest GEMM dtype this CPU has: int8 where it is fast (VNNI, or AVX2/AVX512 through
    oneDNN), else bf16 with AVX512-BF16 or AMX, else fp32."""
    if cpu_has_fast_int8():
        return torch.int8
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


# What a CPU needs for a fast GEMM in each low-precision dtype. Without it torch falls back to
# kernels far slower than fp32: on a 2-core AVX2 machine (no VNNI, no AVX512-BF16) the
# (512 x 4096) @ (4096 x V) product ran at 19 GFLOP/s in bf16, 24 in fp16 and 90-140 in fp32
# (bench/RESULTS.md, runs 21-22); in int8, 1 GFLOP/s through torch._int_mm and 240-310
# through oneDNN's u8 x s8 kernel (decode.int8, which needs AVX2 or AVX512).
_CPU_KERNELS = {
    torch.int8: (lambda: cpu_has_fast_int8(), "AMX or VNNI, or AVX2/AVX512 with oneDNN"),
    torch.bfloat16: (lambda: cpu_has_fast_bf16(), "AVX512-BF16 or AMX"),
    torch.float16: (lambda: cpu_has_fast_fp16(), "AVX512-FP16 or AMX"),
}


def check_gemm_dtype(dtype: torch.dtype, device: torch.device, flops: float) -> None:
    """Refuse a map's explicit low-precision dtype that this CPU has no fast GEMM for: a job of
    `flops` would run tens of times slower than in fp32 (and less exactly). Small jobs (under
    LOW_PRECISION_FLOPS) pass: they take seconds in any dtype. (Running a model in bf16 is
    another matter: it halves its memory, so `load_model` does not check this.)"""
    if device.type != "cpu" or dtype not in _CPU_KERNELS or flops < LOW_PRECISION_FLOPS:
        return
    fast, needs = _CPU_KERNELS[dtype]
    if not fast():
        name = dtype_label(dtype)
        best = dtype_label(fastest_cpu_dtype())
        raise FlashlensError(
            f"--dtype {name} has no fast kernel on this CPU (it needs {needs}): its product "
            f"runs several to a hundred times slower than float32 here; use --dtype auto, "
            f"which picks the fastest dtype this CPU has ({best} here), or map fewer "
            f"--layers to try {name} on a small job"
        )


def fallback_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The next more precise dtype auto tries when `dtype` misses the tolerances on a model:
    int8 -> bf16 (where the hardware is fast at it) -> fp32."""
    if dtype == torch.int8 and (device.type == "cuda" or cpu_has_fast_bf16()):
        return torch.bfloat16
    return torch.float32


def block_size(d_vocab: int, d_mlp: int, device: torch.device, requested: int | None) -> int:
    """Neurons per block: the (block, vocabulary) logits stay near 256 MB (2 GB on GPU), and a
    block is never larger than a layer (padding rows would be wasted work)."""
    if requested:
        return min(requested, d_mlp)
    budget = (2 << 30) if device.type == "cuda" else (256 << 20)
    b = budget // (4 * d_vocab)
    return int(min(d_mlp, max(64, min(4096, 1 << max(b, 1).bit_length() - 1))))


def use_compile(mode: str, device: torch.device, work: int) -> bool:
    """Compile the fused reductions when the job is big enough to repay compilation.

    work: logits to compute (neurons x vocabulary)."""
    if mode in ("on", "off"):
        return mode == "on"
    if mode != "auto":
        raise FlashlensError(f"unknown --compile {mode!r}: use auto, on or off")
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
    elif not has_c_compiler():
        return False
    return work > 1_000_000_000


def has_c_compiler() -> bool:
    """Inductor's CPU kernels (compiled in-process or ahead of time) need a C/C++ compiler."""
    return any(shutil.which(c) for c in ("cc", "gcc", "g++", "c++"))
