"""What every route shares: the engine, the config and the registries. One per app, at
`app.state.omni`; routes reach it through `get_state(request)`."""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omnistream.engine.sampling import SamplingParams
from omnistream.server.config import ServerConfig

if TYPE_CHECKING:
    from omnistream.entrypoints.api import Engine


@dataclass
class ServerState:
    engine: "Engine"
    config: ServerConfig
    model_name: str  # what /v1/models lists and requests must name
    started_at: float = field(default_factory=time.time)
    # sampling for the fields a request leaves out (the CLI's flags); None: OpenAI's defaults
    default_sampling: SamplingParams | None = None
    # max_tokens of a request that sets none (the CLI's --max-new-tokens); None: as much as fits (at most 4096)
    default_max_tokens: int | None = None
    # filled by the modules that own them (sessions_api: the session registry, ops: metrics)
    extras: dict[str, Any] = field(default_factory=dict)
    shutting_down: bool = False  # begin_shutdown() was called: in-flight answers end now
    # what to end at shutdown (chat: each in-flight job's `end_for_shutdown`), weakly held
    on_shutdown: "weakref.WeakSet" = field(default_factory=lambda: weakref.WeakSet())
    # tasks begin_shutdown started that the server waits for before closing connections (live
    # sockets saying session_expired and closing with 1001)
    shutdown_tasks: set = field(default_factory=set)

    def begin_shutdown(self) -> None:
        """The server is stopping (a signal): answers in flight end at once, each with a
        `server_shutting_down` error (streams: that event, then [DONE]), so the graceful
        shutdown does not wait for long answers and cut their connections."""
        self.shutting_down = True
        for job in list(self.on_shutdown):
            job.end_for_shutdown()


def get_state(request_or_ws) -> ServerState:
    return request_or_ws.app.state.omni
