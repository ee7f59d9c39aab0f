"""The stored object format: one block of file data, framed and checksummed.

How this works
--------------
A stored object is a fixed 56-byte header followed by the payload::

    offset size field
    0      4    magic b"OBJF"
    4      1    format version (1)
    5      1    codec: 0 = raw, 1 = zstd
    6      1    checksum algorithm: 1 = BLAKE3-256
    7      1    flags (0; reserved)
    8      8    raw length (bytes of block data after decoding), little endian
    16     8    payload length (bytes stored after the header), little endian
    24     32   BLAKE3 of header bytes 0..24 followed by the payload

The checksum covers the header fields too, so a flipped bit anywhere in the
object is detected.  Blocks are compressed with zstd unless compression
saves less than ``MIN_SAVING`` of the size, in which case they are stored
raw (random data, already-compressed media).  A large block is first probed:
``PROBES`` samples spread over it are compressed, and if none of them
shrinks the block is stored raw without compressing it whole (zstd's output
buffer and pass over 4 MiB of incompressible data were a fifth of a mount's
CPU writing such files).  Encoding and decoding are pure
functions; callers run them in worker threads (zstd and BLAKE3 release the
GIL).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

import blake3
import zstandard

MAGIC = b"OBJF"
VERSION = 1
CODEC_RAW = 0
CODEC_ZSTD = 1
HASH_BLAKE3 = 1
_HEAD = struct.Struct("<4sBBBBQQ")
HEADER_SIZE = _HEAD.size + 32
MIN_SAVING = 0.03          # store raw unless zstd saves at least 3 %
ZSTD_LEVEL = 1
MAX_RAW_LENGTH = 64 * 1024 * 1024
PROBE_FROM = 256 * 1024    # blocks at least this long are probed before compressing
PROBES = 8                 # samples tried, spread evenly over the block ...
PROBE_BYTES = 8 * 1024     # ... of this many bytes each


class CorruptedObject(Exception):
    """The bytes are not a valid object: bad framing or checksum mismatch."""


@dataclass(frozen=True)
class Header:
    codec: int
    raw_length: int
    payload_length: int
    checksum: bytes

    @property
    def stored_length(self) -> int:
        return HEADER_SIZE + self.payload_length


def _checksum(head: bytes | memoryview, payload: bytes | memoryview) -> bytes:
    h = blake3.blake3(head)
    h.update(payload)
    return h.digest()


def encode(data: bytes | bytearray | memoryview, *, level: int = ZSTD_LEVEL,
           compress: bool = True) -> bytes:
    """Frame one block: compress when it pays (and ``compress``), checksum,
    prepend the header."""
    return b"".join(encode_parts(data, level=level, compress=compress))


def encode_parts(data: bytes | bytearray | memoryview, *, level: int = ZSTD_LEVEL,
                 compress: bool = True) -> tuple[bytes, bytes | memoryview]:
    """``encode``'s object as its header and its payload, not joined: a raw
    payload is a view of ``data`` itself (sent as it is, not copied)."""
    raw = memoryview(data)
    if len(raw) > MAX_RAW_LENGTH:
        raise ValueError("block larger than the format allows")
    compressor = zstandard.ZstdCompressor(level=level)
    compress = compress and _may_shrink(compressor, raw)
    packed = compressor.compress(raw) if compress else b""
    if compress and len(packed) <= len(raw) * (1 - MIN_SAVING):
        codec, payload = CODEC_ZSTD, memoryview(packed)
    else:
        codec, payload = CODEC_RAW, raw
    head = _HEAD.pack(MAGIC, VERSION, codec, HASH_BLAKE3, 0, len(raw), len(payload))
    return head + _checksum(head, payload), payload


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


def parse_header(obj: bytes | bytearray | memoryview) -> Header:
    """The header of ``obj``; CorruptedObject when it is not well formed."""
    if len(obj) < HEADER_SIZE:
        raise CorruptedObject("object shorter than its header")
    magic, version, codec, algo, flags, raw_len, payload_len = _HEAD.unpack_from(obj)
    if magic != MAGIC or version != VERSION:
        raise CorruptedObject("bad magic or unknown format version")
    if codec not in (CODEC_RAW, CODEC_ZSTD) or algo != HASH_BLAKE3 or flags != 0:
        raise CorruptedObject("unknown codec, checksum algorithm or flags")
    if raw_len > MAX_RAW_LENGTH or (codec == CODEC_RAW and raw_len != payload_len):
        raise CorruptedObject("impossible lengths in header")
    checksum = bytes(obj[_HEAD.size:HEADER_SIZE])
    return Header(codec, raw_len, payload_len, checksum)


def verify(obj: bytes | bytearray | memoryview) -> Header:
    """Check framing and checksum of a whole object; return its header."""
    header = parse_header(obj)
    view = memoryview(obj)
    if len(view) != header.stored_length:
        raise CorruptedObject(
            f"object is {len(view)} bytes, header says {header.stored_length}")
    if _checksum(view[:_HEAD.size], view[HEADER_SIZE:]) != header.checksum:
        raise CorruptedObject("checksum mismatch")
    return header


def decode(obj: bytes | bytearray | memoryview) -> bytes:
    """The block data of a stored object, verified; CorruptedObject if not."""
    return bytes(decode_view(obj))


def decode_view(obj: bytes | bytearray | memoryview | mmap.mmap) -> bytes | memoryview:
    """``decode``'s block, but a raw one is a view of ``obj`` itself, not a
    copy (the mount caches what it fetched that way)."""
    header = verify(memoryview(obj))
    payload = memoryview(obj)[HEADER_SIZE:]
    if header.codec == CODEC_RAW:
        return payload
    try:
        data = zstandard.ZstdDecompressor().decompress(
            payload, max_output_size=header.raw_length)
    except zstandard.ZstdError as exc:
        raise CorruptedObject(f"zstd: {exc}") from exc
    if len(data) != header.raw_length:
        raise CorruptedObject("decoded length differs from header")
    return data
