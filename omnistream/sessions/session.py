"""Multi-turn sessions: a conversation whose KV stays in the engine between questions.

    s = engine.session()
    s.add_video("clip.mp4", fps=2)         # decoded, resized and hashed now, once
    s.ask("What happens?")                 # prefill: system + video + question
    s.ask("And then?")                     # prefill: only the new turn's tokens
    s.add_audio("speech.wav")              # Qwen2.5-Omni: audio parts, and add_video(...,
                                           # use_audio_in_video=True) for a file's sound track

The session's context is exactly the chat-template token sequence of its conversation: every
answer joins the history as the generated token ids followed by the template's end-of-turn
tokens ("<|im_end|>\\n"), never re-tokenised text. Each turn is an ordinary request whose
prompt is the whole sequence; the prefix cache serves the part already computed. The request
tells the engine to retain the conversation's KV when it ends (up to the session's KV budget):
the engine loop applies it atomically. Retained KV is idle between turns: when other users need
the space the engine may drop it (least recently used first), and the next question recomputes
what is gone, exactly. A session is a client of the engine core: it never touches blocks,
locks or the runner.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from omnistream.cache.prefix_hash import extend_hashes
from omnistream.engine.handle import PreparedRequest, RequestHandle
from omnistream.engine.protocol import EngineRequest, OutputDelta, RequestOutput, Retain
from omnistream.engine.sampling import SamplingParams
from omnistream.errors import UserInputError
from omnistream.media.item import MediaItem, media_blocks
from omnistream.models.literal_text import RenderedHistory, encode_turn, render_history
from omnistream.models.position_prefix import KnownPositions, extend_positions, text_positions
from omnistream.models.prompt import block_kind, expand_placeholders

log = logging.getLogger(__name__)
RELEASE_TIMEOUT_S = 2.0  # a closing session waits this long for the engine to drop its KV

if TYPE_CHECKING:
    from omnistream.entrypoints.api import Engine


class Session:
    def __init__(self, engine: "Engine", session_id: str, system: str | None, tenant: str | None, kv_budget_tokens: int | None) -> None:
        self.engine = engine
        self.id = session_id
        self.tenant = tenant
        self.kv_budget_tokens = kv_budget_tokens
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self.token_ids: list[int] = []  # the conversation so far, as the model sees it
        self.media: list[tuple[int, MediaItem]] = []  # (offset in token_ids, item)
        # positions of token_ids ((3, len), next position): each turn computes only its own
        self._positions: KnownPositions | None = None
        self._rendered: RenderedHistory | None = None  # the template's text of `messages` (None: render when asked)
        self._pending_parts: list[dict[str, Any]] = []  # user content not yet asked about
        self._pending_items: list[MediaItem] = []  # flat: one part may give several items (a block)
        self._pending_sizes: list[int] = []  # items each pending part gave (0: text)
        self._names: list[bytes] = []  # prefix-cache names of token_ids' full blocks (grow with it)
        self._turn = threading.Lock()  # one question at a time: a conversation is sequential
        self.turns = 0  # answered questions
        self.closed = False

    # ------------------------------------------------------------------ inputs
    def add_video(self, src, **options) -> MediaItem:
        """A video part (options as in a message's video part). With use_audio_in_video=True
        (Qwen2.5-Omni) the file's audio track joins it: one block of video and audio pieces;
        returns the first piece (`pending_items()` has them all)."""
        part = {"type": "video", "video": src, **{k: v for k, v in options.items() if v is not None}}
        return self._add_media(part)[0]

    def add_image(self, src, **options) -> MediaItem:
        part = {"type": "image", "image": src, **{k: v for k, v in options.items() if v is not None}}
        return self._add_media(part)[0]

    def add_audio(self, src, **options) -> list[MediaItem]:
        """An audio part (Qwen2.5-Omni): a file path, or {"array": samples, "sampling_rate": hz}.
        Decoded, featurised at its true length and hashed now, once; returns its items (a clip
        whose last 2 s chunk is shorter is two items of one block)."""
        part = {"type": "audio", "audio": src, **{k: v for k, v in options.items() if v is not None}}
        return self._add_media(part)

    def add_text(self, text: str) -> None:
        self._check_open()
        self._pending_parts.append({"type": "text", "text": text})
        self._pending_sizes.append(0)

    @property
    def pending_count(self) -> int:
        """Parts (text and media) added since the last question; a mark for drop_pending()."""
        return len(self._pending_parts)

    @property
    def pending_media(self) -> int:
        """Media parts added since the last question (a part may hold several items)."""
        return sum(1 for n in self._pending_sizes if n)

    def pending_items(self) -> list[MediaItem]:
        return list(self._pending_items)

    def drop_pending(self, mark: int) -> None:
        """Forgets the parts added after `pending_count` was `mark` (a turn that failed), with
        every item each of them gave."""
        n_items = sum(self._pending_sizes[mark:])
        del self._pending_parts[mark:], self._pending_sizes[mark:]
        if n_items:
            del self._pending_items[len(self._pending_items) - n_items:]

    def add_item(self, item: MediaItem | Sequence[MediaItem]) -> MediaItem:
        """Adds an image, video or audio clip already decoded and preprocessed (e.g. by a
        server's media cache), or the items of one block (an audio clip in two items, a video
        with its audio track); it joins the next question's turn like add_image / add_video."""
        self._check_open()
        items = [item] if isinstance(item, MediaItem) else list(item)
        if len(media_blocks(items)) != 1:
            raise UserInputError("add_item takes one media item, or the items of one block (sharing a block_id)")
        if any(m.kind not in ("image", "video", "audio") for m in items):
            raise UserInputError(f"cannot add a media item of kind {items[0].kind!r}")
        self._append_part({"type": block_kind(items)}, items)
        return items[0]

    def _add_media(self, part: dict) -> list[MediaItem]:
        self._check_open()
        items = self.engine.load_media([{"role": "user", "content": [part]}])
        self._append_part(part, items)
        return items

    def _append_part(self, part: dict, items: list[MediaItem]) -> None:
        self._pending_parts.append(part)
        self._pending_items.extend(items)
        self._pending_sizes.append(len(items))

    # ------------------------------------------------------------------ asking
    def ask(self, question: str, sampling: SamplingParams | None = None, *, return_logits: bool = False,
            logprobs: int | None = None) -> RequestOutput:
        """Answers `question` over the conversation so far (waits for the answer)."""
        return self.start(question, sampling, return_logits=return_logits, logprobs=logprobs).finish()

    def ask_stream(self, question: str, sampling: SamplingParams | None = None, *, logprobs: int | None = None) -> Iterator[OutputDelta]:
        """Like ask(), yielding deltas as tokens are produced; the turn joins the conversation
        when the answer ends (an abandoned stream aborts the request and keeps nothing). The
        generator's return value is the RequestOutput."""
        answer = self.start(question, sampling, logprobs=logprobs)
        try:
            yield from answer.handle
            return answer.finish()
        finally:
            answer.abort()  # no-op once finished

    def start(self, question: str, sampling: SamplingParams | None = None, *, return_logits: bool = False,
              logprobs: int | None = None) -> "PendingAnswer":
        """Submits `question` and returns at once, holding the conversation's turn until the
        answer is finished or aborted: read `answer.handle` (deltas, sync or `async for`), then
        `answer.finish()` (the turn joins the conversation) or `answer.abort()` (nothing kept).
        ask() and ask_stream() are this; a server uses it to stream without a thread."""
        self._turn.acquire()
        try:  # built in order with every other caller's (a burst's back to back: engine/build_queue.py)
            turn, handle = self.engine.build_and_send(lambda: self._prepare(question, sampling, return_logits, logprobs))
        except BaseException:
            self._turn.release()
            raise
        return PendingAnswer(handle, lambda res: self._commit(turn, res), self._turn.release)

    def _prepare(self, question: str, sampling: SamplingParams | None, return_logits: bool, logprobs: int | None) -> tuple[tuple, PreparedRequest]:
        self._check_open()
        asked = time.perf_counter()  # TTFT counts from the question; media was ingested at add_*()
        user = {"role": "user", "content": self._pending_parts + [{"type": "text", "text": question}]}
        new_ids, new_media = self._render_turn(user)
        decode_s, preprocess_s = self._pending_costs()
        token_ids, media = self.token_ids + new_ids, self.media + new_media
        try:
            positions = extend_positions(self.engine.model, self._positions, len(token_ids), media)
        except ValueError as e:
            raise UserInputError(f"malformed media placeholders: {e}") from None
        spec = EngineRequest(
            token_ids=token_ids, media=media, sampling=sampling or SamplingParams(),
            cache_salt=self.tenant, known_hashes=self._names, known_positions=positions, retain=Retain(self.id, self.kv_budget_tokens),
            return_logits=return_logits, logprobs=logprobs, arrival=asked, media_decode_s=decode_s, preprocess_s=preprocess_s,
        )
        return (user, new_ids, new_media, positions), self.engine.prepare(spec)

    def _commit(self, turn: tuple, result: RequestOutput) -> RequestOutput:
        """The answer joins the conversation: its ids, then the template's end of turn."""
        user, new_ids, new_media, positions = turn
        prompt = self.token_ids + new_ids
        answer = result.token_ids + self._end_of_turn(result.token_ids)
        self.token_ids = prompt + answer
        self._positions = text_positions(positions, len(answer))
        self.media = self.media + new_media
        self.messages += [user, {"role": "assistant", "content": result.text}]
        # the next question subtracts this text: rendered now, off its path (its TTFT and arrival)
        self._rendered = render_history(self.engine.tokenizer, self.messages)
        self._pending_parts, self._pending_items, self._pending_sizes = [], [], []
        bs = self.engine.block_size
        # token_ids only grow between turns, so the names of earlier blocks stay valid
        extend_hashes(self._names, self.token_ids, self.media, bs, len(self.token_ids) // bs, self.tenant)
        self.turns += 1
        return result

    def prompt_for(self, question: str) -> tuple[list[int], list[tuple[int, MediaItem]]]:
        """The token ids and media the next ask(question) would send (for references)."""
        ids, media = self._render_turn({"role": "user", "content": self._pending_parts + [{"type": "text", "text": question}]})
        return self.token_ids + ids, self.media + media

    def _render_turn(self, user: dict) -> tuple[list[int], list[tuple[int, MediaItem]]]:
        """Token ids of the new user turn + assistant header, media placeholders expanded.

        Rendered as the template's text for (history + turn) minus its text for the history, so
        a turn tokenises exactly as it does inside the whole conversation (Qwen's template
        renders every message independently of the ones after it)."""
        tok = self.engine.tokenizer
        ids = encode_turn(tok, self.messages, [user], history_rendered=bool(self.token_ids), rendered=self._rendered)
        ids, ranges = expand_placeholders(ids, self._pending_items, image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                                          audio_token_id=tok.audio_token_id, audio_start_token_id=tok.audio_start_token_id,
                                          audio_end_token_id=tok.audio_end_token_id)
        base = len(self.token_ids)
        return ids, [(base + r.offset, item) for r, item in zip(ranges, self._pending_items)]

    def _end_of_turn(self, answer: list[int]) -> list[int]:
        im_end = self.engine.tokenizer.im_end_token_id
        newline = self.engine.tokenizer.encode("\n")
        return newline if answer and answer[-1] == im_end else [im_end] + newline

    def _pending_costs(self) -> tuple[float, float]:
        """(decode, preprocess + hash) seconds of the media added since the last question."""
        return (sum(m.decode_s for m in self._pending_items), sum(m.preprocess_s + m.hash_s for m in self._pending_items))

    # ------------------------------------------------------------------ retained KV
    @property
    def pinned_tokens(self) -> int:
        """Tokens of this conversation's KV the engine retains now (may shrink under pressure)."""
        return self.engine.core.run_op("retained_tokens", self.id)

    def retained_blocks(self) -> list[int]:
        """The KV blocks the engine retains for this conversation now, in sequence order."""
        return self.engine.core.run_op("retained_blocks", self.id)

    # ------------------------------------------------------------------ lifecycle
    def fork(self) -> "Session":
        """A new session with this one's history (sharing its retained KV blocks)."""
        self._check_open()
        other = self.engine.session(tenant=self.tenant, kv_budget_tokens=self.kv_budget_tokens)
        other.messages = list(self.messages)  # messages are never mutated, only appended
        other.token_ids, other.media = list(self.token_ids), list(self.media)
        other._positions = self._positions  # never mutated, only replaced
        other._rendered = self._rendered
        other._pending_parts, other._pending_items = list(self._pending_parts), list(self._pending_items)
        other._pending_sizes = list(self._pending_sizes)
        other._names = list(self._names)
        other.turns = self.turns
        self.engine.core.run_op("fork_retained", self.id, other.id)
        return other

    def close(self) -> None:
        """Ends the session: the engine drops its KV (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.engine._forget(self.id)
        self._release_kv()

    def _release_kv(self) -> None:
        if not self.engine.core.is_loop_thread:
            try:  # waited for briefly: a stopped engine must not hang a close (a server's shutdown)
                self.engine.core.run_op("release_retained", self.id, timeout=RELEASE_TIMEOUT_S)
            except TimeoutError:
                log.warning("session %s: the engine did not release its KV within %g s", self.id, RELEASE_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - the engine is closed: nothing to release
                pass

    def _check_open(self) -> None:
        if self.closed:
            raise UserInputError(f"session {self.id} is closed")


class PendingAnswer:
    """A submitted question whose session turn is held until finish() or abort() (see
    Session.start). Either may be called from any thread; the first one releases the turn."""

    def __init__(self, handle: RequestHandle, commit: Callable[[RequestOutput], RequestOutput], release: Callable[[], None]) -> None:
        self.handle = handle
        self._commit = commit
        self._release = release
        self._once = threading.Lock()
        self._released = False

    def finish(self) -> RequestOutput:
        """Waits for the end; the turn joins the conversation (an aborted answer keeps nothing)
        and the session is free for the next question. Raises the request's error."""
        try:
            result = self.handle.result()
            return result if result.finish_reason == "abort" else self._commit(result)
        finally:
            self._release_once()

    def abort(self) -> None:
        """Ends an unfinished answer (nothing joins the conversation) and frees the session;
        a no-op after finish()."""
        if not self._released and not self.handle.done:
            self.handle.abort()
        self._release_once()

    def _release_once(self) -> None:
        with self._once:
            if self._released:
                return
            self._released = True
        self._release()
