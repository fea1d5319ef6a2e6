"""What chat completions and session turns share: how a request's sampling fields meet the
server's defaults, how many tokens an answer may take when the request names none, and the
server-sent-events response that aborts its work whenever it ends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from omnistream.engine.sampling import SamplingParams
from omnistream.errors import BudgetError
from omnistream.server.errors import BadRequest
from omnistream.server.openai_protocol import ChatCompletionRequest
from omnistream.server.state import ServerState

DEFAULT_MAX_TOKENS = 4096  # when the request names none (OpenAI: the model's limit), capped by the room left


def max_tokens_for(state: ServerState, body: ChatCompletionRequest, prompt_len: int) -> int:
    """The request's max_tokens; else the server's default (--max-new-tokens) or
    DEFAULT_MAX_TOKENS, within the room the context and the KV pool leave after the prompt."""
    engine = state.engine
    limit = min(engine.max_context, engine.kv_pool_tokens)
    room = limit - prompt_len
    if body.requested_max_tokens is not None:
        n = body.requested_max_tokens
        if n > room:  # named as the client sent it (the engine's error says max_new_tokens)
            field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            raise BadRequest(f"{field} {n} + the prompt's {prompt_len} tokens exceed the {limit} tokens the model's context and "
                             f"the KV pool hold: at most {max(room, 0)} here", param=field, code="context_length_exceeded")
        return n
    if room < 1:
        raise BudgetError(f"the prompt of {prompt_len} tokens leaves no room for an answer "
                          f"(context {engine.max_context} tokens)")
    return min(state.default_max_tokens or DEFAULT_MAX_TOKENS, room)


def sampling_for(state: ServerState, body: ChatCompletionRequest, max_new: int, choice: int = 0) -> SamplingParams:
    """The request's sampling fields over the server's defaults (OpenAI's: temperature 1);
    choice i of n samples with seed + i."""
    base = state.default_sampling or SamplingParams(temperature=1.0)
    seed = body.seed if body.seed is not None else base.seed
    return SamplingParams(
        temperature=base.temperature if body.temperature is None else body.temperature,
        top_p=base.top_p if body.top_p is None else body.top_p,
        top_k=base.top_k if body.top_k is None else max(body.top_k, 0),
        max_new_tokens=max_new, seed=None if seed is None else seed + choice, stop_token_ids=base.stop_token_ids,
        ignore_eos=body.ignore_eos or base.ignore_eos)


def sse(payload: dict | str) -> str:
    """One server-sent event: `data: <compact JSON or a literal like [DONE]>`."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


class SSEResponse(StreamingResponse):
    """Server-sent events; whatever ends the response (its last event, the client leaving, a
    server shutdown) closes the event generator and calls `on_close` (aborting the work)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        self._complete = False
        super().__init__(self._until_done(events), media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self._events, self._on_close = events, on_close

    async def _until_done(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        async for event in events:
            yield event
        self._complete = True

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._complete:  # cut off (the client left): the access log and metrics say 499, not 200
                scope.setdefault("state", {})["stream_cut"] = True
            await self._events.aclose()
            self._on_close()
