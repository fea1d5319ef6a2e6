"""The built-in models by name: "demo" (models/demo.py) and "omni-demo" (models/omni_demo.py),
each written once into the cache; any other name is a checkpoint directory.

    model_dir = builtin_model_dir("demo")
"""

from __future__ import annotations

from pathlib import Path

from omnistream.models.demo import ensure_demo_model
from omnistream.models.omni_demo import ensure_omni_demo_model

BUILTIN_MODELS = ("demo", "omni-demo")  # names --model and Engine.from_pretrained take besides a directory


def builtin_model_dir(model: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A built-in model's name -> its directory (written once to the cache); anything else is
    taken as a checkpoint directory."""
    if str(model) == "demo":
        return ensure_demo_model(cache_dir)
    if str(model) == "omni-demo":
        return ensure_omni_demo_model(cache_dir)
    return Path(model)
