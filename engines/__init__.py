"""Storage engines shared by both cluster modes: `memory`, `hash` (Bitcask-style), `lsm`.

    engine = open_engine("lsm", "/var/lib/capkv/n1", sync="always")

See `base.py` for the protocol and `FORMATS.md` for every on-disk byte.
"""
from __future__ import annotations

import os

from .base import (
    CorruptionError,
    Engine,
    EngineClosed,
    EngineError,
    EngineOptions,
    InvalidArgument,
)

ENGINE_KINDS = ("memory", "hash", "lsm")


def open_engine(kind: str, path: str | os.PathLike | None = None, **options) -> Engine:
    """Open (creating if needed) an engine of `kind` in directory `path`.

    `memory` needs no path; `hash` and `lsm` need one. Unknown options raise
    `InvalidArgument` naming them.
    """
    if kind == "memory":
        from .memory import MemoryEngine

        return MemoryEngine(**options)
    if kind not in ENGINE_KINDS:
        raise InvalidArgument(f"unknown engine {kind!r}: choose one of {', '.join(ENGINE_KINDS)}")
    if path is None:
        raise InvalidArgument(f"the {kind} engine stores files: give it a directory path")
    if kind == "hash":
        from .hash import HashEngine

        return HashEngine(path, **options)
    from .lsm import LSMEngine

    return LSMEngine(path, **options)


__all__ = [
    "ENGINE_KINDS",
    "CorruptionError",
    "Engine",
    "EngineClosed",
    "EngineError",
    "EngineOptions",
    "InvalidArgument",
    "open_engine",
]
