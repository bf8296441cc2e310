"""`flashlens stats`: per-layer figures against a direct computation, the plot, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from flashlens import Atlas, FlashlensError
from flashlens.atlas.stats import KINDS, QUANTILES, token_kind
from flashlens.cli import main

from .helpers import make_model, reference_logits


@pytest.mark.parametrize(
    ("token", "text", "kind"),
    [
        ("Ġdog", " dog", "word"),
        ("▁a", " a", "word"),
        ("▁t", " t", "subword"),
        ("ing", "ing", "subword"),
        ("Ġ2024", " 2024", "number"),
        ("Ġ...", " ...", "punctuation"),
        ("Ċ", "\n", "whitespace"),
        ("<0x0A>", "\n", "byte"),
        ("<|eot_id|>", "<|eot_id|>", "byte"),
        ("ðŁ", "\ufffd", "byte"),
        ("'s", "'s", "other"),
    ],
)
def test_token_kind(token: str, text: str, kind: str) -> None:
    assert token_kind(token, text) == kind


def test_stats_match_a_direct_computation(stories: Path, stories_atlas: Path) -> None:
    atlas = Atlas.open(stories_atlas)
    kurt, skew = 2.0, 0.5  # low thresholds so the tiny model has some of each
    st = atlas.stats(kurtosis=kurt, skew=skew)
    meta = atlas.meta
    assert [(r.matrix, r.layer) for r in st.rows] == [
        (m, layer) for m in meta.matrices for layer in meta.layers
    ]
    total_pred = total_supp = 0
    for r in st.rows:
        t = pq.read_table(atlas.layer_path(r.matrix, r.layer)).to_pydict()
        top1 = np.array([p[0] for p in t["top_probs"]], dtype=np.float64)
        ent = np.array(t["entropy"], dtype=np.float64)
        assert r.neurons == meta.d_mlp
        assert r.top1_prob_q == pytest.approx(np.quantile(top1, QUANTILES).tolist(), rel=1e-5)
        assert r.entropy_q == pytest.approx(np.quantile(ent, QUANTILES).tolist(), rel=1e-5)
        assert r.top1_prob_mean == pytest.approx(top1.mean(), rel=1e-5)
        kinds = [token_kind(atlas.tokens[i[0]], atlas.texts[i[0]]) for i in t["top_ids"]]
        assert r.kinds == {k: kinds.count(k) for k in KINDS}
        # Prediction/suppression from the model's own logits over the vocabulary.
        L = reference_logits(stories, r.matrix, r.layer, meta.norm).double()  # (d_mlp, d_vocab)
        c = L - L.mean(1, keepdim=True)
        var = c.pow(2).mean(1)
        g1 = c.pow(3).mean(1) / var**1.5
        g2 = c.pow(4).mean(1) / var**2 - 3
        assert r.prediction == int(((g2 > kurt) & (g1 > skew)).sum())
        assert r.suppression == int(((g2 > kurt) & (g1 < -skew)).sum())
        total_pred += r.prediction
        total_supp += r.suppression
    assert total_pred + total_supp > 0  # the test is not vacuous


def test_filters_and_defaults(stories_atlas: Path) -> None:
    atlas = Atlas.open(stories_atlas)
    st = atlas.stats(matrix="down", layers=[1, 3])
    assert [(r.matrix, r.layer) for r in st.rows] == [("down", 1), ("down", 3)]
    assert (st.kurtosis, st.skew) == (10.0, 1.0)
    d = st.to_dict()
    assert "excess kurtosis > 10.0 and skew > 1.0" in d["thresholds"]["prediction"]
    with pytest.raises(FlashlensError, match="matrix 'mlp'"):
        atlas.stats(matrix="mlp")
    with pytest.raises(FlashlensError, match="layer 8"):
        atlas.stats(layers=[8])


def test_plot_and_cli(
    stories_atlas: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "out" / "stats.png"
    assert main(["stats", str(stories_atlas), "--plot", str(png), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["rows"]) == 15 and data["quantiles"] == list(QUANTILES)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(png)  # (H, W, 4)
    assert img.shape[0] > 500 and img.shape[1] > 800
    assert float(np.asarray(img)[..., :3].std()) > 0.05  # not a blank canvas
    assert main(["stats", str(stories_atlas), "--layers", "0-1", "--matrix", "up"]) == 0
    out = capsys.readouterr().out
    assert "pred(iction)" in out and "supp(ression)" in out
    # every quantile printed whole: piped output is not cut to 80 columns with ellipses
    assert "\u2026" not in out
    for r in Atlas.open(stories_atlas).stats(matrix="up", layers=[0, 1]).rows:
        for q in (*r.top1_prob_q[::2], *r.entropy_q[::2]):
            assert f" {q:.2f}" in out
    assert main(["stats", str(stories_atlas), "--plot", str(tmp_path / "x.jpg")]) == 2
    assert "png" in capsys.readouterr().err


def test_table_shows_every_kind(stories_atlas: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each row of the text table adds up: its top-token kinds sum to its neurons, as in --json."""
    assert main(["stats", str(stories_atlas), "--layers", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(line for line in lines if "┃" in line)
    assert [c.strip() for c in head.split("┃")][5:-2] == [
        "word", "subword", "number", "punct", "space", "byte", "other", "degen"
    ]  # fmt: skip
    rows = {}
    for line in lines:
        if "│" in line:
            cells = [c.strip() for c in line.split("│")]
            rows[cells[0]] = (int(cells[2]), [int(c) for c in cells[5:-2]])
    for r in Atlas.open(stories_atlas).stats(layers=[0]).rows:
        neurons, kinds = rows[r.matrix]
        assert kinds == [r.kinds[k] for k in KINDS] and sum(kinds) == neurons == r.neurons
    assert rows["down"][1][KINDS.index("number")] > 0  # a kind the old table left out


ZERO, NAN = (1, 7), (1, 3)  # up_proj neurons of `map_damaged`: all zero, and one NaN weight


def map_damaged(root: Path) -> Path:
    """The atlas of a tiny model with an all-zero and a NaN up_proj neuron in layer 1."""
    from safetensors.torch import load_file, save_file

    from flashlens import map_model

    model = make_model(root / "model", n_layers=2)
    state = load_file(model / "model.safetensors")
    state[f"model.layers.{ZERO[0]}.mlp.up_proj.weight"][ZERO[1]] = 0.0
    state[f"model.layers.{NAN[0]}.mlp.up_proj.weight"][NAN[1], 2] = float("nan")
    save_file(state, model / "model.safetensors")
    map_model(model, root / "atlas", matrices="up", compile="off", audit=0)
    return root / "atlas"


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return map_damaged(tmp_path_factory.mktemp("damaged"))


def test_degenerate_neurons_take_no_place_in_the_reverse_index(damaged: Path) -> None:
    """A NaN probability sorted first and a flat distribution ties everywhere: neither may
    push a real neuron out of a token's top N. Every token keeps N entries, all finite."""
    atlas = Atlas.open(damaged)
    rev = pq.read_table(atlas.reverse_path).to_pydict()
    pairs = set(zip(rev["layer"], rev["index"], strict=True))
    assert ZERO not in pairs and NAN not in pairs
    assert np.isfinite(np.array(rev["prob"], dtype=np.float64)).all()
    per_token = np.bincount(np.array(rev["token_id"]), minlength=atlas.meta.d_vocab)
    assert (per_token == atlas.meta.reverse_n).all()


def test_degenerate_neurons_are_their_own_kind_and_skipped(damaged: Path) -> None:
    """An all-zero or NaN neuron counts as kind `degenerate` and is left out of the means and
    quantiles (said in `skipped`), not a NaN mean for its whole layer nor a `byte` neuron."""
    atlas = Atlas.open(damaged)
    st = atlas.stats()
    for r in st.rows:
        t = pq.read_table(atlas.layer_path(r.matrix, r.layer)).to_pydict()
        w = np.array(t["w_norm"], dtype=np.float64)
        ok = np.isfinite(w) & (w != 0)
        top1 = np.array([p[0] for p in t["top_probs"]], dtype=np.float64)[ok]
        ent = np.array(t["entropy"], dtype=np.float64)[ok]
        assert r.skipped == r.kinds["degenerate"] == int((~ok).sum())
        assert r.top1_prob_mean == pytest.approx(top1.mean(), rel=1e-5)
        assert r.entropy_mean == pytest.approx(ent.mean(), rel=1e-5)
        assert r.top1_prob_q == pytest.approx(np.quantile(top1, QUANTILES).tolist(), rel=1e-5)
        assert r.entropy_q == pytest.approx(np.quantile(ent, QUANTILES).tolist(), rel=1e-5)
        kinds = [
            token_kind(atlas.tokens[i[0]], atlas.texts[i[0]])
            for i, good in zip(t["top_ids"], ok, strict=True)
            if good
        ]
        assert r.kinds == {k: kinds.count(k) for k in KINDS if k != "degenerate"} | {
            "degenerate": int((~ok).sum())
        }
        assert sum(r.kinds.values()) == r.neurons
    assert [r.skipped for r in st.rows] == [0, 2]
    # Thresholds that every finite neuron passes count no degenerate one (NaN > x is true in
    # DuckDB).
    loose = atlas.stats(kurtosis=-1e9, skew=0.0)
    for r in loose.rows:
        t = pq.read_table(atlas.layer_path(r.matrix, r.layer)).to_pydict()
        sk = np.array(t["logit_skew"], dtype=np.float64)
        w = np.array(t["w_norm"], dtype=np.float64)
        ok = np.isfinite(w) & (w != 0) & np.isfinite(t["logit_kurtosis"])
        assert r.prediction == int((ok & (sk > 0)).sum())
        assert r.suppression == int((ok & (sk < 0)).sum())


def test_degenerate_neurons_in_the_table_json_and_plot(
    damaged: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "stats.png"
    assert main(["stats", str(damaged), "--json", "--plot", str(png)]) == 0
    data = json.loads(capsys.readouterr().out)
    (row,) = [r for r in data["rows"] if r["layer"] == 1]
    assert row["top1_prob_mean"] is not None and row["entropy_mean"] is not None
    assert row["skipped"] == row["kinds"]["degenerate"] == 2
    assert png.is_file()
    assert main(["stats", str(damaged)]) == 0
    out = capsys.readouterr().out
    head = next(line for line in out.splitlines() if "┃" in line)
    assert "degen" in [c.strip() for c in head.split("┃")]
    assert "2 neurons are left out of the quantiles" in " ".join(out.split())


def test_moments_of_a_degenerate_neuron_are_undefined(damaged: Path) -> None:
    """`show` reads skew and kurtosis from the atlas: both NaN (undefined) for an all-zero or
    NaN neuron, not a skew of 0 beside a kurtosis of NaN; a sound neuron's are numbers."""
    import math

    atlas = Atlas.open(damaged)
    for layer, index in (ZERO, NAN):
        rec = atlas.neuron(layer, index, "up")
        assert rec.degenerate
        assert math.isnan(rec.logit_skew) and math.isnan(rec.logit_kurtosis)
    rec = atlas.neuron(0, 0, "up")
    assert not rec.degenerate
    assert math.isfinite(rec.logit_skew) and math.isfinite(rec.logit_kurtosis)
    stored = pq.read_table(atlas.layer_path("up", ZERO[0])).to_pydict()
    assert stored["logit_skew"][ZERO[1]] == 0  # as the decoder stores a constant distribution


def test_show_writes_undefined_figures_as_n_a(
    damaged: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flashlens.cli import main

    assert main(["show", str(damaged), f"up:{NAN[0]}:{NAN[1]}"]) == 0
    out = capsys.readouterr()
    assert "skew n/a  kurtosis n/a" in out.out and "meaningless" in out.err
    assert "nan" not in out.out.lower()  # the NaN neuron's table too: n/a, not nan
    assert main(["show", str(damaged), f"up:{ZERO[0]}:{ZERO[1]}"]) == 0
    out = capsys.readouterr()
    assert "skew n/a  kurtosis n/a" in out.out and "meaningless" in out.err
    assert main(["show", str(damaged), "up:0:0"]) == 0
    out = capsys.readouterr()
    assert "n/a" not in out.out and "meaningless" not in out.err


@pytest.mark.parametrize(
    ("kurtosis", "skew", "message"),
    [
        (10.0, -1.0, "the skew threshold must be at least 0, not -1"),
        (float("nan"), 1.0, "the kurtosis threshold must be a finite number, not nan"),
        (float("inf"), 1.0, "the kurtosis threshold must be a finite number, not inf"),
        (10.0, float("nan"), "the skew threshold must be a finite number, not nan"),
        ("10", 1.0, "the kurtosis threshold must be a number"),
    ],
)
def test_bad_thresholds_are_refused_before_any_work(
    stories_atlas: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kurtosis: Any,
    skew: Any,
    message: str,
) -> None:
    with pytest.raises(FlashlensError, match=message):
        Atlas.open(stories_atlas).stats(kurtosis=kurtosis, skew=skew)
    if isinstance(kurtosis, str):
        return
    # The CLI checks them first: before the atlas (here none) and the plot path (here bad).
    argv = ["stats", str(tmp_path / "nothing"), "--kurtosis", str(kurtosis), "--skew", str(skew)]
    assert main([*argv, "--plot", str(tmp_path / "x.jpg")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {message}" or err.startswith(f"error: {message}")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert Atlas.open(stories_atlas).stats(skew=0.0).skew == 0.0  # 0 is a threshold too
