"""Running the viewer: bind a socket, serve it with uvicorn, or answer one request in-process."""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from ..errors import FlashlensError


class ServeError(FlashlensError):
    """The viewer can not start (port in use, bad host) or was asked for a bad path."""


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: bytes


def get(app: Any, path: str) -> Reply:
    """Answer one GET request for `path` (with its query string) without a server."""
    if not path.startswith("/"):
        raise ServeError(
            f"--get needs a path that starts with /, e.g. /neuron/up/2/7.json (got {path!r})"
        )
    route, _, query = path.partition("?")
    # As a browser sends them: the query percent-encoded (raw UTF-8 would be read as latin-1),
    # the path both as sent (raw_path) and decoded (path), as ASGI servers give it.
    query = quote(query, safe="=&+%/:,;@!$'()*?")
    raw = quote(route, safe="/%:@!$&'()*+,;=")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": unquote(raw),
        "raw_path": raw.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"localhost")],
        "client": ("127.0.0.1", 0),
        "server": ("localhost", 80),
    }
    status, headers, chunks = 500, [], []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], message.get("headers", [])
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    asyncio.run(app(scope, receive, send))
    content_type = next((v.decode() for k, v in headers if k.lower() == b"content-type"), "")
    location = next((v.decode() for k, v in headers if k.lower() == b"location"), None)
    if location and 300 <= status < 400:  # a neuron address in /search: follow it
        return get(app, location)
    return Reply(status, content_type, b"".join(chunks))


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), or a one-line error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ServeError(
            f"can not serve on host {host!r} ({err.strerror}); use e.g. --host 127.0.0.1"
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ServeError(
                f"port {port} on {host} is in use; pick another with --port "
                "(or --port 0 for any free port)"
            ) from None
        raise ServeError(f"can not listen on {host}:{port} ({err.strerror})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/"


def run(app: Any, sock: socket.socket, ready: Callable[[], None] = lambda: None) -> None:
    """Serve `app` on the bound socket until Ctrl-C (or SIGTERM); then return. `ready` runs
    once either signal stops it cleanly (e.g. to print the address)."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False)
    # uvicorn shuts down cleanly on SIGINT and SIGTERM, then raises the signal again with the
    # handler found before it: for SIGTERM, Python's default would kill the process (143).
    # Both end as a KeyboardInterrupt here instead, the normal way to stop a viewer.
    main = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        ready()
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        if main:
            signal.signal(signal.SIGTERM, before)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
