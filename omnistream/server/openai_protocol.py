"""The OpenAI Chat Completions wire format (what the official SDKs send and parse), as pydantic
models. Requests are strict: an unknown field is a 400 naming it (a typo must not be silently
ignored), except a few fields that do not change the answer and that SDKs and frameworks send
(`user`, `metadata`, `store`, `service_tier`, neutral penalties, ...): accepted and ignored.

Content parts: `text`, `image_url` {url, detail?}, `video_url` {url} (vLLM's convention),
`input_audio` {data: base64, format} (OpenAI's) and `audio_url` {url} (vLLM's), the audio ones
for models that hear (Qwen2.5-Omni). Media options (fps, nframes, max_pixels, min_pixels, and
use_audio_in_video for videos) may sit inside the url object, on the part, or in the
request-level `mm_processor_kwargs` (vLLM); the innermost wins.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_N = 16  # choices per request (each is a full engine request)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_STOP = 16  # stop strings per request (OpenAI allows 4)


class _Strict(BaseModel):
    # NaN / inf (valid JSON to Python's parser) are refused as "not a finite number", not by a bound
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---------------------------------------------------------------------------------- requests
class MediaOptions(_Strict):
    """Per-item preprocessing options (None: the model's default)."""

    fps: float | None = Field(None, gt=0, le=120)  # video frames sampled per second
    nframes: int | None = Field(None, ge=2)  # video: exactly this many frames (even), wins over fps
    max_pixels: int | None = Field(None, gt=0)  # largest area of a resized image / frame
    min_pixels: int | None = Field(None, gt=0)
    use_audio_in_video: bool | None = None  # video: also hear the file's audio track (Qwen2.5-Omni); images ignore it

    def over(self, fallback: "MediaOptions | None") -> "MediaOptions":
        """These options, falling back to `fallback`'s where unset."""
        base = fallback.model_dump(exclude_none=True) if fallback is not None else {}
        mine = {k: getattr(self, k) for k in MediaOptions.model_fields if getattr(self, k) is not None}
        return MediaOptions(**{**base, **mine})


class ProcessorKwargs(MediaOptions):
    """vLLM's request-level `mm_processor_kwargs` (num_frames is its name for nframes)."""

    num_frames: int | None = Field(None, ge=2)

    def options(self) -> MediaOptions:
        nframes = self.nframes if self.nframes is not None else self.num_frames
        return MediaOptions(fps=self.fps, nframes=nframes, max_pixels=self.max_pixels, min_pixels=self.min_pixels,
                            use_audio_in_video=self.use_audio_in_video)


class ImageURL(MediaOptions):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class VideoURL(MediaOptions):
    url: str


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(MediaOptions):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(MediaOptions):
    type: Literal["video_url"]
    video_url: VideoURL


AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "m4a")  # OpenAI names wav and mp3; FFmpeg reads the others too


class InputAudio(_Strict):
    data: str  # base64 of the file's bytes
    format: Literal[AUDIO_FORMATS]  # type: ignore[valid-type]


class InputAudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioURL(_Strict):
    url: str  # data: URL, an allowed local path (file:// or plain), http(s) if allowed


class AudioURLPart(_Strict):
    type: Literal["audio_url"]
    audio_url: AudioURL


AudioPart = InputAudioPart | AudioURLPart
ContentPart = Annotated[TextPart | ImagePart | VideoPart | InputAudioPart | AudioURLPart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None  # None: an assistant message only (as OpenAI)
    name: str | None = None  # accepted, not rendered (the chat template has no names)
    refusal: str | None = None  # an assistant message echoed back by the SDK carries it

    @model_validator(mode="after")
    def _content_given(self) -> "Message":
        if self.content is None and self.role != "assistant":  # it rendered as an empty turn
            raise ValueError(f"a {self.role} message needs a content (a string or a list of parts)")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool = True  # OpenAI's; nothing to obfuscate on a local server


class ResponseFormat(_Strict):
    type: Literal["text"]  # json_object / json_schema would need constrained decoding


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI for max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 or 0: off
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    mm_processor_kwargs: ProcessorKwargs | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens
    # accepted and ignored: they do not change the answer
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    parallel_tool_calls: bool | None = None
    # accepted only at their neutral value (anything else is refused by the validator)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    modalities: list[Literal["text"]] | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "ChatCompletionRequest":
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0):
                raise ValueError(f"{name} is not supported (only 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        stops = self.stop_strings
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options requires stream: true")
        return self

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# --------------------------------------------------------------------------------- responses
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served by the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    metrics: dict[str, Any] | None = None  # omnistream's: per-request timings (OpenAI clients ignore it)


class ChunkChoice(BaseModel):
    index: int
    delta: dict[str, str]  # {"role": "assistant", "content": ""} first, then {"content": ...}, then {}
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None
    metrics: dict[str, Any] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "omnistream"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
