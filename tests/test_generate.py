"""Steered generation: KV-cached batched generation with a clamp vs a cache-free reference;
the generate and clamp commands."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from torch import nn

from flashlens.cli import main
from flashlens.intervene import Neuron, clamp
from flashlens.intervene.dose import ActivationRange, DoseResponse
from flashlens.intervene.generate import generate_ids
from flashlens.intervene.loading import load_tokenizer

from .helpers import load_reference_model, make_model

PROMPTS = ["Once upon a time", "The little dog ran to the", "Tom"]  # lengths differ: left padding
NEURONS = [Neuron(2, 40, "up"), Neuron(3, 100, "down")]
VALUES = [6.0, -4.0]
N_NEW = 10


@torch.no_grad()
def _reference(model: nn.Module, tok: object, prompt: str, last_from: bool) -> list[int]:
    """Greedy, one prompt, no padding, no KV cache: the whole sequence recomputed every step.

    last_from: clamp only positions from the prompt's last one on (what positions="last" does
    under KV-cached generation), with hooks written here, not the library's."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]  # type: ignore[operator]
    start = ids.shape[1] - 1
    layers = cast(Any, model).model.layers
    mlp2, mlp3 = layers[2].mlp, layers[3].mlp

    def set_up(module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, start if last_from else 0 :, 40] = VALUES[0]
        return out

    def set_act(module: nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
        h = args[0].clone()
        h[:, start if last_from else 0 :, 100] = VALUES[1]
        return (h,)

    handles = [
        mlp2.up_proj.register_forward_hook(set_up),
        mlp3.down_proj.register_forward_pre_hook(set_act),
    ]
    try:
        for _ in range(N_NEW):
            logits = model(ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    finally:
        for h in handles:
            h.remove()
    return ids[0, -N_NEW:].tolist()


@pytest.mark.parametrize("positions", ["all", "last"])
def test_cached_batched_generation_clamps_every_step(stories: Path, positions: str) -> None:
    model, tok = load_reference_model(stories), load_tokenizer(stories)
    with clamp(model, NEURONS, value=VALUES, positions=positions):  # type: ignore[arg-type]
        got = generate_ids(model, tok, PROMPTS, max_new_tokens=N_NEW)  # KV cache, left padding
    plain = generate_ids(model, tok, PROMPTS, max_new_tokens=N_NEW)
    for row, prompt in enumerate(PROMPTS):
        want = _reference(model, tok, prompt, last_from=positions == "last")
        assert got[row].tolist() == want, prompt
    assert not torch.equal(got, plain)  # the clamp matters for this test to mean anything


def test_generate_command_json(stories: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "generate",
        str(stories),
        "--clamp",
        "up:2:40=6",
        "--clamp",
        "down:3:100=-4",
        "--prompt",
        PROMPTS[0],
        "--prompt",
        PROMPTS[1],
        "--max-new-tokens",
        "6",
        "--samples",
        "2",
        "--concept",
        "Lily",
        "--json",
    ]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["clamps"] == ["up:2:40=6", "down:3:100=-4"] and out["temperature"] == 1.0
    assert [r["prompt"] for r in out["results"]] == PROMPTS[:2]
    assert all(len(r["baseline"]) == 2 and len(r["clamped"]) == 2 for r in out["results"])
    texts = [t for r in out["results"] for t in r["baseline"]]
    assert out["baseline_share"] == sum(_word("lily", t) for t in texts) / 4
    assert out["site"] is None and out["sites"] == {"up:2:40": "up", "down:3:100": "act"}
    # Each neuron's natural range at its site on the prompts, as the model's own modules give
    # it, one prompt at a time (no padding): up_proj's output, down_proj's input.
    want = _natural_ranges(stories, PROMPTS[:2])
    for name, (lo, hi) in want.items():
        got = out["ranges"][name]
        assert got["min"] == pytest.approx(lo, rel=1e-4, abs=1e-5), name
        assert got["max"] == pytest.approx(hi, rel=1e-4, abs=1e-5), name
    assert main(args[:-1]) == 0  # the text names them too
    text = capsys.readouterr().out
    assert "up:2:40 natural activation at up (up_proj output) on 2 prompts: " in text
    assert f"{want['up:2:40'][0]:.3g} .. {want['up:2:40'][1]:.3g}" in text


@torch.no_grad()
def _natural_ranges(model_dir: Path, prompts: list[str]) -> dict[str, tuple[float, float]]:
    model = load_reference_model(model_dir)
    tok = load_tokenizer(model_dir)
    seen: dict[str, list[torch.Tensor]] = {"up:2:40": [], "down:3:100": []}
    mlp2, mlp3 = model.model.layers[2].mlp, model.model.layers[3].mlp
    hooks = [
        mlp2.up_proj.register_forward_hook(lambda m, i, o: seen["up:2:40"].append(o[0, :, 40])),
        mlp3.down_proj.register_forward_hook(
            lambda m, i, o: seen["down:3:100"].append(i[0][0, :, 100])
        ),
    ]
    try:
        for p in prompts:
            model(**tok([p], return_tensors="pt"))
    finally:
        for h in hooks:
            h.remove()
    return {k: (float(torch.cat(v).min()), float(torch.cat(v).max())) for k, v in seen.items()}


def _word(concept: str, text: str) -> bool:
    """A whole-word, case-insensitive mention, written here with \\b."""
    return re.search(rf"\b{re.escape(concept)}\b", text, re.IGNORECASE) is not None


def test_mentions_are_whole_words() -> None:
    from flashlens.intervene.generate import mention_share

    texts = [", there was a little girl named", "Then HE ran.", "the hero", "he-he"]
    assert mention_share(texts, "he") == sum(_word("he", t) for t in texts) / len(texts)
    assert mention_share(texts, "He") == mention_share(texts, "he")
    assert mention_share(["I like C++.", "abc++"], "c++") == 0.5  # non-word edges


def test_generate_counts_whole_words(stories: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", str(stories), "--clamp", "1:0=0", "--mode", "add", "--prompt"]
    assert main([*args, PROMPTS[0], "--concept", "he", "--max-new-tokens", "9", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (text,) = out["results"][0]["baseline"]
    assert "he" in text.lower()  # as a piece of a word ("there")
    assert out["baseline_share"] == float(_word("he", text))


def test_continuations_read_as_the_text_after_the_prompt(stories: Path) -> None:
    from flashlens.intervene import steer

    model, tok = load_reference_model(stories), load_tokenizer(stories)
    steering = steer(model, tok, PROMPTS, NEURONS, VALUES, max_new_tokens=N_NEW, samples=2)
    with clamp(model, NEURONS, value=VALUES):
        new = generate_ids(model, tok, PROMPTS, N_NEW, samples=2, temperature=1.0)
    texts = [t for r in steering.results for t in r.clamped]
    for row, text in enumerate(texts):
        prompt = PROMPTS[row // 2]
        whole = tok.decode(tok(prompt)["input_ids"] + new[row].tolist(), skip_special_tokens=True)
        assert prompt + text == whole
    assert any(t.startswith(" ") for t in texts)  # a word-start space the new ids alone lose


def test_generate_reports_site_and_long_prompts(
    stories: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long = "Once upon a time " * 130  # > 512 tokens: stories260K's max_position_embeddings
    args = ["generate", str(stories), "--clamp", "up:2:40=6", "--site", "act"]
    assert main([*args, "--prompt", "Tom", "--max-new-tokens", "2", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["site"] == "act" and out["sites"] == {"up:2:40": "act"} and out["notes"] == []
    assert "Loading" not in captured.err  # transformers' loading bar: flashlens hides it
    assert main([*args, "--prompt", long, "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert "up:2:40 at act (down_proj input)" in captured.out
    (note,) = [line for line in captured.err.splitlines() if "max_position_embeddings" in line]
    assert note.startswith("note: the longest prompt has ") and "(512)" in note


def _chat_model(tmp_path: Path) -> Path:
    path = make_model(tmp_path / "chat", n_layers=2)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def test_generate_chat_template(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flashlens.intervene.prompts import encode

    path = _chat_model(tmp_path)
    tok = load_tokenizer(path)
    batch = encode(tok, ["hi there"], torch.device("cpu"), chat=True)
    text = tok.decode(batch["input_ids"][0])
    assert text.startswith("<s>") and "[user] hi there" in text and text.endswith("[assistant]")
    assert (
        main(
            [
                "generate",
                str(path),
                "--clamp",
                "1:3=5",
                "--prompt",
                "hi",
                "--chat",
                "--max-new-tokens",
                "3",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["chat"] is True
    plain = tmp_path / "plain"
    shutil.copytree(path, plain)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert main(["generate", str(plain), "--clamp", "1:3=5", "--prompt", "hi", "--chat"]) == 2
    assert "has no chat template" in capsys.readouterr().err


def test_a_chat_template_in_its_own_file_is_read_and_fetched(tmp_path: Path) -> None:
    """Newer repos (and transformers 5's saves) keep the chat template in chat_template.jinja
    beside tokenizer_config.json: --chat reads it, and a hub download fetches it."""
    from fnmatch import fnmatch

    from flashlens.intervene.prompts import apply_chat
    from flashlens.weights.resolve import HUB_PATTERNS

    path = _chat_model(tmp_path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "chat_template.jinja").write_text(cfg.pop("chat_template"))
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (text,) = apply_chat(load_tokenizer(path), ["hi there"])
    assert "[user] hi there" in text and text.endswith("[assistant]")
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        assert any(fnmatch(name, pattern) for pattern in HUB_PATTERNS), name


def test_clamp_command(stories: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "dose.png"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nOne day, Lily\n")
    assert (
        main(
            [
                "clamp",
                str(stories),
                "--neuron",
                "up:4:38",
                "--concept",
                "Lily",
                "--values=-5,0,5,20,40",
                "--prompts",
                str(prompts),
                "--plot",
                str(png),
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["n_prompts"] == 2 and out["values"] == [-5, 0, 5, 20, 40]
    assert [v["text"] for v in out["variants"]] == [" Lily"]
    assert out["best"]["ratio"] == max(out["ratios"]) and out["best"]["ratio"] > 1
    r = out["ranges"]["up:4:38"]
    assert r["min"] <= r["next_mean"] <= r["max"] and r["absmax"] == max(-r["min"], r["max"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out["site"] is None and out["sites"] == {"up:4:38": "up"}


def test_clamp_command_reports_its_site(
    stories: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["clamp", str(stories), "--neuron", "up:1:0", "--concept", "Lily", "--site", "act"]
    assert main([*args, "--values", "0,5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["site"] == "act" and out["sites"] == {"up:1:0": "act"}
    assert main([*args, "--values", "0,5"]) == 0
    text = capsys.readouterr().out
    assert "up:1:0 natural activation at act (down_proj input)" in text and "site act" in text
    long = tmp_path / "long.txt"
    long.write_text("Once upon a time " * 130 + "\nTom\n")  # > 512 tokens
    assert main([*args, "--values", "0", "--prompts", str(long), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert sum("past the model's max_position_embeddings (512)" in n for n in notes) == 1


def _dose(mode: str) -> DoseResponse:
    ranges = {
        "up:1:0": ActivationRange(-1.0, 2.0, 2.0, 0.5, 9, 9),
        "up:2:3": ActivationRange(0, 1, 1, 0, 9, 9),
        "up:2:99": ActivationRange(0, 0, 0, None, 0, 9),  # an expert no token reached: no range
    }
    names = list(ranges)
    return DoseResponse(names, [5], mode, "all", 2, 0.1, [-4.0, 0.0, 4.0], [0.2, 0.1, 0.05], ranges)


@pytest.mark.parametrize("mode", ["set", "add", "scale"])
def test_dose_plot_shades_the_natural_range_only_in_set_mode(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    from flashlens.intervene.dose import plot_dose

    saved: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    plot_dose(_dose(mode), str(tmp_path / "dose.png"), "t")
    (ax,) = saved[0].axes
    spans = [p for p in ax.patches if p.get_alpha() == 0.12]
    assert len(spans) == (2 if mode == "set" else 0)  # a shift or a factor is not a value
    label = ax.get_xlabel()
    assert {"set": "activation set", "add": "shift", "scale": "factor"}[mode] in label


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--neuron", "9:1", "--concept", "Lily"], "layer 9 is out of range"),
        (["--neuron", "1:172", "--concept", "Lily"], "index 172 is out of range"),
        (["--neuron", "1:1", "--concept", "elephant"], "unknown concept 'elephant'"),
        (["--neuron", "1:1", "--concept", "Lily", "--values", "a,b"], "bad --values"),
        (
            ["--neuron", "1:1", "--concept", "Lily", "--values", "1,nan"],
            "bad --values '1,nan': nan is not a finite number",
        ),
        (["--neuron", "1:1", "--concept", "Lily", "--mode", "mul"], "unknown --mode 'mul'"),
    ],
)
def test_clamp_command_errors(
    stories: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["clamp", str(stories), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert "clamping" not in err  # the neurons are checked before the progress bar starts


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--values", ""], "no --values in '': write e.g. 0,5,10,20"),
        (
            ["--dtype", "int8"],
            "--dtype 'int8' cannot run a model: choose auto, float32, bfloat16 or float16",
        ),
        (["--matrix", "up,down"], "--matrix takes one matrix (up, gate, down), not a list"),
    ],
)
def test_clamp_checks_options_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    missing = str(tmp_path / "no-model")  # never read
    assert main(["clamp", missing, "--neuron", "1:1", "--concept", "Lily", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


TEMPERATURE = "--temperature must be 0 (greedy) or a positive number"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "-1", "--samples", "2"], f"{TEMPERATURE} (got -1)"),
        (["--temperature", "nan"], f"{TEMPERATURE} (got nan)"),
        (["--samples", "0"], "--samples must be at least 1 (got 0)"),
        (["--max-new-tokens", "-3"], "--max-new-tokens must be at least 1 (got -3)"),
        (["--clamp", "1:2=inf"], "bad --clamp '1:2=inf': 'inf' is not a finite number"),
        (["--dtype", "int8"], "--dtype 'int8' cannot run a model: choose auto, float32"),
        (["--matrix", "up,gate"], "--matrix takes one matrix (up, gate, down), not a list"),
    ],
)
def test_generate_checks_numbers_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    missing = tmp_path / "no-model"  # checked before the model is loaded: never read
    assert main(["generate", str(missing), "--clamp", "0:1=3", "--prompt", "Once", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_steer_refuses_negative_temperature(stories: Path) -> None:
    from flashlens.errors import FlashlensError
    from flashlens.intervene import steer

    model, tok = load_reference_model(stories), load_tokenizer(stories)
    with pytest.raises(FlashlensError, match=r"--temperature must be 0 \(greedy\).*got -0.5"):
        steer(model, tok, ["Once"], [Neuron(0, 1)], 3.0, samples=2, temperature=-0.5)


@pytest.mark.parametrize("command", ["clamp", "generate"])
def test_prompts_file_must_be_utf8(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    bad = tmp_path / "bin.txt"
    bad.write_bytes(b"\xff\xfe bad")
    missing = str(tmp_path / "no-model")  # the file is read before the model is loaded
    args = {
        "clamp": ["clamp", missing, "--neuron", "0:1", "--concept", "and"],
        "generate": ["generate", missing, "--clamp", "0:1=3"],
    }[command]
    assert main([*args, "--prompts", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: cannot read prompts from {bad}: it must be UTF-8 text (byte 0 is 0xff); "
        "save it as UTF-8, one prompt per line\n"
    )
