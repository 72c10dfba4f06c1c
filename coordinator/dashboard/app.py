"""The dashboard's HTTP routes: one static page, JSON views under ``/api/``, live updates as SSE, and ``/metrics``.

Every response is built from :mod:`coordinator.admin.views` (names, hashes, counts, reported scalars). No route returns a
tensor, a payload, a key or a token, and the access log is off, so a token passed as ``?token=`` is never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from coordinator.admin import views
from coordinator.dashboard import collector
from coordinator.rounds.engine import RoundEngine

KEEPALIVE_S = 15.0
CHECK_S = 2.0


def _token_ok(request: Request, token: str) -> bool:
    given = request.query_params.get("token", "")
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return hmac.compare_digest(given.encode(), token.encode())


def create_app(engine: RoundEngine, token: str = "") -> FastAPI:
    """The dashboard application for ``engine``; with ``token``, every route requires it."""
    app = FastAPI(title="fedbridge dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    static = resources.files("coordinator.dashboard") / "static"

    if token:
        @app.middleware("http")
        async def require_token(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            # The shipped page code (static/) is public; the page passes its ?token= on to every API call.
            if not request.url.path.startswith("/static/") and not _token_ok(request, token):
                return JSONResponse({"error": "missing or wrong dashboard token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            return await call_next(request)

    @app.get("/")
    async def index() -> Response:
        return Response((static / "index.html").read_bytes(), media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    routes: dict[str, Callable[[RoundEngine], Any]] = {
        "status": views.status, "sites": views.sites, "rounds": views.rounds, "train_loss": views.train_losses,
        "evaluations": views.evaluations, "releases": views.releases, "snapshot": views.snapshot}
    for name, view in routes.items():
        app.add_api_route(f"/api/{name}", _json_route(engine, view), methods=["GET"], name=name)

    @app.get("/api/events")
    async def events(request: Request) -> StreamingResponse:
        return StreamingResponse(_sse(engine, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(collector.render(engine), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _json_route(engine: RoundEngine, view: Callable[[RoundEngine], Any]) -> Callable[[], Awaitable[JSONResponse]]:
    async def route() -> JSONResponse:
        return JSONResponse(view(engine), headers={"Cache-Control": "no-store"})

    return route


async def _sse(engine: RoundEngine, request: Request) -> AsyncIterator[str]:
    """A ``snapshot`` event whenever the federation's state changes (checked at least every CHECK_S seconds)."""
    last, quiet = "", 0.0
    loop = asyncio.get_running_loop()
    while not await request.is_disconnected():
        doc = json.dumps(views.snapshot(engine), separators=(",", ":"))
        if doc != last:
            last, quiet = doc, loop.time()
            yield f"event: snapshot\ndata: {doc}\n\n"
        elif loop.time() - quiet > KEEPALIVE_S:
            quiet = loop.time()
            yield ": keepalive\n\n"
        await engine.changed(CHECK_S)
