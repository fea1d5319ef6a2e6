"""Prefix keys of a stateless chat completion: names of the prompt prefixes it shares with
other requests, which the router matches against the prefixes each replica recently served
(prefix_affinity.py), so the request goes where its prefix is likely in the prefix cache.

A key names a prefix of the conversation, not the request: a chain of digests, one link per
piece of the prompt, each covering everything before it:

    root = H(version, Authorization, model, mm_processor_kwargs, prompt_cache_key)
    h    = H(h, piece)   pieces in prompt order: each message's role, each of its content
                         parts (canonical JSON; a media part with its data hashed), its end

The chain's value at a *boundary* is a key. Boundaries: the end of each message, and the end
of a media part that more parts of its message follow (many questions about one image or
video: the question differs, the media's KV is shared). A boundary is worth a key only once
the prefix before it is worth reusing: MIN_PREFIX_CHARS of text, or any media part (short
prompts are cheap to prefill, and one key for "no system prompt" would send every request to
one replica). Of the boundaries a request keeps the first (the coarsest: a long system prompt,
the first media) and the last MAX_KEYS - 1 (the deepest: a stateless client that re-sends its
history shares the previous request's last boundaries, so a growing conversation stays on its
replica). Keys are 64-bit digests in hex.

The Authorization header is in the root: on a server with API keys, two keys are two tenants
whose prefix-cache KV is salted apart (server/auth.py), so their prefixes must not match each
other either (nor may routing tell one tenant what another sent). The sampling fields
(max_tokens, temperature, ...) are not: they do not change the prompt.

Cheap by construction: media is never parsed. Before the JSON is parsed, every long string
that is a data URL (`"data:...`) or the `data` of an input_audio part is replaced in the raw
bytes by its blake2b digest (`elide_media`: bytes.find and hashlib, both C speed; hashlib
lets other threads run), so json.loads sees a body of a few kilobytes however large the
media. Anything that does not parse as a chat request gets no key (it is routed by load); a
key is a routing hint only, never a correctness matter.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

VERSION = b"omnistream-prefix-keys/1"
KEY_BYTES = 8  # a key is a 64-bit digest: 16 hex characters
MIN_PREFIX_CHARS = 512  # text before a boundary that makes it a key (~128 tokens); a media part always does
MAX_KEYS = 4  # per request: the first boundary and the last MAX_KEYS - 1
LONG_STRING = 256  # data strings at least this long are hashed in the raw body, not parsed
MEDIA_TYPES = frozenset({"image_url", "video_url", "input_audio", "audio_url"})


def prefix_keys(body: bytes, authorization: str | None = None) -> tuple[str, ...]:
    """The keys of a /v1/chat/completions body, shallowest first; () when it has none (not a
    chat request, or no prefix worth reusing)."""
    request = _parsed(elide_media(body))
    messages = request.get("messages") if isinstance(request, dict) else None
    if not isinstance(messages, list):
        return ()
    h = _chain(hashlib.blake2b(VERSION, digest_size=KEY_BYTES).digest(), (authorization or "").encode(),
               _canon(request.get("model")), _canon(request.get("mm_processor_kwargs")),
               _canon(request.get("prompt_cache_key")))
    boundaries: list[bytes] = []
    weight = 0
    for message in messages:
        if not isinstance(message, dict):
            return ()
        h = _chain(h, b"role", _canon(message.get("role")))
        content = message.get("content")
        parts = content if isinstance(content, list) else [content]
        for i, part in enumerate(parts):
            h = _chain(h, b"part", _canon(part))
            weight += _weight(part)
            if _is_media(part) and i < len(parts) - 1 and weight >= MIN_PREFIX_CHARS:
                boundaries.append(h)
        h = _chain(h, b"end")
        if weight >= MIN_PREFIX_CHARS:
            boundaries.append(h)
    kept = boundaries[:1] + boundaries[1:][-(MAX_KEYS - 1):]
    return tuple(k.hex() for k in kept)


def elide_media(body: bytes) -> bytes:
    """`body` with each long, escape-free data string (`"data:..."` URLs, `"data": "<base64>"`
    values) replaced by `"#<digest>"`: the same JSON, minus the megabytes. In valid JSON a quote
    not preceded by a backslash and followed by `data` opens a string (a closing quote is
    followed by a separator), so only real strings are replaced; anything else is left as is."""
    view = memoryview(body)
    pieces: list[bytes | memoryview] = []
    done = search = 0
    while (j := body.find(b'"data', search)) >= 0:
        start = _data_string_start(body, j)
        if start < 0:
            search = j + 5
            continue
        end = body.find(b'"', start + 1)
        if end < 0:
            break
        if end - start - 1 >= LONG_STRING and body.find(b"\\", start + 1, end) < 0:
            digest = hashlib.blake2b(view[start + 1:end], digest_size=16).hexdigest()
            pieces += [view[done:start], b'"#' + digest.encode() + b'"']
            done = end + 1
        search = end + 1
    if not pieces:
        return body
    pieces.append(view[done:])
    return b"".join(pieces)


def _data_string_start(body: bytes, j: int) -> int:
    """Index of the opening quote of the data string at `body[j:]` (`"data:...` itself, or the
    value of a `"data":` key), or -1."""
    if j > 0 and body[j - 1] == 0x5C:  # an escaped quote inside some string
        return -1
    if body.startswith(b'"data:', j):
        return j
    if not body.startswith(b'"data"', j):
        return -1
    k = j + 6
    while k < len(body) and body[k] in b" \t\r\n:":
        k += 1
    return k if body.startswith(b'"', k) else -1


def _parsed(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def _canon(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _chain(h: bytes, *pieces: bytes) -> bytes:
    d = hashlib.blake2b(h, digest_size=KEY_BYTES)
    for piece in pieces:
        d.update(len(piece).to_bytes(8, "little"))  # lengths first: the pieces cannot run into each other
        d.update(piece)
    return d.digest()


def _is_media(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in MEDIA_TYPES


def _weight(part: Any) -> int:
    """How much a part adds to a prefix's worth: its text's length; a media part is always
    worth a key."""
    if isinstance(part, str):
        return len(part)
    if _is_media(part):
        return MIN_PREFIX_CHARS
    if isinstance(part, dict) and isinstance(part.get("text"), str):
        return len(part["text"])
    return 0
