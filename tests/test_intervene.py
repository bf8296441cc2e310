"""clamp/record hooks against weight surgery and plain runs; dose-response; stories260K."""

from __future__ import annotations

import copy
from itertools import pairwise
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from torch import nn

from flashlens import Atlas
from flashlens.errors import FlashlensError, NeuronError
from flashlens.families import Matrix
from flashlens.intervene import Neuron, activation_ranges, clamp, dose_response, record
from flashlens.intervene.dose import concept_prob
from flashlens.intervene.loading import load_tokenizer
from flashlens.intervene.prompts import DEFAULT_PROMPTS, encode, read_prompts

from .helpers import (
    DENSE_FIRST,
    FAMILIES,
    MOE,
    N_EXPERTS,
    _layers,
    load_reference_model,
    make_model,
    matrices_of,
    neuron_weights,
)

PROMPTS = ["My favourite animal is", "Once upon a time, there was a little", "She"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, object]:
    path = make_model(tmp_path_factory.mktemp("tiny") / "m", n_layers=3, d_mlp=48)
    return load_reference_model(path), load_tokenizer(path)


def _batch(tok: object, prompts: list[str] = PROMPTS) -> dict[str, torch.Tensor]:
    return encode(tok, prompts, torch.device("cpu"))


@torch.no_grad()
def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch, use_cache=False).logits


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --- Neuron ----------------------------------------------------------------------------------
def test_neuron_parse() -> None:
    assert Neuron.parse("up:12:1234") == Neuron(12, 1234, "up")
    assert Neuron.parse("12:1234", matrix="down") == Neuron(12, 1234, "down")
    assert Neuron.parse_list("12:1234, gate:3:7") == [Neuron(12, 1234), Neuron(3, 7, "gate")]
    assert str(Neuron(3, 7, "gate")) == "gate:3:7"
    for bad in ("12", "x:1:2", "up:a:2", "1:2:3:4", "-1:3"):
        with pytest.raises(NeuronError):
            Neuron.parse(bad)
    # ASCII digits only, as layer specs and the viewer's addresses: one spelling per neuron
    for bad in ("+3:7", "3:+7", "1_0:7", "\u0663:7", "3:\uff17", "3:"):
        with pytest.raises(NeuronError, match="write LAYER:INDEX"):
            Neuron.parse(bad)
    assert Neuron.parse(" 3 : 7 ") == Neuron(3, 7)  # (spaces around the numbers are fine)
    with pytest.raises(NeuronError):
        Neuron(1, 2, "proj")  # type: ignore[arg-type]
    assert Neuron.parse("down:2:7", matrix="down") == Neuron(2, 7, "down")
    with pytest.raises(NeuronError, match="names matrix 'up' but the matrix given is 'down'"):
        Neuron.parse("up:2:7", matrix="down")  # refused, not silently read as up
    with pytest.raises(NeuronError, match="as a string"):
        Neuron.parse(12)  # type: ignore[arg-type]


# --- hooks vs the model itself -----------------------------------------------------------------
def test_clamp_to_natural_value_leaves_logits_unchanged(tiny: tuple[nn.Module, object]) -> None:
    model, tok = tiny
    batch = _batch(tok, ["Once upon a time, there was"])
    base = _logits(model, batch)
    neurons = [Neuron(0, 3, "up"), Neuron(1, 40, "gate"), Neuron(2, 7, "down"), Neuron(2, 9)]
    with torch.no_grad(), record(model, neurons) as seen:
        model(**batch, use_cache=False)
    natural = [float(seen[n][0][0, -1]) for n in neurons]  # last position, per neuron
    with clamp(model, neurons, value=natural, positions="last"):
        same = _logits(model, batch)
    torch.testing.assert_close(same, base, rtol=0, atol=1e-6)
    for mode, neutral in (("add", 0.0), ("scale", 1.0)):
        with clamp(model, neurons, value=neutral, mode=mode):  # type: ignore[arg-type]
            torch.testing.assert_close(_logits(model, batch), base, rtol=0, atol=1e-6)
    # and a real clamp does change them (the hooks are live)
    with clamp(model, neurons, value=[v + 5 for v in natural], positions="last"):
        assert (_logits(model, batch) - base).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_natural_clamp_is_a_no_op_and_a_real_one_is_not(
    tmp_path: Path, family: str
) -> None:
    """The hooks land on the modules of every family's layout: a clamp at each site to the
    value it records leaves the logits as they were; the same clamp moved by 5 changes them.
    (In a mixture of experts: the unit of an expert the last token is routed to.)"""
    path = make_model(tmp_path / "m", family, n_layers=2, d_mlp=24)
    model, tok = load_reference_model(path), load_tokenizer(path)
    batch = _batch(tok, ["Once upon a time"])
    base = _logits(model, batch)
    neurons = [Neuron(0, 3, "up"), Neuron(1, 5, "gate"), Neuron(1, 7, "down")]
    for first in [n for n in neurons if n.matrix in matrices_of(family)]:
        sparse = family in MOE and not (family in DENSE_FIRST and first.layer == 0)  # (dense)
        experts = N_EXPERTS if sparse else 1
        units = [Neuron(first.layer, e * 24 + first.index, first.matrix) for e in range(experts)]
        with torch.no_grad(), record(model, units) as seen:
            model(**batch, use_cache=False)
        neuron = next(n for n in units if not seen[n][0][0, -1].isnan())
        natural = float(seen[neuron][0][0, -1])
        with clamp(model, neuron, value=natural, positions="last"):
            torch.testing.assert_close(_logits(model, batch), base, rtol=0, atol=1e-6)
        with clamp(model, neuron, value=natural + 5, positions="last"):
            assert (_logits(model, batch) - base).abs().max() > 1e-4, (family, neuron)


def test_exit_restores_model_even_on_error(tiny: tuple[nn.Module, object]) -> None:
    model, tok = tiny
    batch = _batch(tok)
    base = _logits(model, batch)
    assert _hooks(model) == 0
    with (
        pytest.raises(RuntimeError, match="boom"),
        clamp(model, ["up:1:5", "down:2:3"], value=50.0),
    ):
        assert _hooks(model) == 2
        raise RuntimeError("boom")
    assert _hooks(model) == 0
    assert torch.equal(_logits(model, batch), base)
    with clamp(model, [Neuron(0, 1), Neuron(0, 2), Neuron(1, 1, "gate")], value=9.0):
        assert _hooks(model) == 2  # one hook per hooked module, whatever the number of neurons
    assert _hooks(model) == 0 and torch.equal(_logits(model, batch), base)


def _surgery(
    model: nn.Module, layer: int, index: int, site: str, mode: str, value: float
) -> nn.Module:
    """The clamp written into the weights: a reference that uses no hooks."""
    ref = copy.deepcopy(model)
    mlp = cast(Any, ref).model.layers[layer].mlp
    with torch.no_grad():
        if site == "act":  # act_i -> v: drop column i of W_down, add v * W_down[:, i] as a bias
            col = mlp.down_proj.weight[:, index].clone()
            mlp.down_proj.weight[:, index] = 0
            mlp.down_proj.bias = nn.Parameter(value * col)
            return ref
        if hasattr(mlp, "gate_up_proj"):  # fused: gate's rows, then up's
            lin = mlp.gate_up_proj
            index += lin.out_features // 2 if site == "up" else 0
        else:
            lin = mlp.up_proj if site == "up" else mlp.gate_proj
        bias = torch.zeros(lin.out_features)
        if mode == "set":  # h_i = v: zero row i, bias v
            lin.weight[index] = 0
            bias[index] = value
        elif mode == "add":  # h_i + v: bias v
            bias[index] = value
        else:  # h_i * v: row i times v
            lin.weight[index] *= value
        lin.bias = nn.Parameter(bias)
    return ref


@pytest.mark.parametrize(
    ("site", "mode"),
    [("up", "set"), ("gate", "set"), ("act", "set"), ("up", "add"), ("gate", "scale")],
)
def test_clamp_equals_weight_surgery(tiny: tuple[nn.Module, object], site: str, mode: str) -> None:
    model, tok = tiny
    batch = _batch(tok)  # left-padded batch
    layer, index, value = 1, 17, 3.5
    matrix = {"up": "up", "gate": "gate", "act": "down"}[site]
    with clamp(model, Neuron(layer, index, matrix), value=value, mode=mode):  # type: ignore[arg-type]
        hooked = _logits(model, batch)
    ref = _logits(_surgery(model, layer, index, site, mode, value), batch)
    torch.testing.assert_close(hooked, ref, rtol=1e-5, atol=1e-5)
    assert (hooked - _logits(model, batch)).abs().max() > 1e-3


@pytest.mark.parametrize("site", ["up", "gate", "act"])
def test_fused_gate_up_clamp_equals_weight_surgery(tmp_path: Path, site: str) -> None:
    """Phi-3's gate_up_proj holds gate's units, then up's: a clamp of up:1:17 edits unit
    d_mlp + 17 of its output, as zeroing that row and adding the value as a bias does."""
    path = make_model(tmp_path / "m", "phi3", n_layers=2, d_mlp=24)
    model, tok = load_reference_model(path), load_tokenizer(path)
    batch = _batch(tok)
    matrix: Matrix = {"up": "up", "gate": "gate", "act": "down"}[site]  # type: ignore[assignment]
    with clamp(model, Neuron(1, 17, matrix), value=3.5):
        hooked = _logits(model, batch)
    ref = _logits(_surgery(model, 1, 17, site, "set", 3.5), batch)
    torch.testing.assert_close(hooked, ref, rtol=1e-5, atol=1e-5)
    assert (hooked - _logits(model, batch)).abs().max() > 1e-3
    with (
        pytest.raises(NeuronError, match="out of range"),  # 24 units each, not 48
        clamp(model, Neuron(1, 30, matrix), value=1.0),
    ):
        pass


def test_explicit_site_and_last_position(tiny: tuple[nn.Module, object]) -> None:
    model, tok = tiny
    batch = _batch(tok)
    base = _logits(model, batch)
    n = Neuron(1, 17, "up")
    with clamp(model, n, value=3.5, site="act"):  # an up neuron clamped at its activation
        hooked = _logits(model, batch)
    torch.testing.assert_close(
        hooked, _logits(_surgery(model, 1, 17, "act", "set", 3.5), batch), rtol=1e-5, atol=1e-5
    )
    with clamp(model, n, value=30.0, positions="last"):
        last = _logits(model, batch)
    assert torch.equal(last[:, :-1], base[:, :-1])  # causal: earlier positions untouched
    assert (last[:, -1] - base[:, -1]).abs().min() > 0


def test_neuron_errors(tiny: tuple[nn.Module, object]) -> None:
    model, _ = tiny
    cases = [
        (Neuron(3, 0), "layer 3 is out of range: the model has layers 0-2"),
        (Neuron(0, 48, "down"), "index 48 is out of range: layers have 48 neurons"),
    ]
    for neuron, message in cases:
        with pytest.raises(NeuronError, match=message), clamp(model, neuron, value=1.0):
            pass
    with pytest.raises(NeuronError, match="unknown site"), clamp(model, "1:1", 1.0, site="mlp"):  # type: ignore[arg-type]
        pass
    with pytest.raises(NeuronError, match="same activation"), clamp(model, ["1:1", "up:1:1"], 1):
        pass
    with (
        pytest.raises(FlashlensError, match="2 clamp values for 3 neurons"),
        clamp(model, ["1:1", "1:2", "1:3"], value=[1.0, 2.0]),
    ):
        pass
    with (
        pytest.raises(FlashlensError, match="unknown clamp mode"),
        clamp(model, "1:1", 1.0, mode="mul"),  # type: ignore[arg-type]  # deliberately invalid
    ):
        pass
    assert _hooks(model) == 0
    # a site this model does not have
    bare = copy.deepcopy(model)
    del cast(Any, bare).model.layers[0].mlp.gate_proj
    with (
        pytest.raises(NeuronError, match="site 'gate' does not exist"),
        clamp(bare, "gate:0:1", 1.0),
    ):
        pass


# --- batching and measurement ----------------------------------------------------------------
def test_padded_batch_matches_single_prompts(tiny: tuple[nn.Module, object]) -> None:
    model, tok = tiny
    neurons = [Neuron(0, 5), Neuron(2, 30, "down")]
    batch = _batch(tok)
    assert int(batch["attention_mask"].sum(-1).min()) < batch["input_ids"].shape[1]  # padded
    ranges = activation_ranges(model, batch, neurons)
    singles = [activation_ranges(model, _batch(tok, [p]), neurons) for p in PROMPTS]
    for n in neurons:
        assert ranges[n].min == pytest.approx(min(s[n].min for s in singles), abs=1e-5)
        assert ranges[n].max == pytest.approx(max(s[n].max for s in singles), abs=1e-5)
        assert ranges[n].absmax == pytest.approx(max(abs(ranges[n].min), ranges[n].max))
    ids = [5, 77]
    with clamp(model, neurons, value=4.0):
        p_batch = concept_prob(model, batch, ids)
        p_single = [concept_prob(model, _batch(tok, [p]), ids) for p in PROMPTS]
    assert p_batch == pytest.approx(sum(p_single) / len(p_single), rel=1e-5)


def test_a_flattened_mlp_clamps_the_last_position_of_each_prompt(tmp_path: Path) -> None:
    """OPT's MLP sees (batch * seq, d_mlp): a clamp at the last position of a padded batch
    acts on each prompt's last token, as on each prompt alone, and records are (batch, seq)."""
    path = make_model(tmp_path / "m", "opt", n_layers=2, d_mlp=24)
    model, tok = load_reference_model(path), load_tokenizer(path)
    batch = _batch(tok)
    b, s = batch["input_ids"].shape
    assert b == len(PROMPTS) and int(batch["attention_mask"].sum(-1).min()) < s  # padded
    for matrix in ("up", "down"):
        neuron = Neuron(1, 7, matrix)  # type: ignore[arg-type]
        with torch.no_grad(), record(model, neuron) as seen:
            model(**batch, use_cache=False)
        assert seen[neuron][0].shape == (b, s)
        with clamp(model, neuron, value=6.0, positions="last"):
            hooked = _logits(model, batch)[:, -1]
            single = [_logits(model, _batch(tok, [p]))[0, -1] for p in PROMPTS]
        torch.testing.assert_close(hooked, torch.stack(single), rtol=1e-4, atol=1e-4)
        assert (hooked - _logits(model, batch)[:, -1]).abs().amax(1).min() > 1e-3  # every row


def test_planted_neuron_raises_its_token_monotonically(tmp_path: Path) -> None:
    path = make_model(tmp_path / "m", n_layers=2, d_mlp=32)
    model = load_reference_model(path)
    tok = load_tokenizer(path)
    token, layer, index = 300, 1, 11
    with torch.no_grad():  # plant: neuron 11's output direction is the LM-head row of `token`
        W_U = model.lm_head.weight  # (d_vocab, d_model)
        W_down = model.model.layers[layer].mlp.down_proj.weight  # (d_model, d_mlp)
        W_down[:, index] = W_U[token] / W_U[token].norm()
    batch = _batch(tok)
    values = [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    dose = dose_response(model, batch, Neuron(layer, index, "down"), [token], values)
    assert all(b > a for a, b in pairwise(dose.probs)), dose.probs
    assert dose.probs[-1] > 0.5 > 10 * dose.baseline
    assert dose.best()[0] == 32.0


# --- stories260K: a real trained model -------------------------------------------------------
def _top_up_neuron(atlas: Path, piece: str) -> tuple[Neuron, list[int]]:
    found = Atlas.open(atlas).search(piece, matrix="up", limit=1)
    hit = found.hits[0]
    return Neuron(hit.layer, hit.index, "up"), [v.token_id for v in found.variants]


def test_stories_top_up_neuron_raises_its_piece(stories: Path, stories_atlas: Path) -> None:
    from flashlens.intervene.generate import steer

    model, tok = load_reference_model(stories), load_tokenizer(stories)
    neuron, ids = _top_up_neuron(stories_atlas, "s")
    dose = dose_response(model, encode(tok, DEFAULT_PROMPTS, torch.device("cpu")), neuron, ids)
    value, prob, ratio = dose.best()
    assert prob > dose.baseline and ratio > 2
    steering = steer(
        model,
        tok,
        ["Once upon a time", "One day", "The little girl"],
        [neuron],
        value,
        max_new_tokens=16,
        samples=4,
        concept="s",
        concept_ids=ids,
    )
    assert steering.clamped_concept_tokens > 2 * steering.baseline_concept_tokens  # type: ignore[operator]


def test_read_prompts_needs_utf8(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffOnce upon a time\n\nCafé\n".encode())  # a BOM (Notepad) is dropped
    assert read_prompts(path) == ["Once upon a time", "Café"]
    path.write_bytes("Once\nCafé\n".encode("latin-1"))
    with pytest.raises(FlashlensError) as info:
        read_prompts(path)
    assert str(info.value) == (
        f"cannot read prompts from {path}: it must be UTF-8 text (byte 8 is 0xe9); "
        "save it as UTF-8, one prompt per line"
    )


def test_a_non_finite_clamp_value_is_refused(tiny: tuple[nn.Module, object]) -> None:
    model, _ = tiny
    for value in (float("nan"), [1.0, float("inf")]):
        with pytest.raises(FlashlensError, match="finite"), clamp(model, ["1:1", "1:2"], value):
            pass
    assert _hooks(model) == 0


def test_a_bad_matrix_given_is_blamed_not_the_neuron(
    stories_atlas: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flashlens.cli import main

    with pytest.raises(NeuronError) as info:
        Neuron.parse("1:2", matrix="foo")
    assert str(info.value) == "unknown matrix 'foo': choose up, gate, down"
    with pytest.raises(NeuronError, match="bad neuron 'foo:1:2': matrix 'foo'"):
        Neuron.parse("foo:1:2")  # the neuron named it: the neuron is blamed
    assert main(["show", str(stories_atlas), "1:2", "--matrix", "foo"]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown matrix 'foo': choose up, gate, down\n"


def test_load_model_refuses_a_dtype_it_cannot_run_before_loading(tmp_path: Path) -> None:
    from flashlens.intervene import load_model

    with pytest.raises(FlashlensError) as info:  # the model folder is never looked at
        load_model(tmp_path / "no-model", dtype="int8")
    assert str(info.value) == (
        "--dtype 'int8' cannot run a model: choose auto, float32, bfloat16 or float16"
    )


def test_length_note_past_max_position_embeddings(tiny: tuple[nn.Module, object]) -> None:
    from flashlens.intervene.prompts import length_note

    model, tok = tiny
    batch = _batch(tok)
    longest = int(batch["attention_mask"].sum(-1).max())
    limit = cast(Any, model).config.max_position_embeddings
    assert length_note(model, batch) is None
    assert length_note(model, batch, new_tokens=limit - longest) is None
    note = length_note(model, batch, new_tokens=limit - longest + 1)
    assert note is not None and "\n" not in note
    assert f"{longest} tokens + {limit - longest + 1} new" in note and f"({limit})" in note


def test_loading_a_model_keeps_the_callers_progress_bar_setting(stories: Path) -> None:
    """flashlens hides transformers' loading bar while it loads, and leaves the setting as the
    caller had it (a Python session's own choice)."""
    from transformers.utils import logging as hf_logging

    from flashlens.intervene.loading import load_model

    for enabled in (True, False):
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
        load_model(stories, dtype="float32")
        assert hf_logging.is_progress_bar_enabled() is enabled
    hf_logging.enable_progress_bar()


# (the families with a dense layer: every layer of the other mixtures is sparse, and
# tests/test_experts.py checks their units against the experts' own tensors)
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in MOE or f in DENSE_FIRST])
def test_every_family_records_the_unit_its_address_names(tmp_path: Path, family: str) -> None:
    """An up or gate neuron's recorded value is that unit of the model's own projection: its
    input times the neuron's weight row as the model holds it (read independently of
    flashlens's families), plus the unit's bias; a down neuron's is that unit of its down
    projection's input. Checked in a dense layer (a mixture's first layer where it is
    dense)."""
    path = make_model(tmp_path / "m", family, n_layers=2, d_mlp=24)
    model, tok = load_reference_model(path), load_tokenizer(path)
    batch = _batch(tok, ["Once upon a time"])
    block = _layers(model)[0]
    mlp = getattr(block, "mlp", getattr(block, "shared_mlp", block))
    for matrix in [m for m in ("up", "gate") if m in matrices_of(family)]:
        fused = getattr(mlp, "gate_up_proj", getattr(mlp, "input_linear", None))
        names = {"up": ("up_proj", "c_fc", "dense_h_to_4h", "fc1", "fc_in"), "gate": ("gate_proj",)}
        module = fused or getattr(mlp, next(n for n in names[matrix] if hasattr(mlp, n)))
        seen_in: list[torch.Tensor] = []
        handle = module.register_forward_pre_hook(lambda m, a, out=seen_in: out.append(a[0]))
        neuron = Neuron(0, 7, matrix)
        try:
            with torch.no_grad(), record(model, neuron) as seen:
                model(**batch, use_cache=False)
        finally:
            handle.remove()
        row = neuron_weights(model, matrix, 0)[7]  # (d_model,)
        bias = getattr(module, "bias", None)
        at = 7
        if fused is not None and matrix == "up":
            at += int(module.weight.shape[0]) // 2
        want = seen_in[0].float() @ row + (0.0 if bias is None else float(bias.detach()[at]))
        got = seen[neuron][0]
        torch.testing.assert_close(got, want.reshape(got.shape), rtol=1e-5, atol=1e-5)
    # and a down neuron's value (site act) is that unit of its down projection's input
    down = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "fc_out", "output_linear")
    module = getattr(mlp, next(n for n in down if hasattr(mlp, n)))
    seen_in = []
    handle = module.register_forward_pre_hook(lambda m, a, out=seen_in: out.append(a[0]))
    neuron = Neuron(0, 7, "down")
    try:
        with torch.no_grad(), record(model, neuron) as seen:
            model(**batch, use_cache=False)
    finally:
        handle.remove()
    got = seen[neuron][0]
    torch.testing.assert_close(got, seen_in[0][..., 7].reshape(got.shape), rtol=0, atol=0)
