"""The model presets: the released Qwen2.5-VL-3B/7B-Instruct configs (random weights built from
them for benchmarks) and the small real-tokenizer models of the demo and the tests.

    cfg = preset_config("3b")      # a validated QwenVLConfig
"""

from __future__ import annotations

from omnistream.errors import ConfigError
from omnistream.models.hf_config import QwenVLConfig, TextConfig, VisionConfig

# Field values not given below are the dataclass defaults, which are the released checkpoints'
# (rms_norm_eps, rope_theta, positions; the whole 3B/7B vision tower but its output width).


def _preset_3b() -> QwenVLConfig:
    return QwenVLConfig(
        text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                        num_attention_heads=16, num_key_value_heads=2, mrope_section=(16, 24, 24), tie_word_embeddings=True),
        vision=VisionConfig(out_hidden_size=2048),
    )


def _preset_7b() -> QwenVLConfig:
    return QwenVLConfig(
        text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, mrope_section=(16, 24, 24)),
        vision=VisionConfig(out_hidden_size=3584),
    )


def _small(hidden: int, layers: int, mrope_section: tuple[int, int, int], vision_hidden: int, vision_heads: int) -> QwenVLConfig:
    """A small model with the real vocabulary (real tokenizer) and the real tower's layout
    (window size, full-attention blocks at 1 and 3 of 4), MLPs twice as wide as the hidden size."""
    return QwenVLConfig(
        text=TextConfig(vocab_size=151936, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=mrope_section, tie_word_embeddings=True),
        vision=VisionConfig(depth=4, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=vision_heads,
                            out_hidden_size=hidden, fullatt_block_indexes=(1, 3)),
    )


def _preset_demo() -> QwenVLConfig:
    """~41M parameters (39M of them the embedding): a real-tokenizer model for CLI/server demos."""
    return _small(hidden=256, layers=4, mrope_section=(8, 12, 12), vision_hidden=128, vision_heads=4)  # head_dim 64


def _preset_tiny() -> QwenVLConfig:
    """~10M parameters (almost all embedding): for unit tests."""
    return _small(hidden=64, layers=2, mrope_section=(2, 3, 3), vision_hidden=32, vision_heads=2)  # head_dim 16


PRESETS = {"3b": _preset_3b, "7b": _preset_7b, "demo": _preset_demo, "tiny": _preset_tiny}


def preset_config(name: str) -> QwenVLConfig:
    """``"3b"`` / ``"7b"``: the real Qwen2.5-VL-{3,7}B-Instruct configs; ``"demo"``: a small
    random-weight model; ``"tiny"``: an even smaller one for unit tests."""
    key = name.lower().strip()
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[key]().validate()

