"""An interrupted run resumes to the same atlas; partial files never look complete."""

from __future__ import annotations

import gc
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flashlens import Atlas, map_model
from flashlens.atlas.format import read_meta
from flashlens.atlas.writer import AtlasWriter
from flashlens.cli import main
from flashlens.decode import int8
from flashlens.errors import AtlasError

from .helpers import U7_ONLY, make_model, use_int8_kernel

MAP_ARGS = ["--compile", "off", "--block", "64"]


@pytest.fixture(autouse=True)
def commit_after_every_layer() -> Iterator[None]:
    """These runs map a layer in milliseconds: they save their resume state after every layer
    (FLASHLENS_COMMIT_SECONDS=0), so that an interruption finds layers done, as one after
    COMMIT_SECONDS of a real run does. (Its own MonkeyPatch: a test's undo() keeps it.)"""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLASHLENS_COMMIT_SECONDS", "0")
        yield


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough layers that a run takes a few seconds: room to interrupt it."""
    root = tmp_path_factory.mktemp("resume")
    return make_model(root / "m", d_vocab=4096, d_model=64, d_mlp=256, n_layers=24, tokenizer=None)


@pytest.fixture(scope="module")
def reference_atlas(big_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume-ref") / "atlas"
    map_model(big_model, out, compile="off", block=64)
    return out


def _sigint_as_from_a_shell() -> None:
    # A child inherits an ignored SIGINT (Python then installs no KeyboardInterrupt handler);
    # a map started from a terminal never has it ignored.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_map(model: Path, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "flashlens", "map", str(model), "-o", str(out), *MAP_ARGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_sigint_as_from_a_shell,
    )


def wait_for_layers(out: Path, proc: subprocess.Popen[bytes], n: int) -> None:
    """Block until the run has committed n layers (its resume state names them). The garbage
    collector is off meanwhile: late in the full suite a full collection of this process can
    take longer than the rest of the run, which would then finish before it is interrupted."""
    deadline = time.monotonic() + 120
    gc.disable()
    try:
        while time.monotonic() < deadline:
            done = list((out / "up").glob("layer_*.parquet")) if (out / "up").exists() else []
            if len(done) >= n and (out / ".state").exists():
                return
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.005)
    finally:
        gc.enable()
    pytest.fail("the run never got going")


def assert_same_atlas(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.parquet"))
    for rel in files:
        assert pq.read_table(a / rel).equals(pq.read_table(b / rel)), rel


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_to_identical_atlas(
    big_model: Path, reference_atlas: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    out = tmp_path / "atlas"
    proc = start_map(big_model, out)
    wait_for_layers(out, proc, 2)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        err = proc.stderr.read()  # type: ignore[union-attr]
        assert b"rerun the same command to resume" in err and b"Traceback" not in err
    meta = json.loads((out / "atlas.json").read_text())
    assert meta["complete"] is False
    with pytest.raises(AtlasError, match=r"incomplete.*resume"):
        Atlas.open(out)
    assert not (out / "reverse.parquet").exists()
    # Rerun the same command: finished layers are skipped, the result equals an uninterrupted run.
    rerun = subprocess.run(
        [
            sys.executable,
            "-m",
            "flashlens",
            "map",
            str(big_model),
            "-o",
            str(out),
            *MAP_ARGS,
            "--json",
        ],
        capture_output=True,
        check=True,
    )
    summary = json.loads(rerun.stdout)
    assert summary["neurons_skipped"] >= 256  # at least the first committed layer
    assert summary["neurons_mapped"] + summary["neurons_skipped"] == 3 * 24 * 256
    assert_same_atlas(out, reference_atlas)
    assert not (out / ".state").exists()
    assert not list(out.rglob("*.tmp"))


def test_partial_files_never_count_as_done(
    big_model: Path, reference_atlas: Path, tmp_path: Path
) -> None:
    out = tmp_path / "atlas"
    proc = start_map(big_model, out)
    wait_for_layers(out, proc, 3)
    proc.kill()
    proc.wait()
    done = sorted((out / "up").glob("layer_*.parquet"))
    # A layer file written after the last commit of the resume state, but cut short, and a
    # leftover temporary file: neither may be taken as finished.
    nxt = out / "up" / f"layer_{len(done):03d}.parquet"
    nxt.write_bytes(b"PAR1 truncated")
    (out / "up" / f".layer_{len(done) + 1:03d}.parquet.x.tmp").write_bytes(b"junk")
    map_model(big_model, out, compile="off", block=64)
    for tmp in out.rglob("*.tmp"):
        tmp.unlink()  # stray files from the killed process are not the atlas' business
    assert_same_atlas(out, reference_atlas)


def test_complete_rerun_is_a_no_op(big_model: Path, reference_atlas: Path) -> None:
    before = (reference_atlas / "atlas.json").read_text()
    summary = map_model(big_model, reference_atlas, compile="off", block=64)
    assert summary.neurons_mapped == 0 and summary.neurons_skipped == 3 * 24 * 256
    assert (reference_atlas / "atlas.json").read_text() == before
    assert summary.warnings == [] and summary.compute_dtype == "float32"
    # another --dtype is not applied to a complete atlas, and the summary says so
    other = map_model(big_model, reference_atlas, compile="off", block=64, dtype="bfloat16")
    assert other.neurons_mapped == 0 and other.compute_dtype == "float32"
    assert other.warnings == [
        "the atlas was computed in float32, not in the --dtype bfloat16 asked for; pass "
        "--overwrite to map it again in bfloat16"
    ]
    assert (reference_atlas / "atlas.json").read_text() == before


def test_other_settings_refused_unless_overwrite(big_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "atlas"
    map_model(big_model, out, matrices="up", layers="0-1", compile="off")
    with pytest.raises(AtlasError, match=r"other settings.*top_k.*--overwrite"):
        map_model(big_model, out, matrices="up", layers="0-1", top_k=5, compile="off")
    map_model(big_model, out, matrices="up", layers="0-1", top_k=5, compile="off", overwrite=True)
    assert Atlas.open(out).meta.top_k == 5
    assert len(Atlas.open(out).neuron(0, 3, "up").top) == 5


def fail_write(monkeypatch: pytest.MonkeyPatch, nth: int) -> list[int]:
    """Make the nth layer write fail (disk full); returns the layers whose writes started."""
    real = AtlasWriter.write_layer
    written: list[int] = []

    def failing(self: AtlasWriter, matrix: str, layer: int, results: list) -> None:  # type: ignore[type-arg]
        written.append(layer)
        if len(written) == nth:
            raise OSError("No space left on device (simulated)")
        real(self, matrix, layer, results)

    monkeypatch.setattr(AtlasWriter, "write_layer", failing)
    return written


def test_a_failed_layer_write_stops_the_run_and_a_rerun_resumes(
    big_model: Path, reference_atlas: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layers are written on a thread while the next one maps: a failed write must still stop
    the run (at the next layer, not at the end), leave the committed layers, and resume."""
    out = tmp_path / "atlas"
    written = fail_write(monkeypatch, 3)
    with pytest.raises(OSError, match="No space left"):
        map_model(big_model, out, compile="off", block=64)
    assert written == [0, 1, 2]  # the fourth layer's write was never started
    monkeypatch.undo()
    # what a kill during writes leaves: temporary files, never under a final name
    stale = [out / "up" / ".layer_005.parquet.x1.tmp", out / ".reverse.parquet.x2.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    summary = map_model(big_model, out, compile="off", block=64)
    assert summary.neurons_skipped == 2 * 256
    assert_same_atlas(out, reference_atlas)
    assert not any(p.exists() for p in stale)
    # The audit checks the same sample as an uninterrupted run's, the layers mapped before
    # the interruption read from their files.
    assert Atlas.open(out).meta.audit == Atlas.open(reference_atlas).meta.audit
    # atlas.json's seconds count the first run's mapping (to its last save) too
    total = Atlas.open(out).meta.seconds
    assert total is not None and total > summary.seconds


def test_a_run_interrupted_after_its_last_layer_keeps_its_audit(
    big_model: Path, reference_atlas: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every layer written, the reverse index not: the rerun maps nothing and still audits."""
    out = tmp_path / "atlas"

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device (simulated)")

    monkeypatch.setattr(AtlasWriter, "finish", fail)
    with pytest.raises(OSError, match="No space left"):
        map_model(big_model, out, compile="off", block=64)
    monkeypatch.undo()
    summary = map_model(big_model, out, compile="off", block=64)
    assert summary.neurons_mapped == 0
    assert summary.audit is not None and summary.audit["sample"] == 32
    assert_same_atlas(out, reference_atlas)
    assert Atlas.open(out).meta.audit == Atlas.open(reference_atlas).meta.audit


def test_a_low_precision_run_resumes_to_identical_atlas(
    big_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """int8: the resume state holds the reverse index with its spare entries (approximate
    logits); the resumed run loads it, makes every entry exact at the end and cuts it to N,
    as an uninterrupted run does."""
    whole = tmp_path / "whole"
    map_model(big_model, whole, compile="off", block=64, dtype="int8", layers="0-5")
    out = tmp_path / "resumed"
    written = fail_write(monkeypatch, 4)
    with pytest.raises(OSError, match="No space left"):
        map_model(big_model, out, compile="off", block=64, dtype="int8", layers="0-5")
    assert written == [0, 1, 2, 3]
    monkeypatch.undo()
    summary = map_model(big_model, out, compile="off", block=64, dtype="int8", layers="0-5")
    assert summary.neurons_skipped == 3 * 256 and summary.compute_dtype == "int8"
    assert_same_atlas(out, whole)


def test_a_resumed_run_keeps_the_interrupted_runs_dtype(
    big_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One atlas never mixes dtypes: an explicit other --dtype is refused before anything is
    written, and auto resumes in the dtype the interrupted run computed in (these fp32
    weights alone would make auto choose fp32)."""
    whole = tmp_path / "whole"
    map_model(big_model, whole, compile="off", block=64, dtype="int8", layers="0-5")
    out = tmp_path / "resumed"
    fail_write(monkeypatch, 3)
    with pytest.raises(OSError, match="No space left"):
        map_model(big_model, out, compile="off", block=64, dtype="int8", layers="0-5")
    monkeypatch.undo()
    before = (out / "atlas.json").read_text()
    with pytest.raises(AtlasError, match=r"computed in int8.*--dtype bfloat16.*--dtype int8"):
        map_model(big_model, out, compile="off", block=64, dtype="bfloat16", layers="0-5")
    assert (out / "atlas.json").read_text() == before
    summary = map_model(big_model, out, compile="off", block=64, layers="0-5")
    assert summary.neurons_skipped == 2 * 256 and summary.compute_dtype == "int8"
    assert Atlas.open(out).meta.compute_dtype == "int8"
    # the same kernel throughout: recorded once, no warning
    assert Atlas.open(out).meta.int8_kernel == summary.int8_kernel == int8.kernel()
    assert not [w for w in summary.warnings if "int8 kernel" in w]
    assert_same_atlas(out, whole)


@U7_ONLY
def test_a_run_resumed_on_another_int8_kernel_records_both_and_warns(
    big_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An atlas begun with 8-bit int8 operands (_int_mm) and resumed where the CPU's kernel is
    "u7" (7-bit neuron vectors) is finished, but atlas.json names both kernels and the run
    warns that its layers differ in rounding; a fresh fp32 map records none."""
    out = tmp_path / "resumed"
    use_int8_kernel(monkeypatch, "int_mm")
    fail_write(monkeypatch, 3)
    with pytest.raises(OSError, match="No space left"):
        map_model(big_model, out, compile="off", block=64, dtype="int8", layers="0-5")
    monkeypatch.undo()
    assert read_meta(out / "atlas.json").int8_kernel == "int_mm"  # (incomplete: no Atlas)
    use_int8_kernel(monkeypatch, "u7")
    summary = map_model(big_model, out, compile="off", block=64, dtype="int8", layers="0-5")
    assert summary.neurons_skipped == 2 * 256 and summary.int8_kernel == "u7"
    assert Atlas.open(out).meta.int8_kernel == "int_mm, u7"
    (warning,) = [w for w in summary.warnings if "int8 kernel" in w]
    assert "begun with the int8 kernel int_mm and continued with u7" in warning
    fp32 = map_model(big_model, tmp_path / "fp32", compile="off", dtype="float32", layers="0")
    assert fp32.int8_kernel is None and Atlas.open(tmp_path / "fp32").meta.int8_kernel is None


def test_another_checkpoint_of_the_same_config_is_refused_a_moved_folder_is_not(
    big_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun into an atlas recorded from another folder resumes (or reuses) it only when
    that folder holds the same neurons: one atlas never mixes two models."""
    import shutil

    out = tmp_path / "atlas"
    fail_write(monkeypatch, 3)
    with pytest.raises(OSError, match="No space left"):
        map_model(big_model, out, compile="off", block=64, layers="0-5")
    monkeypatch.undo()
    retrained = make_model(
        tmp_path / "retrained",
        d_vocab=4096,
        d_model=64,
        d_mlp=256,
        n_layers=24,
        tokenizer=None,
        seed=1,
    )  # the same config.json, other weights
    assert (retrained / "config.json").read_text() == (big_model / "config.json").read_text()
    before = (out / "atlas.json").read_text()
    with pytest.raises(AtlasError, match=r"other weights with the same config.json.*--overwrite"):
        map_model(retrained, out, compile="off", block=64, layers="0-5")
    assert (out / "atlas.json").read_text() == before
    moved = tmp_path / "moved"
    shutil.copytree(big_model, moved)  # the same model in another folder: resumed
    summary = map_model(moved, out, compile="off", block=64, layers="0-5")
    assert summary.neurons_skipped == 2 * 256
    with pytest.raises(AtlasError, match="other weights"):  # complete: not reused either
        map_model(retrained, out, compile="off", block=64, layers="0-5")
    # The atlas records the weights' fingerprint: the same folder, its weights replaced in
    # place (a fine-tune saved over it), is refused too.
    assert Atlas.open(out).meta.model == str(moved)
    shutil.copy(retrained / "model.safetensors", moved / "model.safetensors")
    with pytest.raises(AtlasError, match=r"other weights.*weights fingerprint"):
        map_model(moved, out, compile="off", block=64, layers="0-5")


def test_the_order_of_the_matrices_is_not_a_setting(big_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "atlas"
    map_model(big_model, out, matrices="down,up", layers="0-1", compile="off")
    assert Atlas.open(out).meta.matrices == ["up", "down"]  # the family's order, as recorded
    summary = map_model(big_model, out, matrices="up,down", layers="0-1", compile="off")
    assert summary.neurons_skipped == 2 * 2 * 256 and summary.neurons_mapped == 0
    # Mapped, sampled and audited in one order: any spelling gives the same atlas and audit.
    other = tmp_path / "other"
    map_model(big_model, other, matrices="up,down", layers="0-1", compile="off")
    assert_same_atlas(out, other)
    assert Atlas.open(out).meta.audit == Atlas.open(other).meta.audit
    with pytest.raises(AtlasError, match=r"other settings.*matrices"):
        map_model(big_model, out, matrices="down", layers="0-1", compile="off")


def test_atlas_files_follow_the_umask(small_model: Path, tmp_path: Path) -> None:
    """Written through temporary files (mkstemp makes them 0600), yet readable by others as
    any new file is under a 022 umask: a server run by another user can read the atlas."""
    import os

    from flashlens.atlas import format as atlas_format

    umask = os.umask(0o022)
    os.umask(umask)
    assert umask == atlas_format._UMASK
    out = tmp_path / "atlas"
    map_model(small_model, out, compile="off")
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 5
    want = 0o666 & ~umask
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(want)}


def test_layers_written_since_the_last_save_of_the_resume_state_are_mapped_again(
    big_model: Path, reference_atlas: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resume state is saved every FLASHLENS_COMMIT_SECONDS and after the last layer: a
    run stopped before its first save has written layer files but left none done, and the
    rerun maps them again, to the same atlas."""
    monkeypatch.setenv("FLASHLENS_COMMIT_SECONDS", "3600")
    out = tmp_path / "atlas"
    written = fail_write(monkeypatch, 4)
    with pytest.raises(OSError, match="No space left"):
        map_model(big_model, out, compile="off", block=64)
    assert written == [0, 1, 2, 3]
    assert len(list((out / "up").glob("layer_*.parquet"))) == 3  # written, never committed
    assert not (out / ".state").exists()
    monkeypatch.undo()
    summary = map_model(big_model, out, compile="off", block=64)
    assert summary.neurons_skipped == 0
    assert_same_atlas(out, reference_atlas)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("small") / "m", n_layers=2)


def test_overwrite_removes_the_old_validation_and_keeps_the_users_files(
    small_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "atlas"
    map_model(small_model, out, compile="off")
    # validation.parquet is derived from the old atlas (as `flashlens validate` writes it)
    pq.write_table(pa.table({"model": ["old-model"]}), out / "validation.parquet")
    (out / "notes.txt").write_text("mine")
    (out / "up" / "plot.png").write_text("mine too")
    map_model(small_model, out, compile="off", top_k=5, overwrite=True)
    assert not (out / "validation.parquet").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "up" / "plot.png").read_text() == "mine too"
    assert Atlas.open(out).meta.top_k == 5


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("truncate up/layer_001.parquet", r"up/layer_001.parquet is unreadable"),
        ("delete gate/layer_000.parquet", r"gate/layer_000.parquet is missing"),
        ("delete reverse.parquet", r"reverse.parquet is missing"),
        ("delete tokens.parquet", r"tokens.parquet is missing"),
    ],
)
def test_a_damaged_complete_atlas_is_not_complete(
    small_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: str,
    match: str,
) -> None:
    out = tmp_path / "atlas"
    map_model(small_model, out, compile="off")
    whole = {p.relative_to(out): pq.read_table(p) for p in out.rglob("*.parquet")}
    how, name = damage.split()
    if how == "truncate":
        data = (out / name).read_bytes()
        (out / name).write_bytes(data[: len(data) // 2])
    else:
        (out / name).unlink()
    with pytest.raises(
        AtlasError, match=rf"{match}.*; the atlas is damaged: map it again with --overwrite"
    ):
        map_model(small_model, out, compile="off")
    assert main(["map", str(small_model), "-o", str(out), "--compile", "off"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already complete" not in err and "--overwrite" in err
    map_model(small_model, out, compile="off", overwrite=True)
    assert {p.relative_to(out) for p in out.rglob("*.parquet")} == set(whole)
    for rel, table in whole.items():
        assert pq.read_table(out / rel).equals(table), rel


def test_a_local_model_is_recorded_by_its_absolute_path(
    small_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(small_model.parent)
    map_model(small_model.name, tmp_path / "atlas", compile="off")  # as typed: "m"
    assert Atlas.open(tmp_path / "atlas").meta.model == str(small_model)
    # The same model by its absolute path, from another directory: the same settings.
    monkeypatch.chdir(tmp_path)
    summary = map_model(small_model, tmp_path / "atlas", compile="off")
    assert summary.neurons_mapped == 0 and summary.neurons_skipped == 3 * 2 * 48
    # An atlas that recorded the relative path (older flashlens) resumes too.
    meta = json.loads((tmp_path / "atlas" / "atlas.json").read_text())
    (tmp_path / "atlas" / "atlas.json").write_text(json.dumps({**meta, "model": "m"}))
    assert map_model(small_model, tmp_path / "atlas", compile="off").neurons_mapped == 0
