"""`flashlens validate`: the paper's validation as a batch, recorded in validation.parquet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flashlens import Atlas
from flashlens.cli import main
from flashlens.intervene import Neuron, dose_response
from flashlens.intervene.loading import load_tokenizer
from flashlens.intervene.prompts import DEFAULT_PROMPTS, encode

from .helpers import load_reference_model, make_model

SCHEMA = pa.schema(
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
    assert {r["concept"] for r in rows} == {"lily"} and {r["model"] for r in rows} == {str(stories)}

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


def test_validate_unknown_concept(
    stories: Path, atlas: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(atlas), "elephant", "--model", str(stories)]) == 2
    assert "unknown concept 'elephant'" in capsys.readouterr().err
