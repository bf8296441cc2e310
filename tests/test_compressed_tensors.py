"""compressed-tensors checkpoints (quantization_config quant_method "compressed-tensors",
llm-compressor's formats: float8 e4m3 or int8 weights, or int4/int8 values packed in int32
words, with one scale per tensor, output channel, group or block and, for asymmetric int
weights, zero points, as Red Hat AI's FP8, W8A8 and W4A16 releases ship): `map` decodes the
dequantized weights the model runs with, checked against transformers' own loading of the same
files (which calls the compressed-tensors library); `clamp` runs that model; what is not read is
refused in one line. The test checkpoints are written with the library's own quantize and
pack functions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from flashlens import Atlas, Neuron, map_model
from flashlens.cli import main
from flashlens.weights import ModelSource
from flashlens.weights.checkpoint import Checkpoint
from flashlens.weights.quant import scheme

from .helpers import (
    check_map_refused,
    check_runs_as_mapped,
    edit_weights,
    load_reference_model,
    make_model,
    matrices_of,
    neuron_weights,
    rewrite_weights,
)
from .test_map_reference import check_exact

# the largest float8 e4m3, int8 and int4 magnitudes ("int4": pack-quantized, W4A16)
Q_MAX = {"float": 448.0, "int": 127.0, "int4": 7.0}


def scale_shape(shape: tuple[int, ...], strategy: str, size: Any) -> tuple[int, ...]:
    """The scale tensor compressed-tensors stores for a weight (R, C) in `strategy`."""
    R, C = shape
    if strategy == "tensor":
        return (1,)
    if strategy == "channel":
        return (R, 1)
    if strategy == "group":
        return (R, -(-C // size))
    return (-(-R // size[0]), -(-C // size[1]))


def quantize(
    W: torch.Tensor,
    kind: str,
    strategy: str,
    size: Any,
    scale_dtype: torch.dtype,
    symmetric: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """W (R, C) as 8-bit (kind "int4": 4-bit) values, scales in `scale_dtype`, one per
    `strategy` block (the largest magnitude of each block maps to the format's largest value;
    asymmetric: the block's range to the format's), and int8 zero points (None: symmetric),
    the values computed by compressed-tensors' own quantize()."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize

    R, C = W.shape
    grid = scale_shape((R, C), strategy, size)
    bm, bn = (
        (R, C)
        if strategy == "tensor"
        else (1, C)
        if strategy == "channel"
        else ((1, size) if strategy == "group" else tuple(size))
    )
    rows, cols = torch.arange(R) // bm, torch.arange(C) // bn
    lo = torch.zeros(grid if len(grid) == 2 else (1, 1))
    hi = torch.zeros_like(lo)
    for i in range(lo.shape[0]):
        for j in range(lo.shape[1]):
            part = W[rows == i][:, cols == j]
            lo[i, j], hi[i, j] = part.amin(), part.amax()
    zp = None
    if symmetric:
        s = (torch.maximum(-lo, hi).clamp(min=1e-12) / Q_MAX[kind]).to(scale_dtype)
    else:  # the block's range onto q_min .. q_max, its minimum at q_min
        q_max = Q_MAX[kind]
        s = ((hi - lo).clamp(min=1e-12) / (2 * q_max + 1)).to(scale_dtype)
        zp = (-q_max - 1 - lo / s.float()).round().clamp(-q_max - 1, q_max).to(torch.int8)
        zp = zp.reshape(grid)
    s = s.reshape(grid)
    args = QuantizationArgs(
        num_bits=4 if kind == "int4" else 8,
        type="float" if kind == "float" else "int",
        strategy=strategy,
        symmetric=symmetric,
        group_size=size if strategy == "group" else None,
        block_structure=list(size) if strategy == "block" else None,
    )
    q = ct_quantize(W.to(scale_dtype), s, zp, args, dtype=args.pytorch_dtype())
    return q, s, zp


def ct_copy(
    model: Path,
    out: Path,
    kind: str = "float",
    strategy: str = "channel",
    size: Any = None,
    scale_dtype: torch.dtype = torch.bfloat16,
    experts: tuple[str, str, Any] | None = None,
    **weights: Any,
) -> Path:
    """A copy of `model` whose decoder-layer Linear weights (attention, MLP, experts) are
    stored as compressed-tensors does, `name` 8-bit beside `name_scale` (kind "int4":
    `name_packed`, 4-bit values packed in int32 words by compressed-tensors' own
    pack_to_int32, and `name_shape`), with the quantization_config llm-compressor writes (the
    embedding, norms and LM-head stay). experts (kind, strategy, size): the routed experts in
    a scheme of their own, in a second config group targeting them (as Kimi's checkpoints)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    def quantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name, t in state.items():
            if ".layers." in name and t.ndim == 2 and "norm" not in name:
                k, st, sz = experts if experts and ".experts." in name else (kind, strategy, size)
                symmetric = weights.get("symmetric", True)
                q, s, zp = quantize(t.float(), k, st, sz, scale_dtype, symmetric)
                tensors[name.replace(".weight", ".weight_scale")] = s
                if zp is not None:  # (packed along the rows where the values are packed)
                    packed = pack_to_int32(zp, 4, packed_dim=0) if k == "int4" else zp
                    tensors[name + "_zero_point"] = packed
                if k == "int4":
                    tensors[name + "_packed"] = pack_to_int32(q, 4)
                    tensors[name + "_shape"] = torch.tensor(list(t.shape))
                else:
                    tensors[name] = q
            else:
                tensors[name] = t
        return tensors

    rewrite_weights(model, out, quantized)
    config = json.loads((out / "config.json").read_text())
    groups = {"group_0": ct_group(kind, strategy, size, ["Linear"], **weights)}
    if experts:
        groups = {
            "group_0": ct_group(*experts, ["re:.*mlp.experts.*"], **weights),
            "group_1": ct_group(kind, strategy, size, ["Linear"], **weights),
        }
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "mixed-precision" if experts else groups["group_0"]["format"],
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def ct_group(
    kind: str, strategy: str, size: Any, targets: list[str], **weights: Any
) -> dict[str, Any]:
    """A compressed-tensors config group, as llm-compressor writes it."""
    w = {
        "num_bits": 4 if kind == "int4" else 8,
        "type": "float" if kind == "float" else "int",
        "strategy": strategy,
        "symmetric": True,
        "dynamic": False,
        "group_size": size if strategy == "group" else None,
        "block_structure": list(size) if strategy == "block" else None,
        "observer": "minmax",
        **weights,
    }
    activations = {"num_bits": 8, "type": kind, "strategy": "token", "dynamic": True}
    return {
        "targets": targets,
        "weights": w,
        "format": {"float": "float-quantized", "int": "int-quantized"}.get(kind, "pack-quantized"),
        "input_activations": None if kind == "int4" else activations,  # (W4A16)
        "output_activations": None,
    }


def check_map_exact(ct: Path, family: str, out: Path, described: str) -> None:
    """`map` of `ct` in fp32 at `out`: the atlas names the quantisation `described`, and
    every neuron of every matrix and layer equals softmax(lm_head(norm(w))) with w the weight
    of transformers' own model loaded from the files (check_exact, 1e-5)."""
    map_model(ct, out, dtype="float32", compile="off")
    atlas = Atlas.open(out)
    assert atlas.meta.quantization == described
    for matrix in matrices_of(family):
        for layer in (0, 1):
            check_exact(atlas, ct, matrix, layer, "model")


CHANNEL = "fp8 e4m3, one scale per output channel"
CASES = [  # (family, kind, strategy, size, scale dtype, as atlas.json describes it)
    ("llama", "float", "channel", None, torch.bfloat16, CHANNEL),
    ("llama", "int", "channel", None, torch.float32, "int8, one scale per output channel"),
    ("llama", "float", "tensor", None, torch.float32, "fp8 e4m3, one scale per tensor"),
    ("llama", "int", "group", 16, torch.bfloat16, "int8, one scale per 16 columns of a row"),
    ("llama", "float", "block", (16, 16), torch.float16, "fp8 e4m3, 16 x 16 blocks"),
    ("qwen3_moe", "float", "channel", None, torch.bfloat16, CHANNEL),
    # (a shared expert's products rounded to bf16, the routed experts' not, as transformers)
    ("qwen2_moe", "float", "channel", None, torch.bfloat16, CHANNEL),
    ("mixtral", "float", "tensor", None, torch.float32, "fp8 e4m3, one scale per tensor"),
    # W4A16: int4 values packed in int32 words, a scale per group of a row's columns
    ("llama", "int4", "group", 16, torch.bfloat16, "int4, one scale per 16 columns of a row"),
    ("qwen2", "int4", "channel", None, torch.float16, "int4, one scale per output channel"),
    # (packed experts: dequantized by the library, rounded to the scales' dtype)
    ("deepseek_v3", "int4", "group", 16, torch.bfloat16, "int4, one scale per 16 columns of a row"),
]


@pytest.mark.parametrize(("family", "kind", "strategy", "size", "scale_dtype", "described"), CASES)
def test_a_compressed_tensors_map_decodes_the_weights_transformers_dequantizes(
    tmp_path: Path,
    family: str,
    kind: str,
    strategy: str,
    size: Any,
    scale_dtype: torch.dtype,
    described: str,
) -> None:
    """Every decoded neuron of every matrix and layer equals softmax(lm_head(norm(w))) with w
    the weight of transformers' own model loaded from the compressed-tensors files
    (dequantized on this CPU by the compressed-tensors library), to 1e-5, for float8 and int8
    values, each strategy, and scales in bf16, fp16 (products rounded to them, as the library
    does) and fp32; the atlas says how the weights were stored. The weights are really
    quantised: near the original model's, and not equal to them."""
    model = make_model(tmp_path / "m", family, n_layers=2, d_model=32, d_mlp=48)
    ct = ct_copy(model, tmp_path / "ct", kind, strategy, size, scale_dtype)
    check_map_exact(ct, family, tmp_path / "a", described)
    W = neuron_weights(load_reference_model(ct), "up", 1)
    W0 = neuron_weights(load_reference_model(model), "up", 1)
    assert not torch.equal(W, W0)
    assert float((W - W0).abs().max()) <= float(W0.abs().max()) / 8


@pytest.mark.parametrize(
    ("family", "kind", "strategy", "size", "described"),
    [
        ("llama", "int4", "group", 16, "int4 with zero points, one scale per 16 columns of a row"),
        ("llama", "int", "channel", None, "int8 with zero points, one scale per output channel"),
        ("qwen2", "int4", "channel", None, "int4 with zero points, one scale per output channel"),
    ],
)
def test_asymmetric_int_weights_read_with_their_zero_points(
    tmp_path: Path, family: str, kind: str, strategy: str, size: Any, described: str
) -> None:
    """Asymmetric int weights (llm-compressor's W4A16_ASYM, as its AWQ recipes write them;
    W8A8 asym): (q - z) * s with the integer zero points stored beside the scales (packed
    along the rows where the values are packed), every neuron exact against transformers' own
    loading; the zero points are really used (not all zero)."""
    from safetensors.torch import load_file

    model = make_model(tmp_path / "m", family, n_layers=2, d_model=32, d_mlp=48)
    ct = ct_copy(model, tmp_path / "ct", kind, strategy, size, symmetric=False)
    zps = [t for n, t in load_file(ct / "model.safetensors").items() if n.endswith("zero_point")]
    assert zps and any(bool(t.any()) for t in zps)
    check_map_exact(ct, family, tmp_path / "a", described)


def test_mixed_schemes_fp8_layers_and_int4_experts(tmp_path: Path) -> None:
    """Two config groups, as Kimi's checkpoints: the dense layers (attention, the shared
    expert) in float8 with channel scales and the routed experts in packed int4 with group
    scales; each weight reads in its own scheme (told apart by its scales' shape and its
    packing), every neuron exact against transformers' own loading, and the atlas names both."""
    model = make_model(tmp_path / "m", "qwen2_moe", n_layers=2, d_model=32, d_mlp=48)
    ct = ct_copy(model, tmp_path / "ct", experts=("int4", "group", 16))
    check_map_exact(
        ct, "qwen2_moe", tmp_path / "a", "int4, one scale per 16 columns of a row; " + CHANNEL
    )


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_reader_rounds_products_to_the_scales_dtype(
    tmp_path: Path, scale_dtype: torch.dtype
) -> None:
    """Checkpoint.get (whole, a range of rows) and gather (rows, columns) of an int8 weight
    with one scale per group of 8 columns equal compressed-tensors' formula written here on
    its own, q.to(s.dtype) * s in the scale's dtype, and are held in that dtype (exact, in half
    of fp32's memory for bf16 and fp16 scales); with bf16 scales that differs from the fp32
    product (so the rounding is really done)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (24, 40), generator=gen, dtype=torch.int8)
    s = (torch.rand(24, 5, generator=gen) * 1e-2 + 1e-3).to(scale_dtype)
    save_file({"w": q, "w_scale": s}, str(tmp_path / "model.safetensors"))
    want = q.to(s.dtype) * s.repeat_interleave(8, dim=1)
    qc = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "config_groups": {
            "g": {"weights": {"num_bits": 8, "type": "int", "strategy": "group", "group_size": 8}}
        },
    }
    with Checkpoint(tmp_path, scheme({"quantization_config": qc})) as ck:
        assert ck.dtype("w") == scale_dtype and ck.quantized("w")
        assert torch.equal(ck.get("w"), want)
        assert torch.equal(ck.get("w", rows=(5, 19)), want[5:19])
        index = torch.tensor([23, 0, 9, 8])
        assert torch.equal(ck.gather("w", index), want[index])
        assert torch.equal(ck.gather("w", index, dim=1), want[:, index])
    exact = q.float() * s.float().repeat_interleave(8, dim=1)
    assert torch.equal(want.float(), exact) == (scale_dtype == torch.float32)


@pytest.mark.parametrize(("bits", "zeros"), [(4, False), (8, False), (4, True), (8, True)])
def test_the_reader_unpacks_words_rows_and_columns(tmp_path: Path, bits: int, zeros: bool) -> None:
    """A pack-quantized weight (int4 or int8 values in int32 words, packed by compressed-
    tensors' own pack_to_int32, 37 columns so the last word is padded) reads as the library's
    own unpack_from_int32, less its zero points (packed along the rows, where it has them),
    times its group scales: whole, a range of rows, gathered rows (from their words alone) and
    columns; its shape is the stored X_shape."""
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    q = torch.randint(lo, hi, (24, 37), generator=gen, dtype=torch.int8)
    s = (torch.rand(24, 5, generator=gen) * 1e-2 + 1e-3).bfloat16()  # groups of 8 columns
    zp = torch.randint(lo, hi, (24, 5), generator=gen, dtype=torch.int8) if zeros else None
    words = pack_to_int32(q, bits)
    assert torch.equal(unpack_from_int32(words, bits, q.shape), q)
    tensors = {"w_packed": words, "w_shape": torch.tensor([24, 37]), "w_scale": s}
    if zp is not None:
        tensors["w_zero_point"] = pack_to_int32(zp, bits, packed_dim=0)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    grid = lambda t: t.repeat_interleave(8, dim=1)[:, :37]  # noqa: E731
    centred = q.to(s.dtype) if zp is None else q.to(s.dtype) - grid(zp).to(s.dtype)
    want = centred * grid(s)  # (bf16, held so)
    weights = {"num_bits": bits, "type": "int", "strategy": "group", "group_size": 8}
    weights["symmetric"] = not zeros
    qc = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {"g": {"weights": weights}},
    }
    with Checkpoint(tmp_path, scheme({"quantization_config": qc})) as ck:
        assert "w" in ck and ck.shape("w") == (24, 37) and ck.dtype("w") == torch.bfloat16
        assert torch.equal(ck.get("w"), want)
        assert torch.equal(ck.get("w", rows=(5, 19)), want[5:19])
        index = torch.tensor([23, 0, 9, 8])
        assert torch.equal(ck.gather("w", index), want[index])
        assert torch.equal(ck.gather("w", index, dim=1), want[:, index])


@pytest.mark.parametrize("kind", ["int", "int4"])
def test_a_compressed_tensors_model_runs_the_weights_map_decoded_and_clamps_exactly(
    tmp_path: Path, kind: str
) -> None:
    """flashlens loads a compressed-tensors (W8A8 int8, W4A16 packed int4) checkpoint
    dequantized: its MLP weights are the ones `map` decoded, a clamp to a neuron's natural
    value leaves the logits as they were and a moved one does not."""
    model = make_model(tmp_path / "m", "llama", n_layers=2, d_model=32, d_mlp=48)
    ct = ct_copy(model, tmp_path / "ct", kind, "channel")
    check_runs_as_mapped(ct, [Neuron(1, 5, "up")], moved_above=1e-3)
    with ModelSource.open(ct) as source:
        assert source.dtype == torch.bfloat16  # (bf16 scales: the products held exactly)
        label = {"int": "int8", "int4": "int4"}[kind]
        assert source.quantization == f"{label}, one scale per output channel"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("nvfp4", "compressed-tensors weights (float 4-bit, format 'nvfp4-pack-quantized')"),
        ("actorder", "with actorder 'group' (groups in activation order"),
        ("asymmetric", "asymmetric compressed-tensors weights (float 8-bit"),
        ("tensor_group", "with strategy 'tensor_group'"),
        ("sparse", "has a sparsity_config"),
        ("no scales", "up_proj.weight is stored in float8_e4m3fn, but the checkpoint"),
        ("other grid", "(fp8 e4m3, one scale per output channel) needs [48, 1]"),
        ("no shape", "up_proj.weight_packed has no model.layers.1.mlp.up_proj.weight_shape"),
        ("other words", "up_proj.weight_packed [48, 3] does not hold a weight of shape [48, 32]"),
        ("g_idx", "up_proj.weight_g_idx: groups in activation order (a g_idx) are not read"),
        ("zero points", "does not give one integer zero point per scale of model.layers.1"),
        ("damaged", "quantization_config (compressed-tensors) quantises no weights"),
    ],
)
def test_compressed_tensors_checkpoints_not_read_are_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    """FP4 weights, groups in activation order, zero points of float weights, a strategy not
    read, sparse formats, a missing or mis-shaped scale tensor, a packed weight without its
    shape or whose words do not hold it, a g_idx tensor, zero points that do not match the
    scales, a damaged config_groups: exit 2, one line saying what is wrong and what to
    do, no traceback, and no atlas left behind."""
    model = make_model(tmp_path / "m", "llama", n_layers=2, d_model=32, d_mlp=48)
    packed = case in ("no shape", "other words", "g_idx")
    kind = "int4" if packed else "int" if case == "zero points" else "float"
    ct = ct_copy(model, tmp_path / "ct", kind, "channel", symmetric=case != "zero points")
    config = json.loads((ct / "config.json").read_text())
    qc = config["quantization_config"]
    w = qc["config_groups"]["group_0"]["weights"]
    name = "model.layers.1.mlp.up_proj.weight_scale"
    X = "model.layers.1.mlp.up_proj.weight"
    if case == "no shape":
        edit_weights(ct, lambda t: t.pop(X + "_shape"))
    elif case == "other words":
        edit_weights(ct, lambda t: t.update({X + "_packed": t[X + "_packed"][:, :3].clone()}))
    elif case == "g_idx":
        edit_weights(ct, lambda t: t.update({X + "_g_idx": torch.arange(32) // 16}))
    elif case == "zero points":
        zp = X + "_zero_point"
        edit_weights(ct, lambda t: t.update({zp: t[zp][:-1].contiguous()}))
    elif case == "no scales":
        edit_weights(ct, lambda t: t.pop(name))
    elif case == "other grid":
        edit_weights(ct, lambda t: t.update({name: t[name][:-1].contiguous()}))
    else:
        if case == "nvfp4":
            qc["config_groups"]["group_0"]["format"] = "nvfp4-pack-quantized"
            w["num_bits"] = 4
        elif case == "actorder":
            w["actorder"] = "group"
        elif case == "asymmetric":
            w["symmetric"] = False
        elif case == "tensor_group":
            w["strategy"] = "tensor_group"
        elif case == "damaged":
            qc["config_groups"] = "group_0"
        else:
            qc["sparsity_config"] = {"format": "sparse-24-bitmask"}
        (ct / "config.json").write_text(json.dumps(config))
    check_map_refused(ct, tmp_path / "a", capsys, message)


@pytest.mark.parametrize(
    ("family", "kind", "strategy", "size", "message"),
    [
        ("qwen3_moe", "int", "channel", None, "routed expert stored in int8 with 1 x"),
        ("deepseek_v3", "float", "block", (16, 16), "stored in float8_e4m3fn with 16 x 16 scale"),
        ("qwen3_moe", "int4", "group", 16, "int4 (packed) with 1 x 16 scale blocks and zero"),
    ],
)
def test_experts_transformers_cannot_load_are_refused(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    family: str,
    kind: str,
    strategy: str,
    size: Any,
    message: str,
) -> None:
    """Routed experts in int8 (unpacked), in float8 with block scales, or packed with zero
    points, which transformers (5.25) fails to load dequantized (so no model would run the
    weights a map decoded): refused in one line before any work, naming the tensor (float8
    experts with channel or tensor scales, and packed ones without zero points, map: above)."""
    model = make_model(tmp_path / "m", family, n_layers=2, d_model=32, d_mlp=48)
    symmetric = kind != "int4"  # (the packed experts: with zero points)
    ct = ct_copy(model, tmp_path / "ct", kind, strategy, size, symmetric=symmetric)
    assert ".experts." in check_map_refused(ct, tmp_path / "a", capsys, message)


def test_a_model_compares_with_its_w4a16_release(tmp_path: Path) -> None:
    """`compare` takes a model and its W4A16 copy: each neuron's figures equal brute force
    over the two models' own distributions (transformers' dequantized one for the copy), and
    int4's rounding shows as a nonzero divergence."""
    from .test_compare import check_compare_exact

    model = make_model(tmp_path / "m", "llama", n_layers=2, d_model=32, d_mlp=48)
    w4 = ct_copy(model, tmp_path / "w4", "int4", "group", 16)
    assert check_compare_exact(model, w4, tmp_path / "cmp") > 1e-4


def test_the_map_command_says_how_the_weights_were_stored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`flashlens map` of a W4A16 checkpoint says, in its summary and in --json, which
    quantisation it read; of an unquantised one, nothing (null)."""
    model = make_model(tmp_path / "m", "llama", n_layers=2, d_model=32, d_mlp=48)
    w4 = ct_copy(model, tmp_path / "w4", "int4", "group", 16)
    described = "int4, one scale per 16 columns of a row"
    assert main(["map", str(w4), "-o", str(tmp_path / "a"), "--dtype", "float32"]) == 0
    assert f"weights read dequantized from {described}" in capsys.readouterr().err
    for folder, want in ((w4, described), (model, None)):
        out = tmp_path / f"json-{folder.name}"
        assert main(["map", str(folder), "-o", str(out), "--dtype", "float32", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["quantization"] == want
