"""`flashlens map` and `flashlens show`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from ..atlas import Atlas
from ..atlas.validation import ValidationRecord, ratio_text
from ..decode.audit import REL_LOGIT, REL_PROB
from ..decode.pilot import PILOT
from ..intervene.neuron import Neuron
from ..mapping import map_model
from . import app
from .common import console, err_console, print_json, show_prob, show_token


@app.command("map")
def map_command(
    model: str = typer.Argument(..., help="Hugging Face id (org/name) or local model folder."),
    out: Path = typer.Option(..., "-o", "--out", help="Atlas folder to write (or resume)."),
    matrices: str = typer.Option(
        "all", help="Matrices to decode: up, gate, down, or all (every one the model has)."
    ),
    layers: str = typer.Option(None, help="Layers, e.g. 0-5,9 (default: all)."),
    top_k: int = typer.Option(10, help="Top and bottom tokens kept per neuron."),
    reverse_n: int = typer.Option(32, help="Neurons kept per token in the reverse index."),
    norm: str = typer.Option("model", help="Final norm: model (RMSNorm), gain, none."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option(
        "auto",
        help="Compute dtype: auto, float32, bfloat16, float16, int8 (CPU). On a CPU without "
        "a fast kernel for it (int8: VNNI, or AVX2/AVX512 through oneDNN; AVX512-BF16/FP16 or "
        "AMX), a low-precision dtype "
        "is refused for big jobs; auto picks the fastest the CPU has.",
    ),
    block: int = typer.Option(None, help="Neurons per block (default: from vocabulary size)."),
    compile: str = typer.Option("auto", help="Fuse reductions with torch.compile: auto/on/off."),
    overwrite: bool = typer.Option(
        False, help="Replace an atlas made with other settings, or a damaged one."
    ),
    audit: int = typer.Option(
        32, help="Neurons decoded again exactly in fp32 to check accuracy (0: skip)."
    ),
    pilot: int = typer.Option(
        PILOT, help="Neurons that check a low-precision GEMM before the map (0: skip)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Decode every MLP neuron through the final norm and LM-head into an atlas.

    Example:

        flashlens map meta-llama/Llama-3.1-8B -o atlas/llama31-8b --layers 0-5,9

        flashlens map ./Qwen3-8B -o atlas/qwen3 --dtype bfloat16 --pilot 256

    Rerunning the same command resumes an interrupted run. Its state is saved
    every 30 s and after the last layer; FLASHLENS_COMMIT_SECONDS sets how often
    (0: after every layer):

        FLASHLENS_COMMIT_SECONDS=0 flashlens map ./Qwen3-8B -o atlas/qwen3

    Before an int8/bf16/fp16 map, --pilot N neurons (default 64) are decoded both
    ways: if the GEMM misses half the tolerances on any, groups of near-identical
    LM-head rows (untrained tokens, say) are computed exactly in every block, or,
    under --dtype auto, the map steps down to a more precise dtype (int8 ->
    bfloat16 -> float32) and checks again. At the end, --audit N neurons
    (default 32) are decoded again exactly in fp32 and compared: the summary says
    how close the atlas is, with a warning when it is outside tolerance.

    FP8 (block-scaled float8), compressed-tensors (FP8, W8A8, W4A16) and MXFP4
    (gpt-oss) checkpoints are read dequantized, as transformers loads them:

        flashlens map deepseek-ai/DeepSeek-V3 -o atlas/dsv3 --matrices up --layers 3
        flashlens map RedHatAI/Meta-Llama-3.1-70B-Instruct-quantized.w4a16 -o atlas/70b
    """
    summary = map_model(
        model,
        out,
        matrices=matrices,
        layers=layers,
        top_k=top_k,
        norm=norm,
        reverse_n=reverse_n,
        device=device,
        dtype=dtype,
        block=block,
        compile=compile,
        overwrite=overwrite,
        progress=not json_out,
        audit=audit,
        pilot=pilot,
    )
    if json_out:
        _print_warnings(summary.warnings)
        print_json(summary.to_dict())
        return
    s = summary
    if s.neurons_mapped == 0:
        err_console.print(f"[green]{out}[/] is already complete ({s.neurons_skipped:,} neurons).")
        _print_warnings(s.warnings)
        return
    resumed = f", {s.neurons_skipped:,} resumed" if s.neurons_skipped else ""
    kernel = f" ({s.int8_kernel})" if s.int8_kernel else ""
    err_console.print(
        f"[green]mapped {s.neurons_mapped:,} neurons[/]{resumed} in {s.seconds:.1f} s "
        f"({s.neurons_per_second:,.0f} neurons/s, {s.device}, {s.compute_dtype}{kernel}) -> {out}"
    )
    if s.quantization:
        err_console.print(f"weights read dequantized from {escape(s.quantization)}")
    if s.pilot is not None:
        _print_pilot(s.pilot)
    if s.audit is not None:
        _print_audit(s.audit)
    _print_warnings(s.warnings)


def _print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}")


def _print_pilot(p: dict[str, Any]) -> None:
    """One line per pilot on what it found and decided; a warning when it could not fix it."""
    first = (
        f"precision pilot: {p['over']} of {p['sample']} neurons outside half the tolerances "
        f"with the plain {p['dtype']} GEMM (worst probability {100 * p['max_rel_prob']:.2g}% off)"
    )
    fixed = ""
    if p["exact_tokens"]:
        fixed = (
            f"; with {p['exact_tokens']} near-identical LM-head rows computed exactly, "
            f"{p['check_over']} of a fresh {p['sample']} (worst "
            f"{100 * p['check_max_rel_prob']:.2g}%)"
        )
    if p["decision"] == "gemm":
        err_console.print(
            f"precision pilot: {p['sample']} neurons within half the tolerances with the "
            f"{p['dtype']} GEMM (worst probability {100 * p['max_rel_prob']:.2g}% off)"
        )
    elif p["decision"] == "exact tokens":
        err_console.print(f"{first}{fixed}: mapped so")
    elif p["decision"] != "kept":
        err_console.print(f"{first}{fixed}: stepping down to {p['decision']}")
        if p.get("then") is not None:
            _print_pilot(p["then"])
    else:
        err_console.print(
            f"[yellow]warning:[/] {first}{fixed}. Kept the --dtype asked for: remap with "
            "--dtype auto or float32 --overwrite for results within tolerance."
        )


def _print_audit(a: dict[str, Any]) -> None:
    """One line on the audit; a warning, with the way out, when it is outside tolerance."""
    checked = f"{a['sample']} neurons checked against an exact fp32 decode"
    tolerances = f"tolerances {100 * REL_PROB:g}%, {REL_LOGIT:g}"
    worst = (
        f"probabilities within {100 * a['max_rel_prob']:.2g}%, "
        f"logits within {a['max_rel_logit']:.2g} relative"
    )
    if a["ok"]:
        err_console.print(f"accuracy audit: {checked}: {worst} ({tolerances})")
        return
    err_console.print(
        f"[yellow]warning:[/] accuracy audit: {a['over_tolerance']} of {checked} are outside "
        f"the tolerances ({worst}; {tolerances}, same top-1). The {a['compute_dtype']} "
        "GEMM is not accurate enough for this model's head: remap with --dtype float32 "
        "--overwrite for exact results."
    )


@app.command("show")
def show_command(
    atlas: Path = typer.Argument(..., help="Atlas folder written by `flashlens map`."),
    neuron: str = typer.Argument(
        ..., help="LAYER:INDEX (matrix from --matrix) or MATRIX:LAYER:INDEX, e.g. up:12:1234."
    ),
    matrix: str = typer.Option(None, help="up, gate or down (default: up)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show what one neuron means: its top and bottom tokens with probabilities.

    When `flashlens validate` has clamped it, what each check found follows (concept, whether
    the best clamp raised P(concept) by the factor asked, the probabilities, the model).

    Example:

        flashlens show atlas/llama31-8b 12:1234 --matrix up
    """
    n = Neuron.parse(neuron, matrix)
    layer, index, matrix = n.layer, n.index, n.matrix
    at = Atlas.open(atlas)
    rec = at.neuron(layer, index, matrix)
    checks = at.validations(layer, index, matrix)
    expert = at.expert_of(layer, index)  # (expert, unit) in a mixture of experts
    if json_out:
        where = {} if expert is None else {"expert": expert[0], "unit": expert[1]}
        print_json(rec.to_dict() | where | {"validations": [c.to_dict() for c in checks]})
        return
    of = "" if expert is None else f" ({_expert_name(expert[0])}, unit {expert[1]})"
    console.print(
        f"[bold]{matrix} {layer}:{index}[/]{of}  entropy {_num(rec.entropy)} nats  "
        f"logsumexp {_num(rec.logsumexp)}  |w| {_num(rec.w_norm, 3)}  "
        f"skew {_num(rec.logit_skew)}  kurtosis {_num(rec.logit_kurtosis)}"
    )
    if rec.degenerate:
        err_console.print(
            "[yellow]note:[/] this neuron's weight vector is all zero or not finite: its "
            "tokens are meaningless"
        )
    table = Table(show_edge=False)
    for col in ("#", "top token", "prob", "logit", "bottom token", "logit "):
        table.add_column(col, justify="right" if col[0] in "#pl" else "left")
    for i, (t, b) in enumerate(zip(rec.top, rec.bottom, strict=True), 1):
        table.add_row(
            str(i),
            show_token(t.text, t.token),
            show_prob(t.prob),
            _num(t.logit),
            show_token(b.text, b.token),
            _num(b.logit),
        )
    console.print(table)
    if checks:
        console.print(_validation_table(checks))


def _validation_table(checks: list[ValidationRecord]) -> Table:
    """What `flashlens validate` recorded for the neuron: one row per concept and model."""
    table = Table(title="causal checks (flashlens validate)", show_edge=False)
    for col in ("concept", "ok", "ratio", "P before", "P after", "best clamp", "model"):
        table.add_column(col, justify="right" if col[0] in "rP" else "left", no_wrap=True)
    for c in checks:
        asked = "" if c.factor is None else f" (>= {c.factor:g}x)"
        clamp = f"{c.mode or '?'} {c.best_value:.3g}"
        table.add_row(
            escape(c.concept),
            ("[green]yes[/]" if c.validated else "no") + asked,
            ratio_text(c.ratio),
            f"{c.baseline_prob:.2e}",
            f"{c.clamped_prob:.2e}",
            clamp,
            escape(c.model),
        )
    return table


def _num(x: float, digits: int = 2) -> str:
    """A figure for `show`: n/a when undefined (NaN: a constant or damaged neuron)."""
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def _expert_name(expert: int | str) -> str:
    return "shared expert" if expert == "shared" else f"expert {expert}"
