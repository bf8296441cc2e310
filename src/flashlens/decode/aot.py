"""Ahead-of-time compiled kernels (AOTInductor), cached on disk per shape, dtype and machine.

A warm `torch.compile` still costs 5-9 s at every `map` start: importing dynamo and inductor,
tracing, probing the CPU. The same kernel packaged by AOTInductor (a `.pt2` holding a shared
library) loads in milliseconds, so `map` builds each package once per machine and block shape
and loads it on later runs.

Cache: `$FLASHLENS_KERNEL_CACHE`, else `$XDG_CACHE_HOME/flashlens/kernels`, else
`~/.cache/flashlens/kernels`; `FLASHLENS_KERNEL_CACHE=off` turns it off (kernels are then
compiled in-process at every run). A package's name hashes the kernel's source, the argument
shapes, strides and dtypes, torch's version, the C library and the CPU's instruction sets, so
a package is never used for anything it was not built for. Packages are written to a
temporary file and renamed: a half-written one never looks complete; one that fails to load
is rebuilt.
CPU only: on CUDA the engine compiles in-process.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import os
import platform
import tempfile
import warnings
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

Signature = tuple[tuple[tuple[int, ...], tuple[int, ...], str, str], ...]
Runner = Callable[[Sequence[Tensor]], list[Tensor]]  # flat tensors in, flat tensors out

BUILDS: list[Path] = []  # packages built by this process (tests check that a rerun builds none)


def signature(args: Sequence[Tensor]) -> Signature:
    """What a package is specialised to: each argument's shape, strides, dtype and device."""
    return tuple((tuple(a.shape), tuple(a.stride()), str(a.dtype), a.device.type) for a in args)


def cache_dir() -> Path | None:
    setting = os.environ.get("FLASHLENS_KERNEL_CACHE", "")
    if setting.lower() in ("off", "0", "no", "false"):
        return None
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flashlens" / "kernels"


def load_or_build(fn: Callable[..., object], args: Sequence[Tensor]) -> Runner | None:
    """A runner for `fn` on arguments shaped like `args` (CPU tensors), from the cache or built
    now; None when there is no cache, the arguments are not on the CPU, or AOTInductor fails
    (the caller then compiles in-process)."""
    folder = cache_dir()
    if folder is None or any(a.device.type != "cpu" for a in args):
        return None
    try:
        path = folder / f"{fn.__name__}-{_key(fn, signature(args))}.pt2"
        if path.exists():
            runner = _load(path)
            if runner is not None:
                return runner
            log.warning("kernel package %s does not load: rebuilding it", path)
        folder.mkdir(parents=True, exist_ok=True)
        _build(fn, args, path)
        return _load(path)
    except Exception as e:  # no compiler, a read-only cache, an export limitation
        log.warning("no ahead-of-time kernel %s (%s): compiling in-process", fn.__name__, e)
        return None


class _Flat(torch.nn.Module):
    """`fn` as a module with a flat tuple of tensors out, as `torch.export` takes it."""

    def __init__(self, fn: Callable[..., object]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        out = self.fn(*args)
        return tuple(out) if isinstance(out, tuple) else (out,)  # type: ignore[return-value]


def _build(fn: Callable[..., object], args: Sequence[Tensor], path: Path) -> None:
    import torch._inductor  # the compiler: imported only when a package must be built

    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():  # torch's own deprecation notices, not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.export.export(_Flat(fn), tuple(args))
            torch._inductor.aoti_compile_and_package(program, package_path=tmp)
        os.replace(tmp, path)  # atomic: readers see no package or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    BUILDS.append(path)


def _load(path: Path) -> Runner | None:
    """The package's runner, or None if it cannot be loaded (truncated, another build of torch).

    torch's C++ loader directly: the public `aoti_load_package` imports the whole compiler
    first (~2 s), which is most of what the cache saves; it is the fallback for torch builds
    whose private loader differs."""
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        return lambda flat: loader.run(list(flat))
    except Exception:
        pass
    try:
        inductor = importlib.import_module("torch._inductor")
        model = inductor.aoti_load_package(str(path))
        return lambda flat: list(model.loader.run(list(flat)))
    except Exception:
        return None


def _key(fn: Callable[..., object], sig: Signature) -> str:
    parts = [
        inspect.getsource(inspect.getmodule(fn) or fn),  # the kernel and the constants it reads
        fn.__name__,
        repr(sig),
        torch.__version__,
        platform.machine(),
        " ".join(platform.libc_ver()),  # the shared library links against the C library
        _cpu_features(),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


@cache
def _cpu_features() -> str:
    """The instruction sets the compiler may target: torch's capability and the CPU's flags."""
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return capability + ":" + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return capability + ":" + platform.processor()
