"""The page at `/`: a camera (or a local video file) streamed to /v1/realtime, questions at any
moment, answers streaming in, live metrics and a TTFT plot. Plain HTML/JS/CSS in static/
(package data, no build step).

The page and its two assets are public (a browser cannot send a Bearer header on a page load):
the page asks for the API key and passes it to the WebSocket as the `api_key` query parameter,
which auth.py accepts for WebSockets.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

from omnistream.server.auth import allow_anonymous

STATIC = Path(__file__).parent / "static"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}


def install(app: FastAPI) -> None:
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    allow_anonymous(app, "/")
    for name, media_type in ASSETS.items():
        app.add_api_route(f"/static/{name}", _asset(name, media_type), methods=["GET"], include_in_schema=False)
        allow_anonymous(app, f"/static/{name}")


def _asset(name: str, media_type: str):
    async def asset() -> FileResponse:  # one route per file: no path from the client is ever joined
        return FileResponse(STATIC / name, media_type=media_type, headers={"Cache-Control": "no-cache"})

    return asset
