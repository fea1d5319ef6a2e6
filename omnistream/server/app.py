"""Assembles the FastAPI app from the route modules; `uvicorn.run(build_app(...))` serves it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI

from omnistream.server.config import ServerConfig
from omnistream.server.state import ServerState

if TYPE_CHECKING:
    from omnistream.engine.sampling import SamplingParams
    from omnistream.entrypoints.api import Engine


def build_app(engine: "Engine", config: ServerConfig | None = None, *,
              default_sampling: "SamplingParams | None" = None) -> FastAPI:
    """`default_sampling`: what a request's unset sampling fields take (None: OpenAI's defaults)."""
    config = config or ServerConfig()
    name = config.served_model_name or Path(engine.model_dir).name
    app = FastAPI(title="omnistream", docs_url=None, redoc_url=None)
    app.state.omni = ServerState(engine=engine, config=config, model_name=name, default_sampling=default_sampling)
    # each module registers its routes (and its middleware / exception handlers) itself;
    # middleware added later wraps what was added before: ops' access log ends up outside auth
    from omnistream.server import auth, chat, errors, ops, realtime, sessions_api, web

    errors.install(app)
    ops.install_body_limit(app)  # inside auth: a request without a key is a 401 whatever its size
    for module in (auth, ops, chat, sessions_api, realtime, web):
        module.install(app)
    return app
