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
import contextlib
import time
import uuid
from typing import Annotated, Any, AsyncIterator, Callable

from fastapi import Body, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from omnistream.engine.protocol import OutputDelta, RequestOutput
from omnistream.errors import UnknownSessionError, UserInputError
from omnistream.server.auth import tenant_for
from omnistream.server.common import SSEResponse, max_tokens_for, sampling_for, sse
from omnistream.server.errors import APIError, as_api_error
from omnistream.server.media_parts import MediaResolver
from omnistream.server.openai_protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    ImagePart,
    Message,
    ProcessorKwargs,
    PromptTokensDetails,
    Usage,
    VideoPart,
)
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
    (its client is gone), the answer the thread still starts is aborted as soon as it exists,
    and the caller's cleanup waits for the thread: a session is never left holding a turn
    nobody reads, nor changed by a thread after its cleanup ran."""
    fut = asyncio.get_running_loop().run_in_executor(None, start)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(_abort_started)
        with contextlib.suppress(BaseException):  # a second cancel: the callback still aborts
            await asyncio.shield(fut)
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


class SessionTurn:
    """A question running inside a pinned session. Iterating `events()` yields OutputDeltas as
    tokens come, then the final RequestOutput (the turn has joined the history by then). The
    session stays in use (never expired) and its turn held until the events end or close() is
    called; close() before the end aborts the answer and keeps nothing of the turn."""

    def __init__(self, registry: SessionRegistry, entry: Entry, answer: PendingAnswer, prompt_tokens: int) -> None:
        self.registry, self.entry, self.answer = registry, entry, answer
        self.prompt_tokens = prompt_tokens
        self._closed = False
        entry.active = answer

    async def events(self) -> AsyncIterator[OutputDelta | RequestOutput]:
        try:
            async for delta in self.answer.handle:
                yield delta
            yield await asyncio.to_thread(self.answer.finish)  # the turn joins the history
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.answer.abort()  # no-op once finished
        self.entry.active = None
        self.entry.turn.release()
        self.registry.release(self.entry)


async def open_turn(state: ServerState, session_id: str, body: ChatCompletionRequest, tenant: str | None) -> SessionTurn:
    """Starts a chat completion inside pinned session `session_id`; errors (unknown id or
    another tenant's: 404; a bad turn, media or budget: 400) are raised here, before any byte
    of the answer. `body.messages` holds only the new user turn (text and/or media parts)."""
    message = _new_turn(body)
    reg = registry(state)
    entry = reg.hold(session_id, tenant)
    try:
        parts, items, question = await _prepare_turn(state, message, body.mm_processor_kwargs, tenant)
        await entry.turn.acquire()
    except BaseException:
        reg.release(entry)
        raise
    session = entry.session
    mark = session.pending_count
    logprobs = (body.top_logprobs or 0) if body.logprobs else None

    prompt_len = 0

    def start() -> PendingAnswer:
        nonlocal prompt_len
        _add_parts(session, parts, items)
        prompt_len = len(session.prompt_for(question)[0])
        return session.start(question, sampling_for(state, body, max_tokens_for(state, body, prompt_len)), logprobs=logprobs)

    try:
        answer = await start_in_thread(start)
    except BaseException:
        session.drop_pending(mark)  # a failed turn leaves the conversation as it was
        entry.turn.release()
        reg.release(entry)
        raise
    return SessionTurn(reg, entry, answer, prompt_len)


def _new_turn(body: ChatCompletionRequest) -> Message:
    if len(body.messages) != 1 or body.messages[0].role != "user":
        raise UserInputError("with X-Session-Id, `messages` holds only the new user turn (one message, role "
                             "'user'): the session keeps the history on the server")
    if body.n != 1:
        raise UserInputError("n must be 1 in a session: a conversation has one answer per turn")
    if body.stop_strings:
        raise UserInputError("stop strings are not supported in a session: the history keeps whole answers")
    return body.messages[0]


async def chat_in_session(state: ServerState, session_id: str, body: ChatCompletionRequest, tenant: str | None) -> Response:
    """POST /v1/chat/completions with `X-Session-Id`: the answer in the chat.completion shape
    (or its SSE chunks with `stream`), usage.prompt_tokens_details.cached_tokens counting the
    history served from the session's KV."""
    turn = await open_turn(state, session_id, body, tenant)
    reply = ChatReply(state, body, session_id)
    if body.stream:
        return SSEResponse(reply.chunks(turn), on_close=turn.close)
    try:
        async for item in turn.events():
            reply.add(item)
    finally:
        turn.close()
    reply.check_not_aborted()
    return JSONResponse(reply.completion().model_dump(mode="json"))


class ChatReply:
    """A session turn's events in the OpenAI shapes."""

    def __init__(self, state: ServerState, body: ChatCompletionRequest, session_id: str) -> None:
        self.body, self.model, self.session_id = body, state.model_name, session_id
        self.token_text = state.extras.get("token_text")
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.text, self.pairs = "", []
        self.output: RequestOutput | None = None

    def add(self, item: OutputDelta | RequestOutput) -> tuple[str, list]:
        if isinstance(item, RequestOutput):
            self.output = item
            return "", []
        pairs = list(zip(item.token_ids, item.logprobs)) if item.logprobs else []
        self.text += item.text
        self.pairs += pairs
        return item.text, pairs

    def logprobs(self, pairs: list) -> ChoiceLogprobs | None:
        if not self.body.logprobs or self.token_text is None:
            return None
        return ChoiceLogprobs(content=[self.token_text.logprob(t, lp) for t, lp in pairs])

    def check_not_aborted(self) -> None:
        """An answer cut off by the server (its session deleted, or expiring at shutdown) is an
        error, not a short answer."""
        if self.output.finish_reason == "abort":
            raise UnknownSessionError(f"session {self.session_id!r} was closed while it answered")

    @property
    def finish_reason(self) -> str:
        return "length" if self.output.finish_reason == "length" else "stop"

    def usage(self) -> Usage:
        m = self.output.metrics
        return Usage(prompt_tokens=m.prompt_tokens, completion_tokens=m.output_tokens,
                     total_tokens=m.prompt_tokens + m.output_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=m.cached_tokens))

    def metrics(self) -> dict[str, Any]:
        return {**self.output.metrics.as_dict(), "session_id": self.session_id}

    def completion(self) -> ChatCompletion:
        choice = Choice(index=0, message=AssistantMessage(content=self.text), finish_reason=self.finish_reason,
                        logprobs=self.logprobs(self.pairs))
        return ChatCompletion(id=self.id, created=self.created, model=self.model, choices=[choice], usage=self.usage(),
                              metrics=self.metrics())

    def _chunk(self, delta: dict, logprobs=None, finish=None) -> str:
        c = ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                choices=[ChunkChoice(index=0, delta=delta, logprobs=logprobs, finish_reason=finish)])
        usage = {"usage": None} if self.body.include_usage else {}
        return sse({**c.model_dump(mode="json", exclude={"usage", "metrics"}), **usage})

    async def chunks(self, turn: SessionTurn) -> AsyncIterator[str]:
        """role chunk, content chunks, the finish chunk, the usage chunk if asked, [DONE]; an
        error after the first byte is sent as an error event (the status is sent already)."""
        yield self._chunk({"role": "assistant", "content": ""})
        try:
            async for item in turn.events():
                text, pairs = self.add(item)
                if text or pairs:
                    yield self._chunk({"content": text}, self.logprobs(pairs) if pairs else None)
            self.check_not_aborted()
        except Exception as e:  # noqa: BLE001
            yield sse(as_api_error(e).body())
            return
        yield self._chunk({}, finish=self.finish_reason)
        if self.body.include_usage:
            final = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                        usage=self.usage(), metrics=self.metrics())
            yield sse(final.model_dump(mode="json"))
        yield sse("[DONE]")


# ---------------------------------------------------------------------------------- routes
async def create_session(request: Request, body: CreateSession | None = None) -> dict[str, Any]:
    state = get_state(request)
    body = body or CreateSession()
    state.engine.core.check_available()  # a session that could never answer is refused (503)
    session = state.engine.session(system=body.system, tenant=tenant_for(request), kv_budget_tokens=body.kv_budget_tokens)
    return describe(await _open(state, session, tenant_for(request)), 0)


async def add_media(session_id: str, part: Annotated[MediaPart, Body()], request: Request) -> dict[str, Any]:
    state = get_state(request)
    tenant = tenant_for(request)
    with registry(state).use(session_id, tenant) as entry:
        try:
            parts, items, _ = await _prepare_turn(state, Message(role="user", content=[part]), None, tenant)
        except APIError as e:
            raise _of_the_body(e) from None
        async with entry.turn:  # never between a question's submission and its commit
            if entry.session.closed:  # deleted while its media were decoded
                raise UnknownSessionError(f"session {session_id!r} was closed")
            _add_parts(entry.session, parts, items)
        return await _describe(entry)


_ONLY_PART = "messages[0].content[0]"  # where prepare() locates the one part of a media request


def _of_the_body(e: APIError) -> APIError:
    """A media request's body is one part: its errors name no message."""
    if e.param != _ONLY_PART:
        return e
    return e.placed(e.message.removeprefix(f"{_ONLY_PART}: "), None)


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
