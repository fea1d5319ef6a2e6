"""Where a media part's bytes come from, and their sha256 (the media cache's key; the engine's
item hashes are of the decoded pixels): `data:<mime>;base64,...` URLs, OpenAI's input_audio
base64, local files (`file://...` or a plain path, relative paths from the root) only under
`ServerConfig.allowed_media_path` (symlinks resolved: anything that lands outside is refused
with a 403 that never says whether the path exists), http(s) only with `allow_remote_media`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from omnistream.errors import MediaError, one_line
from omnistream.server.config import ServerConfig
from omnistream.server.errors import APIError, BadRequest, TooLarge
from omnistream.server.openai_protocol import InputAudioPart

READ_CHUNK = 1 << 20  # a local video is hashed as it is read, this many bytes at a time


class Forbidden(APIError):
    status, type, code = 403, "permission_error", "media_path_forbidden"


@dataclass
class Source:
    """The bytes of one media part: in memory (data URL, remote) or a verified local file."""

    digest: str  # sha256 of the bytes
    data: bytes | None = None
    path: Path | None = None
    label: str = "media"  # how errors name it (never a server-side temp path)


def read_source(url: str, kind: str, config: ServerConfig) -> Source:
    """The bytes of a media URL (data:, a local path or file://, http(s)) with their sha256."""
    if not url.strip():  # it read as a local path: "local media files are disabled", a 403
        raise BadRequest(f"the {kind}_url is empty (a data: URL, a file path or an http(s) URL)", code="invalid_url")
    scheme = urlparse(url).scheme.lower() if "://" in url or url.startswith("data:") else ""
    if scheme == "data":
        data = data_url_bytes(url)
        return Source(hashlib.sha256(data).hexdigest(), data=data, label=f"the {kind}_url data")
    if scheme in ("http", "https"):
        if not config.allow_remote_media:
            raise BadRequest("remote media URLs are disabled on this server (send a data: URL)",
                             code="remote_media_disabled")
        data = _fetch(url, config.max_body_bytes)
        return Source(hashlib.sha256(data).hexdigest(), data=data, label=url)
    if scheme not in ("", "file"):
        raise BadRequest(f"unsupported media URL scheme {scheme!r} (data:, file:// or a path)")
    return _local(url, kind, config)


def _local(url: str, kind: str, config: ServerConfig) -> Source:
    root = config.allowed_media_path
    if root is None:
        raise Forbidden("local media files are disabled on this server (start it with --allowed-media-path)")
    raw = unquote(urlparse(url).path) if url.lower().startswith("file://") else url
    path = _inside(Path(root), raw)
    try:
        if kind in ("image", "audio"):  # small: read once, decoded from memory
            size = path.stat().st_size
            if size > config.max_body_bytes:
                raise TooLarge(f"{kind} file of {size} bytes exceeds the limit of {config.max_body_bytes}")
            data = path.read_bytes()
            return Source(hashlib.sha256(data).hexdigest(), data=data, label=raw)
        digest = hashlib.sha256()  # a video may be long: hashed as it is read, decoded from the file
        with open(path, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                digest.update(chunk)
    except OSError as e:
        raise MediaError(f"cannot read {raw!r}: {e.strerror}") from None
    return Source(digest.hexdigest(), path=path, label=raw)


def input_audio_source(part: InputAudioPart) -> Source:
    """OpenAI's input_audio: base64 of the file (its `format` names the container; FFmpeg
    reads the header anyway)."""
    try:
        data = base64.b64decode("".join(part.input_audio.data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"invalid base64 in input_audio.data: {e}", code="invalid_base64") from None
    if not data:
        raise MediaError("input_audio.data holds no bytes")
    return Source(hashlib.sha256(data).hexdigest(), data=data, label=f"the input_audio data ({part.input_audio.format})")


def data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise BadRequest("a data URL must be 'data:<mime type>;base64,<data>'", code="invalid_data_url")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"invalid base64 in the data URL: {e}", code="invalid_base64") from None
    if not data:
        raise MediaError("the data URL holds no bytes")
    return data


def _inside(root: Path, raw: str) -> Path:
    """`raw` (absolute, or relative to root) resolved with its symlinks; refused unless the
    result is a regular file under root's resolved path. The message never says whether a
    refused path exists."""
    if not raw or "\x00" in raw:
        raise BadRequest("empty media path, or a NUL byte in it")
    try:
        root = root.resolve()
        candidate = Path(raw) if os.path.isabs(raw) else root / raw
        real = candidate.resolve()
        inside = real.is_relative_to(root)
        found = inside and real.is_file()
    except (OSError, RuntimeError) as e:  # name too long, symlink loop
        raise MediaError(f"cannot open media path {raw!r}: {one_line(e)}") from None
    if not inside:
        raise Forbidden(f"{raw!r} is outside the allowed media path")
    if not found:
        raise MediaError(f"media file not found: {raw!r}")
    return real


def _fetch(url: str, max_bytes: int, timeout_s: float = 20.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - scheme checked by the caller
            data = r.read(max_bytes + 1)
    except OSError as e:
        raise MediaError(f"cannot fetch {url}: {one_line(e)}") from None
    if len(data) > max_bytes:
        raise TooLarge(f"{url} is larger than {max_bytes} bytes")
    return data
