"""`flashlens clamp`, `flashlens generate` and `flashlens validate`: prove what a neuron does."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..atlas.validation import ratio_text
from ..errors import FlashlensError, NeuronError
from . import app
from .common import console, err_console, png_path, print_json, show_prob, show_variants

_MODES = "set (h = v), add (h + v) or scale (h * v)."
_POSITIONS = "all, or last (the next-token position and each generated token)."
_SITES = "up (up_proj output), gate (gate_proj output), act (down_proj input); default: by matrix."
# What a clamp value is, by mode: the name of its column.
_X_COLUMNS = {"set": "clamp value", "add": "shift", "scale": "factor"}


def _floats(spec: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise FlashlensError(
            f"bad {what} {spec!r}: write numbers separated by commas, e.g. 0,5,10,20"
        ) from None
    if not values:
        raise FlashlensError(f"no {what} in {spec!r}: write e.g. 0,5,10,20")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise FlashlensError(f"bad {what} {spec!r}: {bad[0]:g} is not a finite number")
    return values


def _plural(variants: str) -> bool:
    if variants not in ("case", "plural"):
        raise FlashlensError(f"unknown --variants {variants!r}: choose case or plural")
    return variants == "plural"


def _how(mode: str, positions: str, site: str | None = None) -> tuple[Any, Any, Any]:
    # Any: the Literal types of the library, once checked
    """--mode, --positions and --site checked before the model is loaded."""
    from ..intervene.hooks import MODES, POSITIONS
    from ..intervene.neuron import SITES

    for option, value, allowed in (
        ("--mode", mode, MODES),
        ("--positions", positions, POSITIONS),
        ("--site", site, SITES),
    ):
        if value is not None and value not in allowed:
            raise FlashlensError(f"unknown {option} {value!r}: choose {', '.join(allowed)}")
    return mode, positions, site


def _matrix(
    matrix: str | None, hint: str = "name each neuron's matrix, e.g. up:12:1234"
) -> str | None:
    """--matrix checked before the model is loaded: one matrix, not a list."""
    from ..families import MATRICES

    if matrix is not None and "," in matrix:
        raise FlashlensError(
            f"--matrix takes one matrix ({', '.join(MATRICES)}), not a list ({matrix!r}): {hint}"
        )
    if matrix is not None and matrix not in MATRICES:
        raise FlashlensError(f"unknown --matrix {matrix!r}: choose {', '.join(MATRICES)}")
    return matrix


def _site(site: str) -> str:
    """'act (down_proj input)'."""
    from ..intervene.neuron import SITE_TENSORS

    return f"{site} ({SITE_TENSORS[site]})"  # type: ignore[index]


def _note(notes: list[str]) -> None:
    for note in notes:
        err_console.print(f"[yellow]note:[/] {note}")


@app.command("clamp")
def clamp_command(
    model: str = typer.Argument(..., help="Hugging Face id (org/name) or local model folder."),
    neuron: list[str] = typer.Option(
        ..., help="LAYER:INDEX or MATRIX:LAYER:INDEX; repeatable (all are clamped together)."
    ),
    concept: str = typer.Option(..., help="The concept whose next-token probability to measure."),
    matrix: str = typer.Option(
        None, help="Matrix of LAYER:INDEX neurons: up, gate or down (default: up)."
    ),
    values: str = typer.Option(
        None,
        help="Clamp values, e.g. 0,5,10,20 (default: multiples "
        "of the natural max |activation|, both signs).",
    ),
    mode: str = typer.Option("set", help=_MODES),
    positions: str = typer.Option("all", help=_POSITIONS),
    site: str = typer.Option(None, help=_SITES),
    prompts: Path = typer.Option(None, help="Prompts file, one per line (default: a neutral set)."),
    chat: bool = typer.Option(False, help="Wrap prompts in the tokenizer's chat template."),
    variants: str = typer.Option("case", help="Concept tokens: case or plural (see search)."),
    plot: Path = typer.Option(None, help="Write a PNG of probability against clamp value."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16, float16."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Dose-response: the concept's next-token probability with the neurons clamped.

    Example:

        flashlens clamp ./Llama-3.1-8B --neuron up:12:1234 --concept dog --plot dose.png

    Reports the probability of the concept's tokens at the next position, averaged over the
    prompts, unclamped and at each value, with the neurons' natural activation range.
    """
    from ..intervene import Neuron
    from ..intervene.concept import model_concept, variant_ids
    from ..intervene.dose import DEFAULT_MULTIPLES, DEFAULT_SCALES, dose_response, plot_dose
    from ..intervene.hooks import check_neurons
    from ..intervene.loading import check_dtype, load_model
    from ..intervene.prompts import encode, length_note, read_prompts
    from ..progress import progress_bar

    how = _how(mode, positions, site)
    check_dtype(dtype)
    png_path(plot)
    neurons = [Neuron.parse(n, _matrix(matrix)) for n in neuron]
    chosen_values = _floats(values, "--values") if values is not None else None
    texts = read_prompts(prompts)
    lm = load_model(model, device=device, dtype=dtype)
    check_neurons(lm.model, neurons, how[2])  # before the progress bar
    exp = model_concept(concept, lm.folder, lm.d_vocab, _plural(variants))
    batch = encode(lm.tokenizer, texts, lm.device, chat=chat)
    note = length_note(lm.model, batch)
    notes = exp.notes + ([note] if note else [])
    default = DEFAULT_SCALES if mode == "scale" else DEFAULT_MULTIPLES
    n_steps = 1 + len(chosen_values or default)
    with progress_bar(not json_out, n_steps, "clamping") as advance:
        dose = dose_response(
            lm.model,
            batch,
            neurons,
            variant_ids(exp),
            chosen_values,
            *how,
            advance,
        )
    title = f"{', '.join(dose.neurons)} -> P({exp.concept!r})"
    if plot:
        plot_dose(dose, str(plot), title)
    if json_out:
        print_json(
            dose.to_dict()
            | {
                "concept": exp.concept,
                "notes": notes,
                "variants": [v.to_dict() for v in exp.variants],
                "plot": str(plot) if plot else None,
            }
        )
        return
    err_console.print("variants: " + show_variants(exp.variants))
    _note(notes)
    _print_ranges(dose.ranges, dose.sites, dose.n_prompts)
    console.print(
        f"[bold]{title}[/] ({dose.mode}, positions {dose.positions}, site "
        f"{dose.site or 'by matrix'})"
    )
    table = Table(show_edge=False)
    for col in (_X_COLUMNS[dose.mode], "P(concept)", "x baseline"):
        table.add_column(col, justify="right")
    table.add_row("unclamped", f"{dose.baseline:.4g}", "1.00")
    best = dose.best()[0]
    for v, p, x in zip(dose.values, dose.probs, dose.ratios, strict=True):
        style = "bold green" if v == best and x > 1 else None
        table.add_row(f"{v:.4g}", f"{p:.4g}", ratio_text(x), style=style)
    console.print(table)
    if plot:
        err_console.print(f"plot -> {plot}")


def _parse_clamp(spec: str, matrix: str | None) -> tuple[Any, float]:
    from ..intervene import Neuron

    neuron, sep, value = spec.rpartition("=")
    if not sep:
        raise NeuronError(f"bad --clamp {spec!r}: write NEURON=VALUE, e.g. up:12:1234=10")
    parsed = Neuron.parse(neuron, matrix)
    try:
        number = float(value)
    except ValueError:
        raise NeuronError(f"bad --clamp {spec!r}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise NeuronError(f"bad --clamp {spec!r}: {value!r} is not a finite number")
    return parsed, number


@app.command("generate")
def generate_command(
    model: str = typer.Argument(..., help="Hugging Face id (org/name) or local model folder."),
    clamp: list[str] = typer.Option(
        ..., "--clamp", help="NEURON=VALUE, e.g. up:12:1234=10; repeatable."
    ),
    prompt: list[str] = typer.Option(None, help="A prompt; repeatable."),
    prompts: Path = typer.Option(None, help="Prompts file, one per line."),
    chat: bool = typer.Option(False, help="Wrap prompts in the tokenizer's chat template."),
    max_new_tokens: int = typer.Option(40, help="Tokens to generate per continuation."),
    samples: int = typer.Option(1, help="Continuations per prompt (sampled when > 1)."),
    temperature: float = typer.Option(
        None, help="Sampling temperature; 0 is greedy (default: greedy for 1 sample, else 1.0)."
    ),
    seed: int = typer.Option(0, help="Random seed (the same for baseline and clamped)."),
    concept: str = typer.Option(None, help="Report the share of continuations mentioning it."),
    matrix: str = typer.Option(
        None, help="Matrix of LAYER:INDEX neurons: up, gate or down (default: up)."
    ),
    mode: str = typer.Option("set", help=_MODES),
    positions: str = typer.Option("all", help=_POSITIONS),
    site: str = typer.Option(None, help=_SITES),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16, float16."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Steer generation: baseline and clamped continuations side by side.

    Example:

        flashlens generate ./Llama-3.1-8B-Instruct --clamp up:12:1234=10 --prompt "Hi" --chat

    First it prints each clamped neuron's natural activation range on the prompts
    (`ranges` in --json): a value such as =10 reads against it.
    """
    from ..atlas.concepts import ConceptError
    from ..intervene.concept import model_concept, variant_ids
    from ..intervene.generate import check_temperature, steer
    from ..intervene.hooks import check_neurons
    from ..intervene.loading import check_dtype, load_model
    from ..intervene.prompts import read_prompts

    for option, number in (("--max-new-tokens", max_new_tokens), ("--samples", samples)):
        if number < 1:
            raise FlashlensError(f"{option} must be at least 1 (got {number})")
    check_temperature(temperature)  # (before the model loads)
    how = _how(mode, positions, site)
    check_dtype(dtype)
    clamps = [_parse_clamp(c, _matrix(matrix)) for c in clamp]
    texts = list(prompt or []) + (read_prompts(prompts) if prompts else [])
    if not texts:
        raise FlashlensError("no prompt: give --prompt TEXT (repeatable) or --prompts FILE")
    lm = load_model(model, device=device, dtype=dtype)
    check_neurons(lm.model, [n for n, _ in clamps], how[2])  # before the spinner
    ids: list[int] = []
    if concept:
        try:
            ids = variant_ids(model_concept(concept, lm.folder, lm.d_vocab))
        except ConceptError:
            ids = []  # a multi-token concept: counted in the text only
    with err_console.status("generating", spinner="dots") if not json_out else nullcontext():
        result = steer(
            lm.model,
            lm.tokenizer,
            texts,
            [n for n, _ in clamps],
            [v for _, v in clamps],
            *how,
            max_new_tokens=max_new_tokens,
            samples=samples,
            temperature=temperature,
            seed=seed,
            chat=chat,
            concept=concept,
            concept_ids=ids,
        )
    if json_out:
        print_json(result.to_dict())
        return
    _note(result.notes)
    _print_ranges(result.ranges, result.sites, len(texts))
    decoding = "greedy" if result.temperature == 0 else f"temperature {result.temperature:g}"
    at = ", ".join(f"{n} at {_site(s)}" for n, s in result.sites.items())
    console.print(
        f"[bold]clamp[/] {', '.join(result.clamps)} ({result.mode}, positions "
        f"{result.positions}; {at}); {decoding}, seed {result.seed}"
    )
    for r in result.results:
        table = Table(title=repr(r.prompt), show_lines=True, expand=True)
        table.add_column("baseline", ratio=1)
        table.add_column("clamped", ratio=1, style="green")
        for b, c in zip(r.baseline, r.clamped, strict=True):
            table.add_row(b, c)
        console.print(table)
    if result.concept is not None:
        console.print(
            f"continuations mentioning {result.concept!r}: baseline "
            f"{result.baseline_share:.0%}, clamped {result.clamped_share:.0%} "
            f"(of {len(texts) * samples}; whole words, any case)"
        )
    if result.baseline_concept_tokens is not None:
        console.print(
            f"concept tokens per continuation (mean): baseline "
            f"{result.baseline_concept_tokens:.3g}, clamped {result.clamped_concept_tokens:.3g}"
        )


def _print_ranges(ranges: dict[str, Any], sites: dict[str, str], n_prompts: int) -> None:
    """Each neuron's natural activation at its clamp site: what a clamp value is measured by."""
    for name, r in ranges.items():
        where = f"[bold]{name}[/] natural activation at {_site(sites[name])}"
        prompts = f"{n_prompts} prompt{'s' if n_prompts != 1 else ''}"
        if not r.tokens:
            console.print(
                f"{where}: its expert ran on none of the {r.total} tokens of the {prompts} "
                "(a clamp acts only where the router sends a token to the neuron's expert)"
            )
            continue
        ran = (
            f", on the {r.tokens} of {r.total} tokens routed to its expert"
            if (r.tokens < r.total)
            else ""
        )
        mean = "not run there" if r.next_mean is None else f"mean {r.next_mean:.3g}"
        console.print(
            f"{where} on {prompts}{ran}: {r.min:.3g} .. {r.max:.3g} (next-token position {mean})"
        )


@app.command("validate")
def validate_command(
    atlas: Path = typer.Argument(..., help="Atlas folder written by `flashlens map`."),
    concept: str = typer.Argument(..., help="The concept, e.g. dog."),
    model: str = typer.Option(..., help="The model the atlas was mapped from (folder or id)."),
    limit: int = typer.Option(20, help="Validate this many top search hits."),
    neurons: str = typer.Option(None, help="Validate these instead, e.g. 12:1234,up:3:7."),
    matrix: str = typer.Option(
        None, help="Search only this matrix (and the matrix of LAYER:INDEX --neurons; default up)."
    ),
    layers: str = typer.Option(None, help="Search only these layers, e.g. 0-5,9."),
    factor: float = typer.Option(
        2.0, help="Validated when the best clamp multiplies P(concept) by at least this."
    ),
    multiples: str = typer.Option(
        None,
        help="Clamp values: set, add: multiples of each neuron's natural max |activation| "
        "(default -20,-10,-5,-2,0,2,5,10,20); scale: plain factors (default -10,-5,-2,0,2,5,10).",
    ),
    mode: str = typer.Option("set", help=_MODES),
    positions: str = typer.Option("all", help=_POSITIONS),
    prompts: Path = typer.Option(None, help="Prompts file, one per line (default: a neutral set)."),
    variants: str = typer.Option("case", help="Concept tokens: case or plural (see search)."),
    write: bool = typer.Option(True, help="Record the results in ATLAS/validation.parquet."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16, float16."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Which neurons of a concept are causal: clamp each, keep those that raise P(concept).

    Example:

        flashlens validate atlas/llama31-8b dog --model meta-llama/Llama-3.1-8B --limit 20

    Each neuron is clamped alone at --multiples of its natural max |activation| on the prompts
    (with --mode scale, at --multiples as plain factors); it is validated when the best value
    raises the concept's next-token probability (mean over prompts) by at least --factor.
    Results are merged into ATLAS/validation.parquet, which `flashlens search` shows as its
    "validated" column.
    """
    from ..atlas import Atlas, parse_layers
    from ..atlas.validation import check_validation
    from ..intervene import Neuron
    from ..intervene.loading import check_dtype, load_model
    from ..intervene.prompts import read_prompts
    from ..intervene.validate import check_factor, check_model_matches, validate

    mode, positions, _ = _how(mode, positions)
    if limit < 1:
        raise FlashlensError(f"--limit must be at least 1 (got {limit})")
    check_factor(factor)  # (before the model loads)
    check_dtype(dtype)
    _matrix(matrix, "run once per matrix, or leave --matrix out to search all of them")
    at = Atlas.open(atlas)
    if write:
        check_validation(at.root)
    chosen = Neuron.parse_list(neurons, matrix) if neurons is not None else None
    texts = read_prompts(prompts)
    mults = _floats(multiples, "--multiples") if multiples is not None else None
    layer_list = parse_layers(layers, at.meta.n_layers) if layers else None
    check_model_matches(at, model)  # config and weights fingerprint, before the model loads
    lm = load_model(model, device=device, dtype=dtype)
    report = validate(
        at,
        concept,
        lm,
        neurons=chosen,
        limit=limit,
        matrix=matrix,
        layers=layer_list,
        factor=factor,
        prompts=texts,
        multiples=mults,
        mode=mode,  # type: ignore[arg-type]
        positions=positions,  # type: ignore[arg-type]
        plural=_plural(variants),
        write=write,
        progress=not json_out,
    )
    if json_out:
        print_json(report.to_dict())
        return
    err_console.print("variants: " + show_variants(report.variants))
    _note(report.notes)
    value_col = _X_COLUMNS[report.mode]
    unit = "multiplies the activation" if report.unit == "factor" else "in activation units"
    console.print(
        f"[bold]{report.concept!r}[/]: each neuron clamped alone ({report.mode}, positions "
        f"{report.positions}) on {report.n_prompts} prompts; P = P(concept) at the next "
        f"token; the best {value_col} {unit}; P dec: the atlas' decoded probability"
    )
    table = Table(show_edge=False)
    cols = ("neuron", "P dec", "max|act|", value_col, "P before", "P after", "ratio", "ok")
    for col in cols:
        table.add_column(col, justify="left" if col in ("neuron", "ok") else "right", no_wrap=True)
    for r in report.results:
        decoded = "" if r.concept_prob is None else show_prob(r.concept_prob)
        table.add_row(
            str(r.neuron),
            decoded,
            f"{r.absmax:.3g}",
            f"{r.best_value:.3g}",
            f"{r.baseline_prob:.2e}",
            f"{r.clamped_prob:.2e}",
            ratio_text(r.ratio),
            "[green]yes[/]" if r.validated else "no",
        )
    console.print(table)
    where = f" -> {report.path}" if report.path else ""
    console.print(
        f"{report.n_validated} of {len(report.results)} neurons raise "
        f"P({report.concept!r}) by at least {report.factor:g}x{where}"
    )
