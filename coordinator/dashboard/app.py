"""The dashboard's HTTP routes: one static page, JSON views under ``/api/``, live updates as SSE, and ``/metrics``.

Every response is built from :mod:`coordinator.admin.views` (names, hashes, counts, reported scalars). No route returns a
tensor, a payload, a key or a token. With a token, it is taken from ``Authorization: Bearer`` or from the HttpOnly,
SameSite=Strict cookie that ``POST /login`` sets; a request carrying ``?token=`` in its URL is refused (400) whatever
the token, because URLs end up in browser history, proxy logs and Referer headers.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from coordinator.admin import views
from coordinator.dashboard import collector
from coordinator.rounds.engine import RoundEngine

KEEPALIVE_S = 15.0
CHECK_S = 2.0


COOKIE = "fedbridge_dashboard"
LOGIN_PAGE = b"""<!doctype html><html><head><meta charset="utf-8"><title>fedbridge dashboard</title></head><body>
<form method="post" action="/login"><label>dashboard token <input type="password" name="token" autofocus
autocomplete="current-password"></label> <button type="submit">sign in</button></form></body></html>"""


def _given_token(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.cookies.get(COOKIE, "")


def _token_ok(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())


def create_app(engine: RoundEngine, token: str = "") -> FastAPI:
    """The dashboard application for ``engine``; with ``token``, every route requires it."""
    app = FastAPI(title="fedbridge dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    static = resources.files("coordinator.dashboard") / "static"

    if token:
        @app.middleware("http")
        async def require_token(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            if "token" in request.query_params:
                return JSONResponse({"error": "the dashboard token is not accepted in the URL; send it as "
                                              "'Authorization: Bearer <token>' or sign in at /login"}, status_code=400)
            # The shipped page code (static/) and the login form are public; the page's API calls carry the cookie.
            path = request.url.path
            if path.startswith("/static/") or path == "/login" or _token_ok(_given_token(request), token):
                return await call_next(request)
            if path == "/" and "text/html" in request.headers.get("accept", ""):
                return Response(status_code=303, headers={"Location": "/login"})
            return JSONResponse({"error": "missing or wrong dashboard token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})

        @app.get("/login")
        async def login_form() -> Response:
            return Response(LOGIN_PAGE, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-store"})

        @app.post("/login")
        async def login(request: Request) -> Response:
            body = (await request.body())[:4096].decode("utf-8", "replace")
            given = (parse_qs(body).get("token") or [""])[0]
            if not _token_ok(given, token):
                return Response(b"wrong dashboard token", status_code=401, media_type="text/plain")
            resp = Response(status_code=303, headers={"Location": "/", "Cache-Control": "no-store"})
            resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https",
                            path="/")
            return resp

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
