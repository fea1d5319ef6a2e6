"""The /v1/realtime protocol: the client events' fields (pydantic contracts), the error codes
it answers with, the live session's settings, frame decoding, and the payloads of
`response.done` (docs/realtime.md lists them all). The socket itself: server/realtime.py."""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from omnistream.engine.protocol import RequestOutput
from omnistream.engine.sampling import SamplingParams
from omnistream.errors import MediaError, UserInputError
from omnistream.media.frame_memory import FrameMemoryConfig
from omnistream.media.image import load_image
from omnistream.server import validation
from omnistream.server.errors import TooLarge
from omnistream.server.state import ServerState
from omnistream.sessions.live import LiveSession


DEFAULT_MAX_OUTPUT_TOKENS = 128
FRAME_FORMATS = ["JPEG", "PNG", "WEBP"]  # what a camera page or client sends; nothing exotic is parsed
AUDIO_RATE = 16_000  # input_audio_buffer.append: PCM16 little-endian mono at 16 kHz (OpenAI's default pcm16)
AUDIO_TIMESTAMP_SLACK_S = 0.001  # a timestamp_ms rounded to the millisecond may start that much before the previous end


# every `error.code` this module sends for a client's mistake (docs/realtime.md lists them)
ERROR_CODES = {
    "invalid_json": "the message is not JSON",
    "invalid_event": "not an event object, a binary message, or a field that is unknown or of the wrong type",
    "unknown_event": "an event type the server does not know",
    "session_in_use": "session.update of the frame memory, frame size, policy or instructions after the first frame or question",
    "missing_image": "input_image_buffer.append without `image`",
    "missing_audio": "input_audio_buffer.append without `audio`",
    "invalid_base64": "`image` or `audio` is not base64",
    "invalid_audio": "`audio` is not whole PCM16 samples, or the live session refused it",
    "audio_not_supported": "input_audio_buffer.append to a model that does not hear (not a Qwen2.5-Omni checkpoint)",
    "invalid_image": "`image` is not a decodable JPEG, PNG or WebP",
    "payload_too_large": "a frame over ServerConfig.max_image_pixels (read from its header)",
    "invalid_timestamp": "`timestamp_ms` negative, not a number, or before the previous frame's (audio: before the end of the previous audio)",
    "no_question": "response.create with no conversation.item.create since the last answer",
    "too_many_questions": "response.create while ServerConfig.max_live_questions_in_flight answers are in flight",
    "response_not_found": "response.cancel of a response that is not in flight",
    "model_not_found": "the socket's `model` query parameter names another model (the socket is closed)",
    "too_many_sessions": "the server holds ServerConfig.max_sessions sessions (the socket is closed)",
    "session_expired": "idle past ServerConfig.session_ttl_s, or the server is shutting down (the socket is closed)",
}


class EventError(UserInputError):
    """A client event that cannot be applied; answered with an `error` event of this code."""

    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code, self.param = code, param


# ---------------------------------------------------------------------------------- contracts
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN is "not a finite number"


class SessionFields(_Strict):
    """`session.update` {session: ...}: frame memory and frame size are fixed by the first frame."""

    star_size: int | None = Field(None, ge=1)  # frames kept in Star memory (important ones)
    stream_size: int | None = Field(None, ge=1)  # frames in the Stream window (recent ones)
    threshold: float | None = Field(None, ge=0, le=1)  # importance for a patch to enter Star
    policy: Literal["exact", "fast"] | None = None  # live KV policy (sessions/live.py)
    max_pixels: int | None = Field(None, ge=1)  # each frame is resized to at most this many pixels
    min_pixels: int | None = Field(None, ge=1)
    instructions: str | None = None  # the system prompt
    model: str | None = None  # accepted (OpenAI clients send it); the server serves one model
    modalities: list[Literal["text"]] | None = None  # text out only
    input_audio_format: Literal["pcm16"] | None = None  # accepted: the one format taken (16 kHz mono)


class ResponseFields(_Strict):
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    modalities: list[Literal["text"]] | None = None


def response_sampling(fields: ResponseFields, defaults: SamplingParams | None) -> SamplingParams:
    """A live answer's sampling: the response's fields over the server's defaults (`omnistream
    serve --temperature ...`, as chat completions take them); without either, greedy."""
    base = defaults or SamplingParams()
    return SamplingParams(
        temperature=base.temperature if fields.temperature is None else fields.temperature,
        top_p=base.top_p if fields.top_p is None else fields.top_p, top_k=base.top_k,
        seed=base.seed if fields.seed is None else fields.seed, stop_token_ids=base.stop_token_ids,
        max_new_tokens=fields.max_output_tokens or DEFAULT_MAX_OUTPUT_TOKENS)


class TextContent(_Strict):
    type: Literal["input_text"]
    text: str


class MessageItem(_Strict):
    id: str | None = None
    type: Literal["message"]
    role: Literal["user"]
    content: list[TextContent] = Field(min_length=1)


@dataclass(frozen=True)
class LiveConfig:
    """The live session's settings, as `session.created` / `session.updated` report them."""

    star_size: int = FrameMemoryConfig.star_capacity
    stream_size: int = FrameMemoryConfig.stream_capacity
    threshold: float = FrameMemoryConfig.importance_threshold
    policy: str = "exact"
    max_pixels: int | None = None  # None: the video default (sessions/live.py)
    min_pixels: int | None = None
    instructions: str | None = None

    def open(self, state: ServerState, tenant: str | None) -> LiveSession:
        memory = FrameMemoryConfig(star_capacity=self.star_size, stream_capacity=self.stream_size,
                                   importance_threshold=self.threshold)
        return state.engine.live_session(system=self.instructions, tenant=tenant, memory=memory, policy=self.policy,
                                         max_pixels=self.max_pixels, min_pixels=self.min_pixels)


def decode_frame(raw: bytes, max_pixels: int) -> np.ndarray:
    """JPEG / PNG / WebP bytes -> (H, W, 3) uint8. The size is read from the header before any
    pixel is decoded; MediaError (TooLarge) for what is not a usable frame."""
    if not raw:
        raise MediaError("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below
            with Image.open(io.BytesIO(raw), formats=FRAME_FORMATS) as image:
                if image.width * image.height > max_pixels:
                    raise TooLarge(f"a frame of {image.width}x{image.height} pixels is over the limit of {max_pixels}")
                image.load()
                return load_image(image)
    except Image.DecompressionBombError as e:  # PIL's own (higher) limit, from the header as well
        raise TooLarge(f"a frame over the limit of {max_pixels} pixels ({e})") from None
    except UnidentifiedImageError:
        raise MediaError("not a JPEG, PNG or WebP image") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated, corrupt
        raise MediaError(f"cannot decode the image: {' '.join(str(e).split()) or type(e).__name__}") from None


def parse_event(text: str) -> dict:
    try:
        event = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise EventError(f"invalid JSON: {e}", "invalid_json") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise EventError("an event is a JSON object with a string `type`", "invalid_event", "type")
    return event


def event_model(cls: type[BaseModel], value: Any, param: str) -> BaseModel:
    if not isinstance(value, dict):
        raise EventError(f"`{param}` must be an object", "invalid_event", param)
    return cls.model_validate(value)


def validation_message(exc: ValidationError) -> str:
    return "; ".join(f"unknown field {where!r}" if kind == "extra_forbidden" else f"{where}: {message}"
                     for where, message, kind in validation.problems(exc.errors()))


def done_payload(rid: str, res: RequestOutput, live: LiveSession) -> dict[str, Any]:
    """The response.done payload: the answer, usage and the per-question metrics."""
    m, lm = res.metrics, res.live
    status = {"stop": "completed", "length": "incomplete", "abort": "cancelled"}.get(res.finish_reason, "failed")
    details = {"type": status, "reason": "max_output_tokens"} if status == "incomplete" else (
        {"type": status, "reason": "client_cancelled"} if status == "cancelled" else None)
    metrics: dict[str, Any] = {"ttft_ms": _ms(m.ttft_s), "frames_received": live.frames_received}
    if lm is not None:  # an aborted answer committed nothing, so it has no live metrics
        live_fields = asdict(lm)
        metrics.update({k[:-len("_latency")] + "_ms": _ms(v) if k.endswith("_latency") else v
                        for k, v in live_fields.items() if k.endswith("_latency")})
        metrics.update({k: v for k, v in live_fields.items() if not k.endswith("_latency")})
    metrics["decode_tokens_per_s"] = m.decode_tokens_per_s
    return {
        "id": rid, "object": "realtime.response", "status": status, "status_details": details,
        "output": [{"id": rid, "object": "realtime.item", "type": "message", "role": "assistant", "status": status,
                    "content": [{"type": "output_text", "text": res.text}]}],
        "output_text": res.text, "finish_reason": res.finish_reason,
        "usage": {"input_tokens": m.prompt_tokens, "output_tokens": m.output_tokens,
                  "total_tokens": m.prompt_tokens + m.output_tokens,
                  "input_token_details": {"cached_tokens": m.cached_tokens}},
        "metrics": metrics,
    }


def cancelled_payload(rid: str, live: LiveSession) -> dict[str, Any]:
    """response.done of an answer cancelled before it was submitted: the fields of every
    response.done, with nothing generated (no first token: ttft_ms null)."""
    return {"id": rid, "object": "realtime.response", "status": "cancelled", "output": [], "output_text": "",
            "status_details": {"type": "cancelled", "reason": "client_cancelled"}, "finish_reason": "abort",
            "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "input_token_details": {"cached_tokens": 0}},
            "metrics": {"ttft_ms": None, "frames_received": live.frames_received, "decode_tokens_per_s": None}}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)

