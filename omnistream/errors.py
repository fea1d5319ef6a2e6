"""Typed errors. User-input errors (bad media, over budget, unknown session) derive from
`UserInputError` so the CLI prints one line and the server maps them to 4xx JSON; engine faults
derive from `EngineError`."""


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


class EngineError(OmnistreamError):
    """Internal failure of the engine (not caused by the request)."""
