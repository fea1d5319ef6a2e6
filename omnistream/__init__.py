"""omnistream: an inference engine and server for multi-turn and live video/audio QA.

    from omnistream import Engine, SamplingParams
    engine = Engine.from_pretrained("demo")

Layout, top down: entrypoints/ (Python API, CLI, server) -> sessions/ (multi-turn and live
sessions, clients of the engine core) -> engine/ (the one loop: scheduler, model runner) ->
cache/ (paged KV, prefix and encoder caches), models/ (registry, Qwen models, templates),
media/ (decode, resize, hash) -> layers/ (attention, linear, norm, rotary). bench/ measures
through the public interfaces.
"""

__all__ = ["Engine", "SamplingParams"]


def __getattr__(name: str):
    # lazy: `import omnistream.errors` must not pull in torch and the whole engine
    if name == "Engine":
        from omnistream.entrypoints.api import Engine

        return Engine
    if name == "SamplingParams":
        from omnistream.engine.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'omnistream' has no attribute {name!r}")
