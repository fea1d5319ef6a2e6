"""Assembles the FastAPI app from the route modules; `uvicorn.run(build_app(...))` serves it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI

from omnistream.server.config import ServerConfig
from omnistream.server.state import ServerState

if TYPE_CHECKING:
    from omnistream.entrypoints.api import Engine


def build_app(engine: "Engine", config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    name = config.served_model_name or Path(engine.model_dir).name
    app = FastAPI(title="omnistream", docs_url=None, redoc_url=None)
    app.state.omni = ServerState(engine=engine, config=config, model_name=name)
    # each module registers its routes (and its middleware / exception handlers) itself
    from omnistream.server import chat, errors, ops

    errors.install(app)
    ops.install(app)
    chat.install(app)
    for optional in ("sessions_api", "realtime", "web"):
        try:
            module = __import__(f"omnistream.server.{optional}", fromlist=["install"])
        except ModuleNotFoundError as e:  # being built (remove once all exist)
            if e.name != f"omnistream.server.{optional}":
                raise
            continue
        module.install(app)
    return app
