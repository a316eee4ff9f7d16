"""Child process of test_crash.py: writes to an engine until it is killed with SIGKILL.

Each writer thread owns its keys (`t03-017`: thread 3, key 17) and runs a seeded sequence
of puts, deletes and batches. Around every operation it prints one line to stdout, with a
single `os.write` (atomic on a pipe for lines under PIPE_BUF), so the parent knows exactly
what was attempted and what was acknowledged when the kill came:

    READY                                      engine opened
    I 3 41 B P:7430332d303137:812,D:7430332d303039   thread 3 is about to run op 41 (a batch)
    A 3 41                                     op 41 of thread 3 returned (acknowledged)

An op is `P:<key hex>:<value length>` (put), `D:<key hex>` (delete), or `B ` followed by
a comma-separated list of those (one atomic batch). A put's value is `value_for()`, so the
parent recomputes every value from the line alone.

    python tests/engines/crash_writer.py --kind lsm --path /tmp/d --threads 4 --seed 7 \\
        --options '{"sync": "always"}'
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import threading

KEYS_PER_THREAD = 200
# Bound: a child that is never killed stops by itself after this many ops per thread.
MAX_OPS_PER_THREAD = 1_000_000
_out_lock = threading.Lock()


def key_for(thread: int, index: int) -> bytes:
    return b"t%02d-%03d" % (thread, index)


def value_for(thread: int, op_index: int, position: int, length: int) -> bytes:
    """The value op `op_index` of `thread` puts at `position` in its batch (0 for a put)."""
    digest = hashlib.sha256(b"%d:%d:%d" % (thread, op_index, position)).digest()
    return (digest * (length // len(digest) + 1))[:length]


def emit(line: str) -> None:
    data = (line + "\n").encode()
    with _out_lock:
        os.write(1, data)


def random_op(rng: random.Random, thread: int) -> list[tuple[str, bytes, int]]:
    """One op as a list of (kind, key, value length); more than one item means a batch."""
    def one(kind: str) -> tuple[str, bytes, int]:
        key = key_for(thread, rng.randrange(KEYS_PER_THREAD))
        length = rng.choice((0, rng.randint(1, 100), rng.randint(100, 3000)))
        return (kind, key, length)

    roll = rng.random()
    if roll < 0.6:
        return [one("P")]
    if roll < 0.75:
        return [one("D")]
    return [one("P" if rng.random() < 0.75 else "D") for _ in range(rng.randint(2, 8))]


def describe(op: list[tuple[str, bytes, int]]) -> str:
    parts = [f"P:{key.hex()}:{length}" if kind == "P" else f"D:{key.hex()}" for kind, key, length in op]
    return ("B " + ",".join(parts)) if len(op) > 1 else parts[0]


def writer(engine, thread: int, seed: int, errors: list) -> None:
    rng = random.Random(seed * 1000 + thread)
    try:
        for op_index in range(MAX_OPS_PER_THREAD):
            op = random_op(rng, thread)
            emit(f"I {thread} {op_index} {describe(op)}")
            if len(op) == 1:
                kind, key, length = op[0]
                if kind == "P":
                    engine.put(key, value_for(thread, op_index, 0, length))
                else:
                    engine.delete(key)
            else:
                engine.write(
                    [
                        ("put", key, value_for(thread, op_index, position, length)) if kind == "P" else ("delete", key, None)
                        for position, (kind, key, length) in enumerate(op)
                    ]
                )
            emit(f"A {thread} {op_index}")
    except BaseException as exc:  # noqa: BLE001 - reported on stderr and in the exit code
        errors.append(exc)
        import traceback

        traceback.print_exc()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", default="{}", help="engine options as JSON")
    args = parser.parse_args(argv)

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, root)
    from engines import open_engine

    engine = open_engine(args.kind, args.path, **json.loads(args.options))
    emit("READY")
    errors: list = []
    threads = [threading.Thread(target=writer, args=(engine, t, args.seed, errors)) for t in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.close()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
