"""MXFP4 checkpoints (quantization_config quant_method "mxfp4": gpt-oss's release, its experts
packed as 4-bit e2m1 values with a power-of-two scale per 32): `map` decodes the unpacked
weights transformers' own dequantized model holds; `clamp` runs that model; a damaged pack is
refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flashlens import Atlas, Neuron, map_model
from flashlens.weights.checkpoint import Checkpoint
from flashlens.weights.mxfp4 import Mxfp4Experts

from .helpers import (
    check_map_refused,
    check_runs_as_mapped,
    edit_weights,
    load_reference_model,
    make_model,
    neuron_weights,
    rewrite_weights,
)
from .test_map_reference import check_exact

# e2m1's 16 values by nibble, written out here independently of flashlens's table
VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
PACKED = ("gate_up_proj", "down_proj")  # gpt-oss's stacked experts tensors


def pack(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """X (E, C, R) as gpt-oss stores it: blocks (E, R, C / 32, 16) of nibble pairs (the low
    nibble first) and scales (E, R, C / 32), 127 + the exponent that brings each 32 values'
    largest magnitude within 6."""
    W = X.transpose(1, 2).float()  # (E, R, C)
    E, R, C = W.shape
    W = W.reshape(E, R, C // 32, 32)
    e = torch.ceil(torch.log2(W.abs().amax(-1).clamp(min=1e-30) / 6)).clamp(-120, 120)
    nibble = ((W / torch.exp2(e)[..., None])[..., None] - VALUES).abs().argmin(-1)
    blocks = (nibble[..., 0::2] | (nibble[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (e + 127).to(torch.uint8)


def unpack(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The reference unpacking: (E, C, R) fp32."""
    low, high = VALUES[(blocks % 16).long()], VALUES[(blocks // 16).long()]
    vals = torch.stack([low, high], dim=-1).flatten(-2)  # (E, R, G, 32)
    W = vals * 2.0 ** (scales.float() - 127)[..., None]
    return W.flatten(-2).transpose(1, 2)


def mxfp4_copy(model: Path, out: Path) -> Path:
    """A copy of gpt-oss `model` whose experts' tensors are packed, with config.json saying so
    as the hub's release does (attention, router, embedding and head unquantised)."""

    def packed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name, t in state.items():
            if name.endswith(PACKED):
                tensors[name + "_blocks"], tensors[name + "_scales"] = pack(t)
            else:
                tensors[name] = t
        return tensors

    rewrite_weights(model, out, packed)
    config = json.loads((out / "config.json").read_text())
    skip = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens"]
    skip.append("lm_head")
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": skip}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny gpt-oss (d_model 96, experts of 32 units: both multiples of 32) and its MXFP4
    copy."""
    root = tmp_path_factory.mktemp("mxfp4")
    model = make_model(root / "m", "gpt_oss", n_layers=2, d_model=96, d_mlp=32)
    return model, mxfp4_copy(model, root / "mx")


def test_an_mxfp4_map_decodes_the_experts_transformers_unpacks(
    tmp_path: Path, models: tuple[Path, Path]
) -> None:
    """Every decoded neuron of every matrix and layer equals softmax(lm_head(norm(w))) with w
    the weight of transformers' own model loaded from the MXFP4 files (dequantized), to 1e-5;
    the atlas says how the weights were packed. They are really the packed values: equal to
    the reference unpacking, and not to the original model's weights."""
    model, mx = models
    map_model(mx, tmp_path / "a", dtype="float32", compile="off")
    atlas = Atlas.open(tmp_path / "a")
    assert atlas.meta.quantization == "mxfp4 e2m1, one e8m0 scale per 32 values"
    assert atlas.meta.weight_dtype == "bfloat16"  # (which holds the unpacked values exactly)
    for matrix in ("up", "gate", "down"):
        for layer in (0, 1):
            check_exact(atlas, mx, matrix, layer, "model")
    W = neuron_weights(load_reference_model(mx), "up", 1)
    assert not torch.equal(W, neuron_weights(load_reference_model(model), "up", 1))


def test_the_reader_unpacks_whole_tensors_and_single_experts(models: tuple[Path, Path]) -> None:
    """A packed tensor reads under its own name and shape as unpacked, in bf16, whole or one
    expert at a time, equal to the reference unpacking (in fp32); its blocks and scales read
    as stored; without the scheme the name is not there."""
    from safetensors.torch import load_file

    _, mx = models
    stored = load_file(mx / "model.safetensors")
    name = "model.layers.1.mlp.experts.gate_up_proj"
    want = unpack(stored[name + "_blocks"], stored[name + "_scales"])  # (4, 96, 64)
    with Checkpoint(mx, Mxfp4Experts()) as ck:
        assert name in ck and ck.quantized(name)
        assert ck.shape(name) == (4, 96, 64) and ck.dtype(name) == torch.bfloat16
        assert torch.equal(ck.get(name).float(), want)  # (bf16 holds every value exactly)
        assert torch.equal(ck.get(name, rows=(2, 3)).float(), want[2:3])
        assert torch.equal(ck.gather(name, torch.tensor([3, 0])).float(), want[[3, 0]])
        assert ck.get(name, torch.float32).dtype == torch.float32
        assert torch.equal(ck.get(name + "_scales"), stored[name + "_scales"])
    with Checkpoint(mx) as ck:
        assert name not in ck and name + "_blocks" in ck


def test_an_mxfp4_model_runs_the_weights_map_decoded_and_clamps_exactly(
    models: tuple[Path, Path],
) -> None:
    """flashlens loads the MXFP4 checkpoint dequantized: its experts hold the weights `map`
    reads; a clamp of an expert's unit to its natural value leaves the logits as they were,
    and a moved one does not."""
    _, mx = models
    units = [Neuron(1, e * 32 + 5, "up") for e in range(4)]  # unit 5 of every expert
    check_runs_as_mapped(mx, units, moved_above=1e-4)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no scales", "down_proj_blocks has no model.layers.0.mlp.experts.down_proj_scales"),
        ("cut scales", "are not an MXFP4 tensor's blocks (E, R, G, 16) and scales (E, R, G)"),
    ],
)
def test_a_damaged_mxfp4_pack_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    model = make_model(tmp_path / "m", "gpt_oss", n_layers=1, d_model=96, d_mlp=32)
    mx = mxfp4_copy(model, tmp_path / "mx")
    name = "model.layers.0.mlp.experts.down_proj_scales"
    if case == "no scales":
        edit_weights(mx, lambda t: t.pop(name))
    else:
        edit_weights(mx, lambda t: t.update({name: t[name][:, :1].contiguous()}))
    check_map_refused(mx, tmp_path / "a", capsys, message)
