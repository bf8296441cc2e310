"""Type checks of user input shared by the library's entry points: a wrong type is a
`FlashlensError` that names the argument, not a TypeError from deep inside."""

from __future__ import annotations

import numbers
import os

from .errors import FlashlensError


def is_integer(value: object) -> bool:
    """An int (or numpy integer), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def require_text(value: object, what: str, example: str) -> str:
    """`value` if it is a string; else a FlashlensError such as "the concept must be text,
    e.g. 'dog', not 5"."""
    if not isinstance(value, str):
        raise FlashlensError(f"the {what} must be text, e.g. {example!r}, not {value!r}")
    return value


def require_path(value: object, what: str) -> str | os.PathLike[str]:
    """`value` if it is a path (a str or a PathLike); else a FlashlensError naming `what`."""
    if not isinstance(value, str | os.PathLike):
        raise FlashlensError(f"the {what} must be a path or a name, not {value!r}")
    return value


def is_hub_id(name: str) -> bool:
    """Whether a model name reads as a Hugging Face id (org/name), not a local path."""
    return not name.startswith((".", "/", "~")) and name.count("/") == 1
