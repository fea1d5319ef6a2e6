"""Chat messages + preprocessed media -> the token sequence the LLM sees.

``build_prompt`` renders the chat template, tokenizes the text and expands each single
``<|image_pad|>`` / ``<|video_pad|>`` (``<|AUDIO|>`` with Qwen2.5-Omni's tokenizer) to
``item.num_tokens`` copies, recording where each item's placeholder run starts. A placeholder
filled by a block of items (media/item.media_blocks: an audio clip in two items, or a video with
its audio track) gets each item's run in order; a video with its audio track is wrapped in
``<|audio_bos|>`` ... ``<|audio_eos|>`` inside the video's ``<|vision_bos|>`` ... ``<|vision_eos|>``,
as the Qwen2.5-Omni processor writes it. The result is token-for-token what transformers'
``Qwen2_5_VLProcessor`` produces for the same messages and media (the processor expands the
placeholder in the string and then tokenizes; special tokens split the text, so expanding
after tokenization gives the same ids).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from omnistream.errors import UserInputError
from omnistream.media.item import MediaItem, media_blocks
from omnistream.models.literal_text import render_and_encode
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
    """Kinds ("image" / "audio" / "video") of the media content parts, in the order the chat
    templates render them (the Qwen2.5-VL / -Omni templates' detection rules, in their order)."""
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
            elif part.get("type") == "audio" or "audio" in part or "audio_url" in part:
                kinds.append("audio")
            elif part.get("type") == "video" or "video" in part:
                kinds.append("video")
    return kinds


def _article(kind: str) -> str:
    return "an" if kind[0] in "aeiou" else "a"


def block_kind(block: Sequence[MediaItem]) -> str:
    """The placeholder a block fills: a video with its audio track fills the video's."""
    return "video" if any(m.kind == "video" for m in block) else block[0].kind


def expand_placeholders(
    token_ids: Sequence[int],
    media_items: Sequence[MediaItem],
    *,
    image_token_id: int,
    video_token_id: int,
    audio_token_id: int | None = None,
    audio_start_token_id: int | None = None,
    audio_end_token_id: int | None = None,
) -> tuple[list[int], list[PlaceholderRange]]:
    """Replace the i-th single image/video/audio pad id by the runs of the i-th media block
    (media_blocks(media_items)); one range per item."""
    pad_kind = {image_token_id: "image", video_token_id: "video"}
    if audio_token_id is not None:
        pad_kind[audio_token_id] = "audio"
    pad_of = {v: k for k, v in pad_kind.items()}
    blocks = media_blocks(list(media_items))
    pads = [i for i, t in enumerate(token_ids) if t in pad_kind]
    if len(pads) != len(blocks):
        raise UserInputError(
            f"the prompt has {len(pads)} media placeholder(s) but {len(blocks)} "
            "media item(s) were given"
            + (
                " (does the message text contain a literal <|image_pad|> / <|video_pad|>?)"
                if len(pads) > len(blocks)
                else ""
            )
        )
    out: list[int] = []
    ranges: list[PlaceholderRange] = []
    prev = 0
    for k, (pos, block) in enumerate(zip(pads, blocks)):
        kind, got = pad_kind[token_ids[pos]], block_kind(block)
        if got != kind:
            raise UserInputError(
                f"media part {k + 1} of the messages is {_article(kind)} {kind}, "
                f"but media item {k + 1} is {_article(got)} {got}"
            )
        out.extend(token_ids[prev:pos])
        wrapped = kind == "video" and any(m.kind == "audio" for m in block)
        if wrapped:
            if audio_start_token_id is None or audio_end_token_id is None or audio_token_id is None:
                raise UserInputError("this tokenizer has no audio tokens: a video's audio track cannot be used")
            out.append(audio_start_token_id)
        for item in block:
            n = item.num_tokens
            if n <= 0:
                raise UserInputError(f"media item {k + 1} has no tokens (grid_thw {item.grid_thw})")
            if item.kind not in pad_of:
                raise UserInputError(f"this tokenizer has no placeholder for {item.kind}")
            ranges.append(PlaceholderRange(offset=len(out), length=n))
            out.extend([pad_of[item.kind]] * n)
        if wrapped:
            out.append(audio_end_token_id)
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

    Media content parts, in message order, correspond to the blocks of ``media_items``
    (media/item.media_blocks) in order; their kinds must match. Extra keyword arguments go to
    the template (e.g. ``add_vision_id=True``).
    """
    media_items = list(media_items)
    kinds = media_parts(messages)
    blocks = media_blocks(media_items)
    if len(kinds) != len(blocks):
        raise UserInputError(
            f"the messages contain {len(kinds)} {'media' if 'audio' in kinds else 'image/video'} part(s) but {len(blocks)} "
            "media item(s) were given"
        )
    for k, (kind, block) in enumerate(zip(kinds, blocks)):
        got = block_kind(block)
        if got != kind:
            raise UserInputError(
                f"media part {k + 1} of the messages is {_article(kind)} {kind}, "
                f"but media item {k + 1} is {_article(got)} {got}"
            )
    text, ids = render_and_encode(tokenizer, messages, add_generation_prompt, **template_kwargs)  # users' text stays text
    token_ids, ranges = expand_placeholders(
        ids,
        media_items,
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        audio_token_id=tokenizer.audio_token_id,
        audio_start_token_id=tokenizer.audio_start_token_id,
        audio_end_token_id=tokenizer.audio_end_token_id,
    )
    return Prompt(token_ids=token_ids, media=media_items, ranges=ranges, text=text)
