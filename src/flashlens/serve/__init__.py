"""The local web viewer of an atlas (`flashlens serve`): one page per view, each with a JSON
twin (`.json` suffix or `?format=json`). Needs the `serve` extra (fastapi, uvicorn)."""

from .app import make_app
from .server import Reply, ServeError, bind, get, run, url

__all__ = ["Reply", "ServeError", "bind", "get", "make_app", "run", "url"]
