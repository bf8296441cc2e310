"""`flashlens search`, `flashlens stats` and `flashlens prob`."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import typer
from rich.table import Table

from ..atlas import Atlas
from ..atlas.stats import KINDS, thresholds
from ..errors import FlashlensError
from ..intervene.neuron import Neuron
from . import app
from .common import (
    console,
    err_console,
    png_path,
    print_json,
    show_prob,
    show_token,
    show_variants,
)

KIND_COLUMNS = {"punctuation": "punct", "whitespace": "space", "degenerate": "degen"}
LAYERS_HELP = "Only these layers, e.g. 0-5,9 (a range: the atlas's layers in it; default: all)."


@app.command("search")
def search_command(
    atlas: Path = typer.Argument(..., help="Atlas folder written by `flashlens map`."),
    concept: str = typer.Argument(..., help='A word or phrase, e.g. dog or "New York".'),
    matrix: str = typer.Option(None, help="Only this matrix: up, gate or down (default: all)."),
    layers: str = typer.Option(None, help=LAYERS_HELP),
    limit: int = typer.Option(20, help="Neurons to show."),
    top1: bool = typer.Option(False, "--top-1", help="Only neurons whose top token is a variant."),
    variants: str = typer.Option(
        "case", help="case (space/lower/Title/UPPER) or plural (also plural forms)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    csv_out: bool = typer.Option(False, "--csv", help="Print the hits as CSV."),
) -> None:
    """Find the neurons of a concept: ranked by the probability they give its tokens.

    Example:

        flashlens search atlas/llama31-8b dog --matrix up --top-1

    The concept expands to its token variants (" dog", "dog", " Dog", ...; --variants plural
    adds " dogs", ...). A neuron's concept probability sums what it gives those tokens.
    """
    if variants not in ("case", "plural"):
        raise FlashlensError(f"unknown --variants {variants!r}: choose case or plural")
    if json_out and csv_out:
        raise FlashlensError("pass --json or --csv, not both")
    at = Atlas.open(atlas)
    res = at.search(
        concept,
        matrix=matrix,
        layers=layers,
        limit=limit,
        top1=top1,
        plural=variants == "plural",
    )
    validated = (
        any(h.validated is not None for h in res.hits) or (at.root / "validation.parquet").is_file()
    )
    if json_out:
        print_json(res.to_dict())
        return
    err_console.print("variants: " + show_variants(res.variants))
    for note in res.notes:
        err_console.print(f"[yellow]note:[/] {note}")
    if csv_out:
        out = csv.writer(sys.stdout, lineterminator="\n")
        cols = [
            "layer",
            "matrix",
            "index",
            "concept_prob",
            "lower_bound",
            "concept_rank",
            "top_tokens",
        ]
        out.writerow(cols + (["validated"] if validated else []))
        for h in res.hits:
            cells = [
                h.layer,
                h.matrix,
                h.index,
                f"{h.concept_prob:.6g}",
                _yes(h.lower_bound),
                "" if h.concept_rank is None else h.concept_rank,
                json.dumps(h.top_tokens, ensure_ascii=False),
            ]
            out.writerow(cells + ([_yes(h.validated)] if validated else []))
        return
    if not res.hits:
        return
    table = Table(show_edge=False)
    for col in ("#", "neuron", "matrix", "concept prob", "rank", "top tokens"):
        table.add_column(col, justify="right" if col in ("#", "concept prob", "rank") else "left")
    if validated:
        table.add_column("validated")
    for i, h in enumerate(res.hits, 1):
        row: list[str] = [
            str(i),
            f"{h.layer}:{h.index}",
            h.matrix,
            (">=" if h.lower_bound else "") + show_prob(h.concept_prob),
            "-" if h.concept_rank is None else str(h.concept_rank),
            " ".join(show_token(at.texts[i], at.tokens[i]) for i in h.top_token_ids),
        ]
        table.add_row(*row, *([_yes(h.validated)] if validated else []))
    console.print(table)


def _yes(v: bool | None) -> str:
    return "" if v is None else ("yes" if v else "no")


@app.command("stats")
def stats_command(
    atlas: Path = typer.Argument(..., help="Atlas folder written by `flashlens map`."),
    matrix: str = typer.Option(None, help="Only this matrix: up, gate or down (default: all)."),
    layers: str = typer.Option(None, help=LAYERS_HELP),
    plot: Path = typer.Option(None, help="Write a PNG plot to this file."),
    kurtosis: float = typer.Option(10.0, help="Prediction/suppression: excess kurtosis above."),
    skew: float = typer.Option(1.0, help="Prediction: skew above; suppression: below minus it."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """The whole model per layer: top-1 probability, entropy, top-token kinds, and the
    prediction/suppression neurons of Gurnee et al. 2024.

    Example:

        flashlens stats atlas/llama31-8b --plot stats.png
    """
    thresholds(kurtosis, skew)
    png_path(plot)
    at = Atlas.open(atlas)
    st = at.stats(matrix=matrix, layers=layers, kurtosis=kurtosis, skew=skew)
    if plot is not None:
        from ..atlas.stats import plot_stats

        plot_stats(st, str(plot))
        err_console.print(f"plot written to [green]{plot}[/]")
    if json_out:
        print_json(st.to_dict())
        return
    for note in st.notes:
        err_console.print(f"[yellow]note:[/] {note}")
    title = f"{at.meta.model}: per layer (top-1 prob, entropy in nats: p10 median p90)"
    table = Table(show_edge=False, title=title)
    kinds = [KIND_COLUMNS.get(k, k) for k in KINDS]  # every kind: a row's kinds sum to its neurons
    for col in ("matrix", "layer", "neurons", "top-1 prob", "entropy", *kinds, "pred", "supp"):
        # (a narrow terminal wraps the p10 median p90 triples rather than cut their digits)
        table.add_column(col, justify="left" if col == "matrix" else "right", overflow="fold")
    for r in st.rows:
        p, e = r.top1_prob_q, r.entropy_q
        table.add_row(
            r.matrix,
            str(r.layer),
            f"{r.neurons:,}",
            " ".join(_number(x) for x in p[::2]),
            " ".join(_number(x) for x in e[::2]),
            *(f"{r.kinds[k]:,}" for k in KINDS),
            f"{r.prediction:,}",
            f"{r.suppression:,}",
        )
    console.print(table)
    console.print(
        f"pred(iction): excess kurtosis > {st.kurtosis:g} and skew > {st.skew:g}; "
        f"supp(ression): excess kurtosis > {st.kurtosis:g} and skew < -{st.skew:g}"
    )
    skipped = sum(r.skipped for r in st.rows)
    if skipped:
        console.print(
            f"{skipped:,} {'neuron is' if skipped == 1 else 'neurons are'} left out of the "
            "quantiles and pred/supp: degen(erate), an all-zero or non-finite weight vector"
        )


def _number(x: float) -> str:
    """A quantile of the stats table; n/a when every neuron of the row was skipped."""
    return f"{x:.2f}" if math.isfinite(x) else "n/a"


@app.command("prob")
def prob_command(
    atlas: Path = typer.Argument(..., help="Atlas folder written by `flashlens map`."),
    neuron: str = typer.Argument(
        ..., help="LAYER:INDEX (matrix from --matrix) or MATRIX:LAYER:INDEX, e.g. up:12:1234."
    ),
    token: str = typer.Argument(None, help='The token\'s text, e.g. " puppy" (one token).'),
    token_id: int = typer.Option(None, "--token-id", help="The token by vocabulary id instead."),
    matrix: str = typer.Option(None, help="up, gate or down (default: up)."),
    model: str = typer.Option(None, help="Model (id or folder) for the exact value of any token."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """The probability one neuron gives one token.

    Example:

        flashlens prob atlas/llama31-8b 12:1234 " puppy" --model meta-llama/Llama-3.1-8B

    With --model it is exact for any token (one dot product with the token's LM-head row and
    the stored logsumexp); without, the atlas answers when it stores the token for the neuron.
    """
    if token is None and token_id is None:
        raise FlashlensError('give the token\'s text (e.g. " puppy") or --token-id N')
    n = Neuron.parse(neuron, matrix)
    r = Atlas.open(atlas).prob(
        n.layer, n.index, token, matrix=n.matrix, token_id=token_id, model=model
    )
    if json_out:
        print_json(r.to_dict())
        return
    rank = f", rank {r.rank} in its top-k" if r.rank else ""
    shown = show_token(r.text, r.token)
    console.print(
        f"{n.matrix} {n.layer}:{n.index}  p({shown}) = [bold]{r.prob:.6g}[/]  "
        f"(logit {r.logit:.4f}, logsumexp {r.logsumexp:.4f}{rank}; from the "
        f"{r.source})"
    )
