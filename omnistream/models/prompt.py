"""Chat messages + preprocessed media -> the token sequence the LLM sees.

``build_prompt`` renders the chat template, tokenizes the text and expands each single
``<|image_pad|>`` / ``<|video_pad|>`` to ``item.num_tokens`` copies, recording where each
item's placeholder run starts. The result is token-for-token what transformers'
``Qwen2_5_VLProcessor`` produces for the same messages and media (the processor expands the
placeholder in the string and then tokenizes; special tokens split the text, so expanding
after tokenization gives the same ids).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from omnistream.errors import UserInputError
from omnistream.media.item import MediaItem
from omnistream.models.tokenizer import Tokenizer

__all__ = ["PlaceholderRange", "Prompt", "build_prompt", "media_parts", "expand_placeholders"]


@dataclass
class PlaceholderRange:
    """``length`` placeholder tokens of one media item, starting at token index ``offset``."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class Prompt:
    """Token ids with media placeholders expanded; ``ranges[i]`` is where ``media[i]`` sits."""

    token_ids: list[int]
    media: list[MediaItem]
    ranges: list[PlaceholderRange]
    text: str = field(default="", repr=False)  # the rendered template (one pad per item)

    def __len__(self) -> int:
        return len(self.token_ids)


def media_parts(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """Kinds ("image" / "video") of the media content parts, in the order the Qwen2.5-VL
    chat template renders them (same detection rules as the template)."""
    kinds: list[str] = []
    for msg in messages:
        content = msg.get("content") if isinstance(msg, Mapping) else None
        if content is None or isinstance(content, str):
            continue
        for part in content:
            if not isinstance(part, Mapping):
                continue
            if part.get("type") == "image" or "image" in part or "image_url" in part:
                kinds.append("image")
            elif part.get("type") == "video" or "video" in part:
                kinds.append("video")
    return kinds


def expand_placeholders(
    token_ids: Sequence[int],
    media_items: Sequence[MediaItem],
    *,
    image_token_id: int,
    video_token_id: int,
) -> tuple[list[int], list[PlaceholderRange]]:
    """Replace the i-th single image/video pad id by ``media_items[i].num_tokens`` copies."""
    pads = [i for i, t in enumerate(token_ids) if t == image_token_id or t == video_token_id]
    if len(pads) != len(media_items):
        raise UserInputError(
            f"the prompt has {len(pads)} image/video placeholder(s) but {len(media_items)} "
            "media item(s) were given"
            + (
                " (does the message text contain a literal <|image_pad|> / <|video_pad|>?)"
                if len(pads) > len(media_items)
                else ""
            )
        )
    out: list[int] = []
    ranges: list[PlaceholderRange] = []
    prev = 0
    for k, (pos, item) in enumerate(zip(pads, media_items)):
        kind = "image" if token_ids[pos] == image_token_id else "video"
        if item.kind != kind:
            raise UserInputError(
                f"media part {k + 1} of the messages is {'an' if kind == 'image' else 'a'} "
                f"{kind}, but media item {k + 1} is {'an' if item.kind == 'image' else 'a'} "
                f"{item.kind}"
            )
        n = item.num_tokens
        if n <= 0:
            raise UserInputError(f"media item {k + 1} has no tokens (grid_thw {item.grid_thw})")
        out.extend(token_ids[prev:pos])
        ranges.append(PlaceholderRange(offset=len(out), length=n))
        out.extend([token_ids[pos]] * n)
        prev = pos + 1
    out.extend(token_ids[prev:])
    return out, ranges


def build_prompt(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    media_items: Sequence[MediaItem],
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> Prompt:
    """Render ``messages`` with the chat template, tokenize, expand media placeholders.

    Media content parts, in message order, correspond to ``media_items`` in order; their kinds
    must match. Extra keyword arguments go to the template (e.g. ``add_vision_id=True``).
    """
    media_items = list(media_items)
    kinds = media_parts(messages)
    if len(kinds) != len(media_items):
        raise UserInputError(
            f"the messages contain {len(kinds)} image/video part(s) but {len(media_items)} "
            "media item(s) were given"
        )
    for k, (kind, item) in enumerate(zip(kinds, media_items)):
        if item.kind != kind:
            raise UserInputError(
                f"media part {k + 1} of the messages is {'an' if kind == 'image' else 'a'} "
                f"{kind}, but media item {k + 1} is {'an' if item.kind == 'image' else 'a'} "
                f"{item.kind}"
            )
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, **template_kwargs
    )
    ids = tokenizer.encode(text)
    token_ids, ranges = expand_placeholders(
        ids,
        media_items,
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
    )
    return Prompt(token_ids=token_ids, media=media_items, ranges=ranges, text=text)
