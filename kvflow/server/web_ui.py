"""The web chat (/) and the engine dashboard (/dashboard): hand-written pages, ES modules
and CSS shipped in kvflow/server/web, served from memory with no build step and nothing
fetched from elsewhere. `--disable-web-ui` leaves all of it out.

The pages and their files are open even with --api-key (a browser cannot send a key when
it navigates; they hold nothing secret): the pages ask for the key and send it on the API
calls they make. The dashboard's figures (/dashboard/stats) are a monitoring path.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

WEB_DIR = Path(__file__).parent / "web"
ASSET_PREFIX = "/ui/"
PAGES = {"/": "chat.html", "/dashboard": "dashboard.html"}
STATS_PATH = "/dashboard/stats"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# Model output is shown on these pages: no script but the pages' own files may run, even if
# some text were ever parsed as HTML, and nothing may be loaded from or sent to elsewhere.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "img-src 'self'; connect-src 'self'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "Cross-Origin-Opener-Policy": "same-origin",
                    # Files change with the package: the browser asks again each load.
                    "Cache-Control": "no-cache"}


WebFiles = dict[str, tuple[bytes, str]]  # file name: its bytes and content type


def load_web_files() -> WebFiles:
    """Every servable file of WEB_DIR, read once at start-up."""
    return {path.name: (path.read_bytes(), CONTENT_TYPES[path.suffix])
            for path in sorted(WEB_DIR.iterdir()) if path.suffix in CONTENT_TYPES}


def _route_paths(files: WebFiles) -> dict[str, str]:
    """URL path: file name, for the pages and their files."""
    return {**PAGES, **{ASSET_PREFIX + name: name for name in files
                        if name not in PAGES.values()}}


def public_paths(files: WebFiles) -> tuple[str, ...]:
    """The paths that serve the pages and their files, open without a key."""
    return tuple(_route_paths(files))


def add_web_ui(app: FastAPI, files: WebFiles, stats: Callable[[], dict[str, Any]]) -> None:
    """Routes for the pages, their files and the dashboard's figures (`stats()`, which
    raises the server's ApiError while there is no engine to report on)."""
    def endpoint(name: str) -> Callable[[], Response]:
        body, content_type = files[name]

        async def serve() -> Response:
            return Response(body, media_type=content_type, headers=SECURITY_HEADERS)
        return serve

    for path, name in _route_paths(files).items():
        app.add_api_route(path, endpoint(name), methods=["GET"], include_in_schema=False)

    @app.get(STATS_PATH, include_in_schema=False)
    async def dashboard_stats() -> JSONResponse:
        return JSONResponse(stats(), headers={"Cache-Control": "no-store"})
