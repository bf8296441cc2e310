"""Read checkpoint tensors lazily, one at a time, in the checkpoint's own dtype.

Safetensors files (single or sharded through `model.safetensors.index.json`) are validated by
the safetensors library and read through a memory map of their data: each tensor is copied out
and its pages are then released from this process (madvise DONTNEED), so resident memory does
not grow with the number of tensors read. `pytorch_model.bin` (single or sharded) is the
fallback, loaded with `mmap=True`. The transformers model is never built here. In a quantised
checkpoint (weights.quant) the quantised tensors are read dequantized: weights with scales
(FP8, compressed-tensors; scaled.py) in fp32 or, where each is a product rounded to its scales'
dtype, in that dtype (exact), and packed ones (compressed-tensors' int4 words, MXFP4's experts)
under their unpacked names.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .. import pages
from ..errors import CheckpointError, UnsupportedModelError
from .mxfp4 import BLOCKS, SCALES, Mxfp4Experts
from .scaled import G_IDX, PACKED, SHAPE, ZERO, BlockScales, unpack

_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
if hasattr(torch, "float8_e8m0fnu"):  # (FP8 checkpoints' power-of-two scales; torch >= 2.7)
    _DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
# The fingerprint reads this many windows of this many values from every tensor.
FINGERPRINT_WINDOWS, FINGERPRINT_VALUES = 16, 64
# A tensor is copied out of the memory map in slices of this many bytes of the file.
COPY_BYTES = 64 << 20
ST_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class Checkpoint:
    """Tensor name -> lazily loaded tensor, over every weight file of a model folder.

    quant: how the checkpoint is quantised (weights.quant.scheme of its config.json): weights
    with scales (FP8, compressed-tensors) are then read dequantized, in the dtype
    BlockScales.into says (compressed-tensors' packed X_packed and X_shape as one tensor X),
    and MXFP4's packed experts X_blocks and X_scales as one tensor X, unpacked, in bf16 (which
    holds them exactly). None: every tensor as stored."""

    def __init__(self, folder: Path, quant: BlockScales | Mxfp4Experts | None = None) -> None:
        self.folder = folder
        self.quant = quant
        self._fp8 = quant if isinstance(quant, BlockScales) else None
        self._blocks: dict[str, tuple[int, int]] = {}  # quantized weight -> its scales' block
        self._packed: dict[str, tuple[int, ...]] = {}  # unpacked name -> its shape
        self._bits: dict[str, int] = {}  # compressed-tensors' packed weights: bits a value
        self._stack = ExitStack()
        self._where: dict[str, Path] = {}  # tensor name -> file
        self._st: dict[Path, Any] = {}  # open safetensors handles
        self._bin: dict[Path, dict[str, torch.Tensor]] = {}  # mmapped .bin state dicts
        self._maps: dict[Path, mmap.mmap] = {}  # safetensors data, memory-mapped
        self._layout: dict[Path, tuple[int, dict[str, Any]]] = {}  # data start, header
        files = self._weight_files()
        for file in files:
            if file.suffix == ".safetensors":
                self._open_safetensors(file)
        if not self._where:
            for file in files:
                self._open_bin(file)
        if self._fp8 is not None and self._fp8.packed_bits:  # every packed weight's shape
            for name, X in self._companions(PACKED, SHAPE):
                shape = tuple(int(n) for n in self._read(X + SHAPE, None, None).tolist())
                R, C, self._bits[X] = self._fp8.packing(X, self.shape(name), shape)
                self._packed[X] = (R, C)
        if self._fp8 is not None:  # every quantized weight's scales, before any is read
            for name in [*self._where, *self._packed]:
                if name.endswith(G_IDX):
                    raise UnsupportedModelError(
                        f"tensor {name}: groups in activation order (a g_idx) are not read; "
                        "map the model's bf16 release instead"
                    )
                if self.quantized(name):
                    self._scale_of(name)
                    if name + ZERO in self._where:
                        self._scales(name)  # (its zero points checked: a small read)
        if isinstance(quant, Mxfp4Experts):  # every packed tensor's blocks and scales
            for name, X in self._companions(BLOCKS, SCALES):
                self._packed[X] = quant.shape(X, self.shape(name), self.shape(X + SCALES))

    def _companions(self, suffix: str, beside: str) -> list[tuple[str, str]]:
        """(name, X) of every tensor named X + suffix, each checked to have X + beside."""
        out = []
        for name in [n for n in self._where if n.endswith(suffix)]:
            X = name.removesuffix(suffix)
            if X + beside not in self._where:
                raise CheckpointError(
                    f"tensor {name} has no {X + beside} beside it in the checkpoint at "
                    f"{self.folder}: a shard may be missing or damaged; download the model again"
                )
            out.append((name, X))
        return out

    def _weight_files(self) -> list[Path]:
        for index_name in (ST_INDEX, BIN_INDEX):
            index = self.folder / index_name
            if index.is_file():
                try:
                    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
                except (ValueError, KeyError) as err:
                    raise CheckpointError(f"{index} is not a valid shard index ({err})") from None
                shards = sorted({self.folder / f for f in weight_map.values()})
                missing = [s.name for s in shards if not s.is_file()]
                if missing:
                    raise CheckpointError(
                        f"{len(missing)} shard(s) listed in {index.name} are missing from "
                        f"{self.folder}: {', '.join(missing[:5])}; download them again"
                    )
                return shards
        single = [self.folder / "model.safetensors", self.folder / "pytorch_model.bin"]
        found = [f for f in single if f.is_file()] or sorted(self.folder.glob("*.safetensors"))
        if not found:
            raise CheckpointError(
                f"no weights in {self.folder}: expected model.safetensors, "
                f"{ST_INDEX} with its shards, or pytorch_model.bin"
            )
        return found[:1] if found[0].name in {f.name for f in single} else found

    def _open_safetensors(self, file: Path) -> None:
        try:
            handle = self._stack.enter_context(safe_open(str(file), framework="pt"))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f"cannot read {file.name}: {err}. The file is truncated or corrupt; "
                "download it again"
            ) from None
        self._st[file] = handle
        for name in handle.keys():  # noqa: SIM118  (safe_open is not a Mapping)
            self._where[name] = file
        with open(file, "rb") as fh:  # the header safe_open has just validated
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
            self._maps[file] = self._stack.enter_context(
                mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            )
        header.pop("__metadata__", None)
        self._layout[file] = (8 + n, header)

    def _open_bin(self, file: Path) -> None:
        try:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:  # torch raises many types for a bad pickle/zip
            raise CheckpointError(
                f"cannot read {file.name}: {err}. The file is truncated or corrupt; "
                "download it again"
            ) from None
        self._bin[file] = state
        for name in state:
            self._where[name] = file

    def __contains__(self, name: object) -> bool:
        return name in self._where or name in self._packed

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._packed:
            return self._packed[name]
        file = self._file(name)
        if file in self._st:
            return tuple(self._st[file].get_slice(name).get_shape())
        return tuple(self._bin[file][name].shape)

    def dtype(self, name: str) -> torch.dtype:
        """The dtype `get` returns: the stored one, from the header where there is one (no
        data read); for a weight read dequantized, fp32 or, where each weight is a product
        rounded to its scales' dtype (compressed-tensors), that dtype (BlockScales.into); bf16
        for MXFP4's packed experts."""
        if name in self._packed:
            return torch.bfloat16 if isinstance(self.quant, Mxfp4Experts) else self._into(name)
        stored = self._stored_dtype(name)
        return self._into(name) if self.quantized(name, stored) else stored

    def _into(self, name: str) -> torch.dtype:
        """The dtype quantized weight `name` is dequantized into (BlockScales.into)."""
        assert self._fp8 is not None
        scale_dtype = self._stored_dtype(name + self._fp8.suffix)
        return self._fp8.into(name, name in self._bits, scale_dtype)

    def _stored_dtype(self, name: str) -> torch.dtype:
        file = self._file(name)
        if file in self._layout:
            code = self._layout[file][1][name]["dtype"]
            if code in _DTYPES:
                return _DTYPES[code]
        return self._read(name, None, None).dtype

    def quantized(self, name: str, stored: torch.dtype | None = None) -> bool:
        """Whether tensor `name` reads dequantized: an 8-bit weight of a checkpoint with
        scales (FP8, compressed-tensors), or an MXFP4 checkpoint's packed experts."""
        if name in self._packed:
            return True
        if self._fp8 is None or name.endswith((self._fp8.suffix, ZERO)):
            return False
        return (stored or self._stored_dtype(name)) in self._fp8.values

    def get(
        self, name: str, dtype: torch.dtype | None = None, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The tensor as a fresh copy (safetensors: out of the memory map), in its stored dtype
        or converted to `dtype` as it is copied (no copy in the stored dtype beside it); a
        quantised tensor dequantized (as `self.dtype` says) unless `dtype` says otherwise.
        rows (lo, hi): only those rows along the first dimension (half of a fused tensor; an
        expert of stacked ones), read without the rest."""
        if name in self._packed and isinstance(self.quant, Mxfp4Experts):
            blocks, scales = (self._read(name + x, None, rows) for x in (BLOCKS, SCALES))
            W = self.quant.unpack(blocks, scales)
            return W if dtype in (None, torch.bfloat16) else W.to(dtype)
        if self._fp8 is None or not self.quantized(name):
            return self._read(name, dtype, rows)
        q = self._values(name, rows)
        s, z = self._scales(name)
        stacked = len(self.shape(name)) > 2  # (experts first: rows are experts)
        if rows is not None and stacked and s.ndim > 0:  # (not one scale for the tensor)
            s = s[rows[0] : rows[1]]
            z = None if z is None else z[rows[0] : rows[1]]
        row0 = rows[0] if rows is not None and not stacked else 0
        W = self._fp8.dequantize(q, s, self._blocks[name], row0, self._into(name), z)
        return W if dtype in (None, W.dtype) else W.to(dtype)

    def _values(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        """The quantized values of weight `name` as stored (float8, int8), or unpacked to int8
        from compressed-tensors' int32 words; rows (lo, hi): only those."""
        if name in self._bits:
            words = self._read(name + PACKED, None, rows)
            return unpack(words, self._bits[name], self._packed[name][1])
        return self._read(name, None, rows)

    def stored_as(self, name: str) -> str:
        """How weight `name`'s values are stored, as errors name it: "float8_e4m3fn", "int4
        (packed)"."""
        if name in self._bits:
            return f"int{self._bits[name]} (packed)"
        return str(self._stored_dtype(name)).removeprefix("torch.")

    def _scales(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scales of quantized weight `name`, and its zero points (int8, one per scale;
        None where it has none)."""
        s = self._read(self._scale_of(name), None, None)
        if name + ZERO not in self._where:
            return s, None
        z = self._read(name + ZERO, None, None)
        if z.dtype == torch.int32 and name in self._bits:  # packed along the rows
            z = unpack(z.T.contiguous(), self._bits[name], s.shape[0]).T
        if z.shape != s.shape or z.is_floating_point():
            raise CheckpointError(
                f"tensor {name + ZERO} {list(z.shape)} {str(z.dtype).removeprefix('torch.')} "
                f"does not give one integer zero point per scale of {name} "
                f"({list(s.shape)}): the checkpoint is damaged; download the model again"
            )
        return s, z

    def _scale_of(self, name: str) -> str:
        """The name of quantized weight `name`'s scales, checked against its shape."""
        assert self._fp8 is not None
        scale = name + self._fp8.suffix
        if scale not in self._where:
            raise CheckpointError(
                f"tensor {name} is stored in {self.stored_as(name)}, but the checkpoint at "
                f"{self.folder} has no {scale} (its scales) beside it: a shard may be missing "
                "or damaged; download the model again"
            )
        if name not in self._blocks:
            shape = self.shape(name)
            block = self._fp8.block(name, shape, self.shape(scale))
            zeros = name + ZERO in self._where
            self._fp8.check_experts(name, shape, self.stored_as(name), block, zeros)
            self._blocks[name] = block
        return scale

    def _read(
        self, name: str, dtype: torch.dtype | None, rows: tuple[int, int] | None
    ) -> torch.Tensor:
        """`get` of the tensor as stored."""
        file = self._file(name)
        try:
            if file in self._maps:
                return self._copy_out(file, name, dtype, rows)
            tensor = self._bin[file][name]
            if rows is not None:
                tensor = tensor[rows[0] : rows[1]].clone()
            return tensor if dtype is None else tensor.to(dtype)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"cannot read tensor {name} from {file.name}: {err}") from None

    def gather(self, name: str, index: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Slices `index` of tensor `name` along `dim` (0 or 1 of a matrix), copied out of the
        memory map without reading the rest of the tensor (other formats, and MXFP4's packed
        experts: from the whole)."""
        if name in self._bits and dim == 0:  # (rows: their words alone)
            q = unpack(self._gather(name + PACKED, index, 0), self._bits[name], self.shape(name)[1])
        elif name in self._packed:
            return self.get(name).index_select(dim, index)
        else:
            q = self._gather(name, index, dim)
            if self._fp8 is None or not self.quantized(name, q.dtype):
                return q
        assert self._fp8 is not None  # (packed words: a scheme with scales read them)
        s, z = self._scales(name)
        into = self._into(name)
        return self._fp8.dequantize_index(q, s, self._blocks[name], index, dim, into, z)

    def _gather(self, name: str, index: torch.Tensor, dim: int) -> torch.Tensor:
        """`gather` of stored tensor `name`, as stored."""
        file = self._file(name)
        try:
            view = self._view(file, name) if file in self._maps else None
            if view is None:
                view = self._read(name, None, None)
            out = view.index_select(dim, index)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"cannot read tensor {name} from {file.name}: {err}") from None
        return out

    def fingerprint(self, skip: Callable[[str], bool] = lambda name: False) -> str:
        """A short hash of the weights' values: every tensor's name and shape, and 16
        windows of 64 values spread evenly over it (the first and last included), read in
        fp32 so the same values stored as bf16 or fp32, in one file or sharded, safetensors
        or .bin, give the same hash. About 1,000 values a tensor, read with pread (not
        through the memory map, below): a fraction of a second on an 8B model from a cold
        disk. It tells apart any fine-tune, retrain or merged LoRA delta (they move every
        value of the tensors they touch); an edit of a few rows can fall between the
        windows. `skip`: tensors some copies of the same model hold and others not (a tied
        head's copy of the embedding, rotary buffers)."""
        h = hashlib.sha256()
        # The windows are read with pread, not through the memory map: a fault there maps a
        # whole page-cache folio (on a freshly written Llama-3.1-8B-shaped checkpoint that
        # took this process's resident memory to 5.1 GB for a moment, measured), and a
        # map's peak memory must not depend on how recently its checkpoint was written.
        with ExitStack() as files:
            fds = {f: files.enter_context(open(f, "rb")).fileno() for f in self._layout}
            for name in sorted(n for n in self._where if not skip(n)):
                h.update(self._windows(name, fds))
        return h.hexdigest()[:16]

    def same_sample(self, a: str, b: str) -> bool:
        """Whether tensors `a` and `b` have the same shape and the same values in the
        fingerprint's windows (a tied head's copy of the embedding)."""
        with ExitStack() as files:
            fds = {f: files.enter_context(open(f, "rb")).fileno() for f in self._layout}
            return self._windows(a, fds)[len(a) :] == self._windows(b, fds)[len(b) :]

    def _windows(self, name: str, fds: dict[Path, int]) -> bytes:
        """Tensor `name`'s part of the fingerprint: its name, shape and sampled values
        (safetensors: read from the files `fds` with pread; other formats: from the tensor)."""
        file = self._file(name)
        try:
            lo0, hi, dtype = self._span(file, name) if file in fds else (0, 0, None)
            w, k = FINGERPRINT_VALUES, FINGERPRINT_WINDOWS
            if dtype is not None:
                size = dtype.itemsize
                n = (hi - lo0) // size
                parts = [
                    _pread(fds[file], lo0 + lo * size, min(w, n - lo) * size, dtype)
                    for lo in _window_starts(n, w, k)
                ]
            else:
                flat = self._read(name, None, None).reshape(-1)
                parts = [flat[lo : lo + w] for lo in _window_starts(flat.numel(), w, k)]
            values = [p.float() if p.is_floating_point() else p.long() for p in parts]
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"cannot read tensor {name} from {file.name}: {err}") from None
        head = f"{name}{list(self.shape(name))}".encode()
        return head + b"".join(v.numpy().tobytes() for v in values)

    def _span(self, file: Path, name: str) -> tuple[int, int, torch.dtype | None]:
        """Where tensor `name`'s bytes lie in safetensors `file` (offsets lo, hi from the
        file's start) and its dtype (None: one this reader does not map)."""
        start, header = self._layout[file]
        info = header[name]
        lo, hi = (start + o for o in info["data_offsets"])
        return lo, hi, _DTYPES.get(info["dtype"])

    def _view(self, file: Path, name: str) -> torch.Tensor | None:
        """A zero-copy, read-only view of tensor `name` in the memory map (None: a dtype this
        reader does not map, or an empty tensor)."""
        lo, hi, dtype = self._span(file, name)
        if dtype is None or hi == lo:
            return None
        with warnings.catch_warnings():  # read-only buffer: callers copy out of it
            warnings.simplefilter("ignore", UserWarning)
            view = torch.frombuffer(self._maps[file], dtype=torch.uint8, count=hi - lo, offset=lo)
        return view.view(dtype).reshape(self._layout[file][1][name]["shape"])

    def _copy_out(
        self, file: Path, name: str, dtype: torch.dtype | None, rows: tuple[int, int] | None
    ) -> torch.Tensor:
        """Tensor `name` (or its `rows`) copied out of the memory map in slices of about
        COPY_BYTES, each slice's pages released from this process once copied: the file's
        pages of a large tensor (the LM-head: 1 GiB at Llama-3.1-8B shapes) are never all
        resident beside the copy."""
        view = self._view(file, name)
        if view is None:  # rare dtypes (the library converts) and empty tensors
            tensor = self._st[file].get_tensor(name)
            if rows is not None:
                tensor = tensor[rows[0] : rows[1]].clone()
            return tensor if dtype is None else tensor.to(dtype)
        lo0 = self._span(file, name)[0]
        if rows is not None:  # contiguous rows: contiguous bytes
            lo0 += rows[0] * (view[0].numel() * view.element_size() if len(view) else 0)
            view = view[rows[0] : rows[1]]
        out = pages.empty(tuple(view.shape), dtype or view.dtype)  # huge pages if large
        flat_in, flat_out = view.reshape(-1), out.view(-1)
        step = max(1, COPY_BYTES // view.element_size())
        for i in range(0, flat_in.numel(), step):
            j = min(i + step, flat_in.numel())
            flat_out[i:j].copy_(flat_in[i:j])
            self._release(file, lo0 + i * view.element_size(), lo0 + j * view.element_size())
        return out

    def _release(self, file: Path, lo: int, hi: int) -> None:
        """Drop this process's pages of bytes [lo, hi) of `file`'s memory map, from the page
        that holds byte lo (a page shared with the bytes before is read again if needed)."""
        mm = self._maps[file]
        if hasattr(mm, "madvise"):
            page = mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, lo // page * page, hi - lo // page * page)

    def _file(self, name: str) -> Path:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(
                f"tensor {name!r} is not in the checkpoint at {self.folder}; "
                "the weights do not match config.json's architecture"
            ) from None

    def close(self) -> None:
        self._maps.clear()
        self._stack.close()
        self._st.clear()
        self._bin.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _window_starts(n: int, w: int, k: int) -> list[int]:
    """The fingerprint's k windows of w values over a tensor of n: spread evenly, the first
    and last included, overlaps merged."""
    return sorted({round(i * max(n - w, 0) / (k - 1)) for i in range(k)} if n else ())


def _pread(fd: int, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """nbytes of file fd at offset, as a tensor of dtype (a copy: no memory map involved)."""
    data = os.pread(fd, nbytes, offset)
    if len(data) != nbytes:
        raise OSError(f"the file ends before byte {offset + nbytes} (truncated?)")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)
