"""Helpers shared by the commands: output, neuron addresses."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

from rich.console import Console

from ..atlas.concepts import TokenVariant
from ..atlas.tokens import readable


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
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def show_variants(variants: Sequence[TokenVariant]) -> str:
    """A concept's token variants on one line; variants that read alike (a byte token and a
    token of the same character) carry the tokenizer's form, e.g. 'H' (<0x48>)."""
    seen = Counter(v.text for v in variants)
    return ", ".join(
        show_token(v.text) + (f" ({v.token})" if seen[v.text] > 1 else "") for v in variants
    )


def show_token(text: str, token: str | None = None) -> str:
    """A decoded token made visible: quotes, escaped whitespace; a byte token (its text is
    U+FFFD) as the tokenizer writes it, unquoted (e.g. <0xE2>)."""
    shown = readable(text, token)
    return shown if shown != text else repr(text)
