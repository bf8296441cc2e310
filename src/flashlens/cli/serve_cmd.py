"""`flashlens serve`: the local web viewer of an atlas."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import typer

from ..atlas import Atlas
from ..errors import FlashlensError
from . import app

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command("serve")
def serve_command(
    atlas: Path = typer.Argument(..., help="Atlas folder written by `flashlens map`."),
    host: str = typer.Option("127.0.0.1", help="Address to serve on (default: this machine only)."),
    port: int = typer.Option(8765, help="Port to listen on (0: any free port)."),
    get: str = typer.Option(
        None, "--get", help="Print the response to one path (e.g. /neuron/up/2/7.json) and exit."
    ),
) -> None:
    """Browse an atlas in a web browser: overview, neurons, tokens, concept search.

    Example:

        flashlens serve atlas/llama31-8b --port 8765
        flashlens serve atlas/llama31-8b --get /neuron/up/12/1234.json

    Every page has a JSON twin: add .json to its path (or ?format=json).
    """
    try:
        from ..serve import bind, make_app, run, url
        from ..serve import get as get_path
    except ImportError as err:
        raise FlashlensError(
            f"flashlens serve needs the web extra ({err.name} is missing): "
            "pip install 'flashlens[serve]'"
        ) from None
    viewer = make_app(Atlas.open(atlas))
    if get is not None:
        reply = get_path(viewer, get)
        sys.stdout.write(reply.body.decode("utf-8"))
        if reply.status >= 400:
            raise typer.Exit(1)
        return
    if not 0 <= port <= 65535:
        raise FlashlensError(f"--port {port} is out of range: use 1-65535 (or 0 for any free port)")
    sock = bind(host, port)
    if host not in LOOPBACK:
        click.secho(
            f"warning: serving on {host}: anyone who can reach this machine can read the atlas",
            fg="yellow",
            err=True,
        )
    announce = f"flashlens: serving {atlas} at {url(sock)} (Ctrl-C to stop)"
    run(viewer, sock, ready=lambda: click.echo(announce, err=True))
    click.echo("flashlens: stopped", err=True)
