"""Helpers shared by the commands: output, neuron addresses."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console


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


def show_token(text: str) -> str:
    """A decoded token made visible: quotes, escaped whitespace."""
    return repr(text)
