"""The ahead-of-time kernel cache (decode/aot.py): a later process loads the packages without
compiling anything, a damaged package is rebuilt, an unusable cache falls back to in-process
compilation, and a package is only ever used for the arguments it was built for."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashlens.decode import aot
from flashlens.decode.engine import Decoder, warm_up
from flashlens.decode.kernels import compiled, exact_logits
from flashlens.decode.norm import NormMode, Readout

# The warm-up test's shapes (test_engine_perf_paths.py): the session builds these packages once.
V, D, B, K = 203, 24, 8, 4
CPU = torch.device("cpu")

FRESH_PROCESS = """
import json, sys, torch
from flashlens.decode import aot
from flashlens.decode.engine import Decoder, warm_up
from flashlens.decode.kernels import block_stats, compiled, exact_logits
from flashlens.decode.norm import Readout
V, D, B, K = {V}, {D}, {B}, {K}
warm_up(B, V, D, torch.bfloat16, torch.bfloat16, K, None, torch.device("cpu"))
g = torch.Generator().manual_seed(3)
W_U = (torch.randn(V, D, generator=g) * 0.5).bfloat16()
final = Readout(1 + torch.rand(D, generator=g), 1e-6)
args = (W_U, final, "model", K, torch.device("cpu"), torch.bfloat16)
r = Decoder(*args, compile=True).decode((torch.randn(B, D, generator=g) * 2).bfloat16())
print(json.dumps({{
    "builds": len(aot.BUILDS),
    "compiler_imported": "torch._dynamo" in sys.modules or "torch._inductor" in sys.modules,
    "package_calls": [compiled(f, "cpu").package_calls for f in (block_stats, exact_logits)],
    "top_ids": r.top_ids.tolist(),
    "logsumexp": r.logsumexp.tolist(),
}}))
"""


def _needs_compiler() -> None:
    if compiled(exact_logits, "cpu") is None:
        pytest.skip("no C compiler for inductor")


def _exact_args() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    W_U = torch.randn(V, D, generator=g).bfloat16()
    ids = torch.randint(0, V, (B, 20), generator=g)
    return W_U, ids, torch.randn(B, D, generator=g)


def test_a_later_process_loads_the_packages_without_compiling(_kernel_cache: Path) -> None:
    _needs_compiler()
    warm_up(B, V, D, torch.bfloat16, torch.bfloat16, K, None, CPU)  # built here, or already
    names = {p.name.split("-")[0] for p in _kernel_cache.glob("*.pt2")}
    assert {"block_stats", "exact_logits"} <= names
    env = {**os.environ, "FLASHLENS_KERNEL_CACHE": str(_kernel_cache)}
    script = FRESH_PROCESS.format(V=V, D=D, B=B, K=K)
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["builds"] == 0 and not out["compiler_imported"]
    assert out["package_calls"] == [1, 1]
    # The same block decoded here by the eager engine.
    g = torch.Generator().manual_seed(3)
    W_U = (torch.randn(V, D, generator=g) * 0.5).bfloat16()
    args: tuple[torch.Tensor, Readout, NormMode, int, torch.device, torch.dtype]
    args = (W_U, Readout(1 + torch.rand(D, generator=g), 1e-6), "model", K, CPU, torch.bfloat16)
    want = Decoder(*args).decode((torch.randn(B, D, generator=g) * 2).bfloat16())
    assert out["top_ids"] == want.top_ids.tolist()
    torch.testing.assert_close(torch.tensor(out["logsumexp"]), want.logsumexp, rtol=1e-4, atol=1e-4)


def test_a_damaged_package_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _needs_compiler()
    monkeypatch.setenv("FLASHLENS_KERNEL_CACHE", str(tmp_path))
    args = _exact_args()
    path = tmp_path / f"exact_logits-{aot._key(exact_logits, aot.signature(args))}.pt2"
    path.write_bytes(b"PK\x03\x04 a package cut short by a full disk")
    builds = len(aot.BUILDS)
    runner = aot.load_or_build(exact_logits, args)
    assert runner is not None and aot.BUILDS[builds:] == [path]
    torch.testing.assert_close(runner(list(args))[0], exact_logits(*args), rtol=1e-5, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    # A torch build whose loader `_load` cannot call as it does: the public API loads it.
    real, calls = torch._C._aoti.AOTIModelPackageLoader, []

    def changed(
        path: str, name: str, single_threaded: bool, runners: int, device_index: int
    ) -> torch._C._aoti.AOTIModelPackageLoader:
        calls.append((path, name, single_threaded, runners, device_index))
        if len(calls) == 1:
            raise TypeError("incompatible constructor arguments")
        return real(path, name, single_threaded, runners, device_index)

    changed.load_metadata_from_package = real.load_metadata_from_package  # type: ignore[attr-defined]
    monkeypatch.setattr(torch._C._aoti, "AOTIModelPackageLoader", changed)
    public = aot._load(path)
    assert public is not None and len(calls) == 2
    torch.testing.assert_close(public(list(args))[0], exact_logits(*args), rtol=1e-5, atol=1e-5)


def test_an_unusable_cache_falls_back_to_in_process_compilation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _needs_compiler()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("FLASHLENS_KERNEL_CACHE", str(blocker / "kernels"))
    W_U, ids, x = _exact_args()
    x = x[:3]  # a shape no other test prepares
    ids = ids[:3]
    with caplog.at_level(logging.WARNING, logger="flashlens.decode.aot"):
        assert aot.load_or_build(exact_logits, (W_U, ids, x)) is None
    assert "compiling in-process" in caplog.text
    kernel = compiled(exact_logits, "cpu")
    assert kernel is not None
    kernel.prepare(W_U, ids, x)  # torch.compile instead: still correct
    calls = kernel.package_calls
    torch.testing.assert_close(kernel(W_U, ids, x), exact_logits(W_U, ids, x), rtol=1e-5, atol=1e-5)
    assert kernel.package_calls == calls


def test_cache_location_and_switch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLASHLENS_KERNEL_CACHE", "off")
    assert aot.cache_dir() is None
    assert aot.load_or_build(exact_logits, _exact_args()) is None
    monkeypatch.delenv("FLASHLENS_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert aot.cache_dir() == tmp_path / "flashlens" / "kernels"


def test_a_package_is_keyed_by_everything_it_was_built_for() -> None:
    W_U, ids, x = _exact_args()
    key = lambda *a: aot._key(exact_logits, aot.signature(a))  # noqa: E731
    base = key(W_U, ids, x)
    assert key(W_U, ids, x) == base
    assert key(W_U.float(), ids, x) != base  # dtype
    assert key(W_U, ids[:, :10], x) != base  # shape
    assert key(W_U, ids.T.contiguous().T, x) != base  # strides
    assert aot.signature([torch.zeros(2, 3).T]) != aot.signature([torch.zeros(3, 2)])
