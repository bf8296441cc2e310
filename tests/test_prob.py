"""`flashlens prob`: the exact probability of any token for any neuron."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from flashlens import Atlas, FlashlensError
from flashlens.cli import main

from .helpers import make_model, other_weights, reference_probs


def test_prob_with_model_equals_full_softmax(stories: Path, stories_atlas: Path) -> None:
    atlas = Atlas.open(stories_atlas)
    meta = atlas.meta
    gen = torch.Generator().manual_seed(1)
    for _ in range(24):
        m = meta.matrices[int(torch.randint(len(meta.matrices), (1,), generator=gen))]
        layer = int(torch.randint(meta.n_layers, (1,), generator=gen))
        index = int(torch.randint(meta.d_mlp, (1,), generator=gen))
        token_id = int(torch.randint(meta.d_vocab, (1,), generator=gen))
        r = atlas.prob(layer, index, matrix=m, token_id=token_id, model=stories)
        expected = float(reference_probs(stories, m, layer, meta.norm)[index, token_id])
        assert r.source == "model" and r.token_id == token_id
        assert r.prob == pytest.approx(expected, rel=1e-4)


def test_prob_by_text_and_rank(stories: Path, stories_atlas: Path) -> None:
    atlas = Atlas.open(stories_atlas)
    rec = atlas.neuron(3, 40, "down")
    best = rec.top[0]
    r = atlas.prob(3, 40, best.text, matrix="down", model=stories)
    assert r.token_id == best.token_id and r.rank == 1
    assert r.prob == pytest.approx(best.prob, rel=1e-5)
    P = reference_probs(stories, "down", 3)
    assert r.prob == pytest.approx(float(P[40, best.token_id]), rel=1e-4)


def test_prob_from_the_atlas(stories: Path, stories_atlas: Path) -> None:
    atlas = Atlas.open(stories_atlas)
    meta = atlas.meta
    P = reference_probs(stories, "up", 1, meta.norm)  # (d_mlp, d_vocab)
    rec = atlas.neuron(1, 5, "up")
    # In the neuron's top-k.
    r = atlas.prob(1, 5, token_id=rec.top[3].token_id)
    assert r.source == "top-k" and r.rank == 4
    assert r.prob == pytest.approx(float(P[5, rec.top[3].token_id]), rel=1e-4)
    # In the reverse index but not the top-k: the token's best neuron overall, if it is
    # in up layer 1 and does not list the token among its own top-k.
    import pyarrow.parquet as pq

    rev = pq.read_table(stories_atlas / "reverse.parquet").to_pylist()
    rows = [r for r in rev if r["layer"] == 1 and r["matrix"] == "up"]
    for row in rows:
        listed = {s.token_id for s in atlas.neuron(1, row["index"], "up").top}
        if row["token_id"] not in listed:
            r = atlas.prob(1, row["index"], token_id=row["token_id"])
            assert r.source == "reverse index" and r.rank is None
            assert r.prob == pytest.approx(float(P[row["index"], row["token_id"]]), rel=1e-4)
            break
    else:
        pytest.fail("no reverse-index entry outside a top-k in up layer 1")
    # In neither: the atlas cannot say; the message bounds it and asks for --model.
    stored = {r["token_id"] for r in rows if r["index"] == 5} | {s.token_id for s in rec.top}
    missing = int(P[5].argsort()[0])  # the neuron's least likely token
    assert missing not in stored
    with pytest.raises(FlashlensError, match="--model"):
        atlas.prob(1, 5, token_id=missing)


def test_token_text_must_be_one_token(stories: Path, stories_atlas: Path) -> None:
    atlas = Atlas.open(stories_atlas)
    with pytest.raises(FlashlensError, match="not one token: it tokenizes as"):
        atlas.prob(0, 0, " puppydog", model=stories)
    with pytest.raises(FlashlensError, match="empty"):
        atlas.prob(0, 0, "")
    with pytest.raises(FlashlensError, match="out of range"):
        atlas.prob(0, 0, token_id=atlas.meta.d_vocab)
    with pytest.raises(FlashlensError, match="out of range"):
        atlas.prob(0, atlas.meta.d_mlp, token_id=5)
    with pytest.raises(FlashlensError, match="layer 9"):
        atlas.prob(9, 0, token_id=5)
    with pytest.raises(FlashlensError, match="not both"):
        atlas.prob(0, 0, " the", token_id=5, model=stories)


def test_model_must_match_the_atlas(stories_atlas: Path, tmp_path: Path) -> None:
    other = make_model(tmp_path / "other", d_vocab=512, d_model=64, d_mlp=172, n_layers=5)
    with pytest.raises(FlashlensError, match="not the model this atlas was made from"):
        Atlas.open(stories_atlas).prob(0, 0, token_id=3, model=other)


def test_cli(stories: Path, stories_atlas: Path, capsys: pytest.CaptureFixture[str]) -> None:
    atlas = str(stories_atlas)
    assert main(["prob", atlas, "2:7", " the", "--model", str(stories), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    P = reference_probs(stories, "up", 2)
    assert data["text"] == " the"
    assert data["prob"] == pytest.approx(float(P[7, data["token_id"]]), rel=1e-4)
    assert (
        main(["prob", atlas, "2:7", "--token-id", str(data["token_id"]), "--model", str(stories)])
        == 0
    )
    assert "p(' the')" in capsys.readouterr().out
    assert main(["prob", atlas, "2:999", " the"]) == 2
    assert main(["prob", atlas, "2:7"]) == 2
    err = capsys.readouterr().err
    assert "out of range" in err and "Traceback" not in err


def test_model_weights_must_match_the_atlas(
    stories: Path,
    stories_atlas: Path,
    stories_bf16: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    other = other_weights(stories, tmp_path / "other")
    atlas = Atlas.open(stories_atlas)
    stored = atlas.neuron(4, 123, "up").w_norm
    with pytest.raises(FlashlensError) as info:
        atlas.prob(4, 123, " nam", model=other)
    message = str(info.value)
    assert f"{other} is not the model the atlas at {stories_atlas} was mapped from" in message
    assert "neuron up:4:123 has |w| " in message and f"but {stored:.6g} in the atlas" in message
    assert "flashlens map" in message and f"--model {atlas.meta.model}" in message
    for matrix in ("gate", "down"):
        with pytest.raises(FlashlensError, match=f"neuron {matrix}:4:7 has"):
            atlas.prob(4, 7, matrix=matrix, token_id=5, model=other)
    # The neurons of unchanged layers are the atlas's: answered.
    assert atlas.prob(0, 7, token_id=5, model=other).source == "model"
    # Signs flipped: every norm kept, the reading not, refused all the same.
    flipped = other_weights(stories, tmp_path / "flipped", flip=True)
    for matrix in ("up", "gate", "down"):
        with pytest.raises(FlashlensError, match=f"neuron {matrix}:4:7 decodes to other logits"):
            atlas.prob(4, 7, matrix=matrix, token_id=5, model=flipped)
    assert atlas.prob(0, 7, token_id=5, model=flipped).source == "model"
    # The same weights rounded to bf16: within bf16 rounding of the stored norm, answered.
    assert atlas.meta.weight_dtype == "float32"
    r = atlas.prob(4, 123, " nam", model=stories_bf16)
    assert r.prob == pytest.approx(atlas.prob(4, 123, " nam", model=stories).prob, rel=0.05)
    assert main(["prob", str(stories_atlas), "up:4:123", " nam", "--model", str(other)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    assert "neuron up:4:123 has |w|" in captured.err and "Traceback" not in captured.err


def test_the_split_of_a_multi_token_word_keeps_its_leading_space(
    stories_atlas: Path, stories: Path
) -> None:
    from flashlens import Atlas

    at = Atlas.open(stories_atlas)
    # ' dog' is '▁do' + 'g' in this tokenizer: the first piece reads ' do', not 'do'
    for model in (None, stories):
        with pytest.raises(FlashlensError, match=r"' do' \+ 'g'"):
            at.prob(2, 7, " dog", matrix="up", model=model)


def test_a_neuron_address_must_be_integers(stories_atlas: Path) -> None:
    import numpy as np

    from flashlens import Atlas
    from flashlens.errors import NeuronError

    at = Atlas.open(stories_atlas)
    for layer, index in ((2, 7.5), (2, 7.0), (True, 7), (2.0, 7), ("2", 7)):
        with pytest.raises(NeuronError, match="must be an integer"):
            at.neuron(layer, index)  # type: ignore[arg-type]  # deliberately wrong types
    assert at.neuron(np.int64(2), np.int32(7)).index == 7


def test_a_concept_a_token_and_a_token_id_of_the_wrong_type_are_named(stories_atlas: Path) -> None:
    from flashlens import Neuron, compare, map_model

    at = Atlas.open(stories_atlas)

    def wrong(value: Any) -> Any:  # a deliberately wrong type, hidden from mypy
        return value

    bad: list[tuple[Any, str]] = [
        (lambda: at.search(wrong(5)), "the concept must be text, e.g. 'dog', not 5"),
        (lambda: at.search(wrong(None)), "the concept must be text"),
        (lambda: at.prob(2, 7, wrong(5)), "the token must be text"),
        (lambda: at.prob(2, 7, token_id=wrong("5")), "the token id must be an integer, not '5'"),
        (lambda: Neuron(wrong("1"), 2), "layer and index must be integers"),
        (lambda: Neuron(1, wrong(2.5)), "layer and index must be integers"),
        (lambda: Atlas.open(wrong(5)), "the atlas folder must be a path or a name, not 5"),
        (lambda: map_model(wrong(5), "out"), "the model (a folder or a Hugging Face id) must"),
        (lambda: compare(wrong(None), stories_atlas), "the model or atlas to compare must be"),
    ]
    for call, message in bad:
        with pytest.raises(FlashlensError, match=re.escape(message)):
            call()
    assert at.prob(2, 7, token_id=at.neuron(2, 7).top[0].token_id).prob > 0


def test_an_unreachable_hub_model_hints_at_prob_not_map(
    stories_atlas: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    argv = ["prob", str(stories_atlas), "2:7", " and", "--model", "nobody-here/no-such-model"]
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("error: cannot fetch 'nobody-here/no-such-model'")
    assert "flashlens map" not in err and "--model" in err
    assert Atlas.open(stories_atlas).meta.model in err  # the model the atlas was made from


@pytest.fixture(scope="module")
def ids_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An atlas mapped from a model folder with no tokenizer: its tokens read `<id N>`."""
    from flashlens import map_model

    root = tmp_path_factory.mktemp("ids-only")
    model = make_model(root / "model", n_layers=1, tokenizer=None)
    map_model(model, root / "atlas", matrices="up", compile="off", audit=0)
    return root / "atlas"


def test_an_atlas_without_a_tokenizer_says_so(
    ids_only: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Text means nothing to an atlas of ids: the error says why and how to fix it, not that
    the word is not in the vocabulary; a token named by its id still works."""
    atlas = Atlas.open(ids_only)
    assert atlas.tokens[5] == "<id 5>"
    for concept in ("dog", "  "):
        with pytest.raises(FlashlensError, match="this atlas has no tokenizer") as info:
            atlas.search(concept)
        assert "tokenizer.json" in str(info.value) and "--overwrite" in str(info.value)
        assert "<id 42>" in str(info.value)  # searching by id
    assert [v.token_id for v in atlas.search("<id 5>").variants] == [5]
    with pytest.raises(FlashlensError, match="this atlas has no tokenizer") as info:
        atlas.prob(0, 0, "x")
    assert "--token-id" in str(info.value) and "(nothing)" not in str(info.value)
    assert atlas.prob(0, 0, token_id=atlas.neuron(0, 0).top[0].token_id).source == "top-k"
    assert main(["search", str(ids_only), "dog"]) == 2
    err = capsys.readouterr().err
    assert "has no token in this vocabulary" not in err and "no tokenizer" in err


def test_a_split_without_the_model_tokenizer_is_called_approximate(
    stories_atlas: Path, tmp_path: Path
) -> None:
    import shutil

    moved = tmp_path / "atlas"
    shutil.copytree(stories_atlas, moved)
    meta = json.loads((moved / "atlas.json").read_text())
    meta["model"] = str(tmp_path / "gone")
    (moved / "atlas.json").write_text(json.dumps(meta))
    (moved / "tokenizer.json").unlink()  # kept by the map: an atlas without it
    with pytest.raises(FlashlensError, match="tokenizer was not found at") as info:
        Atlas.open(moved).prob(2, 7, " puppydog")
    assert "approximate" in str(info.value)
    with pytest.raises(FlashlensError) as info:
        Atlas.open(stories_atlas).prob(2, 7, " puppydog")  # the model folder is there
    assert "not found" not in str(info.value)


def test_a_word_without_its_leading_space_names_the_one_token_meant(stories_atlas: Path) -> None:
    """SentencePiece reads 'Once' as the one token ' Once': the error gives that text rather
    than calling 'Once' several tokens."""
    at = Atlas.open(stories_atlas)
    with pytest.raises(FlashlensError, match=r"reads it as ' Once', one token: give that text"):
        at.prob(2, 7, "Once")
    assert at.prob(2, 7, " Once", model=at.meta.model).token == "▁Once"


def test_the_atlas_own_model_changed_since_is_mapped_again(
    stories: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """When the refused model is the atlas's own folder, its weights changed after the map:
    the way out is to map it again, not to pass the same folder."""
    import shutil

    from flashlens import map_model

    model = Path(shutil.copytree(stories, tmp_path / "m"))
    out = tmp_path / "atlas"
    map_model(model, out, matrices="up", layers="4", compile="off")
    shutil.copy(other_weights(stories, tmp_path / "o") / "model.safetensors", model)
    assert main(["prob", str(out), "up:4:123", " nam", "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert f"the weights at {model} changed since the atlas at {out} was mapped from them" in err
    assert f"map the model again (flashlens map {model} -o {out} --overwrite)" in err
    assert "--model" not in err.split("(flashlens map")[1]


def test_the_atlas_own_hub_model_refused_is_said_to_have_changed(stories_atlas: Path) -> None:
    """The same branch for a hub id the atlas records: no advice to pass the same id."""
    from flashlens.atlas.prob import _not_the_model

    atlas = Atlas.open(stories_atlas)
    rec = atlas.neuron(4, 7, "up")
    atlas.meta.model = "org/some-model"
    message = _not_the_model(atlas, rec, "org/some-model", "has |w| 1 in it")
    assert message.startswith("the weights at org/some-model changed since the atlas at ")
    assert "--model" not in message
