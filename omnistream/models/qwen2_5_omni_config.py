"""Typed, validated view of a Qwen2.5-Omni ``config.json``: the thinker (text decoder, vision
tower, audio encoder) of either on-disk layout.

* the full checkpoint (``"model_type": "qwen2_5_omni"``, what Qwen/Qwen2.5-Omni-{3,7}B ship):
  ``thinker_config`` / ``talker_config`` / ``token2wav_config``, thinker weights under
  ``thinker.``. Only the thinker is read and loaded: answers are text (no talker, no speech).
* the thinker alone (``"model_type": "qwen2_5_omni_thinker"``, what
  ``Qwen2_5OmniThinkerForConditionalGeneration.save_pretrained`` writes): the same fields at the
  top level, weights without a prefix.

The text and vision parts are read by the Qwen2.5-VL parsers (models/hf_config.py): the thinker's
decoder and vision tower are Qwen2.5-VL's. ``to_hf_dict`` writes every field explicitly
(transformers' config classes default the vision width to 3584 and tie embeddings in the text
config by default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from omnistream.errors import ConfigError
from omnistream.models.hf_config import (
    TOKEN_IDS,
    TextConfig,
    VisionConfig,
    _MISSING,
    _as_int,
    _check_positive,
    _parse_text,
    _parse_vision,
)

FULL_MODEL_TYPE = "qwen2_5_omni"
THINKER_MODEL_TYPE = "qwen2_5_omni_thinker"
MODEL_TYPES = (FULL_MODEL_TYPE, THINKER_MODEL_TYPE)

OMNI_TOKEN_IDS: dict[str, int] = {
    "audio_token_id": 151646,  # <|AUDIO|>
    "audio_start_token_id": 151647,  # <|audio_bos|>
    "audio_end_token_id": 151648,  # <|audio_eos|>
}


@dataclass(frozen=True)
class AudioEncoderConfig:
    """The Whisper-style audio encoder of the thinker (Qwen2.5-Omni-3B/7B values)."""

    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    n_window: int = 100  # half a chunk: chunks are 2 * n_window = 200 mel frames (2 s)
    max_source_positions: int = 1500  # rows of the sinusoidal position table
    output_dim: int = 2048  # = the text hidden size
    activation_function: str = "gelu"
    scale_embedding: bool = False

    @property
    def chunk_frames(self) -> int:
        return 2 * self.n_window

    def validate(self) -> None:
        _check_positive("audio_config", num_mel_bins=self.num_mel_bins, d_model=self.d_model,
                        encoder_layers=self.encoder_layers, encoder_attention_heads=self.encoder_attention_heads,
                        encoder_ffn_dim=self.encoder_ffn_dim, n_window=self.n_window,
                        max_source_positions=self.max_source_positions, output_dim=self.output_dim)
        if self.d_model % self.encoder_attention_heads:
            raise ConfigError(f"audio_config: d_model {self.d_model} is not divisible by encoder_attention_heads "
                              f"{self.encoder_attention_heads}")
        if self.d_model % 2:
            raise ConfigError("audio_config: d_model must be even (sinusoidal positions)")
        if (self.chunk_frames - 1) // 2 + 1 > self.max_source_positions:
            raise ConfigError("audio_config: a chunk is longer than the position table (max_source_positions)")
        if self.activation_function != "gelu":
            raise ConfigError(f"audio_config: activation_function {self.activation_function!r} is not supported (gelu)")
        if self.scale_embedding:
            raise ConfigError("audio_config: scale_embedding=true is not supported (Qwen2.5-Omni never uses it)")


@dataclass(frozen=True)
class OmniConfig:
    """The Qwen2.5-Omni thinker: decoder + vision tower + audio encoder + token ids and the
    TMRoPE timing (position_id_per_seconds, seconds_per_chunk)."""

    text: TextConfig
    vision: VisionConfig
    audio: AudioEncoderConfig
    bos_token_id: int = TOKEN_IDS["bos_token_id"]
    eos_token_id: int = TOKEN_IDS["eos_token_id"]
    im_start_token_id: int = TOKEN_IDS["im_start_token_id"]
    im_end_token_id: int = TOKEN_IDS["im_end_token_id"]
    vision_start_token_id: int = TOKEN_IDS["vision_start_token_id"]  # <|vision_bos|>
    vision_end_token_id: int = TOKEN_IDS["vision_end_token_id"]  # <|vision_eos|>
    vision_pad_token_id: int = TOKEN_IDS["vision_pad_token_id"]
    image_token_id: int = TOKEN_IDS["image_token_id"]  # <|IMAGE|>
    video_token_id: int = TOKEN_IDS["video_token_id"]  # <|VIDEO|>
    audio_token_id: int = OMNI_TOKEN_IDS["audio_token_id"]
    audio_start_token_id: int = OMNI_TOKEN_IDS["audio_start_token_id"]
    audio_end_token_id: int = OMNI_TOKEN_IDS["audio_end_token_id"]
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2
    model_type: str = FULL_MODEL_TYPE  # the layout read (sets where the thinker's weights are)
    torch_dtype: str = "bfloat16"

    @property
    def weight_prefix(self) -> str:
        """Where the thinker's tensors are in the checkpoint."""
        return "thinker." if self.model_type == FULL_MODEL_TYPE else ""

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    def validate(self) -> "OmniConfig":
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not a Qwen2.5-Omni layout ({', '.join(MODEL_TYPES)})")
        self.text.validate()
        self.vision.validate()
        self.audio.validate()
        for name, width in (("vision_config.out_hidden_size", self.vision.out_hidden_size), ("audio_config.output_dim", self.audio.output_dim)):
            if width != self.text.hidden_size:
                raise ConfigError(f"{name} {width} must equal the text hidden_size {self.text.hidden_size}")
        ids = {k: getattr(self, k) for k in (*TOKEN_IDS, *OMNI_TOKEN_IDS) if hasattr(self, k)}
        for name, value in ids.items():
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.text.vocab_size:
                raise ConfigError(f"{name} {value!r} is outside the vocabulary (vocab_size {self.text.vocab_size})")
        structural = ["im_start_token_id", "im_end_token_id", "vision_start_token_id", "vision_end_token_id",
                      "image_token_id", "video_token_id", "audio_token_id", "audio_start_token_id", "audio_end_token_id"]
        seen: dict[int, str] = {}
        for name in structural:
            if ids[name] in seen:
                raise ConfigError(f"{name} and {seen[ids[name]]} are both {ids[name]}")
            seen[ids[name]] = name
        _check_positive("thinker config", position_id_per_seconds=self.position_id_per_seconds,
                        seconds_per_chunk=self.seconds_per_chunk)
        if self.torch_dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(f"torch_dtype {self.torch_dtype!r} is not supported (bfloat16, float16, float32)")
        return self

    def replace(self, **changes: Any) -> "OmniConfig":
        return replace(self, **changes).validate()

    # -- parsing ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OmniConfig":
        if not isinstance(d, Mapping):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type == FULL_MODEL_TYPE:
            t = d.get("thinker_config")
            if not isinstance(t, Mapping):
                raise ConfigError("a qwen2_5_omni config needs a 'thinker_config' object")
        elif model_type == THINKER_MODEL_TYPE:
            t = d
        else:
            raise ConfigError(f"model_type {model_type!r} is not a Qwen2.5-Omni layout ({', '.join(MODEL_TYPES)})")
        sub = {}
        for key in ("text_config", "vision_config", "audio_config"):
            if not isinstance(t.get(key), Mapping):
                raise ConfigError(f"thinker config has no '{key}' object")
            sub[key] = t[key]
        td = sub["text_config"]

        def text_get(key: str, default: Any = _MISSING) -> Any:
            if key in td and td[key] is not None:
                return td[key]
            if default is _MISSING:
                raise ConfigError(f"thinker text_config is missing {key!r}")
            return default

        # the thinker's own flag decides tying (transformers' text config defaults it to true);
        # _parse_text ORs the two sources, so hand it only the one that applies
        tie_src = t if "tie_word_embeddings" in t else td
        text = _parse_text({k: v for k, v in td.items() if k != "tie_word_embeddings"},
                           {"tie_word_embeddings": bool(tie_src.get("tie_word_embeddings", False))}, text_get)
        vision = _parse_vision(sub["vision_config"], text.hidden_size)
        audio = _parse_audio(sub["audio_config"], text.hidden_size)

        def tok(key: str, *alts: str, default: int) -> int:
            for k in (key, *alts):
                for src in (t, d, td):
                    if src.get(k) is not None:
                        v = src[k]
                        v = v[0] if isinstance(v, list) and v else v
                        return _as_int(k, v)
            return default

        dtype = t.get("torch_dtype", t.get("dtype")) or d.get("torch_dtype", d.get("dtype")) or td.get("torch_dtype")
        return cls(
            text=text, vision=vision, audio=audio,
            eos_token_id=tok("eos_token_id", default=TOKEN_IDS["eos_token_id"]),
            im_start_token_id=tok("im_start_token_id", default=TOKEN_IDS["im_start_token_id"]),
            im_end_token_id=tok("im_end_token_id", default=TOKEN_IDS["im_end_token_id"]),
            vision_start_token_id=tok("vision_start_token_id", default=TOKEN_IDS["vision_start_token_id"]),
            vision_end_token_id=tok("vision_end_token_id", default=TOKEN_IDS["vision_end_token_id"]),
            vision_pad_token_id=tok("vision_token_id", "vision_pad_token_id", default=TOKEN_IDS["vision_pad_token_id"]),
            image_token_id=tok("image_token_index", "image_token_id", default=TOKEN_IDS["image_token_id"]),
            video_token_id=tok("video_token_index", "video_token_id", default=TOKEN_IDS["video_token_id"]),
            audio_token_id=tok("audio_token_index", "audio_token_id", default=OMNI_TOKEN_IDS["audio_token_id"]),
            audio_start_token_id=tok("audio_start_token_id", default=OMNI_TOKEN_IDS["audio_start_token_id"]),
            audio_end_token_id=tok("audio_end_token_id", default=OMNI_TOKEN_IDS["audio_end_token_id"]),
            position_id_per_seconds=tok("position_id_per_seconds", default=25),
            seconds_per_chunk=tok("seconds_per_chunk", default=2),
            model_type=model_type,
            torch_dtype=str(dtype) if dtype else "bfloat16",
        ).validate()

    @classmethod
    def from_dir(cls, path: str | Path) -> "OmniConfig":
        p = Path(path)
        cfg_path = p if p.is_file() else p / "config.json"
        if not cfg_path.is_file():
            raise ConfigError(f"no config.json in {p}")
        try:
            d = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{cfg_path} is not valid JSON: {e}") from e
        return cls.from_dict(d)

    # -- writing ---------------------------------------------------------------------------
    def thinker_dict(self) -> dict[str, Any]:
        """The thinker's config, every field explicit (loads in transformers 5.x as
        Qwen2_5OmniThinkerConfig)."""
        t, v, a = self.text, self.vision, self.audio
        return {
            "architectures": ["Qwen2_5OmniThinkerForConditionalGeneration"],
            "model_type": THINKER_MODEL_TYPE,
            "audio_config": {
                "model_type": "qwen2_5_omni_audio_encoder", "num_mel_bins": a.num_mel_bins, "d_model": a.d_model,
                "encoder_layers": a.encoder_layers, "encoder_attention_heads": a.encoder_attention_heads,
                "encoder_ffn_dim": a.encoder_ffn_dim, "n_window": a.n_window, "max_source_positions": a.max_source_positions,
                "output_dim": a.output_dim, "activation_function": a.activation_function, "scale_embedding": a.scale_embedding,
                "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
            },
            "vision_config": {
                "model_type": "qwen2_5_omni_vision_encoder", "depth": v.depth, "hidden_size": v.hidden_size,
                "embed_dim": v.hidden_size, "intermediate_size": v.intermediate_size, "num_heads": v.num_heads,
                "in_channels": v.in_channels, "in_chans": v.in_channels, "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
                "window_size": v.window_size, "out_hidden_size": v.out_hidden_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes), "hidden_act": v.hidden_act,
            },
            "text_config": {
                "model_type": "qwen2_5_omni_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
                "hidden_act": t.hidden_act, "max_position_embeddings": t.max_position_embeddings,
                "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta,
                "rope_scaling": {"mrope_section": list(t.mrope_section), "rope_type": "default", "type": "default"},
                "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": t.num_hidden_layers,
                "tie_word_embeddings": t.tie_word_embeddings, "attention_dropout": 0.0,
            },
            "audio_token_index": self.audio_token_id, "image_token_index": self.image_token_id,
            "video_token_index": self.video_token_id, "audio_start_token_id": self.audio_start_token_id,
            "audio_end_token_id": self.audio_end_token_id, "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id, "vision_token_id": self.vision_pad_token_id,
            "position_id_per_seconds": self.position_id_per_seconds, "seconds_per_chunk": self.seconds_per_chunk,
            "user_token_id": 872, "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": self.bos_token_id, "tie_word_embeddings": t.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
        }

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json of this config's layout: the full checkpoint (thinker + talker +
        token2wav configs; only the thinker is real here) or the thinker alone."""
        thinker = self.thinker_dict()
        if self.model_type == THINKER_MODEL_TYPE:
            return thinker
        return {
            "architectures": ["Qwen2_5OmniModel"],
            "model_type": FULL_MODEL_TYPE,
            "enable_audio_output": False,  # no talker weights are written with random checkpoints
            "thinker_config": thinker,
            "talker_config": {"model_type": "qwen2_5_omni_talker"},
            "token2wav_config": {"model_type": "qwen2_5_omni_token2wav"},
            "torch_dtype": self.torch_dtype,
        }


def _parse_audio(ad: Mapping[str, Any], text_hidden: int) -> AudioEncoderConfig:
    defaults = AudioEncoderConfig(output_dim=text_hidden)

    def g(key: str, *alts: str) -> Any:
        for k in (key, *alts):
            if ad.get(k) is not None:
                return ad[k]
        return getattr(defaults, key)

    return AudioEncoderConfig(
        num_mel_bins=_as_int("audio_config.num_mel_bins", g("num_mel_bins")),
        d_model=_as_int("audio_config.d_model", g("d_model", "hidden_size")),
        encoder_layers=_as_int("audio_config.encoder_layers", g("encoder_layers", "num_hidden_layers")),
        encoder_attention_heads=_as_int("audio_config.encoder_attention_heads", g("encoder_attention_heads", "num_attention_heads")),
        encoder_ffn_dim=_as_int("audio_config.encoder_ffn_dim", g("encoder_ffn_dim", "intermediate_size")),
        n_window=_as_int("audio_config.n_window", g("n_window")),
        max_source_positions=_as_int("audio_config.max_source_positions", g("max_source_positions")),
        output_dim=_as_int("audio_config.output_dim", g("output_dim")),
        activation_function=str(g("activation_function")),
        scale_embedding=bool(g("scale_embedding")),
    )


# ---------------------------------------------------------------------------------------------
# presets (thinker only; the text parts are the Qwen2.5-VL-{3,7}B decoders at a 32k context)


def _text(**kw) -> TextConfig:
    return TextConfig(mrope_section=(16, 24, 24), max_position_embeddings=32768, **kw)


def _preset_3b() -> OmniConfig:
    text = _text(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True)
    return OmniConfig(text=text, vision=VisionConfig(out_hidden_size=2048), audio=AudioEncoderConfig(output_dim=2048))


def _preset_7b() -> OmniConfig:
    text = _text(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4)
    return OmniConfig(text=text, vision=VisionConfig(out_hidden_size=3584), audio=AudioEncoderConfig(output_dim=3584))


def _preset_tiny() -> OmniConfig:
    """For unit tests: the real vocabulary and the real towers' layouts, tiny widths."""
    text = TextConfig(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, mrope_section=(2, 3, 3), max_position_embeddings=32768)
    vision = VisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=(1, 3))
    audio = AudioEncoderConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=64)
    return OmniConfig(text=text, vision=vision, audio=audio)


OMNI_PRESETS = {"omni-3b": _preset_3b, "omni-7b": _preset_7b, "omni-tiny": _preset_tiny}


def omni_preset_config(name: str, layout: str = FULL_MODEL_TYPE) -> OmniConfig:
    """"omni-3b" / "omni-7b": the Qwen2.5-Omni thinkers' shapes; "omni-tiny": for tests.
    layout: FULL_MODEL_TYPE (thinker under "thinker.") or THINKER_MODEL_TYPE."""
    key = name.lower().strip()
    if key not in OMNI_PRESETS:
        raise ConfigError(f"unknown Omni preset {name!r} (known: {', '.join(OMNI_PRESETS)})")
    return OMNI_PRESETS[key]().replace(model_type=layout)
