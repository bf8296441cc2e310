"""Clamps and recordings of a mixture of experts' units against the experts computed by hand.

The reference is transformers' own forward with the experts' weights edited (scale clamps), or
an eager loop over the experts that edits the unit inside each expert's computation (set and
add clamps), as a dense MLP's hooks would: never flashlens's output correction itself.
"""

from __future__ import annotations

import copy
import json
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from torch import nn

from flashlens.cli import main
from flashlens.errors import NeuronError, UnsupportedModelError
from flashlens.families import Matrix
from flashlens.intervene import Neuron, activation_ranges, clamp, record
from flashlens.intervene.prompts import encode

from .helpers import (
    DENSE_FIRST,
    MOE,
    N_EXPERTS,
    _layers,
    load_reference_model,
    make_model,
    moe_parts,
    tokenizer_of,
)

D_EXPERT = 24
PROMPTS = ["My favourite animal is", "Once upon a time, there was a little", "She"]
SITE_MATRIX: dict[str, Matrix] = {"up": "up", "gate": "gate", "act": "down"}


@pytest.fixture(scope="module", params=MOE)
def moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp(request.param)
    # DeepSeek-style mixtures: layer 0 dense, 1 and 2 sparse; the others: 0 and 1 sparse
    n_layers = 3 if request.param in DENSE_FIRST else 2
    path = make_model(root / "m", request.param, n_layers=n_layers, d_mlp=D_EXPERT)
    model, tok = load_reference_model(path), tokenizer_of(path)
    return model, encode(tok, PROMPTS, torch.device("cpu")), path


@torch.no_grad()
def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch, use_cache=False).logits


def _experts(model: nn.Module, layer: int) -> Any:
    return moe_parts(_layers(model)[layer])[0]


def _routing(model: nn.Module, batch: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """Which experts each token of the batch is routed to at `layer`: (batch, seq, top_k)."""
    seen: list[torch.Tensor] = []
    experts = _experts(model, layer)
    handle = experts.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    try:
        _logits(model, batch)
    finally:
        handle.remove()
    return seen[0].view(*batch["input_ids"].shape, -1)


def _n_layers(model: nn.Module) -> int:
    return int(cast(Any, model).config.get_text_config().num_hidden_layers)


def _busiest(model: nn.Module, batch: dict[str, torch.Tensor], layer: int) -> int:
    """The expert the router sends most of the batch's real tokens to at `layer`."""
    route = _routing(model, batch, layer)[batch["attention_mask"].bool()]  # (tokens, k)
    return int(route.flatten().mode().values)


# The experts' layouts, read from the module as transformers declares them: gate_up_proj
# (E, 2m, d) with gate's units then up's, or transposed (E, d, 2m) with them alternating, and
# a bias on each product (gpt-oss).
def _transposed(ex: Any) -> bool:
    return bool(getattr(ex, "is_transposed", False))


def _column(ex: Any, site: str, i: int) -> int:
    """Unit i's gate or up along the 2m outputs of gate_up_proj."""
    if getattr(ex, "is_concatenated", True):
        return i + (D_EXPERT if site == "up" else 0)
    return 2 * i + (site == "up")


def _gate_up(ex: Any, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e's gate_up outputs on tokens x (n, d): (n, 2m), its bias added."""
    W = ex.gate_up_proj[e]
    h = x @ (W if _transposed(ex) else W.T)
    return h + ex.gate_up_proj_bias[e] if getattr(ex, "has_bias", False) else h


def _down(ex: Any, e: int, act: torch.Tensor) -> torch.Tensor:
    W = ex.down_proj[e]
    out = act @ (W if _transposed(ex) else W.T)
    return out + ex.down_proj_bias[e] if getattr(ex, "has_bias", False) else out


def _eager(
    model: nn.Module, layer: int, unit: tuple[int, int], site: str, edit: Callable[..., Any]
) -> nn.Module:
    """A copy of the model whose layer's experts run as a plain loop over experts, with
    `edit(h, is_last)` applied to expert e's unit i at `site` inside it (h: the unit's
    values on the tokens routed to e)."""
    ref = copy.deepcopy(model)
    experts = _experts(ref, layer)
    block = [1]  # the sequence length, from the MoE block's (batch, seq, d_model) input
    moe_parts(_layers(ref)[layer])[2].register_forward_pre_hook(
        lambda m, args: block.__setitem__(0, args[0].shape[1])
    )
    e_clamped, i = unit

    def forward(self: Any, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> Any:
        out = torch.zeros_like(x)
        for e in range(self.gate_up_proj.shape[0]):
            token, slot = (index == e).nonzero(as_tuple=True)
            gate_up = _gate_up(self, e, x[token])  # (n, 2m)
            last = token % block[0] == block[0] - 1
            hit = e == e_clamped
            if hit and site in ("gate", "up"):
                c = _column(self, site, i)
                gate_up[:, c] = edit(gate_up[:, c], last)
            act = self._apply_gate(gate_up)  # (n, m): the model's own activation
            if hit and site == "act":
                act[:, i] = edit(act[:, i], last)
            out.index_add_(0, token, _down(self, e, act) * weights[token, slot, None])
        return out

    experts.forward = types.MethodType(forward, experts)
    return ref


@pytest.mark.parametrize("site", ["up", "gate", "act"])
def test_a_scale_clamp_equals_scaling_the_experts_weights(moe: Any, site: str) -> None:
    """Scaling a unit at up / gate / act by s is scaling its W_up vector, W_gate vector (then
    only where act_fn is linear: s = 0 under SiLU) or W_down vector, with the bias of the
    product where there is one: the model's own forward on the edited weights is the
    reference."""
    model, batch, _ = moe
    layer, i = 1, 5
    s = 0.0 if site == "gate" else 2.5  # silu(s * g) != s * silu(g), but silu(0) = 0
    e = _busiest(model, batch, layer)
    ref = copy.deepcopy(model)
    ex = _experts(ref, layer)
    with torch.no_grad():
        if site == "act":  # (not its bias: that one does not pass through the unit)
            (ex.down_proj[e, i] if _transposed(ex) else ex.down_proj[e, :, i]).mul_(s)
        else:
            c = _column(ex, site, i)
            (ex.gate_up_proj[e, :, c] if _transposed(ex) else ex.gate_up_proj[e, c]).mul_(s)
            if getattr(ex, "has_bias", False):
                ex.gate_up_proj_bias[e, c] *= s
    neuron = Neuron(layer, e * D_EXPERT + i, SITE_MATRIX[site])
    with clamp(model, neuron, value=s, mode="scale"):
        hooked = _logits(model, batch)
    torch.testing.assert_close(hooked, _logits(ref, batch), rtol=1e-5, atol=1e-5)
    assert (hooked - _logits(model, batch)).abs().max() > 1e-4  # the clamp acted


@pytest.mark.parametrize(
    ("site", "mode", "positions"),
    [("up", "set", "all"), ("gate", "add", "all"), ("act", "set", "last"), ("up", "add", "last")],
)
def test_set_and_add_clamps_equal_editing_the_unit_inside_its_expert(
    moe: Any, site: str, mode: str, positions: str
) -> None:
    """On a left-padded batch, with each prompt's last position or all of them."""
    model, batch, _ = moe
    layer, v = 1, 3.0
    route = _routing(model, batch, layer)
    e = int(route[:, -1].flatten().mode().values)  # an expert some last positions go to
    i = 7

    def edit(h: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        new = torch.full_like(h, v) if mode == "set" else h + v
        return torch.where(last, new, h) if positions == "last" else new

    ref = _eager(model, layer, (e, i), site, edit)
    neuron = Neuron(layer, e * D_EXPERT + i, SITE_MATRIX[site])
    with clamp(model, neuron, value=v, mode=mode, positions=positions):  # type: ignore[arg-type]
        hooked = _logits(model, batch)
    torch.testing.assert_close(hooked, _logits(ref, batch), rtol=1e-5, atol=1e-5)
    unclamped = _logits(model, batch)
    assert (hooked - unclamped).abs().max() > 1e-4
    if positions == "last":  # causal: positions before the last are untouched (up to the
        # rounding of a later layer's experts, which batch tokens by the experts they reach)
        torch.testing.assert_close(hooked[:, :-1], unclamped[:, :-1], rtol=1e-5, atol=1e-5)


def test_record_is_the_units_value_where_its_expert_runs_and_nan_elsewhere(moe: Any) -> None:
    model, batch, _ = moe
    layer = 1
    route = _routing(model, batch, layer)  # (batch, seq, k)
    ex = _experts(model, layer)
    x: list[torch.Tensor] = []
    handle = ex.register_forward_pre_hook(lambda m, args: x.append(args[0]))
    matrices: list[Matrix] = ["up", "gate", "down"]
    neurons = [Neuron(layer, e * D_EXPERT + 4, m) for e in range(N_EXPERTS) for m in matrices]
    try:
        with torch.no_grad(), record(model, neurons) as seen:
            _logits(model, batch)
    finally:
        handle.remove()
    h = x[0].view(*route.shape[:2], -1)  # the experts' input, (batch, seq, d_model)
    for n in neurons:
        e, i = divmod(n.index, D_EXPERT)
        got = seen[n][0]  # (batch, seq)
        runs = (route == e).any(-1)
        assert torch.equal(got.isnan(), ~runs), n
        gate_up = _gate_up(ex, e, h).detach()  # (batch, seq, 2m)
        g, u = gate_up[..., _column(ex, "gate", i)], gate_up[..., _column(ex, "up", i)]
        want = {"up": u, "gate": g, "down": ex._apply_gate(gate_up)[..., i]}[n.matrix]
        torch.testing.assert_close(got[runs], want[runs].detach(), rtol=1e-5, atol=1e-6)
    # activation ranges count the tokens routed to the expert and skip the others
    e = _busiest(model, batch, layer)
    n = neurons[3 * e]
    r = activation_ranges(model, batch, [n])[n]
    real = batch["attention_mask"].bool()
    runs = (route == e).any(-1) & real
    assert (r.tokens, r.total) == (int(runs.sum()), int(real.sum()))
    assert r.max == pytest.approx(float(seen[n][0][runs].max()), rel=1e-6)


def test_a_natural_clamp_of_several_units_leaves_the_logits_exactly(moe: Any) -> None:
    """Every expert's unit 3 at each site, set to what it records at the last position where
    its expert runs there; two units of one expert at once; then moved by 5, they act."""
    model, batch, _ = moe
    one = {k: t[:1] for k, t in batch.items()}  # one prompt: one value per neuron
    base = _logits(model, one)
    L = _n_layers(model)  # the last two layers are sparse
    neurons = [Neuron(L - 1, e * D_EXPERT + 3, m) for e in range(N_EXPERTS) for m in ("up", "down")]
    e = int(_routing(model, one, L - 2)[0, -1, 0])  # an expert the last token runs there
    neurons += [Neuron(L - 2, e * D_EXPERT + 9, "gate"), Neuron(L - 2, e * D_EXPERT + 3, "up")]
    if L == 3:  # and a dense layer's neuron beside them (DeepSeek)
        neurons += [Neuron(0, 40, "down")]
    with torch.no_grad(), record(model, neurons) as seen:
        _logits(model, one)
    natural = {n: float(seen[n][0][0, -1]) for n in neurons}
    chosen = [n for n in neurons if natural[n] == natural[n]]  # not NaN: the expert ran
    assert {n.layer for n in chosen} == set(range(L))
    values = [natural[n] for n in chosen]
    with clamp(model, chosen, value=values, positions="last"):
        assert torch.equal(_logits(model, one), base)
    with clamp(model, chosen, value=[v + 5 for v in values], positions="last"):
        assert (_logits(model, one) - base).abs().max() > 1e-3


def test_expert_clamps_follow_kv_cached_generation(moe: Any) -> None:
    """Under KV-cached decoding the experts see one new token per step: a clamp at all
    positions gives the greedy continuation that recomputing the whole sequence gives."""
    model, batch, _ = moe
    real = batch["attention_mask"][1].bool()
    ids = batch["input_ids"][1:2, real]  # one prompt, unpadded
    e = _busiest(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 1)
    neuron = Neuron(1, e * D_EXPERT + 2, "down")
    with clamp(model, neuron, value=40.0):
        cached = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        for _ in range(6):  # recompute every step from scratch
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        clamped = model(input_ids=ids).logits
    assert torch.equal(cached, ids)
    assert (clamped - model(input_ids=ids).logits).abs().max() > 1e-3  # the clamp acted


def test_expert_neuron_errors(moe: Any) -> None:
    model, _, _ = moe
    shared = moe_parts(_layers(model)[1])[1]
    width = N_EXPERTS * D_EXPERT + (0 if shared is None else _down_of(shared).in_features)
    with pytest.raises(NeuronError, match=rf"index {width} is out of range.*4 experts of 24 units"):
        clamp(model, f"up:1:{width}", 1.0).__enter__()
    L = _n_layers(model)
    with pytest.raises(NeuronError, match=f"layer {L} is out of range"):
        clamp(model, f"up:{L}:0", 1.0).__enter__()
    with pytest.raises(NeuronError, match="expert 1 unit 2, act"):
        clamp(model, ["down:1:26", Neuron(1, 26, "up")], 1.0, site="act").__enter__()
    old = copy.deepcopy(model)  # the per-expert modules of transformers 4
    moe_parts(_layers(old)[L - 1])[2].experts = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(UnsupportedModelError, match="upgrade transformers"):
        clamp(old, f"up:{L - 1}:1", 1.0).__enter__()


def test_clamp_and_validate_an_expert_neuron_from_the_command_line(
    moe: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, batch, path = moe
    route = _routing(model, batch, 1)
    idle = [e for e in range(N_EXPERTS) if not (route == e).any()]
    busy = _busiest(model, batch, 1)
    neuron = f"up:1:{busy * D_EXPERT + 3}"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    argv = ["clamp", str(path), "--neuron", neuron, "--concept", "a", "--prompts", str(prompts)]
    argv += ["--json"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    r = got["ranges"][neuron]
    real = batch["attention_mask"].bool()
    assert (r["tokens"], r["total"]) == (int(((route == busy).any(-1) & real).sum()), real.sum())
    assert max(got["probs"]) != min(got["probs"])  # the clamp moved the concept
    if idle:  # an expert these prompts never reach: said, not silently "no effect"
        argv[3] = f"up:1:{idle[0] * D_EXPERT}"
        assert main(argv[:-1]) == 0
        assert "its expert ran on none of the" in capsys.readouterr().out


@pytest.fixture(
    scope="module",
    params=[
        "qwen2_moe",
        "deepseek_v3",
        "qwen3_5_moe_multimodal",
        "gemma4_moe_multimodal",
        "granitemoehybrid_moe",
    ],
)
def shared_moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A mixture with a shared expert: Qwen2-MoE's (D_SHARED wide, seeing the tokens
    flattened) or DeepSeek-V3's (one expert wide, seeing (batch, seq, d_model))."""
    root = tmp_path_factory.mktemp(request.param)
    path = make_model(root / "m", request.param, n_layers=2, d_mlp=D_EXPERT)
    model, tok = load_reference_model(path), tokenizer_of(path)
    return model, tok, encode(tok, PROMPTS, torch.device("cpu")), path


def _shared_expert(model: nn.Module, layer: int) -> Any:
    return moe_parts(_layers(model)[layer])[1]


def _down_of(shared: Any) -> Any:
    """A shared expert's down projection (Granite 4's fused shared MLP: output_linear)."""
    return getattr(shared, "down_proj", getattr(shared, "output_linear", None))


def _scale_unit(shared: Any, site: str, j: int, s: float) -> None:
    """Scale unit j's weights at `site` in a shared expert: its W_down column (act), or its
    gate or up row (a fused input_linear: gate's rows, then up's)."""
    if site == "act":
        _down_of(shared).weight[:, j] *= s
    elif hasattr(shared, "input_linear"):
        W = shared.input_linear.weight
        W[j + (W.shape[0] // 2 if site == "up" else 0)] *= s
    else:
        (shared.up_proj if site == "up" else shared.gate_proj).weight[j] *= s


@pytest.mark.parametrize("site", ["up", "gate", "act"])
def test_a_shared_expert_unit_is_clamped_in_the_shared_expert(shared_moe: Any, site: str) -> None:
    """Neuron E * d_expert + j is unit j of the shared expert, which runs on every token: a
    scale clamp equals scaling its weights in the model's own forward."""
    model, _, batch, _ = shared_moe
    layer, j, s = 1, 5, (0.0 if site == "gate" else 2.5)
    ref = copy.deepcopy(model)
    shared = _shared_expert(ref, layer)
    with torch.no_grad():
        _scale_unit(shared, site, j, s)
    neuron = Neuron(layer, N_EXPERTS * D_EXPERT + j, SITE_MATRIX[site])
    with clamp(model, neuron, value=s, mode="scale"):
        hooked = _logits(model, batch)
    torch.testing.assert_close(hooked, _logits(ref, batch), rtol=1e-5, atol=1e-5)
    assert (hooked - _logits(model, batch)).abs().max() > 1e-4


def test_a_shared_expert_clamps_each_prompts_last_token(shared_moe: Any) -> None:
    """Qwen2-MoE's shared expert runs on (batch * seq, d_model), DeepSeek's on (batch, seq,
    d_model): records are (batch, seq), with no NaN (it runs on every token), and a clamp of
    the last position of a padded batch acts on each prompt's last token as on it alone."""
    model, tok, batch, _ = shared_moe
    b, s = batch["input_ids"].shape
    neuron = Neuron(1, N_EXPERTS * D_EXPERT + 3, "down")
    with torch.no_grad(), record(model, neuron) as seen:
        _logits(model, batch)
    assert seen[neuron][0].shape == (b, s) and not seen[neuron][0].isnan().any()
    with clamp(model, neuron, value=6.0, positions="last"):
        hooked = _logits(model, batch)[:, -1]
        single = [_logits(model, encode(tok, [p], torch.device("cpu")))[0, -1] for p in PROMPTS]
    torch.testing.assert_close(hooked, torch.stack(single), rtol=1e-4, atol=1e-4)
    assert (hooked - _logits(model, batch)[:, -1]).abs().amax(1).min() > 1e-3  # every row


def test_show_names_the_shared_expert(
    shared_moe: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, _, _, path = shared_moe
    assert main(["map", str(path), "-o", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    d_shared = _down_of(_shared_expert(model, 1)).in_features
    last = N_EXPERTS * D_EXPERT + d_shared - 1
    assert main(["show", str(tmp_path / "a"), f"up:1:{last}", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["expert"], shown["unit"]) == ("shared", d_shared - 1)
    assert main(["show", str(tmp_path / "a"), "up:1:95"]) == 0  # the routed experts' last
    assert "(expert 3, unit 23)" in capsys.readouterr().out
    assert main(["show", str(tmp_path / "a"), f"up:1:{last}"]) == 0
    assert f"(shared expert, unit {d_shared - 1})" in capsys.readouterr().out
    assert main(["show", str(tmp_path / "a"), f"up:1:{last + 1}"]) == 2
    assert "out of range" in capsys.readouterr().err
