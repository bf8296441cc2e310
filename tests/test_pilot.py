"""The pilot: a low-precision map checks its GEMM on the model's own neurons first.

Three heads, three outcomes: the real stories260K in bf16 or int8 (near-identical rows for its
256 byte tokens) is fixed by computing those rows exactly; a random head passes as it is; a
head whose logits are large and spread over many tokens cannot be fixed so, and auto steps
down (int8 -> bf16 -> fp32) until it maps it in fp32. Each atlas is then checked against the
model's own modules, neuron by neuron.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flashlens import Atlas, map_model
from flashlens.cli import main
from flashlens.decode import pilot, policy
from flashlens.decode.pilot import twin_tokens

from .helpers import U7_ONLY, make_model, use_int8_kernel
from .test_audit import independent_check


@pytest.fixture
def low_precision_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto picks bf16 for these small jobs too, as it does for big ones on bf16 CPUs."""
    monkeypatch.setattr(policy, "LOW_PRECISION_FLOPS", 0.0)
    monkeypatch.setattr(policy, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(policy, "cpu_has_fast_int8", lambda: False)


@pytest.fixture
def int8_auto(low_precision_auto: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """auto picks int8 for these small jobs too, as it does for big ones on VNNI CPUs."""
    monkeypatch.setattr(policy, "cpu_has_fast_int8", lambda: True)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_near_identical_rows_are_computed_exactly(
    tmp_path: Path, stories_bf16: Path, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_int8_kernel(monkeypatch, "int_mm")  # 8-bit operands (u7: the test below)
    s = map_model(stories_bf16, tmp_path / "a", dtype=dtype, compile="off", audit=0)
    assert s.pilot is not None and s.compute_dtype == dtype == s.pilot["dtype"]
    assert s.pilot["over"] > 0 and s.pilot["max_rel_prob"] > pilot.MARGIN * 0.01
    assert s.pilot["decision"] == "exact tokens" and s.pilot["check_over"] == 0
    # without the pilot the same map has 117 (bf16; test_audit) or 387 (int8) neurons outside
    # tolerance; with it:
    atlas = Atlas.open(tmp_path / "a")
    assert independent_check(atlas, stories_bf16)[0] == 0
    assert atlas.meta.pilot == s.pilot


@U7_ONLY
def test_u7_int8_on_stories_steps_down(
    tmp_path: Path, stories_bf16: Path, int8_auto: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The "u7" int8 kernel (AVX2 CPUs) rounds the activations to 7 bits: on the real
    stories260K (d_model 64) that is outside the tolerances even with its byte tokens computed
    exactly, so the pilot says so, and auto steps down to bf16 and maps within them."""
    use_int8_kernel(monkeypatch, "u7")
    s = map_model(stories_bf16, tmp_path / "a", compile="off", audit=0)
    assert s.pilot is not None and (s.pilot["dtype"], s.pilot["decision"]) == ("int8", "bfloat16")
    assert s.pilot["over"] > 0 and s.pilot["check_over"] is not None and s.pilot["check_over"] > 0
    assert s.compute_dtype == "bfloat16" and s.int8_kernel is None  # (the int8 GEMM is gone)
    assert independent_check(Atlas.open(tmp_path / "a"), stories_bf16)[0] == 0


def test_twin_tokens_finds_the_untrained_byte_tokens(stories_bf16: Path) -> None:
    from flashlens.decode.norm import apply_final_norm
    from flashlens.weights import ModelSource

    src = ModelSource.open(stories_bf16)
    W_U = src.W_U()
    mean = W_U.float().mean(0)
    x = apply_final_norm(src.neurons("up", 0), src.readout(), "model")
    found = set(twin_tokens(W_U, mean, (x @ W_U.float().T).double()).tolist())
    src.close()
    bytes_ = set(range(3, 259))  # <0x00>..<0xFF>: TinyStories is ASCII, most never occur
    assert len(found & bytes_) >= 240 and len(found - bytes_) <= 16
    assert 13 not in found  # <0x0A>, the newline, is trained: its row is not a twin


def test_twin_tokens_on_injected_groups() -> None:
    g = torch.Generator().manual_seed(0)
    V, d = 3000, 64
    W_U = torch.randn(V, d, generator=g)
    groups = [torch.arange(100, 160), torch.arange(2000, 2012)]
    for ids in groups:  # rows = a shared direction + 10% noise
        c = torch.randn(d, generator=g) * 2
        W_U[ids] = c + 0.1 * torch.randn(len(ids), d, generator=g)
    mean = W_U.mean(0)
    x = torch.stack([W_U[ids].mean(0) - mean for ids in groups])  # one neuron per group
    ref = (x @ W_U.T).double()
    assert twin_tokens(W_U, mean, ref).tolist() == torch.cat(groups).tolist()
    # random rows only: nothing to compute exactly
    plain = torch.randn(V, d, generator=g)
    assert twin_tokens(plain, plain.mean(0), (plain[:4] @ plain.T).double()).numel() == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_random_head_keeps_the_plain_gemm(
    tmp_path: Path, low_precision_auto: None, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(policy, "cpu_has_fast_int8", lambda: dtype == "int8")
    model = make_model(tmp_path / "m", d_vocab=512, d_model=64, d_mlp=96, dtype=torch.bfloat16)
    s = map_model(model, tmp_path / "a", matrices="up", compile="off", audit=96 * 3)
    assert s.compute_dtype == dtype and s.pilot is not None
    assert s.pilot["decision"] == "gemm" and s.pilot["over"] == 0
    assert s.pilot["exact_tokens"] == 0 and s.audit is not None and s.audit["ok"]


def _spread_head_model(path: Path) -> Path:
    """Logits around +-100 spread over many tokens: bf16 rounds each by up to 0.25, with no
    group of near-identical rows to blame, so only an fp32 GEMM is within tolerance."""
    model = make_model(path, d_vocab=512, d_model=32, d_mlp=64, dtype=torch.bfloat16)
    tensors = load_file(model / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    u = torch.randn(32, generator=g)
    W_U = 25 * u / u.norm() + 0.05 * torch.randn(512, 32, generator=g)
    tensors["lm_head.weight"] = W_U.bfloat16()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return model


def test_auto_falls_back_to_fp32(tmp_path: Path, low_precision_auto: None) -> None:
    model = _spread_head_model(tmp_path / "m")

    s = map_model(model, tmp_path / "bf16", dtype="bfloat16", compile="off", audit=0)
    assert s.pilot is not None and s.pilot["decision"] == "kept"  # explicit: kept, warned
    assert independent_check(Atlas.open(tmp_path / "bf16"), model)[0] > 0

    s = map_model(model, tmp_path / "auto", compile="off", audit=0)
    assert s.pilot is not None and s.pilot["decision"] == "float32"
    assert s.pilot["over"] > 0 and s.pilot["exact_tokens"] == 0
    atlas = Atlas.open(tmp_path / "auto")
    assert s.compute_dtype == atlas.meta.compute_dtype == "float32"
    assert independent_check(atlas, model)[0] == 0

    s = map_model(model, tmp_path / "off", compile="off", audit=0, pilot=0)
    assert s.pilot is None and s.compute_dtype == "bfloat16"


def test_auto_steps_down_from_int8_through_bf16_to_fp32(
    tmp_path: Path, int8_auto: None, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _spread_head_model(tmp_path / "m")
    assert main(["map", str(model), "-o", str(tmp_path / "a"), "--audit", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["pilot"]
    assert (report["dtype"], report["decision"]) == ("int8", "bfloat16")
    then = report["then"]
    assert (then["dtype"], then["decision"]) == ("bfloat16", "float32") and then["over"] > 0
    atlas = Atlas.open(tmp_path / "a")
    assert atlas.meta.compute_dtype == "float32" and atlas.meta.pilot == report
    assert independent_check(atlas, model)[0] == 0
    assert main(["map", str(model), "-o", str(tmp_path / "b"), "--audit", "0"]) == 0
    text = " ".join(capsys.readouterr().err.split())
    assert "plain int8 GEMM" in text and "stepping down to bfloat16" in text
    assert "plain bfloat16 GEMM" in text and "stepping down to float32" in text


def test_cli_says_what_the_pilot_did(
    tmp_path: Path, stories_bf16: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["map", str(stories_bf16), "--matrices", "gate", "--audit", "0"]
    assert main([*args, "-o", str(tmp_path / "a"), "--dtype", "bfloat16"]) == 0
    text = " ".join(capsys.readouterr().err.split())
    assert "precision pilot:" in text and "near-identical LM-head rows computed exactly" in text
    assert "mapped so" in text and "warning" not in text
    assert main([*args, "-o", str(tmp_path / "b"), "--dtype", "bfloat16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["pilot"]
    assert report["decision"] == "exact tokens" and report["exact_tokens"] > 200
    assert main([*args, "-o", str(tmp_path / "c"), "--pilot", "-1"]) == 2
    assert "--pilot must be 0" in capsys.readouterr().err
