"""POST /v1/chat/completions on the engine's async API.

    body (pydantic) -> media decoded or reused (media_parts, thread pool) -> prompt built and
    n EngineRequests submitted (a worker thread: tokenising, M-RoPE positions and block hashes
    are CPU work) -> `async for delta in handle` per choice -> one JSON answer, or SSE chunks

Per choice the text passes through StopText (stop strings: the text ends before the first
one, the request is aborted, finish_reason "stop"); a streamed answer is the same text as the
non-streamed one because both read the same deltas through the same code. A client that goes
away (streaming or not) aborts its requests, which frees their KV. With `X-Session-Id` the
request is answered inside a pinned session (sessions_api).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pydantic
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from omnistream.engine.handle import RequestHandle
from omnistream.engine.protocol import EngineRequest, OutputDelta, RequestOutput
from omnistream.errors import UnknownSessionError
from omnistream.models.prompt import build_prompt
from omnistream.server.auth import tenant_for
from omnistream.server.common import SSEResponse, max_tokens_for, sampling_for, sse
from omnistream.server.errors import NotFound, Overloaded, ShuttingDown, as_api_error
from omnistream.server.media_decode import Hearing
from omnistream.server.media_parts import MediaResolver, PreparedMessages
from omnistream.server.openai_protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    PromptTokensDetails,
    Usage,
)
from omnistream.server.state import ServerState, get_state
from omnistream.server.tokens import StopText, TokenText



def install(app: FastAPI) -> None:
    state: ServerState = app.state.omni
    resolver = MediaResolver(state.engine.processor, state.config, hearing=Hearing.of(state.engine.model))
    state.extras["media"] = resolver
    state.extras["token_text"] = TokenText(state.engine.tokenizer)
    app.router.on_shutdown.append(resolver.close)
    app.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"],
                      response_model=None)


# request bodies up to this size are parsed on the event loop: a 448x448 PNG's request (0.6 MB)
# parses in ~0.6 ms (pydantic-core; 1.15 ms for 1 MB on the 2-core CI machine), while its hop to
# a worker thread and back took 11-32 ms (median "server receive" of image requests, H200 bench
# serve, 32 clients)
INLINE_PARSE_BYTES = 1 << 20
INLINE_PARSE_OBJECTS = 256  # and of at most this many JSON objects: validation costs per object, not per byte
INLINE_PREPARE_CHARS = 16 << 10  # text-only prompts up to this many characters are tokenised there too


async def create_chat_completion(request: Request) -> Response:
    received = time.perf_counter()  # before the body is read: the metrics' server_receive_s starts here
    # a body of several megabytes of inline media would hold the event loop (and every stream
    # on it) for milliseconds: parsed and validated in a worker thread. One up to a megabyte is
    # parsed here (under a millisecond), since the hop to a thread and back waits for the
    # interpreter twice behind the engine loop and the media threads (tens of ms under load)
    raw = await request.body()
    inline = len(raw) <= INLINE_PARSE_BYTES and raw.count(b"{") <= INLINE_PARSE_OBJECTS
    body = _parse(raw) if inline else await run_in_threadpool(_parse, raw)
    state = get_state(request)
    if body.model != state.model_name:
        raise NotFound(f"model {body.model!r} does not exist (this server serves {state.model_name!r})",
                       param="model", code="model_not_found")
    tenant = tenant_for(request)
    session_id = request.headers.get("x-session-id")
    if session_id is not None:
        return await _in_session(state, session_id, body, tenant)
    _check_load(state)
    job = await _submit(state, request, body, tenant, received)
    if body.stream:
        return SSEResponse(_stream(job), on_close=job.abort)
    return await _complete(request, job)


def _parse(raw: bytes) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate_json(raw)
    except pydantic.ValidationError as e:  # the same 400 as FastAPI's own validation gives
        raise RequestValidationError(e.errors(include_url=False)) from None


async def _in_session(state: ServerState, session_id: str, body: ChatCompletionRequest, tenant: str | None) -> Response:
    """X-Session-Id: the turn is answered inside the pinned session by sessions_api (which owns
    them); an unknown id, or another tenant's, is a 404."""
    if state.extras.get("sessions") is None:
        raise UnknownSessionError(f"unknown session {session_id!r}")
    from omnistream.server.sessions_api import chat_in_session

    return await chat_in_session(state, session_id, body, tenant)


def _check_load(state: ServerState) -> None:
    # a counter read off the loop (engine/core.py EngineLoad): engine.stats() would wait for a step
    waiting = state.engine.core.load().waiting
    if waiting >= state.config.max_queued_requests:
        raise Overloaded(f"the engine has {waiting} requests waiting (limit {state.config.max_queued_requests}); "
                         "retry later")


# ------------------------------------------------------------------------------ one job
@dataclass
class ChoiceRun:
    """One choice: its engine request and what it has produced so far."""

    index: int
    handle: RequestHandle
    stop: StopText
    token_ids: list[int] = field(default_factory=list)  # the answer's tokens (up to a stop string)
    logprobs: list[tuple[int, tuple]] = field(default_factory=list)  # (token id, TokenLogprob)
    finish_reason: str | None = None
    output: RequestOutput | None = None
    observed: bool = False  # counted in the metrics (once, however the choice ended)


@dataclass
class ChatJob:
    id: str
    model: str
    body: ChatCompletionRequest
    prompt_tokens: int
    prepared: PreparedMessages
    choices: list[ChoiceRun]
    token_text: TokenText
    observe: Callable[[RequestOutput], None] | None
    created: int = field(default_factory=lambda: int(time.time()))
    received: float | None = None  # perf_counter(): the handler started (before the body was read)
    arrival: float | None = None  # perf_counter(): handed to the engine's clock (its TTFT starts here)
    first_sent: float | None = None  # perf_counter(): the first content chunk left for the socket
    shutdown: bool = False  # cut short because the server stops (ServerState.begin_shutdown)

    def __hash__(self) -> int:  # held in ServerState.on_shutdown (a WeakSet): by identity
        return id(self)

    def end_for_shutdown(self) -> None:
        self.shutdown = True
        for c in self.choices:
            if not c.handle.done:
                c.handle.abort()

    def abort(self) -> None:
        """Ends the choices still running (the client left, or the answer is complete) and counts
        in the metrics those that did not finish normally, as "abort", once they have ended."""
        for c in self.choices:
            if not c.handle.done:
                c.handle.abort()
            if not c.observed and self.observe is not None:
                c.observed = True
                task = asyncio.get_running_loop().create_task(_observe_ended(c, self.observe))
                _COUNTING.add(task)  # the loop keeps only a weak reference to a task
                task.add_done_callback(_COUNTING.discard)

    def usage(self) -> Usage:
        done = [c.output for c in self.choices if c.output is not None]
        completion = sum(len(c.token_ids) for c in self.choices)
        cached = done[0].metrics.cached_tokens if done else 0
        prompt = done[0].metrics.prompt_tokens if done else self.prompt_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    def metrics(self) -> dict:
        """omnistream's per-request timings (choice 0), with what the server itself spent."""
        out = self.choices[0].output
        m = out.metrics.as_dict() if out is not None else {}
        m = {**m, "media_decode_s": self.prepared.decode_s, "media_items_reused": self.prepared.reused}
        # the server's own share of the client's TTFT: reading and parsing the request before the
        # engine's clock starts, and handing the first token to the socket after it was sampled
        if self.received is not None and self.arrival is not None:
            m["server_receive_s"] = self.arrival - self.received
        if out is not None and out.metrics.first_token_at is not None and self.first_sent is not None:
            m["server_send_s"] = self.first_sent - out.metrics.first_token_at
        # the same two moments on the server's clock (time.perf_counter(): CLOCK_MONOTONIC, so a
        # client on the same host can split its own wait into the way in and the way back)
        m["server_received_at"], m["server_first_sent_at"] = self.received, self.first_sent
        return m

    def logprobs_of(self, pairs: list[tuple[int, tuple]]) -> ChoiceLogprobs | None:
        if not self.body.logprobs:
            return None
        return ChoiceLogprobs(content=[self.token_text.logprob(t, lp) for t, lp in pairs])


async def _submit(state: ServerState, request: Request, body: ChatCompletionRequest, tenant: str | None,
                  received: float | None = None) -> ChatJob:
    arrival = time.perf_counter()
    resolver: MediaResolver = state.extras["media"]
    prepared = await resolver.prepare(body.messages, body.mm_processor_kwargs, tenant)
    if _small_text(prepared):  # a template render + tokenisation of ~1k tokens: sub-millisecond
        prompt_len, handles = _prepare_requests(state, body, prepared, tenant, arrival)
    else:
        fut: asyncio.Future = asyncio.get_running_loop().run_in_executor(
            None, _prepare_requests, state, body, prepared, tenant, arrival)
        try:
            prompt_len, handles = await asyncio.shield(fut)
        except asyncio.CancelledError:  # the client left while the thread submitted
            fut.add_done_callback(_abort_submitted)
            raise
    rid = request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex
    job = ChatJob(id=f"chatcmpl-{rid}", model=state.model_name, body=body, prompt_tokens=prompt_len,
                  prepared=prepared, choices=[ChoiceRun(i, h, StopText(body.stop_strings)) for i, h in enumerate(handles)],
                  token_text=state.extras["token_text"], observe=getattr(state.extras.get("metrics"), "observe", None),
                  received=received, arrival=arrival)
    state.on_shutdown.add(job)
    if state.shutting_down:  # submitted while the server stops
        job.end_for_shutdown()
    return job


def _small_text(prepared: PreparedMessages) -> bool:
    """No media and little text: tokenised and submitted on the event loop. A thread hop costs
    more than the work (the thread and then the loop each wait for the interpreter behind the
    engine loop and the media threads); long prompts and media prompts still go to a thread."""
    if prepared.items:
        return False
    chars = 0
    for m in prepared.messages:
        content = m.get("content")
        chars += len(content) if isinstance(content, str) else sum(len(p.get("text") or "") for p in content or [])
    return chars <= INLINE_PREPARE_CHARS


def _abort_submitted(fut: asyncio.Future) -> None:
    """Nobody will read these requests: abort them as soon as the thread has submitted them."""
    if fut.exception() is None:
        for h in fut.result()[1]:
            h.abort()


def _logprobs(body: ChatCompletionRequest) -> int | None:
    return (body.top_logprobs or 0) if body.logprobs else None


def _prepare_requests(state: ServerState, body: ChatCompletionRequest, prepared: PreparedMessages,
                      tenant: str | None, arrival: float) -> tuple[int, list[RequestHandle]]:
    """(prompt length, handles) in a worker thread. If one of the n submissions is refused,
    those already queued are aborted."""
    engine = state.engine
    prompt = build_prompt(engine.tokenizer, prepared.messages, prepared.items)
    max_new = max_tokens_for(state, body, len(prompt.token_ids))
    media = [(r.offset, m) for r, m in zip(prompt.ranges, prompt.media)]
    handles: list[RequestHandle] = []
    try:
        for i in range(body.n):
            spec = EngineRequest(
                token_ids=prompt.token_ids, media=media, sampling=sampling_for(state, body, max_new, i),
                cache_salt=tenant, logprobs=_logprobs(body),
                arrival=arrival, media_decode_s=prepared.decode_s if i == 0 else 0.0)
            handles.append(engine.submit(spec))
    except BaseException:
        for h in handles:
            h.abort()
        raise
    return len(prompt.token_ids), handles


# --------------------------------------------------------------------- running a choice
Emit = Callable[[ChoiceRun, str, list], Awaitable[None]]


async def _run_choice(job: ChatJob, c: ChoiceRun, emit: Emit | None) -> None:
    """Reads the choice's deltas to its end (or its first stop string)."""
    async with contextlib.aclosing(c.handle.__aiter__()) as deltas:
        async for delta in deltas:
            text, pairs = c.stop.feed(delta.text), _pairs(delta)
            c.token_ids += delta.token_ids
            c.logprobs += pairs
            if emit is not None and (text or pairs):
                await emit(c, text, pairs)
            if c.stop.hit:
                break
    if c.stop.hit:
        c.handle.abort()
    else:
        rest = c.stop.flush()
        if emit is not None and rest:
            await emit(c, rest, [])
    c.output = await c.handle.aresult()
    c.finish_reason = "stop" if c.stop.hit else c.output.finish_reason
    if job.observe is not None and not c.observed:  # a stop string ends it by an abort: counted as "stop"
        c.observed = True
        job.observe(dataclasses.replace(c.output, finish_reason=c.finish_reason))


_COUNTING: set[asyncio.Task] = set()  # cut-off choices waiting to be counted (ChatJob.abort)


async def _observe_ended(c: ChoiceRun, observe: Callable[[RequestOutput], None]) -> None:
    """Counts a choice that was cut off (its client left mid-answer) once the engine has ended it."""
    try:
        out = await c.handle.aresult()
    except Exception:  # noqa: BLE001 - an engine error: nothing to count as an answer
        return
    observe(dataclasses.replace(out, finish_reason="abort"))


def _pairs(delta: OutputDelta) -> list[tuple[int, tuple]]:
    return list(zip(delta.token_ids, delta.logprobs)) if delta.logprobs else []


# ------------------------------------------------------------------------- non-streaming
async def _complete(request: Request, job: ChatJob) -> Response:
    work = asyncio.ensure_future(asyncio.gather(*(_run_choice(job, c, None) for c in job.choices)))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the client left: nobody reads the answer
            return Response(status_code=499)
        work.result()
    finally:
        work.cancel()
        gone.cancel()
        work.add_done_callback(_quiet)  # a cancelled gather's CancelledError is not an error to log
        job.abort()
    if job.shutdown:
        raise _cut_short()
    choices = [Choice(index=c.index, message=AssistantMessage(content=c.stop.text), finish_reason=c.finish_reason,
                      logprobs=job.logprobs_of(c.logprobs)) for c in job.choices]
    answer = ChatCompletion(id=job.id, created=job.created, model=job.model, choices=choices, usage=job.usage(),
                            metrics=job.metrics())
    return JSONResponse(answer.model_dump(mode="json"))


def _cut_short() -> ShuttingDown:
    return ShuttingDown("the server is shutting down: the answer was cut short")


def _quiet(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ----------------------------------------------------------------------------- streaming
async def _stream(job: ChatJob) -> AsyncIterator[str]:
    """role chunk per choice, content chunks as they come (choices interleaved), one finish
    chunk per choice (an empty delta, as OpenAI sends it), the usage chunk, [DONE]."""
    usage_field = {"usage": None} if job.body.include_usage else {}

    def chunk(index: int, delta: dict, logprobs=None, finish=None) -> str:
        c = ChatCompletionChunk(id=job.id, created=job.created, model=job.model,
                                choices=[ChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)])
        return sse({**c.model_dump(mode="json", exclude={"usage", "metrics"}), **usage_field})

    # content chunks without logprobs, the bulk of a stream: the model's own serialisation of
    # one chunk per choice, cut around its text (a model_dump per token cost ~50 us of the
    # event loop, which shares the interpreter with the engine loop)
    marker = "\u0000omnistream-text\u0000"
    templates = {c.index: chunk(c.index, {"content": marker}).split(json.dumps(marker)) for c in job.choices}
    queue: asyncio.Queue = asyncio.Queue()

    async def emit(c: ChoiceRun, text: str, pairs: list) -> None:
        if pairs:
            queue.put_nowait(chunk(c.index, {"content": text}, job.logprobs_of(pairs)))
        else:
            head, tail = templates[c.index]
            queue.put_nowait(head + json.dumps(text) + tail)

    async def run(c: ChoiceRun) -> None:
        try:
            await _run_choice(job, c, emit)
            if job.shutdown:
                raise _cut_short()
            queue.put_nowait(chunk(c.index, {}, finish=c.finish_reason))
        except Exception as e:  # noqa: BLE001 - reported in the stream, the status is sent already
            queue.put_nowait(e)
        queue.put_nowait(None)

    for c in job.choices:
        yield chunk(c.index, {"role": "assistant", "content": ""})
    tasks = [asyncio.create_task(run(c)) for c in job.choices]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                yield sse(as_api_error(item).body())
                break
            else:
                if job.first_sent is None:
                    job.first_sent = time.perf_counter()
                yield item
        else:
            if job.body.include_usage:
                final = ChatCompletionChunk(id=job.id, created=job.created, model=job.model, choices=[],
                                            usage=job.usage(), metrics=job.metrics())
                yield sse(final.model_dump(mode="json"))
        yield sse("[DONE]")
    finally:
        for t in tasks:
            t.cancel()
        job.abort()
