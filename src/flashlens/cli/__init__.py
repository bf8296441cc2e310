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
    epilog=(
        "Example: flashlens map meta-llama/Llama-3.1-8B -o atlas/llama31-8b, then "
        "flashlens search atlas/llama31-8b dog. Each command's --help has its own examples."
    ),
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
    args = sys.argv[1:] if argv is None else argv
    try:
        app(args=args, prog_name="flashlens")  # standalone: usage errors print themselves
    except FlashlensError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        return 2
    except OSError as err:  # a path the user gave that cannot be read or written, a full disk
        typer.secho(f"error: {_os_error(err)}", fg="red", err=True)
        return 2
    except KeyboardInterrupt:
        return _interrupted(args)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        return _interrupted(args) if code == 130 else code  # typer turns Ctrl-C into exit 130
    return 0


RESUMABLE = ("map", "compare")  # commands whose rerun resumes (compare maps its models)


def _interrupted(args: list[str]) -> int:
    command = next((a for a in args if not a.startswith("-")), "")
    resume = "; rerun the same command to resume" if command in RESUMABLE else ""
    typer.echo(f"interrupted{resume}", err=True)
    return 130


def _os_error(err: OSError) -> str:
    """One line for an OSError: what failed, on which path, and the system's reason."""
    reason = err.strerror or str(err)
    if err.filename is None:
        return reason
    return f"{reason}: {err.filename} (check the path and its permissions, and free space)"


def run() -> None:  # console-script entry point
    sys.exit(main())
