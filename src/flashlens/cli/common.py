"""Helpers shared by the commands: output, neuron addresses."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def show_token(text: str) -> str:
    """A decoded token made visible: quotes, escaped whitespace."""
    return repr(text)
