"""Pinned multi-turn sessions over HTTP: the conversation's KV and history live on the server.

    POST   /v1/sessions              {system?, kv_budget_tokens?}          -> session object
    POST   /v1/sessions/{id}/media   one image_url / video_url content part -> session object
    POST   /v1/sessions/{id}/fork                                           -> the new session
    GET    /v1/sessions/{id}                                                -> session object
    DELETE /v1/sessions/{id}                                                -> {id, deleted}

A question is a chat completion carrying `X-Session-Id: <id>` (chat.py calls
`chat_in_session`): its `messages` hold only the new user turn (text and/or media parts), the
answer follows Session.ask semantics (a follow-up costs only its own tokens) and joins the
history. Sessions are per tenant (another key gets 404), counted against
ServerConfig.max_sessions (429 beyond) and closed after ServerConfig.session_ttl_s idle.

Session work that blocks (media decoding, the engine's KV bookkeeping) runs in a worker thread;
questions of one session are serialised by an asyncio lock, so a waiting question holds no
thread.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, AsyncIterator, Callable

from fastapi import Body, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from omnistream.engine.protocol import OutputDelta, RequestOutput
from omnistream.engine.sampling import SamplingParams
from omnistream.errors import UserInputError
from omnistream.server.auth import tenant_for
from omnistream.server.media_parts import MediaResolver
from omnistream.server.openai_protocol import ChatCompletionRequest, ImagePart, Message, ProcessorKwargs, VideoPart
from omnistream.server.session_registry import Entry, SessionRegistry, registry_of
from omnistream.server.state import ServerState, get_state
from omnistream.sessions.session import PendingAnswer, Session

# ---------------------------------------------------------------------------------- contracts
class CreateSession(BaseModel):
    model_config = ConfigDict(extra="forbid")
    system: str | None = None  # the system prompt of the conversation
    kv_budget_tokens: int | None = Field(None, ge=1)  # retained KV cap; None: the engine's default


MediaPart = Annotated[ImagePart | VideoPart, Field(discriminator="type")]  # chat completions' content part


# ---------------------------------------------------------------------------------- media
def media_resolver(state: ServerState) -> MediaResolver:
    """The server's resolver of OpenAI media parts (shared with chat completions: one media
    cache, one decode pool)."""
    resolver = state.extras.get("media")
    if resolver is None:
        resolver = state.extras["media"] = MediaResolver(state.engine.processor, state.config)
    return resolver


async def _prepare_turn(state: ServerState, message: Message, defaults: ProcessorKwargs | None,
                        tenant: str | None) -> tuple[list[dict[str, Any]], list, str]:
    """A user message -> (engine parts before the question, their media items, question): the
    text after the last media part is the question, earlier parts stay in place as context.
    Media is decoded, resized and hashed now (or reused when re-sent)."""
    if isinstance(message.content, str) or message.content is None:
        return [], [], message.content or ""
    prepared = await media_resolver(state).prepare([message], defaults, tenant)
    parts = prepared.messages[0]["content"]
    last_media = max((i for i, p in enumerate(parts) if p["type"] != "text"), default=-1)
    question = "".join(p["text"] for p in parts[last_media + 1:])
    return parts[: last_media + 1], prepared.items, question


def _add_parts(session: Session, parts: list[dict[str, Any]], items: list) -> None:
    media = iter(items)
    for part in parts:
        if part["type"] == "text":
            session.add_text(part["text"])
        else:
            session.add_item(next(media))


# ---------------------------------------------------------------------------------- helpers
def registry(state: ServerState) -> SessionRegistry:
    return state.extras["sessions"]


def describe(entry: Entry, pinned_tokens: int) -> dict[str, Any]:
    s = entry.session
    return {
        "id": s.id, "object": "session", "created": int(entry.created),
        "turns": s.turns,  # questions answered
        "context_tokens": len(s.token_ids),  # the conversation as the model sees it
        "pinned_tokens": pinned_tokens,  # of which the engine retains KV now (may shrink under pressure)
        "media_items": len(s.media), "pending_media": s.pending_media,  # pending: added, not asked about yet
        "kv_budget_tokens": s.kv_budget_tokens,
    }


async def _describe(entry: Entry) -> dict[str, Any]:
    pinned = await asyncio.to_thread(lambda: entry.session.pinned_tokens)  # asks the engine loop
    return describe(entry, pinned)


async def start_in_thread(start: Callable[[], PendingAnswer]) -> PendingAnswer:
    """Runs a blocking `Session.start` in a worker thread. If the caller is cancelled meanwhile
    (its client is gone), the answer the thread still starts is aborted as soon as it exists:
    a session is never left holding a turn nobody reads."""
    fut = asyncio.get_running_loop().run_in_executor(None, start)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(_abort_started)
        raise


def _abort_started(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().abort()


async def close_session(entry: Entry) -> None:
    """Ends a pinned session: its running answer is aborted, then the engine drops its KV."""
    if entry.active is not None:
        entry.active.abort()
    async with entry.turn:  # the answer's reader has let go: no retain can follow the release
        await asyncio.to_thread(entry.session.close)


async def _open(state: ServerState, session: Session, tenant: str | None) -> Entry:
    """Registers a new session; over the cap it is closed again and 429 raised."""
    async def close() -> None:
        await close_session(entry)

    try:
        entry = registry(state).add("session", tenant, session, close)
    except Exception:
        await asyncio.to_thread(session.close)
        raise
    return entry


# ---------------------------------------------------------------------------------- questions
def _new_turn(body: ChatCompletionRequest) -> Message:
    if len(body.messages) != 1 or body.messages[0].role != "user":
        raise UserInputError("with X-Session-Id, `messages` holds only the new user turn (one message, role "
                             "'user'): the session keeps the history on the server")
    if body.n != 1:
        raise UserInputError("n must be 1 in a session: a conversation has one answer per turn")
    return body.messages[0]


async def chat_in_session(state: ServerState, session_id: str, body: ChatCompletionRequest, sampling: SamplingParams,
                          tenant: str | None, *, logprobs: int | None = None) -> AsyncIterator[OutputDelta | RequestOutput]:
    """Answers a chat completion inside pinned session `session_id`: yields OutputDeltas as
    tokens come, then the final RequestOutput (its metrics.cached_tokens count the reused
    history, so a follow-up costs only its own tokens).

    `body.messages` holds only the new user turn (text and/or media parts). Unknown id or
    another tenant's -> UnknownSessionError (404). Closing the generator early (client gone)
    aborts the answer and keeps nothing of the turn; so does a failed turn."""
    with registry(state).use(session_id, tenant) as entry:
        message = _new_turn(body)
        parts, items, question = await _prepare_turn(state, message, body.mm_processor_kwargs, tenant)
        async with entry.turn:
            session = entry.session
            mark = session.pending_count
            try:
                _add_parts(session, parts, items)
                answer = await start_in_thread(lambda: session.start(question, sampling, logprobs=logprobs))
            except BaseException:
                session.drop_pending(mark)
                raise
            entry.active = answer
            try:
                async for delta in answer.handle:
                    yield delta
                yield await asyncio.to_thread(answer.finish)  # the turn joins the history
            finally:
                entry.active = None
                answer.abort()  # no-op once finished


# ---------------------------------------------------------------------------------- routes
async def create_session(request: Request, body: CreateSession | None = None) -> dict[str, Any]:
    state = get_state(request)
    body = body or CreateSession()
    session = state.engine.session(system=body.system, tenant=tenant_for(request), kv_budget_tokens=body.kv_budget_tokens)
    return describe(await _open(state, session, tenant_for(request)), 0)


async def add_media(session_id: str, part: Annotated[MediaPart, Body()], request: Request) -> dict[str, Any]:
    state = get_state(request)
    tenant = tenant_for(request)
    with registry(state).use(session_id, tenant) as entry:
        parts, items, _ = await _prepare_turn(state, Message(role="user", content=[part]), None, tenant)
        async with entry.turn:  # never between a question's submission and its commit
            _add_parts(entry.session, parts, items)
        return await _describe(entry)


async def fork_session(session_id: str, request: Request) -> dict[str, Any]:
    state = get_state(request)
    tenant = tenant_for(request)
    with registry(state).use(session_id, tenant) as entry:
        async with entry.turn:
            other = await asyncio.to_thread(entry.session.fork)
        return await _describe(await _open(state, other, tenant))


async def get_session(session_id: str, request: Request) -> dict[str, Any]:
    state = get_state(request)
    with registry(state).use(session_id, tenant_for(request)) as entry:
        return await _describe(entry)


async def delete_session(session_id: str, request: Request) -> dict[str, Any]:
    entry = registry(get_state(request)).remove(session_id, tenant_for(request), "session")
    await close_session(entry)
    return {"id": session_id, "object": "session.deleted", "deleted": True}


def install(app: FastAPI) -> None:
    registry_of(app)
    app.add_api_route("/v1/sessions", create_session, methods=["POST"])
    app.add_api_route("/v1/sessions/{session_id}", get_session, methods=["GET"])
    app.add_api_route("/v1/sessions/{session_id}", delete_session, methods=["DELETE"])
    app.add_api_route("/v1/sessions/{session_id}/media", add_media, methods=["POST"])
    app.add_api_route("/v1/sessions/{session_id}/fork", fork_session, methods=["POST"])
