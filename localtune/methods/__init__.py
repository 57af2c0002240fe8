"""One file per training method, each a `Method` (base.py) with the hooks it needs.

REGISTRY is the one list of methods: adding a method is its file plus one line here. Modules
load on first use, so reading a recipe does not import every method.
"""
from __future__ import annotations

import importlib

REGISTRY = {"sft": "sft", "dpo": "dpo", "distill": "distill", "reward": "reward", "ppo": "ppo",  # kind -> module
            "grpo": "grpo", "orpo": "orpo", "simpo": "simpo", "kto": "kto"}


def kinds() -> tuple[str, ...]:
    """The stage kinds a recipe may name."""
    return tuple(REGISTRY)


def get(kind: str):
    """The Method of a stage kind (a KeyError for a kind the recipe parser let through is a bug)."""
    return importlib.import_module(f".{REGISTRY[kind]}", __name__).METHOD


def of(stage):
    return get(stage.kind)


def all_methods() -> list:
    return [get(kind) for kind in REGISTRY]


def for_init(fmt: str) -> str | None:
    """The kind of stage `localtune init` writes for data of this canonical format, or None."""
    return next((m.kind for m in all_methods() if fmt in m.init_for), None)


def key_kinds() -> dict[str, tuple[str, ...]]:
    """Each method-only recipe key -> the kinds that take it (from the methods' options)."""
    import dataclasses

    out: dict[str, tuple[str, ...]] = {}
    for m in all_methods():
        for f in dataclasses.fields(m.options) if m.options else ():
            out[f.name] = out.get(f.name, ()) + (m.kind,)
    return out
