"""The engine's device, dtype, block-size and compile choices, the GPU ones included: this
machine has no CUDA device, so the GPU path's decisions are checked here as plain functions
(the engine code itself is device-generic and runs in every other test)."""

from __future__ import annotations

import builtins

import pytest
import torch

from flashlens.decode import policy
from flashlens.decode.policy import (
    block_size,
    fallback_dtype,
    resolve_device,
    resolve_dtype,
    use_compile,
)
from flashlens.errors import FlashlensError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
LLAMA3_V, LLAMA3_D_MLP = 128256, 14336


def test_block_size_keeps_the_logits_block_near_its_budget() -> None:
    # CPU: ~256 MB of fp32 logits -> 512 rows at the Llama 3 vocabulary; GPU: ~2 GB -> 4096.
    assert block_size(LLAMA3_V, LLAMA3_D_MLP, CPU, None) == 512
    assert block_size(LLAMA3_V, LLAMA3_D_MLP, CUDA, None) == 4096
    for dev, budget in ((CPU, 256 << 20), (CUDA, 2 << 30)):
        for V in (512, 32000, 50257, 151936, 256000):
            B = block_size(V, 1 << 20, dev, None)
            assert B & (B - 1) == 0, B  # a power of two
            assert B == 4096 or B * 4 * V <= budget < 2 * B * 4 * V or B == 64
    assert block_size(512, 172, CUDA, None) == 172  # never more than a layer
    assert block_size(LLAMA3_V, LLAMA3_D_MLP, CUDA, 100) == 100  # --block wins


def test_auto_dtype_follows_the_weights_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_dtype("auto", torch.bfloat16, CUDA) == torch.bfloat16
    assert resolve_dtype("auto", torch.float16, CUDA) == torch.float16
    assert resolve_dtype("auto", torch.float32, CUDA) == torch.float32
    monkeypatch.setattr(policy, "cpu_has_fast_int8", lambda: False)
    for fast, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(policy, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert resolve_dtype("auto", torch.bfloat16, CPU) == want
        assert resolve_dtype("auto", torch.float16, CPU) == want
    # VNNI: int8 first on the CPU, never on the GPU (an explicit int8 there is an error)
    monkeypatch.setattr(policy, "cpu_has_fast_int8", lambda: True)
    assert resolve_dtype("auto", torch.bfloat16, CPU) == torch.int8
    assert resolve_dtype("auto", torch.float32, CPU) == torch.float32  # fp32 weights: exact
    assert resolve_dtype("auto", torch.bfloat16, CUDA) == torch.bfloat16
    assert resolve_dtype("int8", torch.float32, CPU) == torch.int8
    with pytest.raises(FlashlensError, match="int8 is a CPU path"):
        resolve_dtype("int8", torch.bfloat16, CUDA)
    assert resolve_dtype("float16", torch.float32, CPU) == torch.float16  # explicit wins
    # small jobs (quick in fp32 anyway) are computed exactly; big ones in low precision
    small, big = policy.LOW_PRECISION_FLOPS / 2, policy.LOW_PRECISION_FLOPS * 2
    assert resolve_dtype("auto", torch.bfloat16, CUDA, small) == torch.float32
    assert resolve_dtype("auto", torch.bfloat16, CUDA, big) == torch.bfloat16
    assert resolve_dtype("bfloat16", torch.bfloat16, CUDA, small) == torch.bfloat16
    with pytest.raises(FlashlensError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", torch.bfloat16, CPU)


def test_auto_steps_down_towards_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    for fast_bf16, after_int8 in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(policy, "cpu_has_fast_bf16", lambda f=fast_bf16: f)
        assert fallback_dtype(torch.int8, CPU) == after_int8
    assert fallback_dtype(torch.bfloat16, CPU) == torch.float32
    assert fallback_dtype(torch.float16, CUDA) == torch.float32


def test_device_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    with pytest.raises(FlashlensError, match="no CUDA device is available"):
        resolve_device("cuda:0")
    with pytest.raises(FlashlensError, match="unknown device 'tpu9'"):
        resolve_device("tpu9")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == CUDA
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_compile_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    assert use_compile("on", CPU, 1) and not use_compile("off", CPU, 10**12)
    big, small = 10**10, 10**6
    monkeypatch.setattr(policy.shutil, "which", lambda name: "/usr/bin/" + name)
    assert use_compile("auto", CPU, big) and not use_compile("auto", CPU, small)
    monkeypatch.setattr(policy.shutil, "which", lambda name: None)  # no C compiler: eager
    assert not use_compile("auto", CPU, big)
    real_import = builtins.__import__

    def no_triton(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "triton":
            raise ImportError("no triton")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    assert not use_compile("auto", CUDA, big)  # GPU without triton: eager
    with pytest.raises(FlashlensError, match="unknown --compile"):
        use_compile("sometimes", CPU, big)


def test_an_explicit_dtype_without_a_fast_cpu_kernel_is_refused_for_big_jobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a CPU without VNNI / AVX512-BF16 / AVX512-FP16, torch's int8, bf16 and fp16 products
    run several to a hundred times slower than fp32: a big map in them would never end."""
    from flashlens.decode.policy import check_gemm_dtype

    small, big = policy.LOW_PRECISION_FLOPS / 2, policy.LOW_PRECISION_FLOPS * 2
    for name in ("int8", "bf16", "fp16"):
        monkeypatch.setattr(policy, f"cpu_has_fast_{name}", lambda: False)
    for dtype, needs in (
        (torch.int8, "VNNI"),
        (torch.bfloat16, "AVX512-BF16"),
        (torch.float16, "AVX512-FP16"),
    ):
        with pytest.raises(FlashlensError, match=f"no fast kernel on this CPU.*{needs}"):
            check_gemm_dtype(dtype, CPU, big)
        check_gemm_dtype(dtype, CPU, small)  # seconds in any dtype
        check_gemm_dtype(dtype, CUDA, big)  # not a CPU question
    check_gemm_dtype(torch.float32, CPU, big)
    # the way out names what auto picks on this CPU (VNNI without AVX512-BF16: Cascade Lake)
    monkeypatch.setattr(policy, "cpu_has_fast_int8", lambda: True)
    check_gemm_dtype(torch.int8, CPU, big)
    with pytest.raises(FlashlensError, match=r"--dtype auto, which .* \(int8 here\)"):
        check_gemm_dtype(torch.bfloat16, CPU, big)
