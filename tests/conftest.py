"""Shared pytest fixtures. Keep this file small: add a fixture here only when several test
files need it, with a one-line docstring.

Available:
  tiny_config       session  QwenVLConfig of the "tiny" preset (text hidden 64, 2 layers)
  tiny_model_dir    session  Path of a random-weight "tiny" checkpoint (hub layout, float32,
                             init_std=TEST_INIT_STD, tied embeddings, real Qwen tokenizer)
  tiny_tokenizer    session  omnistream.models.tokenizer.Tokenizer of tiny_model_dir
  hf_tiny_model     session  transformers Qwen2_5_VLForConditionalGeneration of tiny_model_dir
                             (float32, eval); skips if transformers is missing. Do not mutate;
                             pass explicit position_ids (model.model.rope_deltas is shared state)
  make_media_item   function factory: make_media_item(kind, grid_thw, seed=0, **fields)
                             -> MediaItem with random normalised pixel_values
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download during tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Weights ~N(0, 0.3) for the tiny preset: positions change logits by ~10% while float32 stays
# ~1e-4 from float64 (the default 0.02 makes attention nearly uniform: positions invisible).
TEST_INIT_STD = 0.3


@pytest.fixture(scope="session")
def tiny_config():
    """The "tiny" preset config."""
    from omnistream.models.qwen2_5_vl_presets import preset_config

    return preset_config("tiny")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_config):
    """A random-weight tiny checkpoint directory, built once per test session (~1 s)."""
    from omnistream.models.demo import write_model_dir

    out = tmp_path_factory.mktemp("models") / "tiny"
    return write_model_dir(
        out, tiny_config, seed=0, init_std=TEST_INIT_STD, dtype="float32", preset="tiny"
    )


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    """omnistream's Tokenizer for the tiny checkpoint."""
    from omnistream.models.tokenizer import Tokenizer

    return Tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def hf_tiny_model(tiny_model_dir):
    """The transformers oracle model of the tiny checkpoint (float32, eval mode)."""
    transformers = pytest.importorskip("transformers")
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_model_dir, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture
def make_media_item():
    """Factory for MediaItems with random pixel values of the right shape (1176 per patch)."""
    from omnistream.media.item import MediaItem

    def make(kind: str, grid_thw: tuple[int, int, int], seed: int = 0, **fields) -> MediaItem:
        t, h, w = grid_thw
        gen = torch.Generator().manual_seed(seed)
        pixels = torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=gen)
        if kind == "video" and "timestamps" not in fields:
            fields["timestamps"] = [i * 0.5 for i in range(2 * t)]
        return MediaItem(kind=kind, pixel_values=pixels, grid_thw=tuple(grid_thw), **fields)

    return make
