"""Registers `omnistream profile` and `omnistream bench ...` (filled in by bench modules)."""

from __future__ import annotations


def add_bench_commands(sub, add_model_args) -> None:
    pass
