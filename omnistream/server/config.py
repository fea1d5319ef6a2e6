"""Typed server configuration: where it listens, who may call it, and the limits that turn a
hostile or mistaken request into a clear 4xx instead of a stalled or crashed server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omnistream.errors import ConfigError


def _check_key(key: str, where: str) -> str:
    """A key a client can send in `Authorization: Bearer <key>`: one word of printable characters."""
    if not key or any(c.isspace() for c in key) or not key.isprintable():
        hint = " (an unset $KEY in --api-key \"$KEY\" would have left the server open)" if not key.strip() else ""
        raise ConfigError(f"{where}: an API key is one word of printable characters, got {key!r}{hint}")
    return key


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # Bearer key required on every route but /health; None: open
    api_keys_file: Path | None = None  # more keys, one per line ('#' starts a comment line), each its own tenant
    served_model_name: str | None = None  # the `model` clients send; None: the checkpoint folder's name
    allowed_media_path: Path | None = None  # local files readable by image_url/video_url; None: none
    allow_remote_media: bool = False  # http(s) media URLs; off by default (the server fetches nothing)
    # limits (each answered with a 4xx that names it)
    max_body_bytes: int = 64 << 20  # request body
    max_image_pixels: int = 8192 * 8192  # decoded pixels of one image (checked from the header first)
    max_video_frames: int = 768  # frames sampled from one video
    max_video_seconds: float = 4 * 3600.0  # duration of one video
    max_audio_seconds: float = 1200.0  # duration of one audio clip or a video's audio track (Qwen2.5-Omni)
    media_decode_timeout_s: float = 60.0  # wall time to decode one media item
    media_decode_threads: int = 16  # media decoded at once (PyAV and PIL decode outside the interpreter lock)
    # worker processes that decode images and videos (server/media_workers.py: off the server's
    # interpreter lock); 0: in the threads (the default: on the H200 host 8 workers made bench
    # serve's image requests slower, see the module); unset: half the cores (at most 8) on 8 or more
    media_decode_processes: int | None = 0
    max_sessions: int = 256  # open sessions + live sessions per server
    session_ttl_s: float = 1800.0  # an idle session is closed after this
    max_live_questions_in_flight: int = 1  # per live session
    max_queued_requests: int = 1024  # requests waiting in the engine; beyond: 503

    def __post_init__(self) -> None:
        if not (0 <= self.port < 65536):
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        for name in ("max_body_bytes", "max_image_pixels", "max_video_frames", "max_sessions", "media_decode_threads",
                     "max_live_questions_in_flight", "max_queued_requests"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.media_decode_processes is not None and self.media_decode_processes < 0:
            raise ConfigError(f"media_decode_processes must be >= 0 (0: decode in threads), got {self.media_decode_processes}")
        for name in ("max_video_seconds", "max_audio_seconds", "media_decode_timeout_s", "session_ttl_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.api_key is not None:
            _check_key(self.api_key, "api_key")  # an empty one ("$KEY" unset) would leave the server open
        if self.api_keys_file is not None:
            self.api_keys()  # unreadable or malformed: refused at startup, not at the first request
        if self.allowed_media_path is not None and not Path(self.allowed_media_path).is_dir():
            raise ConfigError(f"allowed_media_path {self.allowed_media_path}: not a directory")

    def api_keys(self) -> list[str]:
        """Every accepted key: api_key, then api_keys_file's (read now: a restart picks up edits)."""
        keys = [self.api_key] if self.api_key else []
        if self.api_keys_file is None:
            return keys
        try:  # utf-8-sig: a byte-order mark (files saved on Windows) is not part of the first key
            lines = Path(self.api_keys_file).read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"api_keys_file {self.api_keys_file}: {e}") from None
        for n, line in enumerate(lines, 1):
            key = line.strip()
            if not key or key.startswith("#"):  # whole-line comments only: '#' may be part of a key
                continue
            keys.append(_check_key(key, f"api_keys_file {self.api_keys_file}, line {n}"))
        if len(keys) == (1 if self.api_key else 0):
            raise ConfigError(f"api_keys_file {self.api_keys_file}: no keys in it")
        return keys
