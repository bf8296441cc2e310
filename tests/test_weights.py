"""Reading checkpoints: the copy out of the memory map equals the safetensors library's read."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flashlens.weights import Checkpoint, ModelSource

from .helpers import make_model


def assert_same_as_library(folder: Path) -> None:
    with Checkpoint(folder) as ckpt:
        names = list(ckpt)
        assert names
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118
                    want = fh.get_tensor(name)
                    got = ckpt.get(name)
                    assert got.dtype == want.dtype and got.shape == want.shape
                    assert torch.equal(got, want), name
                    assert ckpt.shape(name) == tuple(want.shape)
                    assert ckpt.dtype(name) == want.dtype


def test_every_tensor_equals_the_library_read(tmp_path: Path, stories: Path) -> None:
    assert_same_as_library(stories)
    assert_same_as_library(make_model(tmp_path / "bf16", dtype=torch.bfloat16, shard_size="40KB"))


def test_odd_dtypes_and_empty_tensors(tmp_path: Path) -> None:
    tensors = {
        "a": torch.arange(7, dtype=torch.int64),
        "b": torch.randn(3, 5).half(),
        "c": torch.empty(0, 4),
        "d": torch.tensor([True, False]),
        "e": torch.randn(2, 3, dtype=torch.float64),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    with Checkpoint(tmp_path) as ckpt:
        for name, t in tensors.items():
            assert torch.equal(ckpt.get(name), t), name


def test_a_local_folder_is_named_by_its_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What atlas.json records as the model: usable from any directory."""
    folder = make_model(tmp_path / "models" / "m", n_layers=1, tokenizer=None)
    monkeypatch.chdir(tmp_path / "models")
    for typed in ("m", "./m", "../models/m", str(folder)):
        source = ModelSource.open(typed)
        try:
            assert source.model == str(folder), typed
        finally:
            source.close()


def _fingerprint(folder: Path) -> str:
    with Checkpoint(folder) as ckpt:
        return ckpt.fingerprint()


def test_the_weights_fingerprint_follows_the_values(tmp_path: Path) -> None:
    """The same values give the same fingerprint however they are stored (bf16 or fp32, one
    file or shards, safetensors or .bin); any tensor's changed values, another."""
    bf16 = make_model(tmp_path / "bf16", dtype=torch.bfloat16, tokenizer=None)
    with Checkpoint(bf16) as ckpt:
        tensors = {name: ckpt.get(name) for name in ckpt}
    as_fp32 = {k: v.float() for k, v in tensors.items()}  # the same values, exactly
    layouts = {"fp32": tmp_path / "fp32", "bin": tmp_path / "bin", "shards": tmp_path / "sh"}
    for folder in layouts.values():
        folder.mkdir()
    save_file(as_fp32, layouts["fp32"] / "model.safetensors")
    torch.save(as_fp32, layouts["bin"] / "pytorch_model.bin")
    names = sorted(tensors)
    for i, part in enumerate((names[::2], names[1::2])):
        save_file({k: tensors[k] for k in part}, layouts["shards"] / f"model-{i}.safetensors")
    want = _fingerprint(bf16)
    assert len(want) == 16
    for label, folder in layouts.items():
        assert _fingerprint(folder) == want, label
    # One value changed in the middle of one tensor (a window there), or a whole tensor.
    name = "model.layers.1.self_attn.q_proj.weight"
    for edit in ("one", "all"):
        changed = dict(as_fp32)
        t = changed[name].clone()
        if edit == "one":
            flat = t.view(-1)
            flat[round(7 * (flat.numel() - 64) / 15)] += 1.0  # the eighth of 16 windows
        else:
            t += 0.01
        changed[name] = t
        folder = tmp_path / edit
        folder.mkdir()
        save_file(changed, folder / "model.safetensors")
        assert _fingerprint(folder) != want, edit


def test_the_fingerprint_reads_safetensors_without_the_memory_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The windows are read with pread: a fault in the memory map maps a whole page-cache
    folio (5.1 GB of resident memory for a moment on a freshly written 8B-shaped checkpoint).
    The hash is the one the map-based reader gave (recorded in existing atlases)."""
    model = make_model(tmp_path / "m", dtype=torch.bfloat16, tokenizer=None)
    want = hashlib.sha256()  # the windows taken from the memory map's views, as before
    with Checkpoint(model) as ckpt:  # (the views die with the map: used inside only)
        for name in sorted(ckpt):
            view = ckpt._view(ckpt._file(name), name)
            assert view is not None
            flat = view.reshape(-1)
            starts = sorted({round(i * max(flat.numel() - 64, 0) / 15) for i in range(16)})
            want.update(f"{name}{list(view.shape)}".encode())
            want.update(b"".join(flat[lo : lo + 64].float().numpy().tobytes() for lo in starts))

    def no_map(*args: object) -> None:
        raise AssertionError("the fingerprint read through the memory map")

    monkeypatch.setattr(Checkpoint, "_view", no_map)
    assert _fingerprint(model) == want.hexdigest()[:16]


def test_the_fingerprint_leaves_out_what_only_some_saves_hold(tmp_path: Path) -> None:
    """A tied model saved with torch.save(state_dict) also holds the head's copy of the
    embedding, and old saves hold rotary buffers; save_pretrained's files hold neither. The
    model's fingerprint is the same for both."""
    import shutil

    tied = make_model(tmp_path / "tied", tie=True, tokenizer=None)
    with Checkpoint(tied) as ckpt:
        state = {name: ckpt.get(name) for name in ckpt}
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(4)
    other = tmp_path / "bin"
    other.mkdir()
    shutil.copy(tied / "config.json", other / "config.json")
    torch.save(state, other / "pytorch_model.bin")

    def fingerprint(folder: Path) -> str:
        source = ModelSource.open(folder)
        try:
            return source.fingerprint()
        finally:
            source.close()

    assert fingerprint(other) == fingerprint(tied)
    assert _fingerprint(other) != _fingerprint(tied)  # the whole checkpoint's: they differ


def _resident_file_kib() -> int:
    """This process's resident file-backed memory (Linux /proc), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_the_fingerprint_leaves_no_checkpoint_pages_resident(tmp_path: Path) -> None:
    """Its windows are read through the memory map; a fault there can map far more than the
    window (a freshly written file sits in the page cache in large folios), and none of it may
    stay in the process's resident memory: map's peak RSS would grow by GBs on an 8B model."""
    tensors = {f"t{i}": torch.randn(4096, 2048).bfloat16() for i in range(8)}  # 8 x 16 MiB
    save_file(tensors, tmp_path / "model.safetensors")  # (in the page cache: just written)
    with Checkpoint(tmp_path) as ckpt:
        before = _resident_file_kib()
        ckpt.fingerprint()
        grown = _resident_file_kib() - before
        assert grown < 4096, f"{grown} KiB of the checkpoint left resident"
        ckpt.get("t0")  # (a tensor copied out releases its pages too)
        assert _resident_file_kib() - before < 4096


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_a_tensor_is_copied_out_in_slices_and_converted_as_it_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large tensor (the LM-head: 1 GiB in bf16 at Llama-3.1-8B shapes) is copied out of the
    memory map a slice at a time, each slice's file pages released once copied, and converted
    to the dtype asked for as it is copied: its file pages are never all resident beside the
    copy (before: 1 GiB more of map's peak memory). The result equals the stored values."""
    from flashlens.weights import checkpoint

    W = torch.randn(8190, 4096).bfloat16()  # 64 MiB, not a whole number of slices
    save_file({"a": torch.randn(3), "W": W}, tmp_path / "model.safetensors")  # (W unaligned)
    monkeypatch.setattr(checkpoint, "COPY_BYTES", 4 << 20)
    seen: list[tuple[int, int, int]] = []  # (lo, hi, resident file KiB before releasing)
    release = Checkpoint._release

    def spy(self: Checkpoint, file: Path, lo: int, hi: int) -> None:
        seen.append((lo, hi, _resident_file_kib()))
        release(self, file, lo, hi)

    monkeypatch.setattr(Checkpoint, "_release", spy)
    with Checkpoint(tmp_path) as ckpt:
        before = _resident_file_kib()
        got = ckpt.get("W", torch.float32)
        assert got.dtype == torch.float32 and torch.equal(got, W.float())
        assert len(seen) == 16  # 15 whole slices of 4 MiB and the rest
        assert all(a[1] == b[0] for a, b in itertools.pairwise(seen))  # no gaps
        assert seen[-1][1] - seen[0][0] == W.numel() * 2  # the tensor's bytes, all of them
        worst = max(kib for *_, kib in seen) - before
        assert worst < 24 << 10, f"{worst} KiB of the checkpoint resident during the copy"
        seen.clear()
        assert torch.equal(ckpt.get("W"), W) and len(seen) == 16  # the stored dtype likewise


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_fused_gate_up_halves_are_read_alone_and_by_neuron(tmp_path: Path, fmt: str) -> None:
    """Phi-3's gate_up_proj (2 * d_mlp, d_model): gate is its first d_mlp rows, up the rest;
    a whole layer reads only its half, and single neurons come from the same rows."""
    from .helpers import load_reference_model, neuron_weights

    model = make_model(tmp_path / "m", "phi3", n_layers=2, d_mlp=24)
    if fmt == "bin":
        from safetensors.torch import load_file

        state = load_file(model / "model.safetensors")
        (model / "model.safetensors").unlink()
        torch.save(state, model / "pytorch_model.bin")
    ref = load_reference_model(tmp_path / "m") if fmt == "safetensors" else None
    source = ModelSource.open(model)
    fused = source.checkpoint.get("model.layers.1.mlp.gate_up_proj.weight")  # (48, d_model)
    index = torch.tensor([0, 5, 23])
    for matrix, half in (("gate", fused[:24]), ("up", fused[24:])):
        W = source.neurons(matrix, 1)  # type: ignore[arg-type]
        assert W.shape == (24, source.d_model) and torch.equal(W, half)
        assert torch.equal(source.neuron_rows(matrix, 1, index), half[index])  # type: ignore[arg-type]
        if ref is not None:
            assert torch.equal(W.float(), neuron_weights(ref, matrix, 1))
    source.close()
