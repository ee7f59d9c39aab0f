"""The stored object format: one block of file data, framed and checksummed.

How this works
--------------
A stored object (format 2, what is written now) is a fixed 64-byte header,
a table with one entry per *piece* (``PIECE_SIZE``, 64 KiB, of block data),
then the pieces' stored bytes one after the other::

    offset size field
    0      4    magic b"OBJF"
    4      1    format version (2)
    5      1    checksum algorithms: 2 = the header's BLAKE3, the pieces'
                XXH3-128 (what is written now); 1 = BLAKE3 for both
    6      1    flags (0; reserved)
    7      1    piece size as a power of two (16: 64 KiB)
    8      8    raw length (bytes of block data after decoding), little endian
    16     8    payload length (bytes of pieces after the table), little endian
    24     4    pieces: ceil(raw length / piece size)
    28     4    reserved (0)
    32     32   BLAKE3 of bytes 0..32 followed by the table
    64     21n  the table: per piece, its stored length (4 bytes), its codec
                (1 byte: 0 = raw, 1 = zstd) and the digest of its stored
                bytes (16 bytes): XXH3-128, or the first 16 bytes of BLAKE3

The header checksum covers the fixed fields and the table, and the table
covers every piece, so a flipped bit anywhere is detected, and the header
checksum is a fingerprint of the whole object (``head`` reports it).  A
reader of a few KiB in the middle of a block needs only the header, the
table and the pieces it touches (``decode_range``; a data node serves them
with ``piece_span``): a random 4 KiB read costs one 64 KiB piece, not the
whole block.  MooseFS keeps a CRC per 64 KiB for the same reason.

The pieces' digests guard against damage (a flipped bit on a disk or on the
way), not against forgery: object ids are random, not content addresses, so
nobody gains by making two pieces with one digest.  So they are XXH3-128
(``xxhash``, 128 bits: an undetected random error is as unlikely as with
BLAKE3's 16 bytes), which checks a 4 MiB block in 0.09 ms where BLAKE3 took
0.74 ms; the mount checks every block it reads in its event loop's thread,
where BLAKE3 was a fifth of a cold sequential read's samples.  The header's
own checksum, over a few hundred bytes, stays BLAKE3.

Each piece is compressed with zstd on its own, and kept compressed only if
that saves ``MIN_SAVING`` of it (random data, already-compressed media stay
raw).  A large block is first probed: ``PROBES`` samples spread over it are
compressed, and if none of them shrinks the block is stored raw without
compressing it whole (zstd's pass over 4 MiB of incompressible data was a
fifth of a mount's CPU writing such files).

Format 1, still read (and still written for erasure-coded shards, which are
read whole): a 56-byte header (magic, version 1, codec of the whole payload,
checksum algorithm, flags, raw length, payload length, BLAKE3 of header
bytes 0..24 and the payload), then the payload, compressed whole or raw.

Encoding and decoding are pure functions; callers run large ones in worker
threads (zstd and BLAKE3 release the GIL).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass

import blake3
import xxhash
import zstandard

MAGIC = b"OBJF"
VERSION = 1                # whole payload, one checksum (erasure-coded shards)
VERSION_PIECES = 2         # checksummed pieces (everything else)
CODEC_RAW = 0
CODEC_ZSTD = 1
HASH_BLAKE3 = 1            # format 1: the checksum; format 2: the header's and the pieces'
HASH_XXH3 = 2              # format 2: the header's checksum BLAKE3, the pieces' XXH3-128
_HEAD = struct.Struct("<4sBBBBQQ")          # format 1's fields before its checksum
HEADER_SIZE = _HEAD.size + 32               # format 1's header
_HEAD2 = struct.Struct("<4sBBBBQQII")       # format 2's fields before its checksum
HEADER2_SIZE = _HEAD2.size + 32             # format 2's fixed header (the table follows)
HEAD_BYTES = max(HEADER_SIZE, HEADER2_SIZE)  # enough to parse any header
_ENTRY = struct.Struct("<IB16s")            # a piece: stored length, codec, digest
ENTRY_SIZE = _ENTRY.size
PIECE_SHIFT = 16
PIECE_SIZE = 1 << PIECE_SHIFT
_SHIFTS = range(12, 27)                     # piece sizes a reader accepts: 4 KiB .. 64 MiB
MIN_SAVING = 0.03          # store raw unless zstd saves at least 3 %
ZSTD_LEVEL = 1
MAX_RAW_LENGTH = 64 * 1024 * 1024
PROBE_FROM = 256 * 1024    # blocks at least this long are probed before compressing
PROBES = 8                 # samples tried, spread evenly over the block ...
PROBE_BYTES = 8 * 1024     # ... of this many bytes each

Buf = bytes | bytearray | memoryview


class CorruptedObject(Exception):
    """The bytes are not a valid object: bad framing or checksum mismatch."""


@dataclass(frozen=True)
class Header:
    codec: int                 # format 2: zstd if any piece is compressed
    raw_length: int
    payload_length: int
    checksum: bytes
    version: int = VERSION
    payload_offset: int = HEADER_SIZE    # where the payload starts (after any table)
    piece_shift: int = 0                 # format 2 only
    pieces: int = 0                      # format 2 only
    algo: int = HASH_BLAKE3              # format 2: which digest the pieces have

    @property
    def stored_length(self) -> int:
        return self.payload_offset + self.payload_length


@dataclass(frozen=True)
class Piece:
    stored_length: int
    codec: int
    digest: bytes


def _checksum(head: Buf, payload: Buf) -> bytes:
    h = blake3.blake3(head)
    h.update(payload)
    return h.digest()


def _blake3_16(piece: Buf) -> bytes:
    return blake3.blake3(piece).digest(length=16)


_PIECE_DIGESTS: dict[int, Callable[[Buf], bytes]] = {
    HASH_BLAKE3: _blake3_16, HASH_XXH3: xxhash.xxh3_128_digest}
WRITTEN_ALGO = HASH_XXH3    # the pieces' digest of what is written now


def encode(data: Buf, *, level: int = ZSTD_LEVEL, compress: bool = True,
           pieced: bool = True) -> bytes:
    """Frame one block: compress when it pays (and ``compress``), checksum,
    prepend the header (format 2, or format 1 when not ``pieced``)."""
    return b"".join(encode_parts(data, level=level, compress=compress, pieced=pieced))


def encode_parts(data: Buf, *, level: int = ZSTD_LEVEL, compress: bool = True,
                 pieced: bool = True) -> tuple[bytes, bytes | memoryview]:
    """``encode``'s object as its header (with the table) and its payload,
    not joined: a raw payload is a view of ``data`` itself (sent as it is,
    not copied)."""
    raw = memoryview(data)
    if len(raw) > MAX_RAW_LENGTH:
        raise ValueError("block larger than the format allows")
    compressor = zstandard.ZstdCompressor(level=level)
    compress = compress and _may_shrink(compressor, raw)
    if pieced:
        return _encode_pieces(raw, compressor if compress else None)
    packed = compressor.compress(raw) if compress else b""
    if compress and len(packed) <= len(raw) * (1 - MIN_SAVING):
        codec, payload = CODEC_ZSTD, memoryview(packed)
    else:
        codec, payload = CODEC_RAW, raw
    head = _HEAD.pack(MAGIC, VERSION, codec, HASH_BLAKE3, 0, len(raw), len(payload))
    return head + _checksum(head, payload), payload


def _encode_pieces(raw: memoryview, compressor: zstandard.ZstdCompressor | None
                   ) -> tuple[bytes, bytes | memoryview]:
    digest = _PIECE_DIGESTS[WRITTEN_ALGO]
    stored: list[Buf] = []
    table = []
    for start in range(0, len(raw), PIECE_SIZE):
        piece = raw[start:start + PIECE_SIZE]
        out: Buf = piece
        codec = CODEC_RAW
        if compressor is not None:
            packed = compressor.compress(piece)
            if len(packed) <= len(piece) * (1 - MIN_SAVING):
                codec, out = CODEC_ZSTD, packed
        stored.append(out)
        table.append(_ENTRY.pack(len(out), codec, digest(out)))
    compressed = any(len(s) != PIECE_SIZE for s in stored[:-1]) or \
        (bool(stored) and len(stored[-1]) != len(raw) - (len(stored) - 1) * PIECE_SIZE)
    payload: bytes | memoryview = b"".join(stored) if compressed else raw
    fixed = _HEAD2.pack(MAGIC, VERSION_PIECES, WRITTEN_ALGO, 0, PIECE_SHIFT, len(raw),
                        len(payload), len(stored), 0)
    listed = b"".join(table)
    return b"".join((fixed, _checksum(fixed, listed), listed)), payload


def incompressible(data: Buf) -> bool:
    """Would ``encode`` store ``data`` raw, none of its probes shrinking?
    Then encoding it is only hashing it (see ``decoding_is_checking``)."""
    raw = memoryview(data)
    return len(raw) >= PROBE_FROM and not _may_shrink(zstandard.ZstdCompressor(level=ZSTD_LEVEL),
                                                       raw)


def decoding_is_checking(obj: Buf) -> bool:
    """Is nothing in the stored object ``obj`` compressed, so that decoding
    it is only checking it?  A caller with an event loop does that in the
    loop's own thread: BLAKE3 lets go of the GIL for each 64 KiB piece and
    takes it back, and in a worker thread each taking back waited for the
    loop's thread, so checking a 4 MiB block there took 3-5 ms instead of
    0.7 (a cold read of four files: 740-790 -> 907-991 MiB/s)."""
    return parse_header(obj).codec == CODEC_RAW


def _may_shrink(compressor: zstandard.ZstdCompressor, raw: memoryview) -> bool:
    """Is ``raw`` worth compressing whole: short, or one of ``PROBES``
    samples spread over it shrinks by ``MIN_SAVING``?"""
    if len(raw) < PROBE_FROM:
        return True
    step = len(raw) // PROBES
    for start in range(0, step * PROBES, step):
        sample = raw[start:start + PROBE_BYTES]
        if len(compressor.compress(sample)) <= len(sample) * (1 - MIN_SAVING):
            return True
    return False


def parse_header(obj: Buf) -> Header:
    """The header of ``obj`` (its first ``HEAD_BYTES`` are enough);
    CorruptedObject when it is not well formed."""
    if len(obj) < _HEAD.size:
        raise CorruptedObject("object shorter than its header")
    magic, version = bytes(obj[:4]), obj[4]
    if magic != MAGIC or version not in (VERSION, VERSION_PIECES):
        raise CorruptedObject("bad magic or unknown format version")
    if version == VERSION_PIECES:
        return _parse_header2(obj)
    if len(obj) < HEADER_SIZE:
        raise CorruptedObject("object shorter than its header")
    magic, version, codec, algo, flags, raw_len, payload_len = _HEAD.unpack_from(obj)
    if codec not in (CODEC_RAW, CODEC_ZSTD) or algo != HASH_BLAKE3 or flags != 0:
        raise CorruptedObject("unknown codec, checksum algorithm or flags")
    if raw_len > MAX_RAW_LENGTH or (codec == CODEC_RAW and raw_len != payload_len):
        raise CorruptedObject("impossible lengths in header")
    checksum = bytes(obj[_HEAD.size:HEADER_SIZE])
    return Header(codec, raw_len, payload_len, checksum)


def _parse_header2(obj: Buf) -> Header:
    if len(obj) < HEADER2_SIZE:
        raise CorruptedObject("object shorter than its header")
    _, _, algo, flags, shift, raw_len, payload_len, pieces, reserved = _HEAD2.unpack_from(obj)
    if algo not in _PIECE_DIGESTS or flags != 0 or reserved != 0 or shift not in _SHIFTS:
        raise CorruptedObject("unknown checksum algorithm, flags or piece size")
    if raw_len > MAX_RAW_LENGTH or payload_len > raw_len \
            or pieces != -(-raw_len >> shift):
        raise CorruptedObject("impossible lengths in header")
    checksum = bytes(obj[_HEAD2.size:HEADER2_SIZE])
    return Header(CODEC_RAW if payload_len == raw_len else CODEC_ZSTD, raw_len, payload_len,
                  checksum, VERSION_PIECES, HEADER2_SIZE + pieces * ENTRY_SIZE, shift, pieces,
                  algo)


def read_table(header: Header, obj: Buf) -> list[Piece]:
    """The piece table of a format 2 object whose first bytes (at least up
    to the payload) are ``obj``, checked against the header's checksum."""
    view = memoryview(obj)
    if len(view) < header.payload_offset:
        raise CorruptedObject("object shorter than its piece table")
    listed = view[HEADER2_SIZE:header.payload_offset]
    if _checksum(view[:_HEAD2.size], listed) != header.checksum:
        raise CorruptedObject("checksum mismatch in header or piece table")
    table = [Piece(*_ENTRY.unpack_from(listed, i * ENTRY_SIZE)) for i in range(header.pieces)]
    size = 1 << header.piece_shift
    for i, piece in enumerate(table):
        raw = min(size, header.raw_length - i * size)
        if piece.codec == CODEC_RAW and piece.stored_length != raw or \
                piece.codec == CODEC_ZSTD and not 0 < piece.stored_length <= raw or \
                piece.codec not in (CODEC_RAW, CODEC_ZSTD):
            raise CorruptedObject(f"impossible entry for piece {i}")
    if sum(p.stored_length for p in table) != header.payload_length:
        raise CorruptedObject("piece lengths do not add up to the payload")
    return table


def piece_span(header: Header, table: list[Piece], first: int, last: int) -> tuple[int, int]:
    """Where pieces ``first`` .. ``last`` lie in the stored object: [start, end)."""
    start = header.payload_offset + sum(p.stored_length for p in table[:first])
    return start, start + sum(p.stored_length for p in table[first:last + 1])


def verify(obj: Buf) -> Header:
    """Check framing and checksums of a whole object; return its header."""
    header = parse_header(obj)
    view = memoryview(obj)
    if len(view) != header.stored_length:
        raise CorruptedObject(
            f"object is {len(view)} bytes, header says {header.stored_length}")
    if header.version == VERSION_PIECES:
        _check_pieces(header, read_table(header, view), view[header.payload_offset:])
    elif _checksum(view[:_HEAD.size], view[HEADER_SIZE:]) != header.checksum:
        raise CorruptedObject("checksum mismatch")
    return header


def _check_pieces(header: Header, table: list[Piece], stored: memoryview) -> list[memoryview]:
    """The stored bytes of each piece of ``table`` (pieces of the object
    ``header`` heads), laid out in ``stored``, checked."""
    digest = _PIECE_DIGESTS[header.algo]
    views = []
    pos = 0
    for i, piece in enumerate(table):
        view = stored[pos:pos + piece.stored_length]
        if len(view) != piece.stored_length or digest(view) != piece.digest:
            raise CorruptedObject(f"checksum mismatch in piece {i}")
        views.append(view)
        pos += piece.stored_length
    return views


def decode(obj: Buf) -> bytes:
    """The block data of a stored object, verified; CorruptedObject if not."""
    return bytes(decode_view(obj))


def decode_view(obj: Buf | mmap.mmap) -> bytes | memoryview:
    """``decode``'s block, but a raw one is a view of ``obj`` itself, not a
    copy (the mount caches what it fetched that way)."""
    header = verify(memoryview(obj))
    payload = memoryview(obj)[header.payload_offset:]
    if header.codec == CODEC_RAW:
        return payload
    if header.version == VERSION_PIECES:
        table = read_table(header, memoryview(obj))
        return _decoded_pieces(header, table, _check_pieces(header, table, payload), 0)
    return _unpacked(payload, header.raw_length)


def _unpacked(payload: Buf, raw_length: int) -> bytes:
    try:
        data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw_length)
    except zstandard.ZstdError as exc:
        raise CorruptedObject(f"zstd: {exc}") from exc
    if len(data) != raw_length:
        raise CorruptedObject("decoded length differs from header")
    return data


def _decoded_pieces(header: Header, table: list[Piece], stored: list[memoryview],
                    first: int) -> bytes | memoryview:
    """The raw bytes of pieces ``first`` .. (checked stored bytes given)."""
    size = 1 << header.piece_shift
    raws = []
    for i, view in enumerate(stored, first):
        raw = min(size, header.raw_length - i * size)
        raws.append(_unpacked(view, raw) if table[i].codec == CODEC_ZSTD else view)
    return b"".join(raws)


def decode_range(body: Buf | mmap.mmap, first: int, last: int) -> tuple[int, bytes | memoryview]:
    """What a data node sent for pieces ``first`` .. ``last`` of an object:
    its header and table, then those pieces' stored bytes (``piece_span``);
    or, from a node or object that has no pieces, the whole object.
    Checked; returns where the decoded bytes start in the block, and them."""
    view = memoryview(body)
    header = parse_header(view)
    if header.version != VERSION_PIECES or len(view) == header.stored_length:
        return 0, decode_view(view)
    table = read_table(header, view)
    if not 0 <= first <= last < len(table):
        raise CorruptedObject(f"pieces {first}..{last} asked of an object of {len(table)}")
    start, end = piece_span(header, table, first, last)
    if len(view) != header.payload_offset + end - start:
        raise CorruptedObject(f"{len(view)} bytes sent for pieces {first}..{last}")
    payload = view[header.payload_offset:]
    stored = _check_pieces(header, table[first:last + 1], payload)
    if all(p.codec == CODEC_RAW for p in table[first:last + 1]):
        return first << header.piece_shift, payload      # one view, as sent
    return first << header.piece_shift, _decoded_pieces(header, table, stored, first)
