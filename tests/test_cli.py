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
    assert main(argv) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["neurons_mapped"] == 0 and s["neurons_skipped"] == 172
