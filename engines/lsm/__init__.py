"""The `lsm` storage engine: write-ahead log, memtable, SSTables, leveled compaction.

    from engines.lsm import LSMEngine
    engine = LSMEngine("/var/lib/capkv/n1", sync="always", memtable_bytes=8 << 20)

Modules: `wal` (log records), `memtable`, `sstable` (tables, blocks, block cache), `bloom`,
`manifest`, `compaction` (what to merge; pure), `merge` (chunked k-way merge), `short_scan`
(scans with a small limit, in one go), `engine`.
Byte layouts are in engines/FORMATS.md.
"""
from .engine import LSMEngine, LSMOptions

__all__ = ["LSMEngine", "LSMOptions"]
