"""Every error leaves the server as an OpenAI error object with a status that says whose fault it
is:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages", "code": "..."}}

    400  bad input: invalid JSON, unknown or malformed fields (pydantic), bad media (MediaError),
         bad options (ConfigError, UserInputError), over the model's context (BudgetError, code
         context_length_exceeded: OpenAI's own status and code for it)
    401  missing or wrong API key            404  unknown model, session or route
    413  request body or one media item too large (TooLarge)
    503  overloaded (Overloaded, with Retry-After)
    500  EngineError or anything unexpected (logged with its traceback): ours, never the client's

Route modules raise omnistream.errors types or the APIError subclasses below; `install(app)`
registers the handlers that turn them into responses.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from omnistream.errors import (
    BudgetError,
    ConfigError,
    EngineError,
    EngineUnavailable,
    MediaError,
    UnknownSessionError,
    UserInputError,
)
from omnistream.server import validation

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error with its HTTP status and OpenAI fields; subclasses fix the status and type."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param
        if code is not None:
            self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def placed(self, message: str, param: str | None) -> "APIError":
        """The same error (class, status, type, code) with another message and param."""
        out = type(self)(message, param=param, code=self.code)
        out.status, out.type = self.status, self.type
        return out

    def __reduce__(self):
        # raised in a media worker process (server/media_workers.py): its param and code cross too
        return _rebuild, (type(self), self.message, self.param, self.__dict__.get("code"))


def _rebuild(cls, message: str, param: str | None, code: str | None) -> "APIError":
    return cls(message, param=param, code=code)


class BadRequest(APIError):
    status = 400


class AuthError(APIError):
    status, code = 401, "invalid_api_key"


class NotFound(APIError):
    status, code = 404, "not_found"


class TooLarge(APIError, MediaError):
    """A request body, or one media item (pixels, frames, duration, bytes), over a limit."""

    status, code = 413, "payload_too_large"


class ShuttingDown(APIError):
    """The server stops: a request cut short gets this (its stream ends with it, then [DONE])."""

    status, type, code = 503, "server_error", "server_shutting_down"


class Overloaded(APIError):
    status, type, code = 503, "server_error", "overloaded"
    retry_after_s = 1


# omnistream.errors -> (status, code); the first matching class wins (most specific first)
_USER_ERRORS: list[tuple[type[Exception], int, str]] = [
    (UnknownSessionError, 404, "session_not_found"),
    (BudgetError, 400, "context_length_exceeded"),
    (MediaError, 400, "invalid_media"),
    (ConfigError, 400, "invalid_value"),
    (UserInputError, 400, "invalid_request"),
]


def as_api_error(exc: BaseException) -> APIError:
    """Any exception -> the APIError it is answered with (streams send it as an SSE event)."""
    if isinstance(exc, APIError):
        return exc
    for cls, status, code in _USER_ERRORS:
        if isinstance(exc, cls):
            err = APIError(str(exc), code=code)
            err.status = status
            return err
    if isinstance(exc, EngineUnavailable):
        err = APIError(f"the engine is unavailable: {exc}", code="engine_unavailable")
        err.status, err.type = 503, "server_error"
        return err
    err = APIError("internal server error" if not isinstance(exc, EngineError) else f"engine error: {exc}",
                   code="internal_error")
    err.status, err.type = 500, "server_error"
    return err


def _respond(err: APIError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after_s)} if isinstance(err, Overloaded) else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    err = as_api_error(exc)
    if err.status == 503:  # overloaded, stopping or no engine: expected, said without a traceback
        log.warning("request %s refused: %s", _request_id(request), err.message)
    elif err.status >= 500:
        log.error("request %s failed", _request_id(request), exc_info=exc)
    return _respond(err)


async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    """pydantic's list of problems -> one 400 naming each bad field (the first one as `param`)."""
    errors = exc.errors()
    invalid = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if invalid is not None:
        return _respond(BadRequest(f"invalid JSON body: {invalid.get('ctx', {}).get('error', invalid.get('msg'))}",
                                   code="invalid_json"))
    texts, param = [], None
    for where, message, kind in validation.problems(errors, skip=("body",)):
        if not where and kind in ("model_attributes_type", "dict_type", "model_type"):
            return _respond(BadRequest("the request body must be a JSON object (Content-Type: application/json)",
                                       code="invalid_json"))
        param = param or where or None
        if kind == "extra_forbidden":
            texts.append(f"unknown or unsupported field {where!r}")
        else:
            texts.append(f"{where}: {message}" if where else message)
    return _respond(BadRequest("; ".join(texts) or "invalid request", param=param, code="invalid_request"))


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (unknown route 404, wrong method 405) in the OpenAI shape."""
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    code = _HTTP_CODES.get(exc.status_code)
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("request %s failed unexpectedly", _request_id(request), exc_info=exc)
    return _respond(as_api_error(exc))


def _request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(UserInputError, _on_api_error)
    app.add_exception_handler(EngineError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)
