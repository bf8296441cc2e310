"""The `flashlens` command line: a thin layer over the library.

Each command lives in its own module and registers itself on `app`. `main()` turns user
mistakes (FlashlensError) into one line on stderr and a non-zero exit, with no traceback.
"""

from __future__ import annotations

import sys

import typer

from ..errors import FlashlensError

app = typer.Typer(
    name="flashlens",
    help="Explain every MLP neuron of a language model through its own LM-head.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)

# Command modules register on `app` when imported.
from . import compare_cmd as _compare_cmd  # noqa: E402,F401
from . import intervene_cmd as _intervene_cmd  # noqa: E402,F401
from . import map_cmd as _map_cmd  # noqa: E402,F401
from . import search_cmd as _search_cmd  # noqa: E402,F401
from . import serve_cmd as _serve_cmd  # noqa: E402,F401


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, 2 user error, 130 interrupted)."""
    try:
        app(args=argv, prog_name="flashlens")  # standalone: usage errors print themselves
    except FlashlensError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        return 2
    except KeyboardInterrupt:
        return _interrupted()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        return _interrupted() if code == 130 else code  # typer turns Ctrl-C into exit 130
    return 0


def _interrupted() -> int:
    typer.echo("interrupted; rerun the same command to resume", err=True)
    return 130


def run() -> None:  # console-script entry point
    sys.exit(main())
