"""/v1/realtime: a live video session over a WebSocket, in the OpenAI Realtime event model.

One socket = one live session (engine.live_session). The client streams camera frames
(`input_image_buffer.append`, Qwen-Omni-Realtime's event, plus `timestamp_ms`) and, to a model
that hears (Qwen2.5-Omni), sound (`input_audio_buffer.append`: base64 PCM16, 16 kHz mono, OpenAI's
default format, plus an optional `timestamp_ms` on the frames' clock), adds questions
(`conversation.item.create` with `input_text`) and asks for answers (`response.create`); the
server streams `response.output_text.delta`s and ends each answer with `response.done`, which
carries the per-question metrics. docs/realtime.md lists every event and field.

Data flow. The receive loop never waits for an answer: each response runs as its own task
(LiveSession.start in a worker thread, then the engine handle read with `async for`), so frames
keep arriving, and keep being ingested, while an answer streams. A frame's base64 and JPEG/PNG
decoding runs in a worker thread (awaited in order, so frames and questions keep the order the
client sent them in: a question sees every frame sent before it). A bad event gets an `error`
event and the socket and session go on. When the socket closes, its answers are aborted and the
live session is closed: its KV is freed and its worker thread stops.

The events' fields, the error codes, the live settings, frame decoding and the response.done
payloads: realtime_events.py. Here the socket: receiving, ingesting, answering, closing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from fastapi import FastAPI, WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from omnistream.engine.sampling import SamplingParams
from omnistream.errors import EngineError, UserInputError
from omnistream.server import validation
from omnistream.server.auth import accepted_subprotocol, tenant_for
from omnistream.server.errors import as_api_error
from omnistream.server.realtime_events import (
    AUDIO_RATE,
    AUDIO_TIMESTAMP_SLACK_S,
    EventError,
    LiveConfig,
    MessageItem,
    ResponseFields,
    SessionFields,
    cancelled_payload,
    decode_frame,
    done_payload,
    event_model,
    parse_event,
    response_sampling,
    validation_message,
)
from omnistream.server.session_registry import Entry, registry_of
from omnistream.server.sessions_api import start_in_thread
from omnistream.server.state import ServerState
from omnistream.sessions.live import LiveSession
from omnistream.sessions.session import PendingAnswer

log = logging.getLogger(__name__)

INTAKE_QUEUE = 64  # frames / questions received but not yet decoded or started (then the socket waits)


@dataclass
class Response:
    """One answer in flight."""

    id: str
    event_id: str | None = None  # of the client's response.create (errors name it)
    task: asyncio.Task | None = None
    answer: PendingAnswer | None = None  # once LiveSession.start returned
    cancelled: bool = False  # response.cancel arrived


# ---------------------------------------------------------------------------------- the socket
class RealtimeConnection:
    def __init__(self, ws: WebSocket, state: ServerState) -> None:
        self.ws, self.state = ws, state
        self.registry = state.extras["sessions"]
        self.tenant = tenant_for(ws)
        self.id = f"sess_{uuid.uuid4().hex[:16]}"
        self.config = LiveConfig()
        self.entry: Entry | None = None
        self.question: list[str] = []  # input_text of items not answered yet
        self.responses: dict[str, Response] = {}
        self.opened = time.monotonic()
        self.last_ts = -math.inf  # of the last frame accepted
        self.frames_accepted = 0  # frames queued for the live session (decoded or not yet)
        self.hears = getattr(state.engine.model, "audio_config", None) is not None
        self.audio_end: float | None = None  # where the last accepted audio chunk ends (s)
        self.audio_generation = 0  # input_audio_buffer.clear drops queued chunks of older generations
        # frames and answers to start, in the order the client sent them (see _intake_loop)
        self._intake: asyncio.Queue = asyncio.Queue(maxsize=INTAKE_QUEUE)
        self._intake_task: asyncio.Task | None = None
        self._send_lock = asyncio.Lock()
        self._events = 0
        self._closing = False
        self.shutting_down = False  # the server stops (end_for_shutdown)
        self._loop: asyncio.AbstractEventLoop | None = None  # the socket's, once run() started
        state.on_shutdown.add(self)

    def __hash__(self) -> int:  # held in ServerState.on_shutdown (a WeakSet): by identity
        return id(self)

    def end_for_shutdown(self) -> None:
        """The server stops (any thread): answers in flight end now, each with its
        response.done (cancelled, reason server_shutting_down), then the socket says
        session_expired and closes with 1001 (going away). Before, uvicorn's shutdown closed
        it with 1012 and no event (a fresh-clone trial); the server waits for this close
        (ServerState.shutdown_tasks) before its own."""
        self.shutting_down = True
        for r in list(self.responses.values()):
            _cancel(r)
        if self._loop is None or self._loop.is_closed():
            return
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:  # at once: the server's shutdown reads the tasks right after begin_shutdown
            self._start_shutdown_close()
        else:
            self._loop.call_soon_threadsafe(self._start_shutdown_close)

    def _start_shutdown_close(self) -> None:
        task = asyncio.ensure_future(self._close_for_shutdown())
        self.state.shutdown_tasks.add(task)
        task.add_done_callback(self.state.shutdown_tasks.discard)

    async def _close_for_shutdown(self) -> None:
        if self._closing:
            return
        await asyncio.gather(*(r.task for r in list(self.responses.values()) if r.task is not None), return_exceptions=True)
        await self._expire("the server is shutting down")

    @property
    def live(self) -> LiveSession:
        return self.entry.session

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.ws.accept(subprotocol=accepted_subprotocol(self.ws))
        model = self.ws.query_params.get("model")
        if model is not None and model != self.state.model_name:
            await self._send_error(EventError(f"model {model!r} does not exist (this server serves "
                                              f"{self.state.model_name!r})", "model_not_found", "model"))
            await self.ws.close(code=1008)
            return
        try:
            await self._open()
        except Exception as e:  # noqa: BLE001 - over the session cap, a bad default: say so, close
            await self._send_error(e)
            await self.ws.close(code=1013 if getattr(e, "status", 0) == 429 else 1011)
            return
        try:
            await self.send({"type": "session.created", "session": self._describe()})
            self._intake_task = asyncio.get_running_loop().create_task(self._intake_loop())
            await self._receive_loop()
        finally:
            await self._shutdown()

    async def _open(self) -> None:
        live = await asyncio.to_thread(self.config.open, self.state, self.tenant)
        try:
            self.entry = self.registry.add("live", self.tenant, live, self._expire, entry_id=self.id)
        except Exception:
            await asyncio.to_thread(live.close)
            raise

    async def _receive_loop(self) -> None:
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            self.registry.touch(self.entry)
            text = msg.get("text")
            event_id = None
            try:
                if text is None:
                    raise EventError("binary messages are not supported: send JSON text events", "invalid_event")
                event = parse_event(text)
                event_id = event.get("event_id")
                handler = self._handlers.get(event["type"])
                if handler is None:
                    raise EventError(f"unknown event type {event['type']!r}", "unknown_event", "type")
                await handler(self, event)
            except WebSocketDisconnect:
                return
            except Exception as e:  # noqa: BLE001 - a bad event never ends the socket
                if not isinstance(e, (UserInputError, ValidationError)):
                    log.exception("realtime %s: event failed", self.id)
                await self._send_error(e, event_id)

    # ------------------------------------------------------------------ client events
    async def _session_update(self, event: dict) -> None:
        fields = event_model(SessionFields, event.get("session", {}), "session")
        changes = fields.model_dump(exclude_none=True, exclude={"model", "modalities", "input_audio_format"})
        new = replace(self.config, **changes)
        if new != self.config:
            if self.frames_accepted or self.live.turns or self.responses:
                raise EventError("session.update: frame memory, frame size, policy and instructions can be changed "
                                 "only before the first frame and question", "session_in_use", "session")
            live = await asyncio.to_thread(new.open, self.state, self.tenant)  # ConfigError -> error event
            old, self.entry.session, self.config = self.live, live, new
            await asyncio.to_thread(old.close)
        await self.send({"type": "session.updated", "session": self._describe()})

    async def _append_frame(self, event: dict) -> None:
        image = event.get("image")
        if not isinstance(image, str) or not image:
            raise EventError("input_image_buffer.append needs `image`: a base64 JPEG or PNG", "missing_image", "image")
        ts = self._timestamp(event.get("timestamp_ms"))
        if image.startswith("data:"):  # a data URL (what canvas.toDataURL gives) is fine too
            image = image.partition(",")[2]
        try:
            raw = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise EventError("input_image_buffer.append: `image` is not valid base64", "invalid_base64", "image") from None
        self.last_ts = ts  # taken even if the bytes do not decode: timestamps only move forward
        self.frames_accepted += 1
        await self._intake.put(("frame", raw, ts, event.get("event_id")))  # waits only when decoding is far behind

    def _timestamp(self, value: Any) -> float:
        """timestamp_ms -> seconds; absent: time since the socket opened. Never backwards."""
        if value is None:
            ts = max(time.monotonic() - self.opened, self.last_ts if math.isfinite(self.last_ts) else 0.0)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise EventError(f"timestamp_ms must be a finite number >= 0, got {value!r}", "invalid_timestamp", "timestamp_ms")
        else:
            ts = value / 1000.0
        if ts < self.last_ts:
            raise EventError(f"timestamp_ms {value} is before the previous frame's ({self.last_ts * 1000:.0f} ms)",
                             "invalid_timestamp", "timestamp_ms")
        return ts

    async def _append_audio(self, event: dict) -> None:
        """A chunk of sound: validated here, queued in order with frames and questions."""
        if not self.hears:
            raise EventError(f"{self.state.model_name} does not take audio (serve a Qwen2.5-Omni checkpoint)",
                             "audio_not_supported", "audio")
        audio = event.get("audio")
        if not isinstance(audio, str) or not audio:
            raise EventError("input_audio_buffer.append needs `audio`: base64 PCM16 (16 kHz mono)", "missing_audio", "audio")
        try:
            raw = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise EventError("input_audio_buffer.append: `audio` is not valid base64", "invalid_base64", "audio") from None
        if len(raw) % 2:
            raise EventError(f"input_audio_buffer.append: `audio` is {len(raw)} bytes, not whole PCM16 samples",
                             "invalid_audio", "audio")
        samples = np.frombuffer(raw, dtype="<i2")
        ts = self._audio_timestamp(event.get("timestamp_ms"))
        self.audio_end = ts + len(samples) / AUDIO_RATE
        await self._intake.put(("audio", samples, ts, event.get("event_id"), self.audio_generation))

    def _audio_timestamp(self, value: Any) -> float:
        """timestamp_ms -> seconds; absent: right where the previous chunk ended (a PCM stream
        is contiguous), the first one at the time since the socket opened."""
        if value is None:
            return self.audio_end if self.audio_end is not None else time.monotonic() - self.opened
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise EventError(f"timestamp_ms must be a finite number >= 0, got {value!r}", "invalid_timestamp", "timestamp_ms")
        ts = value / 1000.0
        if self.audio_end is not None and ts < self.audio_end - AUDIO_TIMESTAMP_SLACK_S:
            raise EventError(f"timestamp_ms {value} is before the end of the previous audio ({self.audio_end * 1000:.0f} ms)",
                             "invalid_timestamp", "timestamp_ms")
        return ts

    async def _clear_audio(self, event: dict) -> None:
        """Drops the audio chunks still queued (not yet handed to the live session); what the
        session has taken stays in its audio memory, as frames do."""
        self.audio_generation += 1
        await self.send({"type": "input_audio_buffer.cleared"})

    async def _item_create(self, event: dict) -> None:
        item = event_model(MessageItem, event.get("item", {}), "item")
        item_id = item.id or f"item_{uuid.uuid4().hex[:16]}"
        self.question.extend(c.text for c in item.content)
        await self.send({"type": "conversation.item.created", "previous_item_id": None, "item": {
            "id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
            "content": [c.model_dump() for c in item.content]}})

    async def _response_create(self, event: dict) -> None:
        fields = event_model(ResponseFields, event.get("response", {}), "response")
        limit = self.state.config.max_live_questions_in_flight
        if len(self.responses) >= limit:
            raise EventError(f"{limit} answer(s) already in flight on this session (the limit): wait for response.done "
                             "or send response.cancel", "too_many_questions")
        if not self.question:
            raise EventError("no question: send conversation.item.create with input_text first", "no_question")
        sampling = response_sampling(fields, self.state.default_sampling)
        question, self.question = "\n".join(self.question), []
        r = Response(f"resp_{uuid.uuid4().hex[:16]}", event.get("event_id"))
        self.registry.hold(self.id, self.tenant, "live")  # not expired while it answers (released by _end)
        self.responses[r.id] = r
        await self.send({"type": "response.created", "response": {
            "id": r.id, "object": "realtime.response", "status": "in_progress", "output": []}})
        await self._intake.put(("answer", r, question, sampling))

    async def _response_cancel(self, event: dict) -> None:
        rid = event.get("response_id")
        targets = [self.responses[rid]] if rid in self.responses else list(self.responses.values()) if rid is None else []
        if not targets:
            raise EventError(f"no response {rid!r} in flight" if rid else "no response in flight", "response_not_found",
                             "response_id")
        for r in targets:
            _cancel(r)

    _handlers = {
        "session.update": _session_update,
        "input_image_buffer.append": _append_frame,
        "input_audio_buffer.append": _append_audio,
        "input_audio_buffer.clear": _clear_audio,
        "conversation.item.create": _item_create,
        "response.create": _response_create,
        "response.cancel": _response_cancel,
    }

    # ------------------------------------------------------------------ intake
    async def _intake_loop(self) -> None:
        """Frames and questions in the order they were sent: a frame is decoded (worker thread)
        and queued for the live session; a question is started (LiveSession.start: it waits for
        the frames before it and snapshots its context), so it sees exactly the frames sent
        before it, then streams in its own task while later frames go on. The receive loop
        only validates and enqueues: it never waits for decoding or an answer."""
        while not self._closing:
            kind, *args = await self._intake.get()
            if kind == "frame":
                raw, ts, event_id = args
                try:
                    await asyncio.to_thread(self._add_frame, raw, ts)
                except Exception as e:  # noqa: BLE001 - this frame alone is refused
                    if not isinstance(e, UserInputError):
                        log.exception("realtime %s: frame failed", self.id)
                    await self._send_error(e, event_id)
            elif kind == "audio":
                samples, ts, event_id, generation = args
                if generation != self.audio_generation:
                    continue  # input_audio_buffer.clear came after it
                try:
                    await asyncio.to_thread(self._add_audio, samples, ts)
                except Exception as e:  # noqa: BLE001 - this chunk alone is refused
                    if not isinstance(e, UserInputError):
                        log.exception("realtime %s: audio failed", self.id)
                    await self._send_error(e, event_id)
            else:
                r, question, sampling = args
                try:
                    await self._start(r, question, sampling)
                except WebSocketDisconnect:
                    return  # the receive loop sees the disconnect and cleans up

    def _add_frame(self, raw: bytes, ts: float) -> None:
        """Decode (this worker thread) and queue the frame; the live session's worker ingests it."""
        try:
            frame = decode_frame(raw, self.state.config.max_image_pixels)
        except UserInputError as e:
            raise EventError(f"input_image_buffer.append: {e}", getattr(e, "code", None) or "invalid_image", "image") from None
        self.live.add_frame(frame, ts)

    def _add_audio(self, samples: np.ndarray, ts: float) -> None:
        try:
            self.live.add_audio(samples, ts, AUDIO_RATE)
        except UserInputError as e:  # MediaError: too short, a bad timestamp; the session goes on
            raise EventError(f"input_audio_buffer.append: {e}", "invalid_audio", "audio") from None

    # ------------------------------------------------------------------ answers
    async def _start(self, r: Response, question: str, sampling: SamplingParams) -> None:
        live = self.live
        try:
            if not r.cancelled:
                r.answer = await start_in_thread(lambda: live.start(question, sampling))
                if r.cancelled:
                    r.answer.abort()
        except Exception as e:  # noqa: BLE001 - no frames yet, a budget: reported, the session goes on
            await self._failed(r, e)
            return
        except BaseException:
            self._end(r)
            raise
        r.task = asyncio.get_running_loop().create_task(self._stream(r, live))

    async def _stream(self, r: Response, live: LiveSession) -> None:
        """Deltas, then response.done with the metrics (or cancelled / failed)."""
        try:
            if r.answer is None:  # cancelled before it started
                await self.send({"type": "response.done", "response": cancelled_payload(r.id, live)})
                return
            async for delta in r.answer.handle:
                if delta.text:
                    await self.send({"type": "response.output_text.delta", "response_id": r.id, "item_id": r.id,
                                     "output_index": 0, "content_index": 0, "delta": delta.text})
            res = await asyncio.to_thread(r.answer.finish)
            done = done_payload(r.id, res, live)
            if self.shutting_down and done["status"] == "cancelled":
                done["status_details"] = {"type": "cancelled", "reason": "server_shutting_down"}
            await self.send({"type": "response.done", "response": done})
        except WebSocketDisconnect:
            pass  # the socket is gone: the receive loop ends and cleans up
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - reported to the client; the session goes on
            await self._failed(r, e)
        finally:
            self._end(r)

    async def _failed(self, r: Response, e: Exception) -> None:
        if not isinstance(e, (UserInputError, EngineError)):
            log.exception("realtime %s: answer failed", self.id)
        try:
            await self._send_error(e, r.event_id)
            await self.send({"type": "response.done", "response": {
                "id": r.id, "object": "realtime.response", "status": "failed", "output": [],
                "status_details": {"type": "failed", "error": as_api_error(e).body()["error"]}}})
        finally:
            self._end(r)

    def _end(self, r: Response) -> None:
        """The answer is over (any way): the session is free for the next one."""
        if self.responses.pop(r.id, None) is None:
            return
        if r.answer is not None:
            r.answer.abort()  # no-op once finished
        self.registry.release(self.entry)

    # ------------------------------------------------------------------ output
    async def send(self, event: dict) -> None:
        self._events += 1
        event = {"event_id": f"event_{self._events}", **event}
        async with self._send_lock:  # several answers and the receive loop write to one socket
            if self.ws.application_state == WebSocketState.CONNECTED and not self._closing:
                await self.ws.send_text(json.dumps(event))

    async def _send_error(self, exc: BaseException, event_id: str | None = None) -> None:
        """An `error` event: OpenAI's shape, plus the client's event_id it answers."""
        param = getattr(exc, "param", None)
        if isinstance(exc, ValidationError):
            kind, code, message = "invalid_request_error", "invalid_event", validation_message(exc)
            param = next((where for where, _, _ in validation.problems(exc.errors()) if where), None)  # the first field at fault
        elif isinstance(exc, EventError):
            kind, code, message = "invalid_request_error", exc.code, str(exc)
        else:
            err = as_api_error(exc)
            kind, code, message = err.type, err.code, err.message
        try:
            await self.send({"type": "error", "error": {
                "type": kind, "code": code, "message": message, "param": param,
                "event_id": event_id}})
        except WebSocketDisconnect:
            pass

    def _describe(self) -> dict[str, Any]:
        audio = {"input_audio_format": "pcm16", "input_audio_sampling_rate": AUDIO_RATE} if self.hears else {
            "input_audio_format": None}
        return {"id": self.id, "object": "realtime.session", "model": self.state.model_name, "modalities": ["text"],
                **asdict(self.config), **audio, "max_questions_in_flight": self.state.config.max_live_questions_in_flight}

    # ------------------------------------------------------------------ the end
    async def _expire(self, why: str = "idle past its TTL, or the server is shutting down") -> None:
        """The registry's close (TTL, server shutdown) or the server's stop: end the socket;
        run() cleans up."""
        if self._closing:
            return
        await self._send_error(EventError(f"session closed by the server ({why})", "session_expired"))
        self._closing = True
        try:
            await self.ws.close(code=1001)
        except RuntimeError:
            pass
        if self.entry is not None:  # a socket stopped while its session was still opening has none
            await asyncio.to_thread(self.live.close)  # idempotent; run() may still be on its way

    async def _shutdown(self) -> None:
        """Socket gone: abort the answers, close the live session (KV freed, worker stopped)."""
        self._closing = True
        tasks = [r.task for r in self.responses.values() if r.task is not None] + [self._intake_task]
        for t in tasks:
            if t is not None:
                t.cancel()
        await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)
        for r in list(self.responses.values()):  # started answers were aborted by their tasks
            self._end(r)
        # the close runs to its end even if this handler is cancelled (the server shutting
        # down); the session is counted, and holds its slot, until it is really closed
        closing = asyncio.ensure_future(asyncio.to_thread(self.live.close))
        closing.add_done_callback(lambda _: self.registry.discard(self.id))
        await asyncio.shield(closing)


def _cancel(r: Response) -> None:
    r.cancelled = True  # one still waiting to start never starts
    if r.answer is not None:
        r.answer.abort()  # the stream ends; response.done says "cancelled"


async def realtime(ws: WebSocket) -> None:
    await RealtimeConnection(ws, ws.app.state.omni).run()


def install(app: FastAPI) -> None:
    registry_of(app)
    app.add_api_websocket_route("/v1/realtime", realtime)
