"""Helpers shared by the commands: output, neuron addresses."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

from ..errors import NeuronError

console = Console()
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def parse_neuron(spec: str) -> tuple[int, int]:
    """'12:1234' -> (12, 1234)."""
    try:
        layer, index = (int(p) for p in spec.split(":"))
    except ValueError:
        raise NeuronError(f"bad neuron {spec!r}: write LAYER:INDEX, e.g. 12:1234") from None
    if layer < 0 or index < 0:
        raise NeuronError(f"bad neuron {spec!r}: layer and index are non-negative")
    return layer, index


def show_token(text: str) -> str:
    """A decoded token made visible: quotes, escaped whitespace."""
    return repr(text)
