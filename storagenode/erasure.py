"""Erasure coding of blocks: k data shards and m parity shards (Reed-Solomon).

How this works
--------------
A block is first framed exactly as on a replicated volume
(``blockformat.encode``: zstd when it pays, BLAKE3 over everything).  That
framed object, L bytes, is cut into k data slices of S = ceil(L / k) bytes
(zeros pad the end), and zfec computes m parity slices of S bytes from them.
The code is systematic: slices 0..k-1 are the framed object itself, and any
k of the k + m slices give back all of them.

Slice i becomes shard i, a stored object of its own: the blockformat framing
again (BLAKE3-checksummed, never compressed: the data is compressed already)
around a payload that starts with a 32-byte shard header::

    offset size field
    0      4    magic b"OBSH"
    4      1    shard format version (1)
    5      1    k
    6      1    m
    7      1    index of this shard (0..k+m-1)
    8      8    L, the framed object's length, little endian
    16     16   the first 16 bytes of the framed object's BLAKE3 checksum

so a shard says by itself which block it belongs to and where it goes: a
shard found at the wrong position, or one of another block, is rejected
before anything is decoded.  Decoding verifies every shard, keeps the
largest group that agrees on (L, checksum), takes k of them (data shards
first: with all k data shards decoding is a concatenation), and checks the
rebuilt framed object's own checksum before decompressing it.

Stored size: k + m shards of S + 88 bytes for an L-byte framed object, so
(k + m) / k of it plus 88 bytes a shard.  Pure, CPU-bound functions: callers
run them in worker threads (zfec releases the GIL while it computes, as do
BLAKE3 and zstd).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import zfec

from . import blockformat

MAGIC = b"OBSH"
VERSION = 1
_HEAD = struct.Struct("<4sBBBBQ16s")
SHARD_HEADER_SIZE = _HEAD.size
MAX_K = 16
MAX_M = 8
_DIGEST = slice(24, 40)      # where the framed object keeps its checksum's first 16 bytes


class ErasureError(Exception):
    """The shards of a block cannot give it back."""


class CorruptShard(ErasureError):
    """One shard fails its checksum, is malformed, or belongs elsewhere."""


class NotEnoughShards(ErasureError):
    """Fewer than k good, agreeing shards: the block cannot be decoded."""


@dataclass(frozen=True)
class Shard:
    """One verified shard: where it belongs and its slice of the framed object."""
    index: int
    length: int            # L, the framed object's length
    digest: bytes          # its checksum's first 16 bytes
    data: memoryview       # S bytes


def check_code(k: int, m: int) -> None:
    """ValueError unless (k, m) is a code this module makes."""
    if not (1 <= k <= MAX_K and 1 <= m <= MAX_M):
        raise ValueError(f"erasure code {k}+{m} not in 1..{MAX_K} + 1..{MAX_M}")


@functools.lru_cache(maxsize=32)
def _encoder(k: int, m: int) -> zfec.Encoder:
    return zfec.Encoder(k, k + m)       # read-only once built: safe across threads


@functools.lru_cache(maxsize=32)
def _decoder(k: int, m: int) -> zfec.Decoder:
    return zfec.Decoder(k, k + m)


def slice_size(length: int, k: int) -> int:
    """S: the bytes of framed object in each shard."""
    return -(-length // k)


# ---------------------------------------------------------------- encoding

def encode_block(block: bytes | bytearray | memoryview, k: int, m: int) -> list[bytes]:
    """The k + m shard objects of ``block``, shard i at position i."""
    check_code(k, m)
    framed = blockformat.encode(block, pieced=False)     # read whole: one checksum
    shards = _shards_of(framed, k, m, range(k + m))
    return [shards[i] for i in range(k + m)]


def _data_slices(framed: bytes, k: int) -> tuple[memoryview, ...]:
    size = slice_size(len(framed), k)
    padded = memoryview(framed + bytes(k * size - len(framed)))
    return tuple(padded[i * size:(i + 1) * size] for i in range(k))


def _shards_of(framed: bytes, k: int, m: int, wanted: Iterable[int]) -> dict[int, bytes]:
    """Shards ``wanted`` of the framed object ``framed``."""
    indexes = sorted(set(wanted))
    if any(not 0 <= i < k + m for i in indexes):
        raise ValueError(f"shard index out of 0..{k + m - 1}: {indexes}")
    slices = _data_slices(framed, k)
    parity = tuple(i for i in indexes if i >= k)
    computed = _encoder(k, m).encode(slices, parity) if parity else []
    pieces: dict[int, bytes | memoryview] = {i: slices[i] for i in indexes if i < k}
    pieces.update(zip(parity, computed))
    digest = framed[_DIGEST]
    return {i: _frame(k, m, i, len(framed), digest, pieces[i]) for i in indexes}


def _frame(k: int, m: int, index: int, length: int, digest: bytes,
           data: bytes | memoryview) -> bytes:
    head = _HEAD.pack(MAGIC, VERSION, k, m, index, length, digest)
    return blockformat.encode(b"".join((head, data)), compress=False, pieced=False)


# ---------------------------------------------------------------- verifying

def verify_shard(obj: bytes | memoryview, k: int, m: int, index: int) -> Shard:
    """Shard ``index`` of a k+m block, checked; CorruptShard if it is not that."""
    try:
        header = blockformat.verify(obj)
    except blockformat.CorruptedObject as exc:
        raise CorruptShard(f"shard {index}: {exc}") from None
    payload = memoryview(obj)[blockformat.HEADER_SIZE:]
    if header.codec != blockformat.CODEC_RAW or len(payload) < SHARD_HEADER_SIZE:
        raise CorruptShard(f"shard {index}: not a shard object")
    magic, version, sk, sm, si, length, digest = _HEAD.unpack_from(payload)
    if magic != MAGIC or version != VERSION:
        raise CorruptShard(f"shard {index}: bad shard magic or version")
    if (sk, sm, si) != (k, m, index):
        raise CorruptShard(f"shard {index}: holds shard {si} of a {sk}+{sm} code")
    data = payload[SHARD_HEADER_SIZE:]
    if len(data) != slice_size(length, k) or length < blockformat.HEADER_SIZE:
        raise CorruptShard(f"shard {index}: {len(data)} bytes for a {length}-byte object")
    return Shard(index, length, bytes(digest), data)


def _verified(shards: Mapping[int, bytes | memoryview], k: int, m: int
              ) -> tuple[list[Shard], list[str]]:
    """The shards that verify, and what was wrong with the others."""
    good: list[Shard] = []
    problems: list[str] = []
    for index, obj in shards.items():
        try:
            good.append(verify_shard(obj, k, m, index))
        except CorruptShard as exc:
            problems.append(str(exc))
    return good, problems


def _agreeing(shards: Iterable[Shard], k: int, problems: Sequence[str] = ()) -> list[Shard]:
    """k shards of the largest group that agrees on the object, data shards first."""
    groups: dict[tuple[int, bytes], dict[int, Shard]] = {}
    for shard in shards:
        groups.setdefault((shard.length, shard.digest), {})[shard.index] = shard
    best = max(groups.values(), key=len, default={})
    if len(best) < k:
        raise NotEnoughShards(f"{len(best)} good shards of {k} needed"
                              + (f" ({'; '.join(problems)})" if problems else ""))
    return [best[i] for i in sorted(best)[:k]]


# ---------------------------------------------------------------- decoding

def _framed_object(chosen: Sequence[Shard], k: int, m: int) -> bytes:
    """The framed object from k agreeing shards (sorted by index); its own
    checksum is checked by whoever uses it (``_unframe``, ``rebuild_shards``)."""
    slices: Sequence[bytes | memoryview] = [s.data for s in chosen]
    if chosen[-1].index >= k:          # a data shard is missing: solve for it
        slices = _decoder(k, m).decode(tuple(slices), tuple(s.index for s in chosen))
    framed = b"".join(slices)[:chosen[0].length]
    if framed[_DIGEST] != chosen[0].digest:
        raise ErasureError("rebuilt object does not match its shards' checksum")
    return framed


def _from_any(shards: Mapping[int, bytes | memoryview], k: int, m: int) -> bytes:
    check_code(k, m)
    good, problems = _verified(shards, k, m)
    return _framed_object(_agreeing(good, k, problems), k, m)


def decode_shards(shards: Iterable[Shard], k: int, m: int) -> bytes:
    """The block from shards already checked by ``verify_shard`` (any k of
    them that agree suffice).  NotEnoughShards / ErasureError."""
    check_code(k, m)
    return _unframe(_framed_object(_agreeing(shards, k), k, m))


def decode_block(shards: Mapping[int, bytes | memoryview], k: int, m: int) -> bytes:
    """The block whose shards (index -> shard object) are given; any k good
    shards suffice, bad ones are skipped.  NotEnoughShards / ErasureError."""
    return _unframe(_from_any(shards, k, m))


def _unframe(framed: bytes) -> bytes:
    """The block in a rebuilt framed object, verified."""
    try:
        return blockformat.decode(framed)
    except blockformat.CorruptedObject as exc:
        raise ErasureError(f"rebuilt object does not decode: {exc}") from None


def rebuild_shards(shards: Mapping[int, bytes | memoryview], k: int, m: int,
                   wanted: Iterable[int]) -> dict[int, bytes]:
    """Shards ``wanted`` (index -> shard object), byte for byte as
    ``encode_block`` made them, from any k good shards of the block."""
    framed = _from_any(shards, k, m)
    try:
        blockformat.verify(framed)
    except blockformat.CorruptedObject as exc:
        raise ErasureError(f"rebuilt object fails verification: {exc}") from None
    return _shards_of(framed, k, m, wanted)
