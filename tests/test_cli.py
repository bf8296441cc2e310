"""The CLI: JSON output shapes, and an example in every command's help."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer

from flashlens.cli import app, main


def test_every_command_has_an_example_in_its_help() -> None:
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert {"map", "show"} <= set(commands)
    for name, command in commands.items():
        help_text = command.help or ""
        assert "Example" in help_text and "flashlens " + name in help_text, name
    top = typer.main.get_command(app).epilog or ""
    assert "Example: flashlens map " in top and "flashlens search " in top


def test_show_json_keys(stories_atlas: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(stories_atlas), "2:7", "--matrix", "up", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"layer", "matrix", "index", "top", "bottom", "logsumexp", "entropy"} <= set(data)
    assert (data["layer"], data["matrix"], data["index"]) == (2, "up", 7)
    assert {"token_id", "token", "prob", "logit"} <= set(data["top"][0])
    probs = [t["prob"] for t in data["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1


def test_show_takes_matrix_in_the_address(
    stories_atlas: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", str(stories_atlas), "gate:3:17", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["layer"], data["matrix"], data["index"]) == (3, "gate", 17)


def test_show_prints_table(stories_atlas: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flashlens import Atlas

    assert main(["show", str(stories_atlas), "0:3", "--matrix", "down"]) == 0
    out = capsys.readouterr().out
    top = Atlas.open(stories_atlas).neuron(0, 3, "down").top[0]
    assert repr(top.text) in out and f"{top.prob:.4f}" in out


def test_show_prints_byte_tokens_in_their_own_form(
    stories_atlas: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flashlens import Atlas

    top = Atlas.open(stories_atlas).neuron(2, 10, "up").top
    byte = [t for t in top if "\ufffd" in t.text]
    assert byte, "this neuron of stories260K has byte tokens (<0x..>) among its top tokens"
    assert main(["show", str(stories_atlas), "up:2:10"]) == 0
    out = capsys.readouterr().out
    assert all(t.token in out for t in byte) and "\ufffd" not in out


def test_search_prints_byte_tokens_as_show_does(
    stories_atlas: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flashlens import Atlas

    at = Atlas.open(stories_atlas)
    hit = next(
        h for h in at.search("ig", matrix="up", limit=200).hits if (h.layer, h.index) == (2, 10)
    )
    assert hit.top_token_ids == [t.token_id for t in at.neuron(2, 10, "up").top[:5]]
    byte = [at.tokens[i] for i in hit.top_token_ids if "\ufffd" in at.texts[i]]
    assert byte, "up 2:10 of stories260K has byte tokens (<0x..>) among its top 5"
    assert main(["search", str(stories_atlas), "ig", "--matrix", "up", "--limit", "200"]) == 0
    out = capsys.readouterr().out
    # unquoted, as `show` prints them, and never as U+FFFD
    assert all(f" {b}" in out and f"'{b}'" not in out for b in byte) and "\ufffd" not in out


def test_variants_that_read_alike_carry_the_tokenizers_form() -> None:
    from flashlens.atlas.concepts import TokenVariant
    from flashlens.cli.common import show_token, show_variants

    variants = [
        TokenVariant(1, "▁H", " H"),
        TokenVariant(2, "<0x48>", "H"),
        TokenVariant(3, "H", "H"),
    ]
    assert show_variants(variants) == "' H', 'H' (<0x48>), 'H' (H)"
    # A byte token that is no character alone reads in its tokenizer form, not as U+FFFD.
    bytes_ = [TokenVariant(4, "<0xE2>", "\ufffd"), TokenVariant(5, "<0x98>", "\ufffd")]
    assert show_variants(bytes_) == "<0xE2>, <0x98>"
    assert show_token("\ufffd", "<0xE2>") == "<0xE2>" and show_token(" dog", "Ġdog") == "' dog'"


def test_map_json_summary(
    stories: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "map",
        str(stories),
        "-o",
        str(tmp_path / "a"),
        "--layers",
        "1",
        "--matrices",
        "up",
        "--compile",
        "off",
        "--json",
    ]
    assert main(argv) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["neurons_mapped"] == 172 and s["neurons_skipped"] == 0 and s["neurons_per_second"] > 0
    assert (s["compute_dtype"], s["int8_kernel"]) == ("float32", None)
    assert main(argv) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["neurons_mapped"] == 0 and s["neurons_skipped"] == 172


def test_flags_show_no_value_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("search", "compare", "map"):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "--json" in out and "<int>" in out  # options that take a value keep their type
        assert "<bool>" not in out, command


def test_prob_prints_byte_tokens_in_their_own_form(
    stories_atlas: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flashlens import Atlas

    at = Atlas.open(stories_atlas)
    assert "\ufffd" in at.texts[239] and at.tokens[239] == "<0xEC>"  # a byte token
    assert main(["prob", str(stories_atlas), "up:0:16", "--token-id", "239"]) == 0
    out = capsys.readouterr().out
    assert "p(<0xEC>) = " in out and "\ufffd" not in out


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory, stories: Path) -> tuple[Path, Path]:
    """stories260K with up 3:6 all zeros (as pruning leaves it) and up 3:7 NaN, and its atlas
    of up layer 3."""
    import shutil

    from safetensors.torch import load_file, save_file

    from flashlens import map_model

    root = tmp_path_factory.mktemp("pruned")
    model = Path(shutil.copytree(stories, root / "model"))
    state = load_file(model / "model.safetensors")
    up = state["model.layers.3.mlp.up_proj.weight"]
    up[6], up[7] = 0.0, float("nan")
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    map_model(model, root / "atlas", matrices="up", layers="3", compile="off")
    return model, root / "atlas"


def _strict_json(text: str) -> object:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_writes_null_for_nan(
    pruned: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from flashlens.cli.common import print_json

    print_json({"a": [1.5, float("inf"), (float("-inf"), float("nan"))], "b": {"c": float("nan")}})
    assert _strict_json(capsys.readouterr().out) == {
        "a": [1.5, None, [None, None]],
        "b": {"c": None},
    }
    assert main(["show", str(pruned[1]), "up:3:6", "--json"]) == 0
    data = _strict_json(capsys.readouterr().out)
    assert isinstance(data, dict) and data["w_norm"] == 0.0 and data["logit_kurtosis"] is None
    assert main(["show", str(pruned[1]), "up:3:7", "--json"]) == 0
    data = _strict_json(capsys.readouterr().out)
    assert isinstance(data, dict) and data["entropy"] is None and data["top"][0]["prob"] is None


def test_nan_neurons_do_not_rank_in_search(
    pruned: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from flashlens import Atlas

    # up 3:7 decodes to NaN everywhere: its top tokens (arbitrary) would match the concept
    nan_top = Atlas.open(pruned[1]).neuron(3, 7, "up").top[0]
    res = Atlas.open(pruned[1]).search(nan_top.text, limit=200)
    assert res.hits and all(h.concept_prob == h.concept_prob for h in res.hits)  # no NaN
    assert (3, 7) not in [(h.layer, h.index) for h in res.hits]
    probs = [h.concept_prob for h in res.hits]
    assert probs == sorted(probs, reverse=True)
    assert main(["search", str(pruned[1]), nan_top.text, "--json"]) == 0
    data = _strict_json(capsys.readouterr().out)
    assert isinstance(data, dict) and data["hits"][0]["index"] == res.hits[0].index


def test_compare_accepts_equal_non_finite_norms(
    pruned: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compare", str(pruned[1]), str(pruned[1]), "--json"]) == 0
    data = _strict_json(capsys.readouterr().out)
    assert isinstance(data, dict) and data["distance"]["exact"]
    overall = data["overall"]
    # the NaN neuron has no distance and is left out of the means, said in a note
    assert overall["neurons"] == 172 and overall["jsd"] == 0.0 and overall["tv_lo"] == 0.0
    assert any("1 neuron has no finite decoded distribution" in n for n in data["notes"])


def test_small_probabilities_do_not_print_as_zero(
    stories_atlas: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flashlens import Atlas
    from flashlens.cli.common import show_prob

    assert show_prob(0.25) == "0.2500" and show_prob(3.456e-5) == "3.46e-05"
    top = Atlas.open(stories_atlas).neuron(0, 66, "up").top
    small = [t for t in top if 0 < t.prob < 5e-5]
    assert small, "up 0:66 of stories260K has top tokens below 5e-5"
    assert main(["show", str(stories_atlas), "up:0:66"]) == 0
    out = capsys.readouterr().out
    assert all(f"{t.prob:.2e}" in out for t in small) and "0.0000 " not in out
