"""Multi-turn sessions: a conversation whose KV stays in the engine between questions.

    s = engine.session()
    s.add_video("clip.mp4", fps=2)         # decoded, resized and hashed now, once
    s.ask("What happens?")                 # prefill: system + video + question
    s.ask("And then?")                     # prefill: only the new turn's tokens

The session's context is exactly the chat-template token sequence of its conversation: every
answer joins the history as the generated token ids followed by the template's end-of-turn
tokens ("<|im_end|>\\n"), never re-tokenised text. Each turn is an ordinary request whose
prompt is the whole sequence; the prefix cache serves the part already computed, and the
session pins those blocks (up to its KV budget) so other traffic cannot evict them. Blocks
beyond the budget may be evicted and are recomputed on demand: answers stay exact.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from omnistream.cache.prefix_hash import extend_hashes
from omnistream.engine.sampling import SamplingParams
from omnistream.errors import UserInputError
from omnistream.media.item import MediaItem
from omnistream.models.prompt import expand_placeholders

if TYPE_CHECKING:
    from omnistream.entrypoints.api import Engine, GenerationResult



class Session:
    def __init__(self, engine: "Engine", session_id: str, system: str | None, tenant: str | None, kv_budget_tokens: int | None) -> None:
        self.engine = engine
        self.id = session_id
        self.tenant = tenant
        self.kv_budget_tokens = kv_budget_tokens
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self.token_ids: list[int] = []  # the conversation so far, as the model sees it
        self.media: list[tuple[int, MediaItem]] = []  # (offset in token_ids, item)
        self._pending_parts: list[dict[str, Any]] = []  # user content not yet asked about
        self._pending_items: list[MediaItem] = []
        self._pinned: list[int] = []
        self._names: list[bytes] = []  # prefix-cache names of token_ids' full blocks (grow with it)
        self.closed = False

    # ------------------------------------------------------------------ inputs
    def add_video(self, src, **options) -> MediaItem:
        part = {"type": "video", "video": src, **{k: v for k, v in options.items() if v is not None}}
        return self._add_media(part)

    def add_image(self, src, **options) -> MediaItem:
        part = {"type": "image", "image": src, **{k: v for k, v in options.items() if v is not None}}
        return self._add_media(part)

    def add_text(self, text: str) -> None:
        self._check_open()
        self._pending_parts.append({"type": "text", "text": text})

    def _add_media(self, part: dict) -> MediaItem:
        self._check_open()
        [item] = self.engine.load_media([{"role": "user", "content": [part]}])
        self._pending_parts.append(part)
        self._pending_items.append(item)
        return item

    # ------------------------------------------------------------------ asking
    def ask(self, question: str, sampling: SamplingParams | None = None, *, return_logits: bool = False) -> "GenerationResult":
        self._check_open()
        asked = time.perf_counter()  # TTFT counts from the question; media was ingested at add_*()
        sampling = sampling or SamplingParams()
        user = {"role": "user", "content": self._pending_parts + [{"type": "text", "text": question}]}
        new_ids, new_media = self._render_turn(user)
        prompt = self.token_ids + new_ids
        media = self.media + new_media
        [result] = self.engine.run_prompts([(prompt, media, self._pending_costs(), asked)], sampling, return_logits=return_logits,
                                           cache_salt=self.tenant, known_hashes=self._names)
        # commit the turn: the answer's ids, then the template's end of turn
        self.token_ids = prompt + result.token_ids + self._end_of_turn(result.token_ids)
        self.media = media
        self.messages += [user, {"role": "assistant", "content": result.text}]
        self._pending_parts, self._pending_items = [], []
        self._repin()
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
        before = tok.apply_chat_template(self.messages, add_generation_prompt=False) if self.token_ids else ""
        full = tok.apply_chat_template(self.messages + [user], add_generation_prompt=True)
        if not full.startswith(before):
            raise UserInputError("chat template does not render turns incrementally")
        ids = tok.encode(full[len(before):])
        ids, ranges = expand_placeholders(ids, self._pending_items, image_token_id=tok.image_token_id, video_token_id=tok.video_token_id)
        base = len(self.token_ids)
        return ids, [(base + r.offset, item) for r, item in zip(ranges, self._pending_items)]

    def _end_of_turn(self, answer: list[int]) -> list[int]:
        im_end = self.engine.model.cfg.im_end_token_id
        newline = self.engine.tokenizer.encode("\n")
        return newline if answer and answer[-1] == im_end else [im_end] + newline

    def _pending_costs(self) -> tuple[float, float]:
        """(decode, preprocess + hash) seconds of the media added since the last question."""
        return (sum(m.decode_s for m in self._pending_items), sum(m.preprocess_s + m.hash_s for m in self._pending_items))

    # ------------------------------------------------------------------ KV pinning
    def _repin(self) -> None:
        """Pin the cached blocks of this conversation's prefix, up to the session budget."""
        with self.engine._lock:  # block refcounts are shared with other threads' sessions
            self._repin_locked()

    def _repin_locked(self) -> None:
        blocks = self.engine.llm.blocks
        budget = self.kv_budget_tokens
        full = len(self.token_ids) // blocks.block_size
        if budget is not None:
            full = min(full, budget // blocks.block_size)
        # token_ids only grow between turns, so the names of earlier blocks stay valid
        extend_hashes(self._names, self.token_ids, self.media, blocks.block_size, len(self.token_ids) // blocks.block_size, self.tenant)
        found = blocks.cached_prefix(self._names[:full])
        blocks.pin(found)  # pin the new set before releasing the old one (they overlap)
        blocks.unpin(self._pinned)
        self._pinned = found

    @property
    def pinned_tokens(self) -> int:
        return len(self._pinned) * self.engine.llm.blocks.block_size

    # ------------------------------------------------------------------ lifecycle
    def fork(self) -> "Session":
        """A new session with this one's history (sharing its KV blocks)."""
        self._check_open()
        other = self.engine.session(tenant=self.tenant, kv_budget_tokens=self.kv_budget_tokens)
        other.messages = list(self.messages)  # messages are never mutated, only appended
        other.token_ids, other.media = list(self.token_ids), list(self.media)
        other._pending_parts, other._pending_items = list(self._pending_parts), list(self._pending_items)
        with self.engine._lock:
            self.engine.llm.blocks.pin(self._pinned)
        other._pinned = list(self._pinned)
        return other

    def close(self) -> None:
        if self.closed:
            return
        with self.engine._lock:
            self.engine.llm.blocks.unpin(self._pinned)
        self._pinned = []
        self.closed = True
        self.engine._sessions.pop(self.id, None)

    def _check_open(self) -> None:
        if self.closed:
            raise UserInputError(f"session {self.id} is closed")
