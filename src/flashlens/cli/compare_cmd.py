"""`flashlens compare`: two models neuron by neuron."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, cast

import typer
from rich.markup import escape
from rich.table import Table

from ..comparison import Comparison, Distance, Figures, compare
from ..comparison.result import percent
from ..errors import FlashlensError
from . import app
from .common import console, err_console, png_path, print_json, show_prob, show_token


@app.command("compare")
def compare_command(
    a: str = typer.Argument(..., help="Model A: atlas folder, model folder or Hugging Face id."),
    b: str = typer.Argument(..., help="Model B: atlas folder, model folder or Hugging Face id."),
    out: Path = typer.Option(
        None, "-o", "--out", help="Folder for the atlases of models given as A/B (DIR/<name>)."
    ),
    matrix: str = typer.Option(None, "--matrix", help="Matrices to compare, e.g. up or up,down."),
    layers: str = typer.Option(None, help="Layers to compare, e.g. 0-5,9 (default: all common)."),
    top_k: int = typer.Option(
        None,
        help="Top-k when mapping models (default: the other atlas', else 10); with two "
        "atlases, compare the first K of their stored lists.",
    ),
    norm: str = typer.Option(None, help="Final norm when mapping models: model, gain, none."),
    distance: str = typer.Option(
        "auto",
        help="exact (read both models' weights), atlas (top-k "
        "bounds only), auto (exact when both models are local).",
    ),
    changed: bool = typer.Option(False, "--changed", help="List the neurons that changed most."),
    unchanged: bool = typer.Option(
        False, "--unchanged", help="List the neurons that changed least."
    ),
    limit: int = typer.Option(20, help="Neurons listed by --changed/--unchanged (0: all)."),
    plot: Path = typer.Option(None, "--plot", help="Write agreement by layer to this PNG."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    csv_out: bool = typer.Option(
        False, "--csv", help="Print CSV (figures by layer, or the listed neurons)."
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N (mapping, exact distance)."),
    dtype: str = typer.Option("auto", help="Compute dtype when mapping models."),
    block: int = typer.Option(None, help="Neurons per block when mapping models."),
    compile: str = typer.Option("auto", help="torch.compile when mapping models: auto/on/off."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an atlas in -o made with other settings."
    ),
) -> None:
    """Compare two models of the same shape neuron by neuron.

    Per matrix, per layer and overall: the share of neurons whose top-1 token is the same, the
    mean Jaccard overlap of their top-k tokens, and a distance between the two decoded
    distributions: the exact Jensen-Shannon divergence (bits) when both models' weights are on
    this machine, else bounds on the total-variation distance from the atlases alone.

    Example:

        flashlens compare atlas/llama31-8b atlas/llama31-8b-instruct --plot agreement.png
        flashlens compare meta-llama/Llama-3.1-8B meta-llama/Llama-3.1-8B-Instruct -o atlases/
        flashlens compare A B --changed --limit 50 --json
    """
    if changed and unchanged:
        raise FlashlensError("pass --changed or --unchanged, not both")
    if json_out and csv_out:
        raise FlashlensError("pass --json or --csv, not both")
    if limit < 0:
        raise FlashlensError("--limit must be 0 (all) or more")
    png_path(plot)
    quiet = json_out or csv_out
    result = compare(
        a,
        b,
        out=out,
        matrices=matrix,
        layers=layers,
        top_k=top_k,
        norm=norm,
        distance=cast(Distance, distance),  # compare() checks the value
        device=device,
        dtype=dtype,
        compile=compile,
        block=block,
        overwrite=overwrite,
        progress=not quiet,
    )
    neurons = None
    if changed or unchanged:
        rank = result.changed if changed else result.unchanged
        neurons = rank(limit or None)
    if plot is not None:
        from ..comparison.plot import plot_agreement

        plot_agreement(result, plot)
    if json_out:
        print_json(result.to_dict(neurons))
    elif csv_out:
        sys.stdout.write(
            result.neurons_csv(neurons) if neurons is not None else result.layers_csv()
        )
    else:
        _print(result, neurons, "changed most" if changed else "changed least")
    if plot is not None and not quiet:
        err_console.print(f"agreement plot -> [green]{plot}[/]")


def _print(result: Comparison, neurons: list[dict[str, Any]] | None, title: str) -> None:
    console.print(f"[bold]A[/] {result.atlas_a}  ({result.model_a})")
    console.print(f"[bold]B[/] {result.atlas_b}  ({result.model_b})")
    dist = (
        "JSD: exact Jensen-Shannon divergence, bits (from both models' weights)"
        if result.exact
        else "TV: total-variation bounds [lo, hi] from the atlases' top-k "
        "lists (no weights: the exact distance needs both models)"
    )
    console.print(f"distance  {escape(dist)}")
    for note in result.notes:
        err_console.print(f"[yellow]note[/] {note}")
    if neurons is not None:
        _print_neurons(result, neurons, title)
        return
    table = Table(show_edge=False)
    for col in (
        "matrix",
        "layer",
        "neurons",
        "same top-1",
        f"top-{result.top_k} Jaccard",
        "JSD" if result.exact else escape("TV [lo, hi]"),
    ):
        table.add_column(col, justify="left" if col == "matrix" else "right")
    for m in result.matrices:
        for layer in result.layers:
            table.add_row(m, str(layer), *_cells(result, result.figures(m, layer)))
        table.add_row(
            f"[bold]{m}[/]", "[bold]all[/]", *_cells(result, result.figures(m)), end_section=True
        )
    table.add_row("[bold]all[/]", "", *_cells(result, result.figures()))
    console.print(table)


def _cells(result: Comparison, f: Figures) -> list[str]:
    dist = show_prob(f.jsd) if f.jsd is not None else escape(f"[{f.tv_lo:.3f}, {f.tv_hi:.3f}]")
    return [f"{f.neurons:,}", percent(f.same_top1), f"{f.jaccard:.3f}", dist]


def _print_neurons(result: Comparison, neurons: list[dict[str, Any]], title: str) -> None:
    table = Table(title=f"neurons that {title}", show_edge=False)
    for col in (
        "neuron",
        "JSD" if result.exact else "TV ≥",
        "Jaccard",
        "top tokens in A",
        "top tokens in B",
    ):
        table.add_column(col, justify="left" if col.startswith(("neuron", "top")) else "right")
    for n in neurons:
        d = n["jsd"] if result.exact else n["tv_lo"]
        table.add_row(
            f"{n['matrix']} {n['layer']}:{n['index']}",
            show_prob(d),
            f"{n['jaccard']:.2f}",
            _tops(n["top_a"]),
            _tops(n["top_b"]),
        )
    console.print(table)


def _tops(tokens: list[dict[str, Any]], n: int = 4) -> str:
    return escape(
        " ".join(f"{show_token(t['text'], t['token'])} {t['prob']:.2f}" for t in tokens[:n])
    )
