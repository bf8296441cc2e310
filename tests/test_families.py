"""Families beyond the Llama layout, end to end as a user runs them: LayerNorm (with and
without bias), a scale on the logits, ungated MLPs; config keys left out read as transformers
reads them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from flashlens import Atlas, map_model
from flashlens.cli import main

from .helpers import (
    _layers,
    load_reference_model,
    make_model,
    neuron_weights,
    reference_logits,
    rewrite_weights,
)
from .test_map_reference import check_exact


def test_an_ungated_layernorm_model_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """GPT-NeoX (Pythia): `map` takes its two matrices by default, refuses gate in one line,
    and `prob` gives the logit the model's own forward gives."""
    model = make_model(tmp_path / "m", "gpt_neox", n_layers=2, d_mlp=24)
    assert main(["map", str(model), "-o", str(tmp_path / "a"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["neurons_mapped"] == 2 * 2 * 24
    atlas = Atlas.open(tmp_path / "a")
    assert atlas.meta.matrices == ["up", "down"] and atlas.meta.family == "gpt_neox"
    assert atlas.meta.decoding is not None and atlas.meta.decoding["norm_kind"] == "layer"

    assert main(["map", str(model), "-o", str(tmp_path / "b"), "--matrices", "up,gate"]) == 2
    err = capsys.readouterr().err
    assert "no gate matrix" in err and "ungated" in err and "Traceback" not in err
    assert not (tmp_path / "b" / "atlas.json").exists()

    prob = ["prob", str(tmp_path / "a"), "down:1:5", " the", "--model", str(model)]
    assert main(prob) == 0 and "the" in capsys.readouterr().out
    assert main([*prob, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = reference_logits(model, "down", 1)[5, got["token_id"]]
    assert got["logit"] == pytest.approx(float(want), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize(
    ("family", "key", "default"),
    [("cohere", "logit_scale", 0.0625), ("granite", "logits_scaling", 1.0)],
)
def test_a_logit_scale_left_out_of_config_is_transformers_default(
    tmp_path: Path, family: str, key: str, default: float
) -> None:
    """Cohere multiplies its logits by logit_scale (0.0625 when config.json omits it), Granite
    divides them by logits_scaling (1): the reference loads the same config.json."""
    model = make_model(tmp_path / "m", family, n_layers=1)
    config = json.loads((model / "config.json").read_text())
    assert config[key] != default  # (the tiny models set another value)
    del config[key]
    (model / "config.json").write_text(json.dumps(config))
    map_model(model, tmp_path / "a", matrices="up", compile="off")
    atlas = Atlas.open(tmp_path / "a")
    check_exact(atlas, model, "up", 0, "model")
    assert atlas.meta.decoding is not None
    assert atlas.meta.decoding.get("logit_scale", 1.0) == default


def test_a_zero_logit_scale_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_model(tmp_path / "m", "granite", n_layers=1)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "logits_scaling": 0}))
    assert main(["map", str(model), "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "logits_scaling=0" in err and "Traceback" not in err


def test_llama_atlases_record_decoding_as_before(tmp_path: Path) -> None:
    """The norm's kind and the logits' scale are recorded only where they apply, so an atlas
    of an RMSNorm model without a scale resumes and compares as it did before."""
    model = make_model(tmp_path / "m", n_layers=1)
    map_model(model, tmp_path / "a", matrices="up", compile="off")
    decoding = Atlas.open(tmp_path / "a").meta.decoding
    assert decoding is not None and set(decoding) == {"norm_eps", "logit_softcap", "tied"}


def test_a_weightless_layernorm_decodes_with_a_unit_gain(tmp_path: Path) -> None:
    """OLMo's final LayerNorm has neither weight nor bias (eps fixed at 1e-5): a neuron's
    decoded vector is its centred, unit-variance self."""
    model = make_model(tmp_path / "m", "olmo", n_layers=1, d_mlp=16)
    map_model(model, tmp_path / "a", matrices="up", compile="off", top_k=3)
    from .helpers import load_reference_model

    w = neuron_weights(load_reference_model(model), "up", 0).double()  # (16, d_model)
    x = (w - w.mean(1, keepdim=True)) / torch.sqrt(w.var(1, unbiased=False, keepdim=True) + 1e-5)
    W_U = load_reference_model(model).lm_head.weight.double()
    want = (x @ W_U.T).topk(3, dim=1).values
    got = torch.tensor(
        Atlas.open(tmp_path / "a").layer_table("up", 0).to_pydict()["top_logits"]
    ).double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_weights_and_sites(tmp_path: Path) -> None:
    """GPT-2 stores its MLP weights transposed (Conv1D): its neurons decode as the model's,
    and clamps see d_mlp units per site (48 here, against a d_model of 32)."""
    from flashlens.errors import NeuronError
    from flashlens.intervene import Neuron, clamp
    from flashlens.intervene.hooks import resolve_site

    from .helpers import load_reference_model

    model = make_model(tmp_path / "m", "gpt2", n_layers=2, d_model=32, d_mlp=48, tie=True)
    map_model(model, tmp_path / "a", compile="off")
    a = Atlas.open(tmp_path / "a")
    assert a.meta.matrices == ["up", "down"] and a.meta.d_mlp == 48
    for matrix in ("up", "down"):
        check_exact(a, model, matrix, 1, "model")

    lm = load_reference_model(model)
    for matrix in ("up", "down"):
        neuron = Neuron(1, 40, matrix)  # type: ignore[arg-type]
        w = resolve_site(lm, neuron).weight_vector(neuron)
        assert torch.equal(w.float(), neuron_weights(lm, matrix, 1)[40])
        with pytest.raises(NeuronError, match="0-47"), clamp(lm, Neuron(1, 48, matrix), 1.0):  # type: ignore[arg-type]
            pass


@pytest.mark.parametrize("family", ["phi", "gptj", "cohere", "gpt2", "phi3"])
def test_prob_gives_the_model_s_own_logit(
    tmp_path: Path, family: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`prob` decodes one neuron exactly against the checkpoint: the head's bias (Phi, GPT-J),
    the logits' scale (Cohere), Conv1D weights (GPT-2), a fused gate_up (Phi-3) included."""
    model = make_model(tmp_path / "m", family, n_layers=2, d_mlp=24)
    map_model(model, tmp_path / "a", matrices="up", compile="off")
    assert (
        main(["prob", str(tmp_path / "a"), "up:1:5", " the", "--model", str(model), "--json"]) == 0
    )
    got = json.loads(capsys.readouterr().out)
    L = reference_logits(model, "up", 1)[5]
    assert got["logit"] == pytest.approx(float(L[got["token_id"]]), rel=1e-5, abs=1e-5)
    assert got["logsumexp"] == pytest.approx(float(torch.logsumexp(L.double(), 0)), rel=1e-5)


def test_a_mixture_of_experts_maps_every_expert_and_says_which(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Mixtral: a layer's neurons are its 4 experts' 24 units each, in order; single neurons
    are read from their own expert; `show` names the expert (clamps: tests/test_experts.py)."""
    from flashlens.weights import ModelSource

    model = make_model(tmp_path / "m", "mixtral", n_layers=2, d_mlp=24)
    source = ModelSource.open(model)
    assert (source.n_experts, source.d_expert, source.d_mlp) == (4, 24, 96)
    index = torch.tensor([70, 5, 95, 30, 71])  # experts 2, 0, 3, 1, 2 (unsorted)
    for matrix in ("up", "gate", "down"):
        W = source.neurons(matrix, 1)  # type: ignore[arg-type]
        assert torch.equal(source.neuron_rows(matrix, 1, index), W[index])  # type: ignore[arg-type]
    source.close()
    assert main(["map", str(model), "-o", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main(["show", str(tmp_path / "a"), "down:1:70", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["expert"], shown["unit"]) == (2, 22)
    assert main(["show", str(tmp_path / "a"), "down:1:70"]) == 0
    assert "(expert 2, unit 22)" in capsys.readouterr().out
    argv = ["prob", str(tmp_path / "a"), "down:1:70", " the", "--model", str(model), "--json"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    want = reference_logits(model, "down", 1)[70, got["token_id"]]
    assert got["logit"] == pytest.approx(float(want), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize(
    ("family", "config", "dense"),
    [
        ("qwen3_moe", {"mlp_only_layers": [0, 2]}, [0, 2]),
        ("qwen2_moe", {"decoder_sparse_step": 2}, [0, 2]),  # every 2nd layer sparse: 1
        ("glm4_moe_lite", {"mlp_layer_types": ["dense", "sparse", "dense"]}, [0, 2]),
        # (its experts stored transposed, its dense layers not)
        ("qwen3_vl_moe", {"mlp_only_layers": [0, 2]}, [0, 2]),
    ],
)
def test_qwen_mixtures_map_their_dense_layers_at_their_width(
    tmp_path: Path, family: str, config: dict[str, Any], dense: list[int]
) -> None:
    """Qwen-MoE layers listed in mlp_only_layers, or off decoder_sparse_step, and GLM-4.7-Flash
    layers that mlp_layer_types calls dense, are dense MLPs of intermediate_size (twice an
    expert's in the tiny GLM): decoded as the model's own modules compute, clamped on their
    own."""
    from flashlens.intervene import clamp, record
    from flashlens.intervene.loading import load_tokenizer
    from flashlens.intervene.prompts import encode

    model = make_model(tmp_path / "m", family, n_layers=3, d_mlp=16, **config)
    map_model(model, tmp_path / "a", dtype="float32")
    atlas = Atlas.open(tmp_path / "a")
    shared = family not in ("qwen3_moe", "qwen3_vl_moe")
    sparse = 4 * 16 + (16 if shared else 0)  # (and a shared expert)
    wide = 32 if family == "glm4_moe_lite" else 16
    assert atlas.meta.widths == [wide if layer in dense else sparse for layer in range(3)]
    assert (atlas.meta.decoding or {})["dense_layers"] == dense
    assert atlas.expert_of(0, 5) is None and atlas.expert_of(1, 5) == (0, 5)
    for layer in range(3):
        for matrix in ("up", "gate", "down"):
            check_exact(atlas, model, matrix, layer, "model")
    reference = load_reference_model(model)
    batch = encode(load_tokenizer(model), ["Once upon a time"], torch.device("cpu"))
    base = reference(**batch).logits
    # a dense layer's neurons are its own modules' units, at up and at act (down_proj's input)
    mlp = _layers(reference)[dense[0]].mlp
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        mlp.up_proj.register_forward_hook(lambda m, a, out: outputs.update(up=out)),
        mlp.down_proj.register_forward_hook(lambda m, a, out: outputs.update(act=a[0])),
    ]
    with torch.no_grad(), record(reference, [f"up:{dense[0]}:9", f"down:{dense[0]}:9"]) as seen:
        reference(**batch)
    for handle in handles:
        handle.remove()
    up, act = (seen[n][0] for n in sorted(seen, key=lambda n: n.matrix != "up"))
    assert torch.equal(up, outputs["up"][..., 9]) and torch.equal(act, outputs["act"][..., 9])
    neuron = f"down:{dense[0]}:9"
    natural = float(act[0, -1])
    with torch.no_grad(), clamp(reference, neuron, natural, positions="last"):
        assert torch.equal(reference(**batch).logits, base)
    with torch.no_grad(), clamp(reference, neuron, natural + 5, positions="last"):
        assert (reference(**batch).logits - base).abs().max() > 1e-4


def test_phi_3_5_moe_reads_its_head_bias_where_lm_head_bias_says(tmp_path: Path) -> None:
    """Phi-3.5-MoE's head has a bias only where config.json's lm_head_bias says so: without
    one, nothing is read or added, and the map still equals the model's own forward."""
    model = make_model(tmp_path / "m", "phimoe", n_layers=2, d_mlp=16, lm_head_bias=False)
    map_model(model, tmp_path / "a", matrices="up", compile="off")
    atlas = Atlas.open(tmp_path / "a")
    assert "logit_bias" not in (atlas.meta.decoding or {})
    check_exact(atlas, model, "up", 1, "model")
    biased = make_model(tmp_path / "b", "phimoe", n_layers=2, d_mlp=16)
    map_model(biased, tmp_path / "ab", matrices="up", compile="off")
    assert (Atlas.open(tmp_path / "ab").meta.decoding or {})["logit_bias"] is True


def test_glm_4_7_flash_without_layer_kinds_has_a_dense_first_layer(tmp_path: Path) -> None:
    """Where config.json leaves out mlp_layer_types, transformers makes the first layer dense
    and the others sparse: so does map."""
    from flashlens.weights import ModelSource

    model = make_model(tmp_path / "m", "glm4_moe_lite", n_layers=3, d_mlp=16)
    config = json.loads((model / "config.json").read_text())
    assert config.pop("mlp_layer_types") == ["dense", "sparse", "sparse"]
    (model / "config.json").write_text(json.dumps(config))
    source = ModelSource.open(model)
    assert source.dense_layers == [0] and source.widths == [32, 80, 80]


def test_gpt_oss_experts_are_read_from_its_stacked_tensors_and_awq_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """gpt-oss holds a layer's experts in two 3D tensors, transposed, gate's and up's units
    alternating: single neurons read alone are the layer's rows; a wrong expert count is a
    clear error; a quantisation flashlens does not read (AWQ) is refused with what to map (its
    MXFP4 release: tests/test_mxfp4.py)."""
    from flashlens.weights import ModelSource

    model = make_model(tmp_path / "m", "gpt_oss", n_layers=1, d_mlp=24)
    source = ModelSource.open(model)
    assert (source.n_experts, source.d_expert, source.family.experts_stacked) == (4, 24, True)
    index = torch.tensor([70, 5, 95, 30, 71])
    for matrix in ("up", "gate", "down"):
        W = source.neurons(matrix, 0)  # type: ignore[arg-type]
        assert torch.equal(source.neuron_rows(matrix, 0, index), W[index])  # type: ignore[arg-type]
    source.close()
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_local_experts": 5}))
    assert main(["map", str(model), "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "experts.gate_up_proj has shape (4, 32, 48), config implies (5, 32, 48)" in err
    awq = {**config, "quantization_config": {"quant_method": "awq"}}
    (model / "config.json").write_text(json.dumps(awq))
    assert main(["map", str(model), "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "quantization_config" in err and "bf16" in err and "Traceback" not in err


def test_a_mixture_with_dense_first_layers_maps_each_layer_at_its_width(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """DeepSeek-V3: layer 0 a dense MLP of 48 neurons, layers 1-2 four experts of 24 units
    and a shared expert of 24 (120 neurons). The atlas records each layer's width; addresses,
    neighbours, `show` and `compare` follow it; bad settings are refused in one line."""
    from flashlens.serve.pages import overview_page
    from flashlens.serve.views import neuron as neuron_view
    from flashlens.serve.views import overview
    from flashlens.weights import ModelSource

    model = make_model(tmp_path / "m", "deepseek_v3", n_layers=3, d_mlp=24)
    source = ModelSource.open(model)
    for layer, index in ((0, [47, 3, 20]), (1, [119, 5, 96, 70, 100])):  # dense; shared too
        for matrix in ("up", "gate", "down"):
            W = source.neurons(matrix, layer)  # type: ignore[arg-type]
            rows = source.neuron_rows(matrix, layer, torch.tensor(index))  # type: ignore[arg-type]
            assert torch.equal(rows, W[index])
    source.close()
    assert main(["map", str(model), "-o", str(tmp_path / "a"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["neurons_mapped"] == 3 * (48 + 120 + 120)
    atlas = Atlas.open(tmp_path / "a")
    assert (atlas.meta.widths, atlas.meta.d_mlp) == ([48, 120, 120], 120)
    assert len(atlas.layer_table("gate", 0)) == 48 and len(atlas.layer_table("gate", 2)) == 120
    assert main(["show", str(tmp_path / "a"), "down:0:47", "--json"]) == 0
    assert "expert" not in json.loads(capsys.readouterr().out)  # a dense layer's neuron
    assert main(["show", str(tmp_path / "a"), "down:0:48"]) == 2
    assert "layer 0 has 48 neurons (0-47)" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "a"), "down:1:100", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["expert"], shown["unit"]) == ("shared", 4)
    links = neuron_view(atlas, "up", "1", "0")["links"]
    assert links["prev"] == "/neuron/up/0/47"  # the dense layer's last neuron
    assert neuron_view(atlas, "up", "0", "47")["links"]["next"] == "/neuron/up/1/0"
    page = overview_page(overview(atlas))
    assert "48 in layers 0; 120 in layers 1-2" in page and "864 neurons decoded" in page
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "a"), "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["overall"]["neurons"] == 3 * (48 + 120 + 120)
    assert same["overall"]["same_top1"] == 1.0
    config = json.loads((model / "config.json").read_text())
    for key, value, said in (
        ("first_k_dense_replace", 4, "first_k_dense_replace=4, outside 0-3"),
        ("moe_layer_freq", 2, "moe_layer_freq=2"),
    ):
        (model / "config.json").write_text(json.dumps({**config, key: value}))
        assert main(["map", str(model), "-o", str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err


def test_every_registered_family_is_checked_against_its_own_model() -> None:
    """The per-family tests (test_map_reference, test_intervene) run over FAMILIES: a new
    registry entry without a tiny transformers model there would land unchecked."""
    from flashlens.families import families, supported_architectures

    from .helpers import FAMILIES, _classes

    assert {f.name for f in families()} == set(FAMILIES)
    assert {a for f in families() for a in f.architectures} == set(supported_architectures())
    for family in FAMILIES:  # each built from its own transformers classes
        assert _classes(family)[1].__name__ in supported_architectures()


def test_the_readme_names_every_supported_architecture() -> None:
    """The README's table of architectures and its count say what the registry holds."""
    import re

    from flashlens.families import supported_architectures

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    count = re.search(r"\*\*Supported architectures\*\* \((\d+)\)", readme)
    assert count is not None and int(count.group(1)) == len(supported_architectures())
    missing = [a for a in supported_architectures() if f"`{a}`" not in readme]
    assert not missing, f"README does not name {missing}"


@pytest.mark.parametrize(
    ("family", "prefix"), [("gpt2", "transformer."), ("bloom", "transformer."), ("opt", "model.")]
)
def test_hub_files_without_the_model_prefix_map_the_same(
    tmp_path: Path, family: str, prefix: str
) -> None:
    """GPT-2's, BLOOM's and OPT's hub files name their tensors without the prefix
    transformers' classes put on them ("h.0...", "decoder.layers.0..."): either spelling maps
    to the same atlas."""
    model = make_model(tmp_path / "m", family, n_layers=2, d_mlp=24, tie=True)

    def strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert all(k.startswith(prefix) for k in state)
        return {k.removeprefix(prefix): v for k, v in state.items()}

    bare = rewrite_weights(model, tmp_path / "bare", strip)
    for folder, out in ((model, "a"), (bare, "b")):
        map_model(folder, tmp_path / out, compile="off")
    a, b = Atlas.open(tmp_path / "a"), Atlas.open(tmp_path / "b")
    assert a.meta.matrices == ["up", "down"]
    for matrix in a.meta.matrices:
        check_exact(a, model, matrix, 1, "model")
        assert a.layer_table(matrix, 1).equals(b.layer_table(matrix, 1))


@pytest.mark.parametrize(
    ("family", "omitted"),
    [
        ("deepseek_v3", {"first_k_dense_replace": None}),  # (3 dense when omitted)
        ("glm4_moe", {"first_k_dense_replace": None}),  # (1)
        ("deepseek_v2", {"first_k_dense_replace": None}),  # (0)
        ("ernie4_5_moe", {"moe_layer_start_index": None, "moe_layer_end_index": None}),
        ("ernie4_5_moe", {"moe_layer_end_index": 2, "moe_layer_interval": 2}),
        ("glm4_moe_lite", {"mlp_layer_types": None}),
        ("qwen2_moe", {"decoder_sparse_step": 2}),
        ("qwen3_moe", {"mlp_only_layers": [1, 3]}),
        ("qwen3_next", {"decoder_sparse_step": 2}),
    ],
)
def test_which_layers_are_sparse_follows_transformers(
    tmp_path: Path, family: str, omitted: dict[str, Any]
) -> None:
    """Which layers of a mixture are dense, where config.json leaves the settings out (their
    defaults) or sets them: as the model transformers builds from that config.json."""
    import transformers

    from flashlens.families import family_for

    from .helpers import _classes

    model = make_model(tmp_path / "m", family, n_layers=5, d_mlp=16)
    config = json.loads((model / "config.json").read_text())
    for key, value in omitted.items():
        config.pop(key, None)
        if value is not None:
            config[key] = value
    built = _classes(family)[1](transformers.AutoConfig.for_model(**config))
    sparse = [hasattr(layer.mlp, "experts") for layer in built.model.layers]
    assert [not family_for(config).is_dense(config, i) for i in range(5)] == sparse


def test_granite_4_picks_its_mixture_entry_as_transformers_builds_it(tmp_path: Path) -> None:
    """Granite 4.0's config.json says whether its layers have experts (num_local_experts; 8
    where omitted, as transformers reads it): a dense model maps its shared MLP alone, a
    mixture its experts and then the shared MLP."""
    from flashlens.families import family_for

    dense = make_model(tmp_path / "d", "granitemoehybrid", n_layers=2, d_mlp=16)
    config = json.loads((dense / "config.json").read_text())
    assert family_for(config).name == "granitemoehybrid"
    del config["num_local_experts"]
    assert family_for(config).name == "granitemoehybrid_moe"
    moe = make_model(tmp_path / "m", "granitemoehybrid_moe", n_layers=2, d_mlp=16)
    map_model(moe, tmp_path / "a", compile="off")
    atlas = Atlas.open(tmp_path / "a")
    assert atlas.meta.d_mlp == 4 * 16 + 16 and atlas.expert_of(1, 64) == ("shared", 0)
