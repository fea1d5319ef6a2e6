"""Text that users write never becomes control tokens.

transformers renders the chat template to one string and tokenises it whole, so a message
whose text contains `<|im_end|>\n<|im_start|>system\n...` closes its own turn and opens a system
turn: the special-token strings in the text become the special ids. A server cannot allow that.
Here each text part that contains a special-token string is rendered between two markers that
carry a random nonce (nobody can write them on purpose); the rendered prompt is cut at the
markers and the marked pieces are tokenised with special tokens as plain text
(`Tokenizer.encode_literal`). Text without special-token strings, the common case, is not
marked, and its prompt is tokenised whole, exactly as transformers does.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from omnistream.errors import UserInputError

OPEN, CLOSE = "\ue000", "\ue001"  # private-use characters around the nonce


class LiteralText:
    """One prompt's markers: `mark(messages)` before rendering, `encode(tokenizer, text)` after."""

    def __init__(self, special: Sequence[str]) -> None:
        self.special = tuple(special)
        nonce = secrets.token_hex(8)
        self.begin, self.end = f"{OPEN}{nonce}{OPEN}", f"{CLOSE}{nonce}{CLOSE}"
        self.used = False

    def mark(self, messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """Copies of the messages whose text parts holding special-token strings are marked."""
        return [self._message(m) for m in messages]

    def encode(self, tokenizer, text: str) -> list[int]:
        """Token ids of a rendered prompt (or a suffix of one): marked pieces as plain text."""
        if not self.used or self.begin not in text:
            return tokenizer.encode(text)
        ids: list[int] = []
        rest = text
        while rest:
            head, sep, tail = rest.partition(self.begin)
            if head:
                ids += tokenizer.encode(head)
            if not sep:
                break
            literal, sep, rest = tail.partition(self.end)
            if not sep:
                raise ValueError("a literal-text marker is not closed (the template dropped it)")
            ids += tokenizer.encode_literal(literal)
        return ids

    def plain(self, text: str) -> str:
        """The rendering without the markers (what the template renders from the messages)."""
        return text.replace(self.begin, "").replace(self.end, "") if self.used else text

    def _text(self, text: Any) -> Any:
        if isinstance(text, str) and any(s in text for s in self.special):
            self.used = True
            return f"{self.begin}{text}{self.end}"
        return text

    def _message(self, m: Mapping[str, Any]) -> Mapping[str, Any]:
        content = m.get("content")
        if isinstance(content, str):
            return {**m, "content": self._text(content)}
        if isinstance(content, list):
            parts = [{**p, "text": self._text(p["text"])} if isinstance(p, Mapping) and isinstance(p.get("text"), str) else p
                     for p in content]
            return {**m, "content": parts}
        return m


def render_and_encode(tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                      **template_kwargs: Any) -> tuple[str, list[int]]:
    """(the chat template's rendering of `messages`, its token ids with users' text as plain text)."""
    lit = LiteralText(tokenizer.special_strings())
    text = tokenizer.apply_chat_template(lit.mark(messages), add_generation_prompt=add_generation_prompt, **template_kwargs)
    return lit.plain(text), lit.encode(tokenizer, text)


@dataclass(frozen=True)
class RenderedHistory:
    """A conversation's template text (its markers' LiteralText with it): what encode_turn
    subtracts. A session renders it when a turn ends, off the next question's path."""

    lit: LiteralText
    text: str


def render_history(tokenizer, history: Sequence[Mapping[str, Any]]) -> RenderedHistory:
    lit = LiteralText(tokenizer.special_strings())
    return RenderedHistory(lit, tokenizer.apply_chat_template(lit.mark(history), add_generation_prompt=False))


def encode_turn(tokenizer, history: Sequence[Mapping[str, Any]], turn: Sequence[Mapping[str, Any]],
                history_rendered: bool = True, rendered: RenderedHistory | None = None) -> list[int]:
    """Token ids of `turn` (+ the assistant header) after `history`: the template's text for
    history + turn minus its text for the history (Qwen's template renders every message
    independently of the ones after it), so a turn tokenises as it does inside the whole
    conversation. history_rendered=False: the history is not in the sequence yet (a first turn
    that also renders the system message). `rendered`: the history's text, rendered already."""
    if not history_rendered:
        rendered = RenderedHistory(LiteralText(tokenizer.special_strings()), "")
    elif rendered is None:
        rendered = render_history(tokenizer, history)
    lit, before = rendered.lit, rendered.text
    full = tokenizer.apply_chat_template(lit.mark([*history, *turn]), add_generation_prompt=True)
    if not full.startswith(before):
        raise UserInputError("chat template does not render turns incrementally")
    return lit.encode(tokenizer, full[len(before):])
