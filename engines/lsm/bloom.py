"""Bloom filters for SSTables: "is this key maybe in this table?" in a few bit probes.

A get that misses a table should not read one of its blocks. Each SSTable carries a Bloom
filter (Bloom 1970) over its keys; with `bits_per_key` = 10 and k = round(10 * ln 2) = 7
hash functions the false positive rate is about (1 - e^(-k/10))^k = 0.82 %.

The k probe positions come from one 128-bit murmur3 hash by double hashing
(Kirsch and Mitzenmacher 2006): position_i = (h1 + i * h2) mod m. A get hashes its key
once (`key_hash`) and probes every table's filter with the same pair.

    >>> f = BloomFilter.build([b"apple", b"pear"], bits_per_key=10)
    >>> f.may_contain(key_hash(b"apple")), f.may_contain(key_hash(b"plum"))
    (True, False)

The encoded filter stores its own number of hashes and bits, so a table written with one
`bloom_bits_per_key` is read correctly after the option changes.
"""
from __future__ import annotations

import math
import struct
from collections import deque
from itertools import repeat
from operator import add, itemgetter, mod, rshift

import mmh3

_HEADER = struct.Struct("<IQ")  # num_hashes u32, num_bits u64
# The largest k we accept from a file: more probes than this means a damaged header.
MAX_HASHES = 30


def key_hash(key: bytes) -> tuple[int, int]:
    """The (h1, h2) pair every filter probes with: the top 30 bits of each half of the
    murmur3 x64 128-bit hash (seed 0, unsigned). 30 bits keep the position arithmetic in
    CPython's one-digit ints (twice as fast as 64-bit), and a table never has 2^30 bits."""
    h1, h2 = mmh3.hash64(key, 0, True, False)
    return h1 >> 34, h2 >> 34


def hashes_for(bits_per_key: int) -> int:
    """k = bits_per_key * ln 2 minimises the false positive rate; at least 1, at most 30."""
    return max(1, min(MAX_HASHES, round(bits_per_key * math.log(2))))


class BloomFilter:
    __slots__ = ("num_hashes", "num_bits", "bits", "steps")

    def __init__(self, num_hashes: int, num_bits: int, bits: bytes) -> None:
        self.num_hashes = num_hashes
        self.steps = range(num_hashes)
        self.num_bits = num_bits
        self.bits = bits

    @classmethod
    def build(cls, keys, bits_per_key: int) -> "BloomFilter":
        """A filter over `keys` (any iterable of bytes) with about `bits_per_key` bits each.

        Builds the filter one byte per bit (C-level `bytearray.__setitem__` over all positions),
        then packs it eight bits to the byte through a base-2 integer. The positions are
        computed a probe at a time for all keys, position_i = (position_(i-1) + h2) mod m,
        by `map` over C functions: no bytecode runs per key (the whole build takes a third
        less time than with a comprehension, and a flush spends half its time here).
        """
        keys = list(keys)
        k = hashes_for(bits_per_key)
        m = max(64, len(keys) * bits_per_key)
        m = (m + 7) // 8 * 8
        if m >= 1 << 30:
            raise ValueError(f"{len(keys)} keys are too many for one filter (30-bit positions)")
        unpacked = bytearray(m)
        hashes = list(map(mmh3.hash64, keys, repeat(0), repeat(True), repeat(False)))
        h2s = list(map(rshift, map(itemgetter(1), hashes), repeat(34)))
        positions = list(map(mod, map(rshift, map(itemgetter(0), hashes), repeat(34)), repeat(m)))
        del hashes
        set_bit = unpacked.__setitem__
        for i in range(k):
            if i:
                positions = list(map(mod, map(add, positions, h2s), repeat(m)))
            deque(map(set_bit, positions, repeat(1)), maxlen=0)
        return cls(k, m, _pack_bits(unpacked))

    def may_contain(self, hash_pair: tuple[int, int]) -> bool:
        """False means surely absent; True means "read the table" (maybe a false positive)."""
        h1, h2 = hash_pair
        m = self.num_bits
        bits = self.bits
        for _ in self.steps:
            p = h1 % m
            if not (bits[p >> 3] >> (p & 7)) & 1:
                return False
            h1 += h2
        return True

    def encode(self) -> bytes:
        return _HEADER.pack(self.num_hashes, self.num_bits) + self.bits

    @classmethod
    def decode(cls, data: bytes) -> "BloomFilter":
        """Raises ValueError when the header does not describe the data (caller names the file)."""
        if len(data) < _HEADER.size:
            raise ValueError("bloom filter block shorter than its header")
        k, m = _HEADER.unpack_from(data, 0)
        bits = bytes(data[_HEADER.size:])
        if not 1 <= k <= MAX_HASHES or m == 0 or m % 8 or m >= 1 << 30 or len(bits) * 8 != m:
            raise ValueError(f"bloom filter header (k={k}, m={m}) does not match its {len(bits)} bytes")
        return cls(k, m, bits)


# Packs a bytes-of-0/1 array to bits, bit i of the result = byte i of the input (LSB first):
# 0/1 bytes -> ASCII '0'/'1' -> reversed so bit 0 is the last digit -> int(s, 2) -> bytes.
_TO_ASCII = bytes.maketrans(b"\x00\x01", b"01")


def _pack_bits(unpacked: bytearray) -> bytes:
    digits = bytes(unpacked).translate(_TO_ASCII)[::-1]
    return int(digits, 2).to_bytes(len(unpacked) // 8, "little")
