"""Reading layers ahead, or one at a time: a layer's matrix is read while the previous one maps,
unless it is too large for two to be held at once (the largest mixtures), and either way the
atlas is the same."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from flashlens import map_model, mapping
from flashlens.families import Matrix
from flashlens.weights import ModelSource

from .helpers import make_model
from .test_map_resume import assert_same_atlas


@pytest.mark.parametrize("ahead", [True, False])
def test_layers_are_read_ahead_or_one_at_a_time(ahead: bool) -> None:
    """Read ahead, the next layer's read is under way while one is used; one at a time, it
    starts only once the consumer asks for it, after dropping the layer it had: no two
    layers are ever alive together (checked through weak references)."""
    import weakref

    jobs: list[tuple[Matrix, int]] = [("up", layer) for layer in range(4)]
    reads: list[int] = []
    alive: list[weakref.ref[torch.Tensor]] = []

    def load(job: tuple[Matrix, int]) -> torch.Tensor:
        held = sum(r() is not None for r in alive)
        assert ahead or held == 0, f"layer {job[1]} read while {held} other(s) are held"
        reads.append(job[1])
        W = torch.full((2, 3), float(job[1]))
        alive.append(weakref.ref(W))
        return W

    with ThreadPoolExecutor(max_workers=1) as pool:
        i = -1  # (not enumerate: its reused result tuple would hold the last layer)
        for job, W in mapping._prefetched(pool, load, jobs, None, ahead):
            i += 1
            assert job == jobs[i] and float(W[0, 0]) == i
            if ahead and i + 1 < len(jobs):
                pool.submit(lambda: None).result()  # (the read ahead has been queued)
                assert reads[-1] == i + 1
            else:
                assert reads[-1] == i
            del W
    assert reads == [0, 1, 2, 3]


def test_a_matrix_too_large_for_two_is_read_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """read_ahead: two at a time while a layer's matrix, as read, is at most READ_AHEAD_SHARE
    of the machine's memory, one at a time past it (the memory as the OS reports it, here
    patched around the matrix's size); on a GPU always ahead."""
    model = make_model(tmp_path / "m", "llama", n_layers=2, d_model=32, d_mlp=48)
    with ModelSource.open(model) as source:
        jobs: list[tuple[Matrix, int]] = [("up", 0), ("up", 1)]
        matrix = 48 * 32 * source.dtype.itemsize  # bytes of one layer's matrix
        cpu = torch.device("cpu")
        assert mapping.read_ahead(source, jobs, cpu)  # (this machine: gigabytes)
        pages = {"SC_PAGE_SIZE": 1}
        for memory, want in ((4 * matrix, True), (4 * matrix - 1, False)):
            pages["SC_PHYS_PAGES"] = memory
            monkeypatch.setattr(mapping.os, "sysconf", pages.__getitem__)
            assert mapping.read_ahead(source, jobs, cpu) == want
            assert mapping.read_ahead(source, jobs, torch.device("cuda"))


def test_a_map_read_one_layer_at_a_time_is_the_same_atlas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A low-precision map (int8: its reverse entries made exact at the end, each layer read
    again) gives the same atlas, file for file, whether its layers are read ahead or one at
    a time; one at a time, no layer is read while another is still held, in the map or in
    the exact pass (checked through weak references to every layer read)."""
    import weakref

    model = make_model(tmp_path / "m", "llama", n_layers=3, d_model=32, d_mlp=48)
    args = {"dtype": "int8", "compile": "off", "block": 16}
    map_model(model, tmp_path / "ahead", **args)  # type: ignore[arg-type]
    monkeypatch.setattr(mapping, "READ_AHEAD_SHARE", 0.0)
    calls: list[bool] = []
    prefetched = mapping._prefetched

    def spy(*a: object, **kw: object) -> object:
        calls.append(bool(a[4] if len(a) > 4 else kw.get("ahead", True)))
        return prefetched(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(mapping, "_prefetched", spy)
    alive: list[weakref.ref[torch.Tensor]] = []
    load = mapping._load

    def tracked(*a: object) -> torch.Tensor:
        held = [r for r in alive if r() is not None]
        assert not held, f"{len(held)} layer(s) still held when the next is read"
        W = load(*a)  # type: ignore[arg-type]
        alive.append(weakref.ref(W))
        return W

    monkeypatch.setattr(mapping, "_load", tracked)
    map_model(model, tmp_path / "one", **args)  # type: ignore[arg-type]
    assert len(alive) == 18  # (3 matrices of 3 layers mapped, then read again)
    assert calls == [False, False]  # (the map, then the exact reverse entries)
    assert_same_atlas(tmp_path / "ahead", tmp_path / "one")
