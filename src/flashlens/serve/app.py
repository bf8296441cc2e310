"""The FastAPI app of the viewer: one route per page, each with a JSON twin.

    /                                   atlas overview          (/.json, /index.json)
    /neuron/{matrix}/{layer}/{index}    one neuron              (/neuron/up/2/7.json)
    /token/{token_id}                   reverse index of a token (/token/42.json)
    /search?q=dog                       concept search          (/search.json?q=dog)

A `.json` suffix or `?format=json` gives the twin: the same dict the HTML is rendered from.
Errors are an HTML page (or `{"error": ...}` in the twin) with 400 or 404.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..atlas import Atlas
from ..errors import FlashlensError
from . import pages, views

# HEAD as well as GET: link checkers ask HEAD (the ASGI server sends the headers alone)
PAGE_METHODS = ["GET", "HEAD"]

JSON_FLAG = "flashlens.json"


class JsonSuffix:
    """ASGI middleware: `/path.json` is served by the route of `/path`, flagged as JSON."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith(".json"):
            path = scope["path"][: -len(".json")] or "/"
            path = "/" if path == "/index" else path
            scope = {**scope, "path": path, "raw_path": path.encode(), JSON_FLAG: True}
        await self.app(scope, receive, send)


def wants_json(request: Request) -> bool:
    return bool(request.scope.get(JSON_FLAG)) or request.query_params.get("format") == "json"


def _finite(value: Any) -> Any:
    """NaN and infinities (not JSON) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def json_response(data: Any, status: int = 200) -> Response:
    body = json.dumps(_finite(data), indent=2, ensure_ascii=False) + "\n"
    return Response(body, status_code=status, media_type="application/json")


def make_app(atlas: Atlas) -> FastAPI:
    """The viewer of one opened atlas."""
    app = FastAPI(
        title=f"flashlens: {atlas.meta.model}", docs_url=None, redoc_url=None, openapi_url=None
    )
    app.add_middleware(JsonSuffix)
    model = atlas.meta.model
    lock = threading.Lock()  # the atlas' caches and DuckDB connection are not thread-safe

    def respond(
        request: Request,
        build: Callable[[], dict[str, Any]],
        render: Callable[[dict[str, Any]], str],
    ) -> Response:
        try:
            with lock:
                data = build()
        except views.ViewError as err:
            return error(request, err.status, err.message)
        if wants_json(request):
            return json_response(data)
        return HTMLResponse(render(data))

    def error(request: Request, status: int, message: str) -> Response:
        if wants_json(request):
            return json_response({"error": message, "status": status}, status)
        q = request.query_params.get("q", "") if request.url.path == "/search" else ""
        return HTMLResponse(pages.error_page(status, message, model, q), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = (
                f"no page at {request.url.path}; pages are /, /neuron/MATRIX/LAYER/INDEX, "
                "/token/ID and /search?q=CONCEPT"
            )
        return error(request, exc.status_code, message)

    @app.exception_handler(FlashlensError)
    async def atlas_error(request: Request, exc: FlashlensError) -> Response:
        return error(request, 500, str(exc))  # e.g. a damaged atlas file

    @app.api_route("/", methods=PAGE_METHODS, response_class=HTMLResponse)
    def overview(request: Request) -> Response:
        return respond(request, lambda: views.overview(atlas), pages.overview_page)

    @app.api_route("/neuron/{matrix}/{layer}/{index}", methods=PAGE_METHODS)
    def neuron(request: Request, matrix: str, layer: str, index: str) -> Response:
        return respond(
            request, lambda: views.neuron(atlas, matrix, layer, index), pages.neuron_page
        )

    @app.api_route("/token/{token_id}", methods=PAGE_METHODS)
    def token(request: Request, token_id: str) -> Response:
        return respond(
            request, lambda: views.token(atlas, token_id), lambda d: pages.token_page(d, model)
        )

    @app.api_route("/search", methods=PAGE_METHODS)
    def search(
        request: Request,
        q: str = "",
        matrix: str = "",
        layers: str = "",
        limit: str = "",
        top1: str = "",
        plural: str = "",
    ) -> Response:
        try:
            address = views.neuron_address(q, atlas, matrix)
        except views.ViewError as err:  # "mlp 2:7": an address with no such matrix
            return error(request, err.status, err.message)
        if address is not None:  # "up 2:7" jumps to the neuron
            suffix = ".json" if wants_json(request) else ""
            return RedirectResponse(address + suffix, status_code=303)
        return respond(
            request,
            lambda: views.search(
                atlas,
                q,
                matrix=matrix,
                layers=layers,
                limit=limit,
                top1=_flag(top1),
                plural=_flag(plural),
            ),
            lambda d: pages.search_page(d, model, atlas.meta.matrices),
        )

    @app.api_route("/style.css", methods=PAGE_METHODS)
    def style() -> Response:
        return Response(pages.CSS, media_type="text/css")

    return app


def _flag(value: str) -> bool:
    return value.lower() in ("1", "true", "on", "yes")
