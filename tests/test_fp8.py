"""FP8 checkpoints (quantization_config quant_method "fp8": float8 e4m3 weights with a scale per
block, as DeepSeek-V3 and Qwen3's FP8 releases ship): `map` decodes the dequantized weights the
model runs with, checked against transformers' own loading of the same files; `clamp` runs that
model; bad files and other quantisations are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from flashlens import Atlas, map_model
from flashlens.cli import main
from flashlens.weights import ModelSource
from flashlens.weights.checkpoint import Checkpoint
from flashlens.weights.scaled import BlockScales

from .helpers import (
    check_map_refused,
    check_runs_as_mapped,
    edit_weights,
    load_reference_model,
    make_model,
    matrices_of,
    neuron_weights,
    reference_logits,
    rewrite_weights,
)
from .test_map_reference import check_exact, check_tolerance

FP8_MAX = 448.0  # the largest float8 e4m3 value


def quantize(W: torch.Tensor, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """W (..., R, C) as float8 e4m3 values and fp32 scales, one per block (ceil grid) or one
    for the tensor: the largest magnitude of each block maps to FP8_MAX."""
    W = W.float()
    if block is None:
        s = W.abs().amax().clamp(min=1e-12) / FP8_MAX
        return (W / s).to(torch.float8_e4m3fn), s.reshape(())
    (bm, bn), (R, C) = block, W.shape[-2:]
    rows, cols = torch.arange(R) // bm, torch.arange(C) // bn
    n_r, n_c = int(rows[-1]) + 1, int(cols[-1]) + 1
    amax = torch.zeros((*W.shape[:-2], n_r, n_c))
    for i in range(n_r):
        for j in range(n_c):
            part = W[..., rows == i, :][..., cols == j]
            amax[..., i, j] = part.abs().amax(dim=(-2, -1))
    s = amax.clamp(min=1e-12) / FP8_MAX
    grid = s[..., rows, :][..., cols]  # (..., R, C)
    return (W / grid).to(torch.float8_e4m3fn), s


def dequantize(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """The reference dequantization, written independently of flashlens's."""
    if block is None:
        return q.float() * s.float()
    rows = torch.arange(q.shape[-2]) // block[0]
    cols = torch.arange(q.shape[-1]) // block[1]
    return q.float() * s.float()[..., rows, :][..., cols]


def _divides(shape: torch.Size, block: tuple[int, int]) -> bool:
    return shape[-2] % block[0] == 0 == shape[-1] % block[1]


def fp8_copy(
    model: Path,
    out: Path,
    block: tuple[int, int] | None = (16, 16),
    only: str = ".layers.",
    **qc: Any,
) -> Path:
    """A copy of `model` whose decoder-layer matrices (attention, MLP, experts; those whose
    names hold `only`) are stored in FP8 with their `_scale_inv` tensors, and whose
    config.json says so (the embedding, the norms and the LM-head stay as they were, as in
    the hub's FP8 releases)."""

    def quantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name, t in state.items():
            matrix = ".layers." in name and only in name and t.ndim >= 2 and t.is_floating_point()
            if matrix and (block is None or _divides(t.shape, block)):
                tensors[name], tensors[name + "_scale_inv"] = quantize(t, block)
            else:
                tensors[name] = t
        return tensors

    rewrite_weights(model, out, quantized)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block) if block else None,
        **qc,
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "deepseek_v3"])
def test_an_fp8_map_decodes_the_weights_transformers_dequantizes(
    tmp_path: Path, family: str
) -> None:
    """Every decoded neuron of every matrix and layer equals softmax(lm_head(norm(w))) with w
    the weight of transformers' own model loaded from the FP8 files (dequantized on this CPU),
    to 1e-5; the atlas says the weights were FP8. The weights are really quantised: they are
    within FP8's rounding of the original model's, and not equal to them."""
    model = make_model(tmp_path / "m", family, n_layers=2, d_model=32, d_mlp=48)
    fp8 = fp8_copy(model, tmp_path / "fp8")
    map_model(fp8, tmp_path / "a", dtype="float32", compile="off")
    atlas = Atlas.open(tmp_path / "a")
    assert atlas.meta.quantization == "fp8 e4m3, 16 x 16 blocks"
    assert atlas.meta.weight_dtype == "float32"
    for matrix in matrices_of(family):
        for layer in (0, 1):
            check_exact(atlas, fp8, matrix, layer, "model")
    W = neuron_weights(load_reference_model(fp8), "up", 1)
    W0 = neuron_weights(load_reference_model(model), "up", 1)
    assert not torch.equal(W, W0)
    assert float((W - W0).abs().max()) <= float(W0.abs().max()) / 8  # (3 mantissa bits)


def test_a_mixture_whose_shared_expert_alone_is_fp8_keeps_its_precision(tmp_path: Path) -> None:
    """A bf16 mixture whose shared expert is stored in FP8 and its routed experts not: a
    layer's neurons, and single ones, are held in the wider dtype (fp32), so the shared
    expert's dequantized values are not rounded to bf16; the map is exact."""
    model = make_model(
        tmp_path / "m", "qwen2_moe", n_layers=2, d_model=32, d_mlp=48, dtype=torch.bfloat16
    )
    fp8 = fp8_copy(model, tmp_path / "fp8", only=".shared_expert.")
    with ModelSource.open(fp8) as source:
        W = source.neurons("up", 1)
        assert W.dtype == torch.float32
        index = torch.tensor([W.shape[0] - 1, 3, W.shape[0] - 16])  # shared, routed, shared
        assert torch.equal(source.neuron_rows("up", 1, index), W[index])
    map_model(fp8, tmp_path / "a", dtype="float32", compile="off")
    for matrix in ("up", "down"):
        check_exact(Atlas.open(tmp_path / "a"), fp8, matrix, 1, "model")


def test_an_int8_map_of_fp8_weights_and_the_policy(tmp_path: Path) -> None:
    """FP8 weights are low-precision weights: `auto` picks the fast dtype for a big job from
    the dtype transformers dequantizes them into (config.json's, bfloat16 where it names
    none), and an int8 map meets the low-precision tolerances."""
    from flashlens.decode.policy import fastest_cpu_dtype, resolve_dtype

    model = make_model(tmp_path / "m", "llama", n_layers=2, d_model=64, d_mlp=64)
    fp8 = fp8_copy(model, tmp_path / "fp8")
    map_model(fp8, tmp_path / "a", dtype="int8", compile="off")
    atlas = Atlas.open(tmp_path / "a")
    for matrix in ("up", "gate", "down"):
        check_tolerance(atlas, fp8, matrix, 1, "model")
    config = json.loads((fp8 / "config.json").read_text())
    with ModelSource.open(fp8) as source:
        assert source.dtype == torch.float32 and source.run_dtype == torch.float32
    for key, value, want in (("dtype", "bfloat16", torch.bfloat16), (None, None, torch.bfloat16)):
        edited = {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")}
        if key:
            edited[key] = value
        (fp8 / "config.json").write_text(json.dumps(edited))
        with ModelSource.open(fp8) as source:
            assert source.run_dtype == want
            big = resolve_dtype("auto", source.run_dtype, torch.device("cpu"), 1e13)
            assert big == fastest_cpu_dtype()


@pytest.mark.parametrize(
    ("block", "scales"),
    [((16, 16), "fp32"), ((16, 20), "fp32"), ((32, 16), "bf16"), ((16, 16), "e8m0"), (None, "")],
)
def test_the_reader_dequantizes_rows_columns_and_grids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: tuple[int, int] | None, scales: str
) -> None:
    """Checkpoint.get (whole, or a range of rows) and gather (rows, columns) of a float8
    weight equal the reference dequantization, for a grid that divides the weight, one that
    does not (ceil blocks, as DeepSeek's), scales stored in bf16 or as e8m0 powers of two, and
    one scale per tensor; the scale tensors themselves read as stored. Rows are dequantized in
    slices (of a few rows here) that need not align with the blocks."""
    from safetensors.torch import save_file

    from flashlens.weights import scaled

    monkeypatch.setattr(scaled, "SLICE_ENTRIES", 7 * 40)  # 7 rows of a matrix, 3 of two

    gen = torch.Generator().manual_seed(0)
    W = torch.randn(48, 40, generator=gen)
    q, s = quantize(W, block)
    if scales == "bf16":
        s = s.bfloat16()
    if scales == "e8m0":  # powers of two, stored as float8 e8m0
        s = torch.exp2(torch.ceil(torch.log2(s))).to(torch.float8_e8m0fnu)
        q = (W / dequantize(torch.ones_like(q), s, block)).to(torch.float8_e4m3fn)
    stacked_q = torch.stack([q, q.flip(0)])  # (2, 48, 40): experts first
    s1 = s.flip(0) if block else s  # the second expert's scales
    stacked_s = torch.stack([s, s1]) if block else s.clone()
    tensors = {"w": q, "w_scale_inv": s, "e": stacked_q, "e_scale_inv": stacked_s}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    want = dequantize(q, s, block)
    with Checkpoint(tmp_path, BlockScales((block or (None, None),))) as ck:
        assert ck.dtype("w") == torch.float32 and ck.quantized("w")
        assert torch.equal(ck.get("w"), want)
        assert torch.equal(ck.get("w", rows=(13, 37)), want[13:37])
        assert ck.get("w", torch.bfloat16).dtype == torch.bfloat16
        index = torch.tensor([47, 0, 16, 15, 31])
        assert torch.equal(ck.gather("w", index), want[index])
        assert torch.equal(ck.gather("w", index[index < 40], dim=1), want[:, index[index < 40]])
        assert torch.equal(ck.get("w_scale_inv"), s) and not ck.quantized("w_scale_inv")
        assert torch.equal(ck.get("e", rows=(1, 2))[0], dequantize(q.flip(0), s1, block))
        assert torch.equal(ck.get("e"), torch.stack([want, dequantize(q.flip(0), s1, block)]))
    with Checkpoint(tmp_path) as ck:  # no FP8 scheme: as stored
        assert ck.dtype("w") == torch.float8_e4m3fn and torch.equal(ck.get("w").float(), q.float())


def test_an_fp8_model_runs_the_weights_map_decoded_and_clamps_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """flashlens loads an FP8 checkpoint dequantized, whatever the device: its MLP weights
    are the ones `map` decoded, a clamp to a neuron's natural value leaves the logits as they
    were and a moved one does not; `prob` through the CLI gives the model's own logit."""
    from flashlens import Neuron

    model = make_model(tmp_path / "m", "llama", n_layers=2, d_model=32, d_mlp=48)
    fp8 = fp8_copy(model, tmp_path / "fp8")
    check_runs_as_mapped(fp8, [Neuron(1, 5, "up")], moved_above=1e-3)
    assert main(["map", str(fp8), "-o", str(tmp_path / "a"), "--dtype", "float32"]) == 0
    capsys.readouterr()
    argv = ["prob", str(tmp_path / "a"), "up:1:5", " the", "--model", str(fp8), "--json"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    want = reference_logits(fp8, "up", 1)[5, got["token_id"]]
    assert got["logit"] == pytest.approx(float(want), rel=1e-5, abs=1e-5)
    from fastapi.testclient import TestClient

    from flashlens.serve import make_app

    page = TestClient(make_app(Atlas.open(tmp_path / "a"))).get("/").text
    assert "quantization" in page and "fp8 e4m3, 16 x 16 blocks" in page


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no scales", "up_proj.weight is stored in float8_e4m3fn, but the checkpoint"),
        ("other grid", "quantization_config (fp8 e4m3, 16 x 16 blocks) needs [3, 2]"),
        ("awq", "quantization_config (quant_method 'awq')"),
        ("fp4 experts", "expert_dtype 'fp4'"),
        ("e5m2", "fmt 'e5m2'"),
        ("bad block", "weight_block_size [16]"),
        ("no config", "is stored in float8_e4m3fn, but config.json has no quantization_config"),
    ],
)
def test_bad_fp8_checkpoints_are_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    """A missing or mis-shaped scale tensor, another quantisation, FP4 experts, another FP8
    format, a malformed block size, or float8 weights under a config.json that does not say
    how to scale them: exit 2, one line saying what is wrong and what to do, no traceback,
    and no atlas left behind."""
    model = make_model(tmp_path / "m", "llama", n_layers=2, d_model=32, d_mlp=48)
    fp8 = fp8_copy(model, tmp_path / "fp8")
    config = json.loads((fp8 / "config.json").read_text())
    qc = config["quantization_config"]
    name = "model.layers.1.mlp.up_proj.weight_scale_inv"
    if case == "no scales":
        edit_weights(fp8, lambda t: t.pop(name))
    elif case == "other grid":
        edit_weights(fp8, lambda t: t.update({name: t[name][:, :1].contiguous()}))
    elif case == "no config":
        del config["quantization_config"]
        (fp8 / "config.json").write_text(json.dumps(config))
    else:
        qc.update(
            {
                "awq": {"quant_method": "awq"},
                "fp4 experts": {"expert_dtype": "fp4"},
                "e5m2": {"fmt": "e5m2"},
                "bad block": {"weight_block_size": [16]},
            }[case]
        )
        (fp8 / "config.json").write_text(json.dumps(config))
    check_map_refused(fp8, tmp_path / "a", capsys, message)


def test_a_model_compares_with_its_fp8_release(tmp_path: Path) -> None:
    """`compare` takes a model and its FP8 copy (the same architecture, other weights): each
    neuron's figures equal brute force over the two models' own distributions, and the FP8
    rounding shows as a nonzero divergence."""
    from .test_compare import check_compare_exact

    model = make_model(tmp_path / "m", "llama", n_layers=2, d_model=32, d_mlp=48)
    fp8 = fp8_copy(model, tmp_path / "fp8")
    assert check_compare_exact(model, fp8, tmp_path / "cmp") > 1e-6
