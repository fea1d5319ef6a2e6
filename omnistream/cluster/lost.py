"""HTTP 410 `session_lost`: a request for a session whose replica is gone.

The router sends a session's requests to the replica its id names (placement.py); only when
that replica is no longer running does a request reach another one. So a replica that does not
know a session id naming another replica answers 410 Gone, naming the session and its replica:
the session's history and KV died with that replica (sessions are not migrated, docs/cluster.md)
and the client opens a new one. An unknown id that names this replica, or no replica, stays the
server's 404.

Installed as the app's handler of UnknownSessionError (raised by the session registry after the
API key and tenant checks), so a 410 is only ever sent to an authenticated caller.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from omnistream.cluster.placement import replica_of
from omnistream.errors import UnknownSessionError
from omnistream.server.errors import APIError, as_api_error


class SessionLost(APIError):
    status, code = 410, "session_lost"


def lost_error(session_id: str, replica: str) -> SessionLost:
    return SessionLost(f"session {session_id!r} is lost: replica {replica!r}, which held it, is gone (its history and "
                       "KV went with it); open a new session", param="session_id")


def requested_session(request: Request) -> str | None:
    """The session a request names: the /v1/sessions/{session_id} path, else X-Session-Id."""
    return request.path_params.get("session_id") or request.headers.get("x-session-id")


def install(app: FastAPI, replica: str) -> None:
    async def on_unknown_session(request: Request, exc: UnknownSessionError) -> JSONResponse:
        sid = requested_session(request)
        home = replica_of(sid)
        err = lost_error(sid, home) if home is not None and home != replica else as_api_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    app.add_exception_handler(UnknownSessionError, on_unknown_session)
