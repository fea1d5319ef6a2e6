"""The client's end of a submitted request: output deltas as tokens arrive, then one final output.

    h = core.submit(EngineRequest(...))
    for delta in h:            # or: async for delta in h
        print(delta.text, end="")
    out = h.result()           # RequestOutput (raises the request's error, if it failed)
    h.abort()

The engine loop pushes tokens (`_push`) and the end (`_end`); any number of threads or asyncio
tasks may wait. Text is decoded here, in the reader's thread, never in the loop: each delta is
the new suffix of the decoded output, held back while it ends inside a multi-byte character, so
the deltas concatenate to the final text.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from omnistream.engine.protocol import OutputDelta, RequestOutput, TokenLogprob

if TYPE_CHECKING:
    from omnistream.engine.request import Request


class RequestHandle:
    """A submitted request, from the caller's side: iterate it (`for` or `async for`) for
    OutputDeltas as tokens arrive, `result()` / `await aresult()` for the RequestOutput,
    `abort()` to stop it. Any number of threads and asyncio tasks may read it at once."""

    def __init__(self, request_id: str, decode: Callable[[list[int]], str], abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self._decode = decode
        self._abort = abort
        self._cond = threading.Condition()
        self._tokens: list[int] = []  # every token pushed so far
        self._logprobs: list[TokenLogprob] = []
        self._final: RequestOutput | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._streamers = 0  # threads iterating deltas: only they are woken per token

    # ------------------------------------------------------------------ loop side
    def _push(self, token: int, logprob: TokenLogprob | None) -> None:
        with self._cond:
            self._tokens.append(token)
            if logprob is not None:
                self._logprobs.append(logprob)
            # result() waiters sleep until the end: waking 64 of them per step would fight
            # the engine loop for the interpreter lock
            if self._streamers:
                self._cond.notify_all()
            self._wake()

    def _end(self, out: RequestOutput) -> None:
        with self._cond:
            self._final = out
            self._cond.notify_all()
            self._wake()

    def _wake(self) -> None:
        for loop, event in self._waiters:
            _wake_later(loop, event)

    # ------------------------------------------------------------------ reader side
    @property
    def done(self) -> bool:
        return self._final is not None

    def abort(self) -> None:
        self._abort(self.request_id)

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Waits for the end; raises the request's error if it failed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._final is not None, timeout):
                raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s")
        return self._checked()

    async def aresult(self) -> RequestOutput:
        async for _ in self:
            pass
        return self._checked()

    def __iter__(self):
        reader = _DeltaReader(self)
        while True:
            with self._cond:
                self._streamers += 1
                try:
                    self._cond.wait_for(lambda: len(self._tokens) > reader.seen or self._final is not None)
                finally:
                    self._streamers -= 1
                ended, tokens, logprobs = self._snapshot()
            delta = reader.delta(tokens, logprobs, ended)
            if delta is not None:
                yield delta
            if ended:
                self._checked()
                return

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        waiter = (loop, event)
        with self._cond:
            self._waiters.append(waiter)
        reader = _DeltaReader(self)
        try:
            while True:
                with self._cond:
                    event.clear()
                    ended, tokens, logprobs = self._snapshot()
                if len(tokens) > reader.seen or ended:
                    delta = reader.delta(tokens, logprobs, ended)
                    if delta is not None:
                        yield delta
                    if ended:
                        self._checked()
                        return
                    continue
                await event.wait()
        finally:
            with self._cond:
                self._waiters.remove(waiter)

    def _snapshot(self) -> tuple[bool, list[int], list[TokenLogprob]]:
        """(ended, tokens, logprobs) now; called under self._cond."""
        return self._final is not None, list(self._tokens), list(self._logprobs)

    def _checked(self) -> RequestOutput:
        out = self._final
        if out.error is not None:
            raise out.error
        if out.text is None:  # decoded once, by the first reader
            out.text = self._decode(out.token_ids)
        return out


# Waking an asyncio reader from the engine loop is a call_soon_threadsafe, a write to the event
# loop's self-pipe: one per token per streaming request was 32 syscalls per step at 32 streams,
# on the engine loop. Events to set are collected per event loop and set by one callback there.
_pending: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
_pending_lock = threading.Lock()


def _wake_later(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
    with _pending_lock:
        events = _pending.get(loop)
        if events is not None:  # a callback is scheduled there already
            events.append(event)
            return
        _pending[loop] = [event]
    try:
        loop.call_soon_threadsafe(_set_pending, loop)
    except RuntimeError:  # the event loop is closed: nobody waits any more
        with _pending_lock:
            _pending.pop(loop, None)


def _set_pending(loop: asyncio.AbstractEventLoop) -> None:
    with _pending_lock:
        events = _pending.pop(loop, [])
    for event in events:
        event.set()


class _DeltaReader:
    """Turns the growing token list into deltas of new tokens and new text.

    Incremental: each delta decodes only a window, the tokens of the last delta (context, so a
    byte-level tokenizer joins pieces as a whole decode does) and the new ones; decoding every
    token so far at every delta cost O(n^2) over an answer. Text that ends inside a multi-byte
    character is held back until the character is complete."""

    def __init__(self, handle: RequestHandle) -> None:
        self.handle = handle
        self.seen = 0  # tokens already delivered
        self.text = ""  # text already delivered
        self.prefix = 0  # first token of the decode window
        self.read = 0  # tokens whose text has been delivered

    def delta(self, tokens: list[int], logprobs: list[TokenLogprob], ended: bool) -> OutputDelta | None:
        new, lps = tokens[self.seen :], logprobs[self.seen :] if logprobs else None
        self.seen = len(tokens)
        if ended and self.handle._final.error is None:
            text = self._rest(self.handle._checked().text)
        else:
            text = self._window(tokens)
        if not new and not text:
            return None
        return OutputDelta(self.handle.request_id, new, text, lps or None)

    def _window(self, tokens: list[int]) -> str:
        decode = self.handle._decode
        head = decode(tokens[self.prefix : self.read]) if self.read > self.prefix else ""
        window = decode(tokens[self.prefix :])
        if len(window) <= len(head) or window.endswith("\ufffd"):
            return ""
        text = window[len(head) :]
        self.text += text
        self.prefix, self.read = self.read, len(tokens)
        return text

    def _rest(self, full: str) -> str:
        """The final text past what was delivered (the whole decode is the reference)."""
        if not full.startswith(self.text):
            return ""
        text, self.text = full[len(self.text) :], full
        return text


@dataclass(frozen=True)
class PreparedRequest:
    """A request built and checked (a BudgetError or UserInputError is raised by then) but not
    queued yet: a core's prepare(), then send(). The build is CPU work that callers do one at a
    time, each request queued as soon as it is built (api.Engine.build_and_send)."""

    request: "Request"
    handle: RequestHandle

