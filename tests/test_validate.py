"""`flashlens validate`: the paper's validation as a batch, recorded in validation.parquet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flashlens import Atlas
from flashlens.atlas.validation import read_validation
from flashlens.cli import main
from flashlens.intervene import Neuron, dose_response
from flashlens.intervene.dose import DEFAULT_SCALES
from flashlens.intervene.loading import load_tokenizer
from flashlens.intervene.prompts import DEFAULT_PROMPTS, encode

from .helpers import load_reference_model, make_model, other_weights

OLD_SCHEMA = pa.schema(  # validation.parquet before it recorded the conditions
    [
        ("concept", pa.string()),
        ("layer", pa.int16()),
        ("matrix", pa.string()),
        ("index", pa.int32()),
        ("baseline_prob", pa.float32()),
        ("clamped_prob", pa.float32()),
        ("best_value", pa.float32()),
        ("ratio", pa.float32()),
        ("validated", pa.bool_()),
        ("model", pa.string()),
        ("created", pa.string()),
    ]
)
CONDITIONS = [
    ("factor", pa.float32()),
    ("mode", pa.string()),
    ("positions", pa.string()),
    ("n_prompts", pa.int32()),
]
SCHEMA = pa.schema(
    [*OLD_SCHEMA][: OLD_SCHEMA.get_field_index("model")]
    + [pa.field(n, t) for n, t in CONDITIONS]
    + [OLD_SCHEMA.field("model"), OLD_SCHEMA.field("created")]
)


@pytest.fixture
def atlas(stories_atlas: Path, tmp_path: Path) -> Path:
    """A writable copy of the shared stories atlas."""
    return Path(shutil.copytree(stories_atlas, tmp_path / "atlas"))


def _validate(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["validate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_validate_neurons_matches_dose_response(
    stories: Path, atlas: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _validate(
        capsys,
        str(atlas),
        "Lily",
        "--model",
        str(stories),
        "--neurons",
        "up:4:38,gate:0:5",
        "--multiples=-20,-5,5,20",
    )
    assert (
        out["factor"] == 2.0
        and [v["text"] for v in out["variants"]] == [" Lily"]
        and out["concept"] == "lily"
    )
    # each row is the dose-response of that neuron alone at multiples of its max |activation|
    model, tok = load_reference_model(stories), load_tokenizer(stories)
    batch = encode(tok, DEFAULT_PROMPTS, model.device)
    for r in out["results"]:
        n = Neuron(r["layer"], r["index"], r["matrix"])
        values = [m * r["absmax"] for m in (-20, -5, 5, 20)]
        dose = dose_response(model, batch, n, [317], values)
        assert r["probs"] == pytest.approx(dose.probs, rel=1e-5)
        assert r["baseline_prob"] == pytest.approx(dose.baseline, rel=1e-6)
        assert r["ratio"] == pytest.approx(max(dose.probs) / dose.baseline, rel=1e-5)
        assert r["validated"] == (r["ratio"] >= 2.0)
    assert out["results"][0]["validated"]  # up:4:38 writes ' Lily' (see test_intervene)
    table = pq.read_table(atlas / "validation.parquet")
    assert table.schema.remove_metadata() == SCHEMA
    rows = table.to_pylist()
    assert [(r["layer"], r["matrix"], r["index"]) for r in rows] == [(0, "gate", 5), (4, "up", 38)]
    assert {r["concept"] for r in rows} == {"lily"}
    assert {r["model"] for r in rows} == {str(stories.resolve())}
    assert {(r["factor"], r["mode"], r["positions"], r["n_prompts"]) for r in rows} == {
        (2.0, "set", "all", len(DEFAULT_PROMPTS))
    }

    # rerun one neuron with another factor, and another concept: rows merge, none duplicated
    again = _validate(
        capsys,
        str(atlas),
        "Lily",
        "--model",
        str(stories),
        "--neurons",
        "4:38",
        "--factor",
        "1e9",
        "--multiples",
        "20",
    )
    assert not again["results"][0]["validated"]
    _validate(
        capsys, str(atlas), "s", "--model", str(stories), "--neurons", "0:32", "--multiples", "20"
    )
    rows = pq.read_table(atlas / "validation.parquet").to_pylist()
    keys = sorted((r["concept"], r["layer"], r["matrix"], r["index"]) for r in rows)
    assert keys == [("lily", 0, "gate", 5), ("lily", 4, "up", 38), ("s", 0, "up", 32)]
    assert [r["validated"] for r in rows if r["index"] == 38] == [False]


def test_validate_top_search_hits(
    stories: Path, atlas: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _validate(
        capsys,
        str(atlas),
        "ily",
        "--model",
        str(stories),
        "--limit",
        "3",
        "--matrix",
        "up",
        "--multiples",
        "-20,20",
    )
    hits = Atlas.open(atlas).search("ily", matrix="up", limit=3).hits
    assert [(r["layer"], r["index"]) for r in out["results"]] == [(h.layer, h.index) for h in hits]
    assert [r["concept_prob"] for r in out["results"]] == [h.concept_prob for h in hits]
    assert [h.validated for h in hits] == [r["validated"] for r in out["results"]]
    assert out["n_validated"] >= 1


def test_validate_progress_and_table(
    stories: Path, atlas: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "validate",
                str(atlas),
                "Lily",
                "--model",
                str(stories),
                "--neurons",
                "4:38",
                "--no-write",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "up:4:38" in out and "at least 2x" in out
    assert not (atlas / "validation.parquet").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--neurons", "4:999"], "neuron index 999 is out of range"),
        (["--neurons", "7:1"], "layer 7 is not in this atlas"),
        (["--neurons", "4:1", "--factor", "0"], "--factor must be positive"),
    ],
)
def test_validate_errors(
    stories: Path, atlas: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["validate", str(atlas), "Lily", "--model", str(stories), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_validate_refuses_other_model(
    atlas: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = make_model(tmp_path / "other", n_layers=2)
    assert main(["validate", str(atlas), "Lily", "--model", str(other), "--neurons", "1:1"]) == 2
    err = capsys.readouterr().err
    assert "does not match the atlas" in err and "config hash" in err
    assert main(["validate", str(atlas), "elephant", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--limit", "0"], "--limit must be at least 1 (got 0)"),
        (["--factor", "nan"], "--factor must be positive and finite (got nan)"),
        (["--factor", "-1"], "--factor must be positive and finite (got -1)"),
        (["--multiples", "1,inf"], "bad --multiples '1,inf': inf is not a finite number"),
        (["--prompts", "BIN"], "it must be UTF-8 text (byte 0 is 0xff)"),
        (["--neurons", ""], "no neurons in '': write e.g. 12:1234,up:3:7"),
        (["--matrix", "up,down"], "--matrix takes one matrix (up, gate, down), not a list"),
        (["--matrix", "foo"], "unknown --matrix 'foo': choose up, gate, down"),
        (
            ["--dtype", "int8"],
            "--dtype 'int8' cannot run a model: choose auto, float32, bfloat16 or float16",
        ),
    ],
)
def test_validate_checks_options_before_loading(
    atlas: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe bad")
    args = [str(binary) if a == "BIN" else a for a in args]
    missing = str(tmp_path / "no-model")  # the options are checked before the model is loaded
    assert main(["validate", str(atlas), "Lily", "--model", missing, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_validate_refuses_other_weights(
    stories: Path, atlas: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A clamp's effect depends on every weight, so the model must hold the atlas's weights
    (its fingerprint), not only the validated neurons: an edit of layer 4's MLP refuses
    neurons of layer 0 too, and so does an attention-only edit, flipped signs included."""
    fingerprint = Atlas.open(atlas).meta.weights_fingerprint
    assert fingerprint is not None
    edits = {
        "other": other_weights(stories, tmp_path / "other"),
        "flipped": other_weights(stories, tmp_path / "flipped", flip=True),  # norms kept
        "attention": other_weights(stories, tmp_path / "attn", part=".layers.2.self_attn.q_proj"),
    }
    import flashlens.intervene.loading as loading

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before its weights were checked")

    for name, other in edits.items():
        args = ["validate", str(atlas), "Lily", "--model", str(other), "--neurons", "0:5"]
        with pytest.MonkeyPatch.context() as mp:  # refused before the model loads
            mp.setattr(loading, "load_model", never)
            assert main(args) == 2
        full = capsys.readouterr().err
        err = full.splitlines()[-1]  # one line, after transformers' loading bar
        assert "Traceback" not in full, name
        assert f"error: model {other} is not the one the atlas at {atlas} was mapped from" in err
        assert "same config.json, other weights (weights fingerprint " in err, name
        assert f"the atlas's {fingerprint})" in err and f"flashlens map {other} -o OUT" in err
    assert not (atlas / "validation.parquet").exists()
    # The model itself by another path, and loaded in bf16, is the atlas's.
    moved = Path(shutil.copytree(stories, tmp_path / "moved"))
    right = ["validate", str(atlas), "Lily", "--model", str(moved), "--neurons", "4:38"]
    assert main([*right, "--dtype", "bfloat16", "--multiples", "20", "--no-write"]) == 0


def test_validate_checks_neurons_of_an_atlas_without_fingerprint(
    stories: Path, atlas: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An atlas from before weights fingerprints: the validated neurons' weights are checked,
    their |w| and their stored top tokens' logits (a flipped sign keeps the norm)."""
    meta = json.loads((atlas / "atlas.json").read_text())
    del meta["weights_fingerprint"]
    (atlas / "atlas.json").write_text(json.dumps(meta))
    other = other_weights(stories, tmp_path / "other")
    stored = Atlas.open(atlas).neuron(4, 38, "up").w_norm
    args = ["validate", str(atlas), "Lily", "--model", str(other)]
    assert main([*args, "--neurons", "0:5,up:4:38"]) == 2
    full = capsys.readouterr().err
    err = full.splitlines()[-1]
    assert "Traceback" not in full
    assert f"error: {other} is not the model the atlas at {atlas} was mapped from" in err
    assert "neuron up:4:38 has |w| " in err and f"but {stored:.6g} in the atlas" in err
    assert "flashlens map" in err and f"--model {stories}" in err
    assert main([*args, "--neurons", "down:4:3"]) == 2
    assert "neuron down:4:3 has |w|" in capsys.readouterr().err
    assert main([*args, "--layers", "4", "--limit", "2"]) == 2  # the search hits are checked
    assert "neuron " in capsys.readouterr().err
    flipped = other_weights(stories, tmp_path / "flipped", flip=True)  # every norm kept
    assert main(["validate", str(atlas), "Lily", "--model", str(flipped), "--neurons", "4:38"]) == 2
    assert "neuron up:4:38 decodes to other logits" in capsys.readouterr().err
    assert not (atlas / "validation.parquet").exists()
    # Without a fingerprint, unchanged layers are taken as the atlas's.
    assert _validate(capsys, *args[1:], "--neurons", "0:5", "--multiples", "20")["results"]


def test_validate_unknown_concept(
    stories: Path, atlas: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(atlas), "elephant", "--model", str(stories)]) == 2
    assert "unknown concept 'elephant'" in capsys.readouterr().err


def test_validate_scale_mode_clamps_at_plain_factors(
    stories: Path, atlas: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [str(atlas), "Lily", "--model", str(stories), "--neurons", "4:38,gate:0:5"]
    out = _validate(capsys, *args, "--mode", "scale")
    assert out["unit"] == "factor" and out["multiples"] == list(DEFAULT_SCALES)  # as clamp
    model, tok = load_reference_model(stories), load_tokenizer(stories)
    batch = encode(tok, DEFAULT_PROMPTS, model.device)
    for r in out["results"]:
        assert r["absmax"] != 1.0  # so a value multiplied by it would show
        assert r["values"] == list(DEFAULT_SCALES)  # factors, not multiples of max|act|
        n = Neuron(r["layer"], r["index"], r["matrix"])
        dose = dose_response(model, batch, n, [317], DEFAULT_SCALES, mode="scale")
        assert r["probs"] == pytest.approx(dose.probs, rel=1e-5)
        assert r["best_value"] in DEFAULT_SCALES
    given = _validate(capsys, *args, "--mode", "scale", "--multiples=-3,3")
    assert all(r["values"] == [-3, 3] for r in given["results"])
    shift = _validate(capsys, *args, "--mode", "add", "--multiples=-3,3")  # add: activation units
    assert shift["unit"] == "activation"
    assert all(r["values"] == [-3 * r["absmax"], 3 * r["absmax"]] for r in shift["results"])
    rows = pq.read_table(atlas / "validation.parquet").to_pylist()
    assert {r["mode"] for r in rows} == {"add"}  # the last run's conditions, one row each
    assert main(["validate", *args, "--mode", "scale", "--no-write"]) == 0
    text = capsys.readouterr().out
    assert "factor" in text and "multiplies the activation" in text


def test_validate_explicit_neurons_have_decoded_prob(
    stories: Path, atlas: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hits = Atlas.open(atlas).search("Lily", limit=4).hits
    listed = ",".join(f"{h.matrix}:{h.layer}:{h.index}" for h in hits)
    out = _validate(
        capsys,
        *(str(atlas), "Lily", "--model", str(stories), "--neurons", listed + ",gate:0:140"),
        *("--multiples", "20", "--no-write"),
    )
    got = {(r["matrix"], r["layer"], r["index"]): r["concept_prob"] for r in out["results"]}
    for h in hits:  # as search sums it
        assert got[h.matrix, h.layer, h.index] == pytest.approx(h.concept_prob, rel=1e-6)
    # gate:0:140 stores no variant of ' Lily' (search does not list it): below its top-k
    assert ("gate", 0, 140) not in {(h.matrix, h.layer, h.index) for h in hits}
    assert got["gate", 0, 140] == 0.0


def test_validate_checks_the_record_before_clamping(
    stories: Path, atlas: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (atlas / "validation.parquet").write_bytes(b"not parquet")
    missing = str(tmp_path / "no-model")  # refused before the model is even loaded
    for model in (missing, str(stories)):
        assert main(["validate", str(atlas), "Lily", "--model", model, "--neurons", "4:38"]) == 2
        err = capsys.readouterr().err
        assert "validation.parquet is unreadable" in err and "delete it" in err
        assert "validating" not in err  # no progress bar: nothing was clamped
    args = ["--model", str(stories), "--neurons", "4:38", "--multiples", "20", "--no-write"]
    assert main(["validate", str(atlas), "Lily", *args]) == 0  # nothing to write: not read


def test_validate_same_model_by_other_paths_is_one_row(
    stories: Path,
    atlas: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    link = tmp_path / "link"
    link.symlink_to(stories, target_is_directory=True)
    monkeypatch.chdir(stories.parent)
    for model in (str(stories), str(link), stories.name, f"./{stories.name}/"):
        out = _validate(
            capsys, str(atlas), "Lily", "--model", model, "--neurons", "4:38", "--multiples", "20"
        )
        assert out["model"] == str(stories.resolve())
    rows = pq.read_table(atlas / "validation.parquet").to_pylist()
    assert [r["model"] for r in rows] == [str(stories.resolve())]


def test_validate_merges_a_file_of_the_old_schema(
    stories: Path, atlas: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(stories.resolve())
    hits = Atlas.open(atlas).search("Lily", layers=[4], matrix="up", limit=2).hits
    other = next(h.index for h in hits if h.index != 38)  # another neuron search lists
    old = {
        "concept": "lily",
        "layer": 4,
        "matrix": "up",
        "index": 38,
        "baseline_prob": 0.1,
        "clamped_prob": 0.1,
        "best_value": 1.0,
        "ratio": 1.0,
        "validated": False,
        "model": model,
        "created": "2024-01-01T00:00:00+00:00",
    }
    kept = old | {"index": other, "validated": True}
    pq.write_table(pa.Table.from_pylist([old, kept], OLD_SCHEMA), atlas / "validation.parquet")
    out = _validate(
        capsys, str(atlas), "Lily", "--model", model, "--neurons", "4:38", "--multiples", "20"
    )
    assert out["results"][0]["validated"]  # so the old row (not validated) must go
    table = pq.read_table(atlas / "validation.parquet")
    assert table.schema.remove_metadata() == SCHEMA
    rows = {r["index"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted([38, other])  # the old row of 4:38 replaced, the other kept
    assert rows[38]["validated"] and rows[38]["mode"] == "set"
    assert rows[38]["n_prompts"] == len(DEFAULT_PROMPTS) and rows[38]["factor"] == 2.0
    assert [rows[other][n] for n, _ in CONDITIONS] == [None] * len(CONDITIONS)  # unrecorded
    assert rows[other]["validated"] and rows[other]["created"] == kept["created"]
    assert read_validation(atlas, "Lily").schema.remove_metadata() == SCHEMA
    # search reads the merged file
    marks = Atlas.open(atlas).search("Lily", layers=[4], matrix="up", limit=2).hits
    assert {h.index: h.validated for h in marks} == {38: True, other: True}


def test_show_and_the_viewer_list_a_neurons_causal_checks(
    stories: Path, atlas: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastapi.testclient import TestClient

    from flashlens.atlas.validation import ratio_text
    from flashlens.serve import make_app

    model = str(stories.resolve())
    lily = _validate(
        capsys, str(atlas), "Lily", "--model", model, "--neurons", "4:38", "--multiples", "20"
    )["results"][0]
    # the same neuron on another concept, under a factor no clamp reaches
    s = _validate(
        capsys,
        str(atlas),
        "s",
        "--model",
        model,
        "--neurons",
        "4:38",
        "--multiples",
        "20",
        "--mode",
        "add",
        "--factor",
        "1e9",
    )["results"][0]
    assert lily["validated"] and not s["validated"]

    assert main(["show", str(atlas), "up:4:38", "--json"]) == 0
    checks = json.loads(capsys.readouterr().out)["validations"]
    assert [c["concept"] for c in checks] == ["lily", "s"]
    for c, r, mode, factor in ((checks[0], lily, "set", 2.0), (checks[1], s, "add", 1e9)):
        assert c["validated"] == r["validated"] and c["model"] == model
        assert c["ratio"] == pytest.approx(r["ratio"], rel=1e-6)  # (stored as float32)
        assert c["baseline_prob"] == pytest.approx(r["baseline_prob"], rel=1e-6)
        assert c["clamped_prob"] == pytest.approx(r["clamped_prob"], rel=1e-6)
        assert c["best_value"] == pytest.approx(r["best_value"], rel=1e-6)
        assert (c["mode"], c["factor"], c["n_prompts"]) == (mode, factor, len(DEFAULT_PROMPTS))
    assert main(["show", str(atlas), "up:4:38"]) == 0
    text = capsys.readouterr().out
    assert "causal checks" in text
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.split()[:1] in (["lily"], ["s"])}
    assert "yes" in lines["lily"] and ratio_text(checks[0]["ratio"]) in lines["lily"]
    assert "yes" not in lines["s"] and "add" in lines["s"]
    # a neuron never validated has none, and no table
    assert main(["show", str(atlas), "up:4:37", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["validations"] == []
    assert main(["show", str(atlas), "up:4:37"]) == 0
    assert "causal checks" not in capsys.readouterr().out

    client = TestClient(make_app(Atlas.open(atlas)))
    assert client.get("/neuron/up/4/38.json").json()["validations"] == checks
    page = client.get("/neuron/up/4/38").text
    assert 'href="/search?q=lily&amp;matrix=up"' in page
    assert page.count("✓ yes") == 1 and page.count("✗ no") == 1
    assert ratio_text(checks[0]["ratio"]) in page and "add " in page
    blank = client.get("/neuron/up/4/37").text
    assert "Not validated yet" in blank and "--neurons up:4:37" in blank
    assert client.get("/neuron/gate/4/38.json").json()["validations"] == []  # (another matrix)
    # the token page of ' Lily' marks the neurons checked for "lily" among those it lists
    token = client.get("/token/317.json").json()
    assert token["concept"] == "lily"
    marks = {(n["matrix"], n["layer"], n["index"]): n["validated"] for n in token["neurons"]}
    assert marks.pop(("up", 4, 38)) is True
    assert set(marks.values()) == {None}
    page = client.get("/token/317").text
    assert "validated: lily" in page and page.count("✓ yes") == 1


def test_checks_from_a_file_of_the_old_schema_show_their_conditions_unknown(
    stories: Path, atlas: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row = {
        "concept": "lily",
        "layer": 4,
        "matrix": "up",
        "index": 38,
        "baseline_prob": 0.125,  # (exact in float32)
        "clamped_prob": 0.375,
        "best_value": 1.0,
        "ratio": 3.0,
        "validated": True,
        "model": str(stories.resolve()),
        "created": "2024-01-01T00:00:00+00:00",
    }
    pq.write_table(pa.Table.from_pylist([row], OLD_SCHEMA), atlas / "validation.parquet")
    (check,) = Atlas.open(atlas).validations(4, 38, "up")
    assert check.to_dict() == {
        k: v for k, v in row.items() if k not in ("layer", "matrix", "index")
    } | {
        "factor": None,
        "mode": None,
        "positions": None,
        "n_prompts": None,
    }
    assert main(["show", str(atlas), "up:4:38"]) == 0
    assert "? 1" in capsys.readouterr().out  # the clamp's mode was not recorded
