"""`flashlens compare`: a base model against a fine-tuned copy made here, checked by brute force."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flashlens import map_model
from flashlens.cli import main
from flashlens.comparison import Comparison, compare
from flashlens.comparison.figures import topk_figures
from flashlens.errors import FlashlensError

from .helpers import make_model, reference_probs

MATRICES = ("up", "gate", "down")
BLOCK = 256  # neurons per decode block: these layers are small, keep the padding small
FROZEN = (0, 1, 2)  # layers the fine-tune leaves untouched
TUNED = (3, 4)
TEXT = (
    "Once upon a time there was a little dog named Max. Max loved to run in the park and "
    "play with his red ball. One day he found a big shiny stone under a tree."
)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory, stories: Path) -> Path:
    """stories260K fine-tuned for a few Adam steps with layers 0-2, the (tied) embedding/LM-head
    and the final norm frozen: everything the decoding of layers 0-2 reads stays bit-identical."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(stories).float()
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(tuple(f"model.layers.{i}." for i in TUNED))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and not model.model.norm.weight.requires_grad
    assert not model.model.embed_tokens.weight.requires_grad
    ids = torch.tensor([Tokenizer.from_file(str(stories / "tokenizer.json")).encode(TEXT).ids])
    opt = torch.optim.Adam(trainable, lr=0.02)  # large: top tokens must actually move
    model.train()
    for _ in range(6):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("tuned") / "stories-tuned"
    model.save_pretrained(out)
    for f in stories.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def tuned_atlas(tmp_path_factory: pytest.TempPathFactory, tuned: Path) -> Path:
    out = tmp_path_factory.mktemp("atlas") / "tuned"
    map_model(tuned, out, compile="off", block=BLOCK)
    return out


@pytest.fixture(scope="module")
def result(stories_atlas: Path, tuned_atlas: Path) -> Comparison:
    return compare(stories_atlas, tuned_atlas)


# --- brute force ----------------------------------------------------------------------------
def brute_force(P: torch.Tensor, Q: torch.Tensor, k: int) -> dict[str, np.ndarray]:
    """Figures from full distributions P, Q (n, V) fp64: the definitions, written plainly."""
    top_p, top_q = P.topk(k, dim=1).indices, Q.topk(k, dim=1).indices
    common = torch.tensor(
        [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_p, top_q, strict=True)]
    )
    M = (P + Q) / 2
    kl_pm = (torch.special.xlogy(P, P) - torch.special.xlogy(P, M)).sum(1)
    kl_qm = (torch.special.xlogy(Q, Q) - torch.special.xlogy(Q, M)).sum(1)
    return {
        "same_top1": (P.argmax(1) == Q.argmax(1)).numpy(),
        "jaccard": (common.double() / (2 * k - common)).numpy(),
        "jsd": ((kl_pm + kl_qm) / 2 / math.log(2)).numpy(),
        "tv": (0.5 * (P - Q).abs().sum(1)).numpy(),
    }


def rows(result: Comparison, matrix: str, layer: int) -> np.ndarray:
    t = result.neurons
    sel = np.flatnonzero((t.matrix == matrix) & (t.layer == layer))
    assert np.array_equal(t.index[sel], np.arange(len(sel)))
    return sel


def test_every_figure_matches_brute_force(result: Comparison, stories: Path, tuned: Path) -> None:
    assert result.exact and result.matrices == list(MATRICES) and result.layers == [0, 1, 2, 3, 4]
    t = result.neurons
    all_bf: dict[str, list[np.ndarray]] = {k: [] for k in ("same_top1", "jaccard", "jsd", "tv")}
    for matrix in MATRICES:
        for layer in range(5):
            P = reference_probs(stories, matrix, layer)  # (172, 512) fp64
            Q = reference_probs(tuned, matrix, layer)
            bf = brute_force(P, Q, result.top_k)
            sel = rows(result, matrix, layer)
            assert np.array_equal(t.same_top1[sel], bf["same_top1"])
            np.testing.assert_array_equal(t.jaccard[sel], bf["jaccard"])
            np.testing.assert_allclose(t.jsd[sel], bf["jsd"], atol=2e-6)
            np.testing.assert_allclose(t.tv[sel], bf["tv"], atol=2e-6)
            # The atlas-only bounds contain the exact total-variation distance (up to the fp32
            # rounding of the stored probabilities).
            assert np.all(t.tv_lo[sel] <= bf["tv"] + 1e-5)
            assert np.all(bf["tv"] <= t.tv_hi[sel] + 1e-5)
            f = result.figures(matrix, layer)
            assert f.neurons == 172
            assert f.same_top1 == pytest.approx(bf["same_top1"].mean(), abs=1e-12)
            assert f.jaccard == pytest.approx(bf["jaccard"].mean(), abs=1e-12)
            assert f.jsd == pytest.approx(bf["jsd"].mean(), abs=2e-6)
            assert f.tv == pytest.approx(bf["tv"].mean(), abs=2e-6)
            for key in all_bf:
                all_bf[key].append(bf[key])
    overall = result.figures()
    assert overall.neurons == 3 * 5 * 172
    assert overall.same_top1 == pytest.approx(np.concatenate(all_bf["same_top1"]).mean())
    assert overall.jsd == pytest.approx(np.concatenate(all_bf["jsd"]).mean(), abs=2e-6)
    up = result.figures("up")
    assert up.jaccard == pytest.approx(np.concatenate(all_bf["jaccard"][:5]).mean())


def test_frozen_layers_agree_fully_tuned_layers_less(result: Comparison) -> None:
    for matrix in MATRICES:
        for layer in FROZEN:
            f = result.figures(matrix, layer)
            assert (f.same_top1, f.jaccard, f.jsd, f.tv, f.tv_lo) == (1.0, 1.0, 0.0, 0.0, 0.0)
        for layer in TUNED:
            f = result.figures(matrix, layer)
            assert f.same_top1 < 0.9 and f.jaccard < 0.9
            assert f.jsd is not None and f.jsd > 0.01 and f.tv_lo > 0
    changed = result.changed(limit=30)
    assert len(changed) == 30 and all(n["layer"] in TUNED for n in changed)
    jsd = [n["jsd"] for n in changed]
    assert jsd == sorted(jsd, reverse=True) and jsd[0] == result.neurons.jsd.max()
    top = changed[0]
    assert len(top["top_a"]) == len(top["top_b"]) == result.top_k
    assert top["top_a"][0]["text"] == result.texts[top["top_a"][0]["token_id"]]
    unchanged = result.unchanged(limit=10, matrix="gate")
    assert all(
        n["jsd"] == 0.0 and n["matrix"] == "gate" and n["layer"] in FROZEN for n in unchanged
    )


def test_atlas_only_distance(stories_atlas: Path, tuned_atlas: Path, result: Comparison) -> None:
    bounds = compare(stories_atlas, tuned_atlas, distance="atlas")
    assert not bounds.exact and bounds.figures().jsd is None
    for f in ("same_top1", "jaccard", "tv_lo", "tv_hi"):
        assert np.array_equal(getattr(bounds.neurons, f), getattr(result.neurons, f))
    ranked = bounds.changed(limit=None)
    lo = [n["tv_lo"] for n in ranked]
    assert lo == sorted(lo, reverse=True) and len(ranked) == len(result.neurons)


def test_model_compared_with_itself(stories_atlas: Path) -> None:
    same = compare(stories_atlas, stories_atlas)
    f = same.figures()
    assert same.exact and (f.same_top1, f.jaccard, f.jsd, f.tv, f.tv_lo) == (1, 1, 0, 0, 0)
    assert np.all(same.neurons.jsd == 0) and np.all(same.neurons.tv_lo == 0)


def test_bounds_on_random_distributions() -> None:
    """tv_lo <= TV <= tv_hi for arbitrary distributions; both equal TV when the top-k lists
    hold all of the mass."""
    rng = np.random.default_rng(0)
    V, k = 30, 6
    for sparse in (False, True):
        for _ in range(200):
            P = rng.dirichlet(np.full(V, 0.3), size=4)
            Q = rng.dirichlet(np.full(V, 0.3), size=4)
            if sparse:  # at most k tokens carry mass
                for X in (P, Q):
                    for row in X:
                        row[np.argsort(row)[:-k]] = 0
                        row /= row.sum()
            ia, ib = np.argsort(-P, 1)[:, :k], np.argsort(-Q, 1)[:, :k]
            fig = topk_figures(
                ia, np.take_along_axis(P, ia, 1), ib, np.take_along_axis(Q, ib, 1), V
            )
            tv = 0.5 * np.abs(P - Q).sum(1)
            assert np.all(fig.tv_lo <= tv + 1e-12) and np.all(tv <= fig.tv_hi + 1e-12)
            if sparse:
                np.testing.assert_allclose(fig.tv_lo, tv, atol=1e-12)
                np.testing.assert_allclose(fig.tv_hi, tv, atol=1e-12)


def test_models_are_mapped_into_out_and_reused(
    tmp_path: Path, stories: Path, tuned: Path, result: Comparison
) -> None:
    out = tmp_path / "atlases"
    r = compare(stories, tuned, out=out, matrices="up", layers="2-4", compile="off", block=BLOCK)
    assert sorted(p.name for p in out.iterdir()) == ["stories-tuned", "stories260K"]
    assert r.exact and r.matrices == ["up"] and r.layers == [2, 3, 4]
    sel = np.concatenate([rows(result, "up", x) for x in (2, 3, 4)])
    for f in ("same_top1", "jaccard"):
        np.testing.assert_array_equal(getattr(r.neurons, f), getattr(result.neurons, f)[sel])
    for f in ("jsd", "tv", "tv_lo", "tv_hi"):  # another block size: fp32 rounding may differ
        np.testing.assert_allclose(
            getattr(r.neurons, f), getattr(result.neurons, f)[sel], atol=1e-6
        )
    stamps = {p: (p / "atlas.json").stat().st_mtime_ns for p in out.iterdir()}
    again = compare(stories, tuned, out=out, matrices="up", layers="3", compile="off", block=BLOCK)
    assert {p: (p / "atlas.json").stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert again.figures().same_top1 == r.figures("up", 3).same_top1


def test_atlas_against_model_maps_with_the_atlas_settings(
    tmp_path: Path, stories_atlas: Path, tuned: Path
) -> None:
    r = compare(stories_atlas, tuned, out=tmp_path, layers="3", compile="off", block=BLOCK)
    meta = json.loads((tmp_path / "stories-tuned" / "atlas.json").read_text())
    assert (meta["top_k"], meta["norm"], meta["layers"]) == (10, "model", [3])
    assert r.matrices == list(MATRICES) and r.layers == [3]


# --- refusals --------------------------------------------------------------------------------
def _error(a: Path | str, b: Path | str, **kw: object) -> str:
    with pytest.raises(FlashlensError) as err:
        compare(a, b, **kw)  # type: ignore[arg-type]
    return str(err.value)


def test_different_settings_are_refused(tmp_path: Path, stories: Path, stories_atlas: Path) -> None:
    map_model(
        stories,
        tmp_path / "k5",
        matrices="up",
        layers="0",
        top_k=5,
        norm="none",
        compile="off",
        block=BLOCK,
    )
    msg = _error(stories_atlas, tmp_path / "k5")
    assert "top-k: A has 10, B has 5" in msg and "norm mode: A has 'model', B has 'none'" in msg
    assert "--top-k K" in msg
    map_model(stories, tmp_path / "k5m", matrices="up", layers="0", top_k=5, compile="off")
    assert "top-k: A has 10, B has 5" in _error(stories_atlas, tmp_path / "k5m")
    five = compare(stories_atlas, tmp_path / "k5m", top_k=5, distance="atlas")  # fits both
    assert five.top_k == 5 and five.figures("up").same_top1 == 1.0
    assert "store top-5 lists" in _error(stories_atlas, tmp_path / "k5m", top_k=6)


def test_different_shapes_and_architectures_are_refused(
    tmp_path: Path, stories_atlas: Path
) -> None:
    def atlas(name: str, **kw: object) -> Path:
        model = make_model(tmp_path / f"m-{name}", **kw)  # type: ignore[arg-type]
        map_model(model, tmp_path / name, matrices="up", layers="0", compile="off", block=BLOCK)
        return tmp_path / name

    tiny = atlas("tiny")
    msg = _error(stories_atlas, tiny)
    for part in (
        "d_model: A has 64, B has 32",
        "d_mlp: A has 172, B has 48",
        "n_layers: A has 5, B has 3",
    ):
        assert part in msg
    assert "vocabulary size: A has 512, B has 256" in _error(tiny, atlas("v256", d_vocab=256))
    assert "architecture: A has 'LlamaForCausalLM', B has 'Qwen2ForCausalLM'" in _error(
        tiny, atlas("qwen", family="qwen2")
    )
    msg = _error(tiny, atlas("llama3tok", tokenizer="tokenizers/llama3"))
    assert "different tokenizers" in msg
    same_vocab = atlas("seed1", seed=1)  # another model, same tokenizer: comparable
    assert compare(tiny, same_vocab).figures().neurons == 48


def test_scope_intersection_and_bad_inputs(tmp_path: Path, stories: Path, tuned: Path) -> None:
    map_model(stories, tmp_path / "a", matrices="up,down", layers="0-1", compile="off", block=BLOCK)
    map_model(tuned, tmp_path / "b", matrices="up", layers="1-2", compile="off", block=BLOCK)
    r = compare(tmp_path / "a", tmp_path / "b")
    assert r.matrices == ["up"] and r.layers == [1]
    assert any("layers only in A" in n and "0" in n for n in r.notes)
    assert any("matrices only in A" in n and "down" in n for n in r.notes)
    # what --matrix and --layers leave out on purpose is not worth a note
    asked = compare(tmp_path / "a", tmp_path / "b", matrices="up", layers="1")
    assert asked.matrices == ["up"] and asked.layers == [1]
    assert not any("only in" in n for n in asked.notes), asked.notes
    map_model(tuned, tmp_path / "c", matrices="up", layers="3", compile="off", block=BLOCK)
    assert "no matrix and layer in common" in _error(tmp_path / "a", tmp_path / "c")
    assert "not in both atlases" in _error(tmp_path / "a", tmp_path / "b", matrices="down")
    assert "pass -o DIR" in _error(stories, tuned)
    assert "does not exist" in _error(tmp_path / "nowhere", tmp_path / "a")
    (tmp_path / "empty").mkdir()
    assert "neither an atlas" in _error(tmp_path / "empty", tmp_path / "a")


def test_exact_distance_needs_the_right_weights(
    tmp_path: Path, stories: Path, tuned: Path, stories_atlas: Path
) -> None:
    drift = tmp_path / "drift"
    shutil.copytree(tuned, drift)
    map_model(
        drift, tmp_path / "drift-atlas", matrices="up", layers="3", compile="off", block=BLOCK
    )
    shutil.copy(stories / "model.safetensors", drift / "model.safetensors")  # weights replaced
    assert "not the ones its atlas decoded" in _error(stories_atlas, tmp_path / "drift-atlas")
    ok = compare(stories_atlas, tmp_path / "drift-atlas", distance="atlas")
    assert ok.figures().neurons == 172
    # an edit that keeps every norm (a sign flipped) is refused too: the decode differs
    flip = tmp_path / "flip"
    shutil.copytree(stories, flip)
    map_model(flip, tmp_path / "flip-atlas", matrices="up", layers="3", compile="off", block=BLOCK)
    tensors = load_file(flip / "model.safetensors")
    tensors["model.layers.3.mlp.up_proj.weight"][5:9] *= -1
    save_file(tensors, flip / "model.safetensors", metadata={"format": "pt"})
    err = _error(stories_atlas, tmp_path / "flip-atlas")
    assert "neuron 5 decodes to other probabilities" in err, err
    shutil.rmtree(drift)  # the model is gone: auto falls back to the bounds, exact refuses
    auto = compare(stories_atlas, tmp_path / "drift-atlas")
    assert not auto.exact and any("exact distance unavailable" in n for n in auto.notes)
    assert "needs both models' weights" in _error(
        stories_atlas, tmp_path / "drift-atlas", distance="exact"
    )


# --- command line ----------------------------------------------------------------------------
def test_cli_json_csv_changed(
    capsys: pytest.CaptureFixture[str], stories_atlas: Path, tuned_atlas: Path, result: Comparison
) -> None:
    a, b = str(stories_atlas), str(tuned_atlas)
    assert main(["compare", a, b, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["overall"] == result.figures().to_dict()
    assert data["matrices"]["gate"] == result.figures("gate").to_dict()
    assert len(data["layers"]) == 15 and data["distance"]["exact"]

    assert main(["compare", a, b, "--changed", "--limit", "5", "--matrix", "down", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["neurons"] == result.changed(limit=5, matrix="down")
    assert list(data["matrices"]) == ["down"]

    assert main(["compare", a, b, "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("matrix,layer,neurons,same_top1,jaccard")
    assert len(lines) == 1 + 15 + 3 + 1
    assert lines[-1].startswith(f"all,all,2580,{result.figures().same_top1}")

    assert main(["compare", a, b, "--unchanged", "--limit", "3", "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[1].split(",")[7] == "0.0"  # jsd of an unchanged neuron

    assert main(["compare", a, b, "--changed", "--limit", "3"]) == 0
    text = capsys.readouterr().out
    assert "changed most" in text and "top tokens in B" in text


def test_cli_plot_and_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, stories_atlas: Path, tuned_atlas: Path
) -> None:
    import matplotlib.image as mpimg

    png = tmp_path / "agreement.png"
    assert main(["compare", str(stories_atlas), str(tuned_atlas), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "same top-1" in text and "100.0%" in text
    image = mpimg.imread(png)
    assert image.shape[0] > 500 and image.shape[1] > 500
    assert main(["compare", str(stories_atlas), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert main(["compare", str(stories_atlas), str(tuned_atlas), "--changed", "--unchanged"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["compare", str(stories_atlas), str(tuned_atlas), "--plot", "x.jpg"]) == 2
    assert ".png" in capsys.readouterr().err


def test_byte_tokens_carry_their_tokenizer_form(
    capsys: pytest.CaptureFixture[str], stories_atlas: Path, result: Comparison
) -> None:
    """A byte token (its text is U+FFFD) is shown as the tokenizer writes it, e.g. <0xE2>, in
    the table and the CSV; JSON items carry the id, the tokenizer form and the text."""
    from flashlens.atlas.tokens import readable

    ranked = result.changed(limit=None)
    item = next(t for n in ranked for t in n["top_a"] if "\ufffd" in t["text"])
    assert item["token"] == result.tokens[item["token_id"]] and item["token"].startswith("<0x")
    a = str(stories_atlas)
    assert main(["compare", a, a, "--unchanged", "--limit", "0", "--matrix", "up", "--csv"]) == 0
    out = capsys.readouterr().out
    assert "\ufffd" not in out and " | " not in out
    rows = list(csv.DictReader(io.StringIO(out)))
    listed = compare(stories_atlas, stories_atlas, matrices="up").unchanged(limit=None)
    assert len(rows) == len(listed) == 5 * 172
    for row, n in zip(rows, listed, strict=True):
        assert json.loads(row["top_a"]) == [readable(t["text"], t["token"]) for t in n["top_a"]]
    assert any("<0x" in row["top_a"] for row in rows)
    assert main(["compare", a, a, "--unchanged", "--limit", "0", "--matrix", "up"]) == 0
    text = capsys.readouterr().out
    assert "\ufffd" not in text and "<0x" in text and "'<0x" not in text  # unquoted, as show


def test_overwrite_replaces_an_atlas_of_other_settings(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, stories: Path, stories_atlas: Path
) -> None:
    map_model(stories, tmp_path / "stories260K", matrices="up", layers="0", compile="off")
    argv = ["compare", str(stories_atlas), str(stories), "-o", str(tmp_path), "--matrix", "up"]
    argv += ["--layers", "3", "--compile", "off"]
    assert main(argv) == 2  # the atlas there has layer 0 only: refused, saying what works
    err = capsys.readouterr().err
    assert "pass --overwrite to replace it" in err
    assert main([*argv, "--overwrite"]) == 0
    assert "up" in capsys.readouterr().out
    meta = json.loads((tmp_path / "stories260K" / "atlas.json").read_text())
    assert (meta["matrices"], meta["layers"], meta["complete"]) == (["up"], [3], True)


def test_a_share_below_one_never_reads_100_percent() -> None:
    from flashlens.comparison.result import percent

    assert percent(1.0) == "100.0%" and percent(0.5) == "50.0%"
    assert percent(2579 / 2580) == "99.96%" and percent(0.99999) == "99.999%"
    assert percent(float("nan")) == "n/a"


def test_a_negative_limit_is_refused(result: Comparison) -> None:
    with pytest.raises(FlashlensError, match="limit must be 0"):
        result.changed(limit=-1)


def test_top_k_compares_the_first_k_of_the_stored_lists(
    stories_atlas: Path, tuned_atlas: Path, result: Comparison
) -> None:
    three = compare(stories_atlas, tuned_atlas, top_k=3, distance="atlas")
    assert three.top_k == 3 and result.top_k == 10
    t3, t10 = three.neurons, result.neurons
    assert t3.top_ids_a.shape[1] == 3
    assert np.array_equal(t3.top_ids_a, t10.top_ids_a[:, :3])
    sets = [
        len(set(a) & set(b)) / len(set(a) | set(b))
        for a, b in zip(t10.top_ids_a[:, :3].tolist(), t10.top_ids_b[:, :3].tolist(), strict=True)
    ]
    assert np.allclose(t3.jaccard, sets)
    assert not np.allclose(t3.jaccard, t10.jaccard)
    for bad, message in ((0, "give 1 to 10"), (11, "store top-10 lists")):
        with pytest.raises(FlashlensError, match=message):
            compare(stories_atlas, tuned_atlas, top_k=bad, distance="atlas")


def test_a_stored_probability_that_underflowed_to_zero_is_not_a_mismatch() -> None:
    """A very peaked neuron stores 0.0 for its k-th token (exp underflow in fp32) while the
    exact log-probability is finite (-120): the weights are the atlas's all the same."""
    from types import SimpleNamespace

    from flashlens.comparison.exact import Stored, _check_probs
    from flashlens.errors import AtlasError

    source: Any = SimpleNamespace(folder=Path("model"))
    lp = torch.tensor([[-1e-6, -120.0, -130.0, -200.0]]).double()
    stored = Stored(np.array([1.0]), np.array([[0, 1, 2]]), np.array([[1.0, 0.0, 0.0]]))
    _check_probs(source, "up", 0, 0, lp, stored)  # no error
    flipped = Stored(np.array([1.0]), np.array([[3, 1, 2]]), np.array([[1.0, 0.0, 0.0]]))
    with pytest.raises(AtlasError, match="neuron 0 decodes to other probabilities"):
        _check_probs(source, "up", 0, 0, lp, flipped)


def check_compare_exact(a: Path, b: Path, out: Path) -> float:
    """`compare` of model folders a and b (3 matrices, 2 layers) equals brute force over the
    two models' own distributions, neuron by neuron; returns the overall divergence."""
    result = compare(a, b, out=out, compile="off")
    assert result.exact
    for matrix in ("up", "gate", "down"):
        for layer in (0, 1):
            P, Q = reference_probs(a, matrix, layer), reference_probs(b, matrix, layer)
            bf = brute_force(P, Q, result.top_k)
            sel = rows(result, matrix, layer)
            assert np.array_equal(result.neurons.same_top1[sel], bf["same_top1"])
            np.testing.assert_allclose(result.neurons.jsd[sel], bf["jsd"], atol=2e-6)
    overall = result.figures()
    assert overall.jsd is not None
    return float(overall.jsd)
