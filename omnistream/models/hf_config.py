"""Typed, validated view of a Hugging Face Qwen2.5-VL ``config.json``.

Two on-disk layouts exist and both are parsed:

* the hub's flat layout (what the real checkpoints ship): text fields at the top level, a
  ``"vision_config"`` dict and ``"rope_scaling": {"type": "mrope", "mrope_section": [...]}``;
* the transformers-5 layout written by ``save_pretrained``: ``"text_config"`` (with
  ``"rope_parameters"``) and ``"vision_config"``.

``QwenVLConfig.to_hf_dict()`` always writes the hub's flat layout with every field explicit:
the config classes of transformers have misleading defaults (vision hidden 3584,
tokens_per_second 4), so nothing may be left to them. Missing fields in a parsed dict default
to the values of the real Qwen2.5-VL checkpoints, never to transformers' defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from omnistream.errors import ConfigError

__all__ = [
    "VisionConfig",
    "TextConfig",
    "QwenVLConfig",
    "preset_config",
    "PRESETS",
    "TOKEN_IDS",
]

# Token ids of the Qwen2 tokenizer family (same in every Qwen2.5-VL checkpoint).
TOKEN_IDS: dict[str, int] = {
    "bos_token_id": 151643,  # <|endoftext|>
    "im_start_token_id": 151644,  # <|im_start|>
    "im_end_token_id": 151645,  # <|im_end|>
    "eos_token_id": 151645,  # <|im_end|> (instruct checkpoints)
    "vision_start_token_id": 151652,  # <|vision_start|>
    "vision_end_token_id": 151653,  # <|vision_end|>
    "vision_pad_token_id": 151654,  # <|vision_pad|>
    "image_token_id": 151655,  # <|image_pad|>
    "video_token_id": 151656,  # <|video_pad|>
}

_SUPPORTED_ACTS = ("silu",)
_SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)
_VISION_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class VisionConfig:
    """The Qwen2.5-VL vision tower (ViT with window attention + 2x2 patch merger)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 2
    window_size: int = 112  # pixels (8x8 patches of 14 px)
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merge_unit(self) -> int:
        """Patches merged into one LLM token (4 for a 2x2 merge)."""
        return self.spatial_merge_size**2

    @property
    def patch_dim(self) -> int:
        """Length of one row of ``pixel_values``: C * T_patch * P * P (1176 for real models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def window_patches(self) -> int:
        """Side of an attention window in merged tokens (4 for 112 px / 14 px / 2)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    def validate(self) -> None:
        _check_positive(
            "vision_config",
            depth=self.depth,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_heads=self.num_heads,
            in_channels=self.in_channels,
            patch_size=self.patch_size,
            spatial_merge_size=self.spatial_merge_size,
            temporal_patch_size=self.temporal_patch_size,
            tokens_per_second=self.tokens_per_second,
            window_size=self.window_size,
            out_hidden_size=self.out_hidden_size,
        )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision_config: hidden_size {self.hidden_size} is not divisible by "
                f"num_heads {self.num_heads}"
            )
        if self.head_dim % 4:
            raise ConfigError(
                f"vision_config: head_dim {self.head_dim} (hidden_size / num_heads) must be a "
                "multiple of 4 for the 2D (h, w) rotary embedding"
            )
        unit = self.patch_size * self.spatial_merge_size
        if self.window_size % unit:
            raise ConfigError(
                f"vision_config: window_size {self.window_size} must be a multiple of "
                f"patch_size * spatial_merge_size = {unit}"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(
                f"vision_config: fullatt_block_indexes {list(self.fullatt_block_indexes)} has "
                f"entries outside [0, depth={self.depth}): {bad}"
            )
        if len(set(self.fullatt_block_indexes)) != len(self.fullatt_block_indexes):
            raise ConfigError(
                f"vision_config: fullatt_block_indexes {list(self.fullatt_block_indexes)} "
                "has duplicates"
            )
        if self.hidden_act not in _SUPPORTED_ACTS:
            raise ConfigError(
                f"vision_config: hidden_act {self.hidden_act!r} is not supported "
                f"(supported: {', '.join(_SUPPORTED_ACTS)})"
            )


@dataclass(frozen=True)
class TextConfig:
    """The Qwen2.5 decoder (GQA, SwiGLU, RMSNorm, M-RoPE)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    mrope_section: tuple[int, ...]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 128_000
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def validate(self) -> None:
        _check_positive(
            "text config",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
        )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"text config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"text config: num_attention_heads {self.num_attention_heads} is not divisible "
                f"by num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"text config: head_dim {self.head_dim} must be even for RoPE")
        if len(self.mrope_section) != 3 or any(
            not isinstance(s, int) or s <= 0 for s in self.mrope_section
        ):
            raise ConfigError(
                f"text config: mrope_section must be 3 positive integers (t, h, w), "
                f"got {list(self.mrope_section)}"
            )
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ConfigError(
                f"text config: mrope_section {list(self.mrope_section)} sums to "
                f"{sum(self.mrope_section)}, but must sum to head_dim / 2 = {self.head_dim // 2} "
                f"(head_dim = hidden_size {self.hidden_size} / num_attention_heads "
                f"{self.num_attention_heads})"
            )
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"text config: rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"text config: rope_theta must be > 0, got {self.rope_theta}")
        if self.hidden_act not in _SUPPORTED_ACTS:
            raise ConfigError(
                f"text config: hidden_act {self.hidden_act!r} is not supported "
                f"(supported: {', '.join(_SUPPORTED_ACTS)})"
            )


@dataclass(frozen=True)
class QwenVLConfig:
    """A whole Qwen2.5-VL checkpoint config: text decoder + vision tower + special token ids."""

    text: TextConfig
    vision: VisionConfig
    bos_token_id: int = TOKEN_IDS["bos_token_id"]
    eos_token_id: int = TOKEN_IDS["eos_token_id"]
    im_start_token_id: int = TOKEN_IDS["im_start_token_id"]
    im_end_token_id: int = TOKEN_IDS["im_end_token_id"]
    vision_start_token_id: int = TOKEN_IDS["vision_start_token_id"]
    vision_end_token_id: int = TOKEN_IDS["vision_end_token_id"]
    vision_pad_token_id: int = TOKEN_IDS["vision_pad_token_id"]
    image_token_id: int = TOKEN_IDS["image_token_id"]  # <|image_pad|>
    video_token_id: int = TOKEN_IDS["video_token_id"]  # <|video_pad|>
    model_type: str = "qwen2_5_vl"
    torch_dtype: str = "bfloat16"  # dtype of the stored weights

    # -- aliases ---------------------------------------------------------------------------
    @property
    def image_pad_token_id(self) -> int:
        return self.image_token_id

    @property
    def video_pad_token_id(self) -> int:
        return self.video_token_id

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    # -- validation ------------------------------------------------------------------------
    def validate(self) -> "QwenVLConfig":
        if self.model_type not in _SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported "
                f"(supported: {', '.join(_SUPPORTED_MODEL_TYPES)})"
            )
        self.text.validate()
        self.vision.validate()
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(
                f"vision_config.out_hidden_size {self.vision.out_hidden_size} must equal the "
                f"text hidden_size {self.text.hidden_size}"
            )
        ids = {
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "im_start_token_id": self.im_start_token_id,
            "im_end_token_id": self.im_end_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "vision_pad_token_id": self.vision_pad_token_id,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
        }
        for name, value in ids.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if not 0 <= value < self.text.vocab_size:
                raise ConfigError(
                    f"{name} {value} is outside the vocabulary (vocab_size {self.text.vocab_size})"
                )
        structural = [
            "im_start_token_id",
            "im_end_token_id",
            "vision_start_token_id",
            "vision_end_token_id",
            "image_token_id",
            "video_token_id",
        ]
        seen: dict[int, str] = {}
        for name in structural:
            if ids[name] in seen:
                raise ConfigError(f"{name} and {seen[ids[name]]} are both {ids[name]}")
            seen[ids[name]] = name
        if self.torch_dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(
                f"torch_dtype {self.torch_dtype!r} is not supported (bfloat16, float16, float32)"
            )
        return self

    # -- parsing ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QwenVLConfig":
        """Parse a Qwen2.5-VL config.json (hub flat layout or transformers-5 layout)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "qwen2_5_vl")
        if model_type not in _SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported (this engine runs Qwen2.5-VL: "
                f"{', '.join(_SUPPORTED_MODEL_TYPES)})"
            )
        td = d.get("text_config")
        if td is None:
            td = d  # hub flat layout
        elif not isinstance(td, Mapping):
            raise ConfigError("text_config must be a JSON object")
        vd = d.get("vision_config")
        if vd is None:
            raise ConfigError("config has no 'vision_config'")
        if not isinstance(vd, Mapping):
            raise ConfigError("vision_config must be a JSON object")

        def text_get(key: str, default: Any = _MISSING) -> Any:
            for src in (td, d):
                if key in src and src[key] is not None:
                    return src[key]
            if default is _MISSING:
                raise ConfigError(f"config is missing the text field {key!r}")
            return default

        text = _parse_text(td, d, text_get)
        vision = _parse_vision(vd, text.hidden_size)

        def tok(key: str, *alts: str) -> int:
            for k in (key, *alts):
                for src in (d, td):
                    if k in src and src[k] is not None:
                        v = src[k]
                        if isinstance(v, list):  # eos may be a list in some configs
                            if not v:
                                break
                            v = v[0]
                        return _as_int(k, v)
            return TOKEN_IDS[key]

        dtype = d.get("torch_dtype", d.get("dtype")) or td.get("torch_dtype", td.get("dtype"))
        cfg = cls(
            text=text,
            vision=vision,
            bos_token_id=tok("bos_token_id"),
            eos_token_id=tok("eos_token_id"),
            im_start_token_id=tok("im_start_token_id"),
            im_end_token_id=tok("im_end_token_id"),
            vision_start_token_id=tok("vision_start_token_id"),
            vision_end_token_id=tok("vision_end_token_id"),
            vision_pad_token_id=tok("vision_pad_token_id", "vision_token_id"),
            image_token_id=tok("image_token_id"),
            video_token_id=tok("video_token_id"),
            model_type=model_type,
            torch_dtype=str(dtype) if dtype else "bfloat16",
        )
        return cfg.validate()

    @classmethod
    def from_dir(cls, path: str | Path) -> "QwenVLConfig":
        """Read ``<path>/config.json`` (or ``path`` itself when it is a file)."""
        p = Path(path)
        cfg_path = p if p.is_file() else p / "config.json"
        if not cfg_path.is_file():
            raise ConfigError(f"no config.json in {p}")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_path} is not valid JSON: {e}") from e
        return cls.from_dict(d)

    # -- writing ---------------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """The hub's flat config.json layout, every field explicit (loads in transformers 4.5x
        and 5.x and in vLLM)."""
        t, v = self.text, self.vision
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": self.model_type,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "im_start_token_id": self.im_start_token_id,
            "im_end_token_id": self.im_end_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "vision_token_id": self.vision_pad_token_id,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "hidden_act": t.hidden_act,
            "hidden_size": t.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": t.intermediate_size,
            "max_position_embeddings": t.max_position_embeddings,
            "max_window_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "sliding_window": 32768,
            "use_sliding_window": False,
            "tie_word_embeddings": t.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
            "vocab_size": t.vocab_size,
            "vision_config": {
                "depth": v.depth,
                "hidden_act": v.hidden_act,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_chans": v.in_channels,
                "in_channels": v.in_channels,
                "out_hidden_size": v.out_hidden_size,
                "patch_size": v.patch_size,
                "spatial_patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "temporal_patch_size": v.temporal_patch_size,
                "tokens_per_second": v.tokens_per_second,
                "window_size": v.window_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
            },
        }

    def replace(self, **changes: Any) -> "QwenVLConfig":
        """A validated copy with top-level fields changed (``text=``/``vision=`` included)."""
        return replace(self, **changes).validate()


# ---------------------------------------------------------------------------------------------
# parsing helpers

_MISSING = object()


def _as_int(name: str, v: Any) -> int:
    if isinstance(v, bool):
        raise ConfigError(f"{name} must be an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    raise ConfigError(f"{name} must be an integer, got {v!r}")


def _as_float(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{name} must be a number, got {v!r}")
    return float(v)


def _as_bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{name} must be true or false, got {v!r}")
    return v


def _check_positive(where: str, **values: int) -> None:
    for k, v in values.items():
        if v <= 0:
            raise ConfigError(f"{where}: {k} must be positive, got {v}")


def _parse_text(td: Mapping[str, Any], d: Mapping[str, Any], get) -> TextConfig:
    rope = None
    for src in (td, d):
        for key in ("rope_parameters", "rope_scaling"):
            if isinstance(src.get(key), Mapping):
                rope = src[key]
                break
        if rope is not None:
            break
    if rope is None:
        raise ConfigError(
            "config has no M-RoPE settings: expected 'rope_scaling' (hub layout) or "
            "'rope_parameters' (transformers-5 layout) with an 'mrope_section'"
        )
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ConfigError(
            f"rope type {rope_type!r} is not supported (Qwen2.5-VL uses plain M-RoPE: "
            "'mrope' / 'default')"
        )
    section = rope.get("mrope_section")
    if not isinstance(section, (list, tuple)):
        raise ConfigError(f"rope settings have no valid 'mrope_section': {dict(rope)}")
    mrope_section = tuple(_as_int("mrope_section", s) for s in section)
    theta = rope.get("rope_theta")
    if theta is None:
        theta = get("rope_theta", 1_000_000.0)

    hidden = _as_int("hidden_size", get("hidden_size"))
    heads = _as_int("num_attention_heads", get("num_attention_heads"))
    kv = get("num_key_value_heads", None)
    kv = heads if kv is None else _as_int("num_key_value_heads", kv)
    if heads > 0 and hidden % heads == 0:
        explicit_hd = get("head_dim", None)
        if explicit_hd is not None and _as_int("head_dim", explicit_hd) != hidden // heads:
            raise ConfigError(
                f"text config: head_dim {explicit_hd} differs from hidden_size / "
                f"num_attention_heads = {hidden // heads}; Qwen2.5-VL needs them equal"
            )
    # tie_word_embeddings: top level in v5, may also sit in text_config (pre-v5 saves).
    tie = False
    for src in (d, td):
        if "tie_word_embeddings" in src and src["tie_word_embeddings"] is not None:
            tie = tie or _as_bool("tie_word_embeddings", src["tie_word_embeddings"])
    if get("use_sliding_window", False):
        raise ConfigError("use_sliding_window=true is not supported (Qwen2.5-VL never uses it)")
    return TextConfig(
        vocab_size=_as_int("vocab_size", get("vocab_size")),
        hidden_size=hidden,
        intermediate_size=_as_int("intermediate_size", get("intermediate_size")),
        num_hidden_layers=_as_int("num_hidden_layers", get("num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        mrope_section=mrope_section,
        rms_norm_eps=_as_float("rms_norm_eps", get("rms_norm_eps", 1e-6)),
        rope_theta=_as_float("rope_theta", theta),
        max_position_embeddings=_as_int(
            "max_position_embeddings", get("max_position_embeddings", 128_000)
        ),
        tie_word_embeddings=tie,
        hidden_act=str(get("hidden_act", "silu")),
    )


def _parse_vision(vd: Mapping[str, Any], text_hidden: int) -> VisionConfig:
    defaults = VisionConfig()

    def g(key: str, *alts: str) -> Any:
        for k in (key, *alts):
            if k in vd and vd[k] is not None:
                return vd[k]
        return getattr(defaults, key)

    rope = vd.get("rope_parameters")
    if isinstance(rope, Mapping):
        theta = rope.get("rope_theta", _VISION_ROPE_THETA)
        if float(theta) != _VISION_ROPE_THETA:
            raise ConfigError(
                f"vision_config: rope_theta {theta} is not supported (Qwen2.5-VL uses "
                f"{_VISION_ROPE_THETA:g})"
            )
    for key in ("patch_size", "temporal_patch_size"):
        if isinstance(vd.get(key), (list, tuple)):
            raise ConfigError(f"vision_config: {key} must be a single integer, got {vd[key]}")
    fullatt = g("fullatt_block_indexes")
    if not isinstance(fullatt, (list, tuple)):
        raise ConfigError(f"vision_config: fullatt_block_indexes must be a list, got {fullatt!r}")
    out_hidden = vd.get("out_hidden_size")
    return VisionConfig(
        depth=_as_int("vision_config.depth", g("depth")),
        hidden_size=_as_int("vision_config.hidden_size", g("hidden_size", "embed_dim")),
        intermediate_size=_as_int("vision_config.intermediate_size", g("intermediate_size")),
        num_heads=_as_int("vision_config.num_heads", g("num_heads", "num_attention_heads")),
        in_channels=_as_int("vision_config.in_channels", g("in_channels", "in_chans")),
        patch_size=_as_int("vision_config.patch_size", g("patch_size", "spatial_patch_size")),
        spatial_merge_size=_as_int("vision_config.spatial_merge_size", g("spatial_merge_size")),
        temporal_patch_size=_as_int(
            "vision_config.temporal_patch_size", g("temporal_patch_size")
        ),
        tokens_per_second=_as_int("vision_config.tokens_per_second", g("tokens_per_second")),
        window_size=_as_int("vision_config.window_size", g("window_size")),
        out_hidden_size=(
            text_hidden
            if out_hidden is None
            else _as_int("vision_config.out_hidden_size", out_hidden)
        ),
        fullatt_block_indexes=tuple(
            _as_int("vision_config.fullatt_block_indexes", i) for i in fullatt
        ),
        hidden_act=str(g("hidden_act")),
    )
