"""Helpers shared by the commands: output, neuron addresses, option types in --help."""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from typer.core import TyperOption

from ..atlas.concepts import TokenVariant
from ..atlas.tokens import readable
from ..errors import FlashlensError


def _width(stream: Any) -> int | None:
    """The terminal's width on a terminal (rich measures it); piped or redirected, $COLUMNS or
    160, not rich's 80, so that tables written to a file or a log keep every digit."""
    if stream is None or stream.isatty():
        return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else 160


console = Console(width=_width(sys.stdout))
err_console = Console(stderr=True, width=_width(sys.stderr))


def print_json(data: Any) -> None:
    """`data` as JSON on stdout; NaN and infinities (not JSON) as null."""
    sys.stdout.write(json.dumps(finite(data), indent=2, ensure_ascii=False) + "\n")


def finite(value: Any) -> Any:
    """`value` with every non-finite float in it (NaN, infinities) made None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def png_path(path: Path | None) -> Path | None:
    """A --plot file name checked before any work (every plot is a PNG), its folder made."""
    if path is None:
        return None
    if path.suffix.lower() != ".png":
        raise FlashlensError(f"--plot {path}: give a .png file name, e.g. plot.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def show_variants(variants: Sequence[TokenVariant]) -> str:
    """A concept's token variants on one line; variants that read alike (a byte token and a
    token of the same character) carry the tokenizer's form, e.g. 'H' (<0x48>); a byte token
    reads in its tokenizer form (show_token)."""
    seen = Counter(v.text for v in variants)
    out = []
    for v in variants:
        shown = show_token(v.text, v.token)
        alike = seen[v.text] > 1 and shown != v.token
        out.append(shown + (f" ({v.token})" if alike else ""))
    return ", ".join(out)


def show_prob(p: float) -> str:
    """A probability for a table: 4 decimals, or 3 significant digits below 0.001 (never a
    bare 0.0000 for a small but real probability)."""
    if math.isnan(p):
        return "n/a"  # (a degenerate neuron's NaN distribution)
    return f"{p:.4f}" if p >= 1e-3 or p == 0 else f"{p:.2e}"


def show_token(text: str, token: str | None = None) -> str:
    """A decoded token made visible: quotes, escaped whitespace; a byte token (its text is
    U+FFFD) as the tokenizer writes it, unquoted (e.g. <0xE2>)."""
    shown = readable(text, token)
    return shown if shown != text else repr(text)


_display_type_rich = getattr(TyperOption, "display_type_rich", None)


def _no_flag_type(self: TyperOption, ctx: Any) -> str | None:
    """The type shown after an option in --help: none for a flag, which takes no value (typer's
    rich help writes `--json <bool>`, `--help <bool>`)."""
    assert _display_type_rich is not None
    return None if self.is_flag else _display_type_rich(self, ctx)  # type: ignore[no-any-return]


if _display_type_rich is not None:  # (a typer without it needs no fix, and must still run)
    TyperOption.display_type_rich = _no_flag_type  # type: ignore[method-assign]
