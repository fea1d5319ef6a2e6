"""Typed errors. User-input errors (bad media, over budget, unknown session) derive from
`UserInputError` so the CLI prints one line and the server maps them to 4xx JSON; engine faults
derive from `EngineError`."""

import re


class OmnistreamError(Exception):
    """Base class of every error omnistream raises on purpose."""


class UserInputError(OmnistreamError):
    """The request is wrong; the engine and other sessions are fine."""


class MediaError(UserInputError):
    """Media cannot be used: unreadable, empty, truncated, not a video/image, absurd size."""


class ConfigError(UserInputError):
    """A configuration value or checkpoint directory is invalid."""


class BudgetError(UserInputError):
    """The request does not fit the memory or token budget, even alone."""


class UnknownSessionError(UserInputError):
    """A session id that does not exist (or was closed)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, systemd): a stop the system asked for, handled as Ctrl-C is
    (graceful, no traceback) but reported as its own: the CLI exits 143 (128 + SIGTERM)."""


class EngineError(OmnistreamError):
    """Internal failure of the engine (not caused by the request)."""


class EngineUnavailable(EngineError):
    """The engine cannot take work any more: it is closed, or its process died or stopped
    answering. A server answers 503: nothing about the request is wrong, another replica (or a
    restarted server) can serve it."""


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def one_line(exc: BaseException) -> str:
    """An exception's text for a user: FFmpeg's reason without errno and path (its strerror),
    on one line (PIL / FFmpeg messages sometimes span several), without Python object reprs
    (PIL names a buffer `<_io.BytesIO object at 0x...>`)."""
    reason = getattr(exc, "strerror", None) or str(exc)
    text = " ".join(_OBJECT_REPR.sub("the data", str(reason)).split())
    return text or type(exc).__name__
