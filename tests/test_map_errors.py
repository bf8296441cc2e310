"""Bad input gets one clear line, no traceback, and loses nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flashlens import Atlas, map_model
from flashlens.cli import main
from flashlens.errors import (
    AtlasError,
    CheckpointError,
    NeuronError,
    UnsupportedModelError,
)

from .helpers import make_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("err") / "m", n_layers=2)


@pytest.fixture(scope="module")
def atlas(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("err-atlas") / "a"
    map_model(model, out, compile="off")
    return out


def copy_model(model: Path, dest: Path) -> Path:
    shutil.copytree(model, dest)
    return dest


def cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI, expect a user error: exit 2 and one line on stderr, no traceback."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_truncated_safetensors(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = copy_model(model, tmp_path / "m")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt"):
        map_model(bad, tmp_path / "a")
    assert "download it again" in cli_error(capsys, "map", str(bad), "-o", str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()  # nothing was started


def test_missing_shard(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", shard_size="40KB")
    shard = sorted(model.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"missing.*{shard.name}"):
        map_model(model, tmp_path / "a")


def test_missing_tensor_and_wrong_shape(model: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    bad = copy_model(model, tmp_path / "m")
    state = load_file(bad / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"up_proj.*missing"):
        map_model(bad, tmp_path / "a")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 49}))
    with pytest.raises(CheckpointError, match=r"shape"):
        map_model(bad, tmp_path / "a")


def test_no_weights_and_no_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config.json"):
        map_model(tmp_path / "empty", tmp_path / "a")
    (tmp_path / "empty" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(CheckpointError, match=r"no weights"):
        map_model(tmp_path / "empty", tmp_path / "a")
    assert "does not exist" in cli_error(capsys, "map", "./no/such/model", "-o", str(tmp_path))


def test_unknown_architecture_and_unsupported_config(model: Path, tmp_path: Path) -> None:
    bad = copy_model(model, tmp_path / "m")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["FancyForCausalLM"]}))
    with pytest.raises(
        UnsupportedModelError, match=r"FancyForCausalLM.*supports.*LlamaForCausalLM"
    ):
        map_model(bad, tmp_path / "a")
    quantised = {**config, "quantization_config": {"quant_method": "gptq"}}
    (bad / "config.json").write_text(json.dumps(quantised))
    what = r"quantization_config.*map the model's bf16, fp16 or fp32 release"
    with pytest.raises(UnsupportedModelError, match=what):
        map_model(bad, tmp_path / "a")


@pytest.mark.parametrize("value", [None, "wide"])
def test_a_config_without_a_usable_size_names_the_key(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str | None
) -> None:
    """hidden_size gone or not a number: one line naming the key, no traceback."""
    bad = copy_model(model, tmp_path / "m")
    config = json.loads((bad / "config.json").read_text())
    if value is None:
        del config["hidden_size"]
    else:
        config["hidden_size"] = value
    (bad / "config.json").write_text(json.dumps(config))
    err = cli_error(capsys, "map", str(bad), "-o", str(tmp_path / "a"))
    assert "has no usable 'hidden_size'" in err and "llama config holds" in err
    assert not (tmp_path / "a").exists()


def test_config_without_architectures_says_the_field_is_missing(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = copy_model(model, tmp_path / "m")
    config = json.loads((bad / "config.json").read_text())
    del config["architectures"]
    (bad / "config.json").write_text(json.dumps(config))
    err = cli_error(capsys, "map", str(bad), "-o", str(tmp_path / "a"))
    assert "config.json has no \"architectures\" field (model_type='llama')" in err
    assert 'add it to config.json, e.g. "architectures": ["LlamaForCausalLM"]' in err
    assert "unsupported architecture" not in err
    assert not (tmp_path / "a").exists()


def test_no_tokenizer_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bare = make_model(tmp_path / "m", n_layers=1, tokenizer=None)
    out = tmp_path / "a"
    assert main(["map", str(bare), "-o", str(out), "--compile", "off", "--json"]) == 0
    captured = capsys.readouterr()
    (warning,) = json.loads(captured.out)["warnings"]
    assert warning.startswith(f"no tokenizer found in {bare} (no tokenizer.json)")
    assert "tokens read <id N>" in warning and "--overwrite" in warning
    assert f"warning: {warning}" in " ".join(captured.err.split())
    assert Atlas.open(out).tokens[269] == "<id 269>"
    with_tokenizer = map_model(make_model(tmp_path / "t", n_layers=1), tmp_path / "b")
    assert with_tokenizer.warnings == []


def test_zero_and_non_finite_neurons_are_a_warning(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file, save_file

    pruned = copy_model(model, tmp_path / "m")
    state = load_file(pruned / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][7] = 0.0
    state["model.layers.0.mlp.gate_proj.weight"][3, 2] = float("nan")
    state["model.layers.0.mlp.down_proj.weight"][4, 5] = float("inf")  # neuron 5: a column
    save_file(state, pruned / "model.safetensors")
    summary = map_model(pruned, tmp_path / "a", compile="off")
    assert summary.warnings == [
        "3 neurons have an all-zero or non-finite weight vector (e.g. up:1:7): their tokens "
        "are meaningless (a pruned or damaged checkpoint?)"
    ]
    assert main(["map", str(pruned), "-o", str(tmp_path / "b"), "--compile", "off"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "warning: 3 neurons have an all-zero or non-finite weight vector" in err
    assert map_model(model, tmp_path / "c", compile="off").warnings == []


def test_hub_unreachable_says_how_to_pass_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=r"cannot fetch.*hf download.*pass that folder"):
        map_model("nobody-here/no-such-model", tmp_path / "a")


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--layers", "0-9"], "out of range"),
        (["--layers", "1-0"], "start is after end"),
        (["--layers", "x"], "bad layer range"),
        (["--layers", "0,,1"], "bad layers '0,,1': an empty item in the list"),
        (["--layers", "-1"], "bad layer range '-1': layers count from 0"),
        (["--layers", "+1"], "bad layer range '+1'"),
        (["--layers", "1_0"], "bad layer range '1_0'"),
        (["--layers", "\u0661"], "bad layer range '\u0661'"),  # Arabic-Indic one: int() takes it
        (["--layers", " "], "no layers in ' '"),
        (["--matrices", "up,ffn"], "unknown matrix ffn"),
        (["--norm", "layer"], "unknown norm mode"),
        (["--dtype", "int4"], "unknown dtype"),
        (["--top-k", "0"], "at least 1"),
        (["--block", "-5"], "--block -5 is not a number of neurons: give at least 1"),
        (["--block", "0"], "--block 0 is not a number of neurons: give at least 1"),
        (["--compile", "maybe"], "unknown --compile 'maybe'"),
    ],
)
def test_bad_map_options(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], match: str
) -> None:
    err = cli_error(capsys, "map", str(model), "-o", str(tmp_path / "a"), *argv)
    assert match in err
    assert not (tmp_path / "a").exists()  # refused before any file is written


@pytest.mark.parametrize("value", ["soon", "-5", "nan"])
def test_bad_commit_interval(
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    value: str,
) -> None:
    monkeypatch.setenv("FLASHLENS_COMMIT_SECONDS", value)
    err = cli_error(capsys, "map", str(model), "-o", str(tmp_path / "a"))
    assert f"FLASHLENS_COMMIT_SECONDS='{value}' is not a number of seconds" in err
    assert not (tmp_path / "a").exists()  # refused before any work or any file


def test_not_an_empty_folder_is_not_clobbered(model: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("mine")
    with pytest.raises(AtlasError, match=r"not empty"):
        map_model(model, tmp_path / "a")
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("neuron", "matrix", "match"),
    [
        ("1:48", "up", "out of range"),
        ("2:0", "up", "layer 2 is not in this atlas"),
        ("1:x", "up", "bad neuron"),
        ("1:0", "ffn", "matrix 'ffn'"),
    ],
)
def test_bad_neuron(
    atlas: Path, capsys: pytest.CaptureFixture[str], neuron: str, matrix: str, match: str
) -> None:
    assert match in cli_error(capsys, "show", str(atlas), neuron, "--matrix", matrix)
    if neuron[-1].isdigit():
        with pytest.raises(NeuronError, match=match):
            layer, index = neuron.split(":")
            Atlas.open(atlas).neuron(int(layer), int(index), matrix)


def test_unreadable_atlas(atlas: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "does not exist" in cli_error(capsys, "show", str(tmp_path / "nope"), "0:0")
    bad = tmp_path / "bad"
    shutil.copytree(atlas, bad)
    (bad / "up" / "layer_001.parquet").write_bytes(b"not parquet")
    with pytest.raises(AtlasError, match=r"layer_001.parquet is unreadable"):
        Atlas.open(bad).neuron(1, 0, "up")
    Atlas.open(bad).neuron(0, 0, "up")  # the rest of the atlas still reads
    (bad / "atlas.json").write_text("{ truncated")
    assert "unreadable" in cli_error(capsys, "show", str(bad), "0:0")
    (bad / "up" / "layer_000.parquet").unlink()
    (bad / "atlas.json").write_text((atlas / "atlas.json").read_text())
    with pytest.raises(AtlasError, match=r"missing"):
        Atlas.open(bad).neuron(0, 0, "up")


def test_overwrite_recovers_an_unreadable_atlas_json(
    atlas: Path, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(atlas, bad)
    (bad / "atlas.json").write_text('{"model": ')
    assert "map the model again with --overwrite" in cli_error(capsys, "show", str(bad), "0:0")
    err = cli_error(capsys, "map", str(model), "-o", str(bad))
    assert "atlas.json is unreadable" in err and "pass --overwrite" in err
    (bad / "notes.txt").write_text("mine")
    assert main(["map", str(model), "-o", str(bad), "--overwrite", "--compile", "off"]) == 0
    capsys.readouterr()
    assert Atlas.open(bad).neuron(1, 0, "up") == Atlas.open(atlas).neuron(1, 0, "up")
    assert (bad / "notes.txt").read_text() == "mine"
    (bad / "atlas.json").write_text("[]")  # valid JSON, but not an atlas's description
    assert "atlas.json is unreadable" in cli_error(capsys, "show", str(bad), "0:0")
    assert "pass --overwrite" in cli_error(capsys, "map", str(model), "-o", str(bad))


def test_atlas_files_without_atlas_json(
    atlas: Path, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """show and map agree on the way out (--overwrite), which keeps the user's own files."""
    bad = tmp_path / "bad"
    shutil.copytree(atlas, bad)
    (bad / "atlas.json").unlink()
    (bad / "notes.txt").write_text("mine")
    (bad / "up" / "plot.png").write_text("mine too")
    err = cli_error(capsys, "show", str(bad), "0:0")
    assert f"{bad} holds atlas files but no atlas.json" in err
    assert f"flashlens map MODEL -o {bad} --overwrite" in err
    err = cli_error(capsys, "map", str(model), "-o", str(bad))
    assert f"{bad} holds atlas files (" in err and "but no atlas.json" in err
    assert "pass --overwrite to map again into it (other files in it are kept)" in err
    assert main(["map", str(model), "-o", str(bad), "--overwrite", "--compile", "off"]) == 0
    capsys.readouterr()
    assert Atlas.open(bad).neuron(1, 0, "up") == Atlas.open(atlas).neuron(1, 0, "up")
    assert (bad / "notes.txt").read_text() == "mine"
    assert (bad / "up" / "plot.png").read_text() == "mine too"
    # A folder of only the user's files is never written into, --overwrite or not.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(AtlasError, match=r"not empty and holds no atlas"):
        map_model(model, other, overwrite=True)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_a_model_folder_is_never_an_atlas(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model folder passed where an atlas goes (an easy slip) is named as a model folder: its
    tokenizer.json is not taken for a damaged atlas's file, and `map -o` the model folder,
    --overwrite or not, writes and deletes nothing there."""
    m = copy_model(model, tmp_path / "m")
    before = sorted(p.name for p in m.iterdir())
    assert "tokenizer.json" in before
    for cmd in (["show", str(m), "0:0"], ["search", str(m), "dog"], ["stats", str(m)]):
        err = cli_error(capsys, *cmd)
        assert f"{m} is a model folder (it has config.json), not an atlas" in err, cmd
        assert "--overwrite" not in err
    for extra in ([], ["--overwrite"]):
        err = cli_error(capsys, "map", str(m), "-o", str(m), *extra)
        assert f"{m} is a model folder (it has config.json); choose another -o folder" in err
    assert sorted(p.name for p in m.iterdir()) == before
    # A lone tokenizer.json (the user's) does not make a folder look like a damaged atlas.
    tok = tmp_path / "tok"
    tok.mkdir()
    shutil.copy(m / "tokenizer.json", tok / "tokenizer.json")
    assert "is not an atlas (no atlas.json)" in cli_error(capsys, "show", str(tok), "0:0")
    with pytest.raises(AtlasError, match=r"not empty and holds no atlas"):
        map_model(model, tok, overwrite=True)
    assert [p.name for p in tok.iterdir()] == ["tokenizer.json"]


def test_a_file_is_not_an_atlas_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    for cmd in (["show", str(f), "0:0"], ["serve", str(f), "--get", "/"]):
        assert f"{f} is a file, not an atlas folder" in cli_error(capsys, *cmd)


def test_an_atlas_beside_a_config_json_is_still_an_atlas(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An atlas mapped into a model folder (as an older flashlens allowed) opens and maps
    again with --overwrite; the model's tokenizer.json beside it is never removed."""
    mixed = copy_model(model, tmp_path / "mixed")
    out = tmp_path / "a"
    map_model(model, out, compile="off")
    for p in out.iterdir():
        if p.name != "tokenizer.json":
            shutil.move(str(p), mixed / p.name)
    before = (mixed / "tokenizer.json").read_bytes()
    assert main(["show", str(mixed), "1:0"]) == 0
    assert main(["map", str(model), "-o", str(mixed), "--overwrite", "--compile", "off"]) == 0
    capsys.readouterr()
    assert (mixed / "tokenizer.json").read_bytes() == before
    assert (mixed / "config.json").is_file() and (mixed / "model.safetensors").is_file()
    assert Atlas.open(mixed).meta.complete


def test_layer_specs_take_any_whitespace() -> None:
    from flashlens.atlas.atlas import parse_layers

    assert parse_layers("\t1,\n3 - 4 ", 5) == [1, 3, 4]
