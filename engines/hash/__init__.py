"""The `hash` storage engine: Bitcask-style (append-only data files, in-memory keydir,
hint files, merge). See engine.py for how it works and engines/FORMATS.md for its bytes.

    from engines.hash import HashEngine
    engine = HashEngine("/var/lib/capkv/n1", sync="always", max_file_bytes=64 << 20)
"""
from .engine import HASH_OPTION_NAMES, HashEngine, HashOptions

__all__ = ["HASH_OPTION_NAMES", "HashEngine", "HashOptions"]
