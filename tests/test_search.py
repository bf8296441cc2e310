"""`flashlens search`: planted concepts, agreement with a brute-force scan, bad input."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from flashlens import Atlas, FlashlensError, map_model
from flashlens.cli import main

from .helpers import LLAMA3_TOKENIZER, STORIES, make_model, reference_probs, shared_path

DOG = (2, 7)  # up_proj neuron planted along " dog"
CALIFORNIA = [(0, 3), (1, 20), (2, 30)]  # up_proj neurons planted along " California"


def plant(model_dir: Path, tokens: dict[tuple[int, int], int]) -> None:
    """Point up_proj rows at LM-head rows: w = W_U[t] / g, so final_norm(w) is along W_U[t]."""
    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    W_U, g = state["lm_head.weight"], state["model.norm.weight"]  # (d_vocab, d_model), (d_model,)
    for (layer, index), token_id in tokens.items():
        state[f"model.layers.{layer}.mlp.up_proj.weight"][index] = W_U[token_id] / g
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random Llama with the real Llama 3 tokenizer and planted neurons, and its atlas.

    d_model is 64 (not 32) so that, among 128,256 random LM-head rows, the planted token is
    clearly the nearest to its own row.
    """
    root = tmp_path_factory.mktemp("planted")
    model = make_model(
        root / "model", d_vocab=128256, d_model=64, d_mlp=48, n_layers=3, tokenizer=LLAMA3_TOKENIZER
    )
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    dog, cal = tok.token_to_id("Ġdog"), tok.token_to_id("ĠCalifornia")
    assert dog is not None and cal is not None  # both single tokens in the Llama 3 vocabulary
    plant(model, {DOG: dog, **{n: cal for n in CALIFORNIA}})
    # up only and a short reverse index: quick to map and to load for 128,256 tokens.
    map_model(model, root / "atlas", matrices="up", reverse_n=4, compile="off")
    return model, root / "atlas"


def test_planted_dog_is_first(planted: tuple[Path, Path]) -> None:
    res = Atlas.open(planted[1]).search("dog")
    first = res.hits[0]
    assert (first.layer, first.index, first.matrix) == (*DOG, "up")
    assert first.concept_rank == 1 and first.top_tokens[0] == " dog"
    assert first.concept_prob > 0.5
    texts = [v.text for v in res.variants]
    assert {" dog", "dog", " Dog", "Dog", "DOG"} <= set(texts)
    assert " dogs" not in texts
    assert any("' DOG'" in n for n in res.notes)  # ' DOG' is two tokens: said, left out
    probs = [h.concept_prob for h in res.hits]
    assert probs == sorted(probs, reverse=True)


def test_plural_variants(planted: tuple[Path, Path]) -> None:
    texts = [v.text for v in Atlas.open(planted[1]).search("dog", plural=True).variants]
    assert {" dog", "dog", " Dog", " dogs", "dogs", " Dogs"} <= set(texts)


def test_top1_finds_exactly_the_planted(planted: tuple[Path, Path]) -> None:
    model, atlas_dir = planted
    atlas = Atlas.open(atlas_dir)
    res = atlas.search("California", top1=True, limit=100)
    found = {(h.layer, h.matrix, h.index) for h in res.hits}
    assert found == {(layer, "up", i) for layer, i in CALIFORNIA}
    assert all(h.concept_rank == 1 for h in res.hits)
    # Brute force: exactly the neurons whose full-softmax argmax is a variant.
    ids = torch.tensor([v.token_id for v in res.variants])
    brute = set()
    for layer in range(3):
        top = reference_probs(model, "up", layer).argmax(1)
        brute |= {(layer, "up", int(i)) for i in torch.nonzero(torch.isin(top, ids)).flatten()}
    assert found == brute
    dog = atlas.search("dog", top1=True, matrix="up", layers=[2])
    assert [(h.layer, h.index) for h in dog.hits] == [DOG]


def test_validated_column(planted: tuple[Path, Path], tmp_path: Path) -> None:
    atlas_dir = tmp_path / "atlas"
    shutil.copytree(planted[1], atlas_dir)
    rows = [
        ("Dog", 2, "up", 7, True, "2026-11-20T00:00:00"),
        ("dog", 2, "up", 7, False, "2026-11-19T00:00:00"),  # older row: superseded
        ("cat", 0, "up", 1, False, "2026-11-20T00:00:00"),
    ]
    n = len(rows)
    table = pa.table(
        {
            "concept": pa.array([r[0].lower() for r in rows]),
            "layer": pa.array([r[1] for r in rows], pa.int16()),
            "matrix": pa.array([r[2] for r in rows]),
            "index": pa.array([r[3] for r in rows], pa.int32()),
            "baseline_prob": pa.array([0.1] * n, pa.float32()),
            "clamped_prob": pa.array([0.5] * n, pa.float32()),
            "best_value": pa.array([8.0] * n, pa.float32()),
            "ratio": pa.array([5.0] * n, pa.float32()),
            "validated": pa.array([r[4] for r in rows]),
            "model": pa.array(["m"] * n),
            "created": pa.array([r[5] for r in rows]),
        }
    )
    pq.write_table(table, atlas_dir / "validation.parquet")
    res = Atlas.open(atlas_dir).search("DOG", limit=5)
    assert res.hits[0].validated is True
    assert all(h.validated is None for h in res.hits[1:])
    assert Atlas.open(planted[1]).search("dog").hits[0].validated is None
    assert main(["search", str(atlas_dir), "dog", "--limit", "3"]) == 0
    assert main(["search", str(atlas_dir), "dog", "--limit", "3", "--csv"]) == 0


def test_cli_json_and_csv(planted: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    atlas = str(planted[1])
    assert main(["search", atlas, "California", "--matrix", "up", "--top-1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {(h["layer"], h["index"]) for h in data["hits"]} == set(CALIFORNIA)
    assert data["variants"][0]["text"] == " California"
    assert main(["search", atlas, "dog", "--limit", "4", "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 4 and (rows[0]["layer"], rows[0]["index"]) == ("2", "7")
    hits = Atlas.open(atlas).search("dog", limit=4).hits
    assert [r["lower_bound"] for r in rows] == ["yes" if h.lower_bound else "no" for h in hits]
    assert main(["search", atlas, "dog", "--limit", "4"]) == 0
    shown = [ln for ln in capsys.readouterr().out.splitlines() if ">=" in ln]
    assert len(shown) == sum(h.lower_bound for h in hits)
    assert main(["search", atlas, "dog", "--variants", "plural"]) == 0
    out = capsys.readouterr()
    assert "' dogs'" in out.err and "2:7" in out.out
    # --csv says which variants it searched, on stderr as the table does
    assert main(["search", atlas, "dog", "--limit", "2", "--csv"]) == 0
    out = capsys.readouterr()
    assert out.err.startswith("variants: ' dog'") and out.out.startswith("layer,matrix")
    assert main(["search", atlas, "dog", "--json", "--csv"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "error: pass --json or --csv, not both" in out.err


def test_multi_token_concept(planted: tuple[Path, Path]) -> None:
    res = Atlas.open(planted[1]).search("Schwarzenegger", limit=3)
    assert [v.text for v in res.variants][:1] == [" Schwar"]
    assert "several tokens" in res.notes[0] and "' Schwar' + 'zen'" in res.notes[0]
    assert res.hits


def test_bad_input(
    planted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    atlas = Atlas.open(planted[1])
    with pytest.raises(FlashlensError, match="empty"):
        atlas.search("")
    # only whitespace: the tokens of exactly that text (Llama 3 has one of two spaces)
    assert [v.token for v in atlas.search("  ").variants] == ["ĠĠ"]
    with pytest.raises(FlashlensError, match="no token in this vocabulary"):
        atlas.search("\U00013000")  # an Egyptian hieroglyph: only byte pieces
    with pytest.raises(FlashlensError, match="layer 7 is not in this atlas"):
        atlas.search("dog", layers=[7])
    with pytest.raises(FlashlensError, match="'1-7' is out of range: the model has layers 0-2"):
        atlas.search("dog", layers="1-7")  # a range past the model: a typo, not a filter
    with pytest.raises(FlashlensError, match="matrix 'gate' is not in this atlas"):
        atlas.search("dog", matrix="gate")
    with pytest.raises(FlashlensError, match=r"^limit must be at least 1"):
        atlas.search("dog", limit=0)  # no CLI flag name (--limit) outside the CLI
    wrong: Any = "5"
    with pytest.raises(FlashlensError, match="limit must be an integer, not '5'"):
        atlas.search("dog", limit=wrong)
    # Nothing found: said, with the nearest tokens.
    res = atlas.search("dog", top1=True, layers=[0])
    assert not res.hits and any("nothing found" in n for n in res.notes)
    # A corrupt atlas: one line, exit code 2, no traceback.
    broken = tmp_path / "broken"
    shutil.copytree(planted[1], broken)
    (broken / "up" / "layer_001.parquet").write_bytes(b"not parquet")
    assert main(["search", str(broken), "dog"]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "Traceback" not in err
    no_reverse = tmp_path / "no_reverse"
    shutil.copytree(planted[1], no_reverse)
    (no_reverse / "reverse.parquet").unlink()
    with pytest.raises(FlashlensError, match=r"reverse\.parquet is missing"):
        Atlas.open(no_reverse).search("dog")
    assert main(["search", str(broken), ""]) == 2


def test_stories_search_matches_brute_force(stories: Path, stories_atlas: Path) -> None:
    """Every stored (neuron, variant) probability, and only those, as a full scan finds them."""
    atlas = Atlas.open(stories_atlas)
    meta = atlas.meta
    res = atlas.search("the", limit=10_000)
    ids = [v.token_id for v in res.variants]
    assert [v.text for v in res.variants] == [" the", " The"]
    keys, P = [], []
    for m in meta.matrices:
        for layer in meta.layers:
            P.append(reference_probs(stories, m, layer, meta.norm))  # (d_mlp, d_vocab)
            keys += [(layer, m, i) for i in range(meta.d_mlp)]
    probs = torch.cat(P)  # (n_neurons, d_vocab), fp64
    top_k = probs.topk(meta.top_k, dim=1).indices  # (n, k)
    stored = torch.zeros(len(keys), len(ids), dtype=torch.bool)
    for j, t in enumerate(ids):
        stored[:, j] |= (top_k == t).any(1)
        stored[probs[:, t].topk(meta.reverse_n).indices, j] = True  # the token's top-N neurons
    expected = {
        keys[n]: float((probs[n, ids] * stored[n]).sum())
        for n in torch.nonzero(stored.any(1)).flatten().tolist()
    }
    got = {(h.layer, h.matrix, h.index): h for h in res.hits}
    assert set(got) == set(expected)
    for key, h in got.items():
        assert h.concept_prob == pytest.approx(expected[key], rel=1e-4, abs=1e-7)
    # a hit is marked a lower bound exactly when a variant's probability is not stored for it
    partial = {keys[n] for n in torch.nonzero(~stored.all(1)).flatten().tolist()}
    assert {k for k, h in got.items() if h.lower_bound} == partial & set(got)
    assert 0 < len(partial & set(got)) < len(got)  # (both kinds occur)
    # The best neuron by the full distributions is the first hit, with its exact rank and top 5.
    full = probs[:, ids].sum(1)
    best = int(full.argmax())
    first = res.hits[0]
    assert (first.layer, first.matrix, first.index) == keys[best]
    assert first.concept_prob == pytest.approx(float(full[best]), rel=1e-4)
    order = probs[best].argsort(descending=True)
    assert first.concept_rank == min(int((order == t).nonzero()) for t in ids) + 1
    assert first.top_tokens == [atlas.texts[int(i)] for i in order[:5]]


def test_tokenizer_forms_and_whitespace_concepts(
    stories_atlas: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A concept that is a token's tokenizer form is that token; one that is only whitespace is
    the tokens of that text, not an empty concept."""
    atlas = Atlas.open(stories_atlas)
    newline = atlas.tokens.index("<0x0A>")
    for concept in ("<0x0A>", "\n"):
        res = atlas.search(concept, limit=3)
        assert [v.token_id for v in res.variants] == [newline] and res.notes == []
        assert res.hits and res.hits[0].top_token_ids[0] == newline
    res = atlas.search("\u2581and", limit=3)  # ▁and: the tokenizer's form of ' and'
    assert [(v.token, v.text) for v in res.variants] == [("\u2581and", " and")]
    assert not any("several tokens" in n for n in res.notes)
    with pytest.raises(FlashlensError, match="no token of this vocabulary is exactly"):
        atlas.search("\t\t\t")  # no token writes it
    assert main(["search", str(stories_atlas), "<0x0A>", "--limit", "1"]) == 0
    assert capsys.readouterr().err.startswith("variants: '\\n'")


def test_one_token_split_is_not_called_several_tokens() -> None:
    """A concept the tokenizer reads as one token of another text (it normalizes it) says so,
    not that it is several tokens long."""
    from types import SimpleNamespace

    from flashlens.atlas.concepts import Vocab, expand

    class Normalizing:  # reads every text as token 1
        def encode(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
            return SimpleNamespace(ids=[1])

    vocab = Vocab(["a", "\u2581be"], ["a", " be"], Normalizing())
    exp = expand("BE!", vocab)
    assert [v.text for v in exp.variants] == [" be"]
    assert (
        exp.notes[0] == "'BE!' is no token's text here; the tokenizer reads it as (' BE!' -> ' be')"
    )
    assert not any("several tokens" in n for n in exp.notes)


def test_whitespace_that_no_token_writes_is_named(stories_atlas: Path) -> None:
    from flashlens import Atlas
    from flashlens.atlas.concepts import ConceptError

    at = Atlas.open(stories_atlas)
    with pytest.raises(ConceptError, match="no token of this vocabulary is exactly '   '"):
        at.search("   ")
    with pytest.raises(ConceptError, match="the concept is empty"):
        at.search("")


def test_a_symbol_of_byte_pieces_names_them(stories_atlas: Path) -> None:
    """A character no token writes is named with the byte pieces the tokenizer writes it as,
    and the first of them is then searchable by its tokenizer form."""
    from flashlens import Atlas
    from flashlens.atlas.concepts import ConceptError

    at = Atlas.open(stories_atlas)
    want = "the tokenizer writes it as 3 pieces ('<0xE2>', '<0x98>', '<0x83>')"
    with pytest.raises(
        ConceptError, match=re.escape(f"'\u2603' has no token in this vocabulary: {want}")
    ):
        at.search("\u2603")  # snowman: UTF-8 E2 98 83
    (variant,) = at.search("<0xE2>").variants
    assert variant.token == "<0xE2>"


def test_layers_read_the_same_everywhere_in_python(
    stories_atlas: Path, stories: Path, tmp_path: Path
) -> None:
    import numpy as np

    from flashlens import Atlas, map_model
    from flashlens.errors import NeuronError

    at = Atlas.open(stories_atlas)
    want = [(h.layer, h.index) for h in at.search("the", layers=[1, 2]).hits]
    assert want and {layer for layer, _ in want} <= {1, 2}
    for spec in ("1-2", "1,2", (2, 1), [np.int64(1), np.int64(2)]):
        assert [(h.layer, h.index) for h in at.search("the", layers=spec).hits] == want
    assert {h.layer for h in at.search("the", layers=3).hits} == {3}
    assert {r.layer for r in at.stats(layers="0").rows} == {0}
    for bad in ("x", [1.5], True):
        with pytest.raises(NeuronError, match="layer"):
            at.search("the", layers=bad)  # type: ignore[arg-type]  # deliberately wrong
    for layers in (0, [0], "0"):  # map_model: a layer number (even 0), a list, or a range
        out = tmp_path / f"m{layers!r}"
        map_model(stories, out, matrices="up", layers=layers, compile="off", audit=0)
        assert Atlas.open(out).meta.layers == [0]


def test_whitespace_concepts_search_exactly_their_text_on_the_cli(
    planted: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Several spaces are the token of several spaces (Llama 3 has them), not one space."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(planted[0] / "tokenizer.json"))
    for concept in ("  ", "   ", "\t", "\n\n", " "):
        (want,) = tok.encode(concept, add_special_tokens=False).ids  # one token each
        assert main(["search", str(planted[1]), concept, "--limit", "1", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert [v["token_id"] for v in data["variants"]] == [want], repr(concept)
        assert data["variants"][0]["text"] == concept and data["notes"] == []


def test_split_without_the_model_folder_says_so_or_uses_the_atlas_tokenizer(
    planted: tuple[Path, Path], tmp_path: Path
) -> None:
    """The map keeps the model's tokenizer.json in the atlas, so a multi-token concept splits
    as the model does after the model folder is gone; without it there, the split is
    approximate and a note says so."""
    from tokenizers import Tokenizer

    model, atlas_dir = planted
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    moved = tmp_path / "atlas"
    shutil.copytree(atlas_dir, moved)
    meta = json.loads((moved / "atlas.json").read_text())
    meta["model"] = str(tmp_path / "gone")  # the model folder was moved or deleted
    (moved / "atlas.json").write_text(json.dumps(meta))
    concept = "Schwarzenegger"
    exact = [tok.encode(f, add_special_tokens=False).ids[0] for f in (" " + concept, concept)]
    assert [v.token_id for v in Atlas.open(atlas_dir).search(concept).variants] == exact
    assert (moved / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    kept = Atlas.open(moved).search(concept)
    assert [v.token_id for v in kept.variants] == exact
    assert not any("tokenizer was not found" in n for n in kept.notes)
    (moved / "tokenizer.json").unlink()  # an atlas without it (or made before it was kept)
    res = Atlas.open(moved).search(concept)
    (note,) = [n for n in res.notes if "tokenizer was not found" in n]
    assert str(tmp_path / "gone" / "tokenizer.json") in note and "approximate" in note
    assert [v.token_id for v in res.variants] != exact  # the greedy split differs here
    shutil.copy(model / "tokenizer.json", moved / "tokenizer.json")
    res = Atlas.open(moved).search(concept)
    assert [v.token_id for v in res.variants] == exact
    assert not any("tokenizer was not found" in n for n in res.notes)
    # A tokenizer.json of another vocabulary in the atlas folder is not used.
    other = shared_path(*STORIES.split("/")) / "tokenizer.json"
    shutil.copy(other, moved / "tokenizer.json")
    assert any("tokenizer was not found" in n for n in Atlas.open(moved).search(concept).notes)


def test_degenerate_neurons_rank_nowhere(tmp_path: Path) -> None:
    """An all-zero neuron's flat distribution lists some token first (a tie-break) and a NaN
    neuron's probabilities are NaN: neither is a hit for any concept."""
    from .test_stats import ZERO, map_damaged

    atlas = Atlas.open(map_damaged(tmp_path))
    zero = atlas.neuron(*ZERO, "up")
    assert zero.w_norm == 0
    res = atlas.search(zero.top[0].text, matrix="up", top1=True, limit=1000)
    assert zero.top[0].token_id in {v.token_id for v in res.variants}
    found = {(h.layer, h.index) for h in res.hits}
    assert ZERO not in found
    bad = set()
    for layer in atlas.meta.layers:
        norms = pq.read_table(atlas.layer_path("up", layer), columns=["w_norm"])["w_norm"]
        bad |= {(layer, i) for i, w in enumerate(norms.to_pylist()) if not 0 < abs(w) < 1e30}
    assert len(bad) == 2
    for concept in ("the", zero.top[0].text, atlas.neuron(*sorted(bad)[0], "up").top[0].text):
        hits = atlas.search(concept, limit=1000).hits
        assert hits and not {(h.layer, h.index) for h in hits} & bad


def test_a_corrupt_validation_file_says_to_delete_it(
    planted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    atlas_dir = tmp_path / "atlas"
    shutil.copytree(planted[1], atlas_dir)
    (atlas_dir / "validation.parquet").write_text("garbage\n")
    assert main(["search", str(atlas_dir), "dog"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "validation.parquet is unreadable" in err and "delete it" in err
    assert "--overwrite" not in err and "Traceback" not in err
    # validate's newer records (more columns, another order) are read for what search needs.
    n = 2
    table = pa.table(
        {
            "created": pa.array(["2026-11-20T00:00:00", "2026-11-19T00:00:00"]),
            "validated": pa.array([True, False]),
            "factor": pa.array([4.0] * n, pa.float32()),
            "mode": pa.array(["max"] * n),
            "positions": pa.array([[1, 2]] * n, pa.list_(pa.int32())),
            "n_prompts": pa.array([8] * n, pa.int32()),
            "concept": pa.array(["dog"] * n),
            "layer": pa.array([DOG[0]] * n, pa.int16()),
            "matrix": pa.array(["up"] * n),
            "index": pa.array([DOG[1]] * n, pa.int32()),
        }
    )
    pq.write_table(table, atlas_dir / "validation.parquet")
    assert Atlas.open(atlas_dir).search("dog").hits[0].validated is True
    legacy = table.drop_columns(["factor", "mode", "positions", "n_prompts"])
    pq.write_table(legacy, atlas_dir / "validation.parquet")
    assert Atlas.open(atlas_dir).search("dog").hits[0].validated is True


@pytest.fixture(scope="module")
def odd_layers(tmp_path_factory: pytest.TempPathFactory, stories: Path) -> Path:
    """An atlas of stories260K (layers 0-4) that holds only layers 1 and 3."""
    out = tmp_path_factory.mktemp("odd") / "atlas"
    map_model(stories, out, matrices="up", layers="1,3", compile="off", audit=0)
    return out


def test_a_layer_range_searches_the_atlas_layers_inside_it(
    odd_layers: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flashlens.atlas.atlas import atlas_layers

    atlas = Atlas.open(odd_layers)
    res = atlas.search("the", layers="0-2", limit=100_000)
    assert res.hits and {h.layer for h in res.hits} == {1}
    assert "layers 0,2 are not in this atlas; searched 1" in res.notes
    everything = atlas.search("the", limit=100_000).hits
    assert [h for h in everything if h.layer == 1] == res.hits
    assert {h.layer for h in atlas.search("the", layers="0-4", limit=1000).hits} == {1, 3}
    st = atlas.stats(layers="0-2")
    assert [r.layer for r in st.rows] == [1]
    assert st.notes == ["layers 0,2 are not in this atlas; the table shows 1"]
    assert atlas.stats().notes == [] and atlas.stats(layers="1-3").notes == [
        "layer 2 is not in this atlas; the table shows 1,3"
    ]
    # A layer named alone must be in the atlas; a range must hold at least one of its layers.
    for spec in ("0", [0], 2, "0,1", "1,2-2"):
        with pytest.raises(
            FlashlensError, match=r"layer [02] is not in this atlas; it has layers 1,3"
        ):
            atlas.search("the", layers=spec)
    with pytest.raises(FlashlensError, match="no layer of 0-1 is in this atlas; it has layers 3"):
        atlas_layers("0-1", [3], 5)
    assert main(["search", str(odd_layers), "the", "--layers", "0-2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["hits"] and {h["layer"] for h in data["hits"]} == {1}
    assert main(["stats", str(odd_layers), "--layers", "2", "--json"]) == 2
    assert "layer 2 is not in this atlas" in capsys.readouterr().err
