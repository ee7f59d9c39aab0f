"""The stored object format: round trips, compression choice, corruption."""

import os
import struct

import pytest
from hypothesis import given, strategies as st

from storagenode import blockformat as bf


@given(st.binary(max_size=20000))
def test_round_trip(data: bytes) -> None:
    assert bf.decode(bf.encode(data)) == data


def test_compressible_block_is_stored_compressed() -> None:
    data = b"hello objfs " * 100000
    obj = bf.encode(data)
    assert bf.verify(obj).codec == bf.CODEC_ZSTD
    assert len(obj) < len(data) // 20


def test_zero_block_is_tiny() -> None:
    obj = bf.encode(bytes(4 << 20))
    assert len(obj) < 4096      # 64 pieces, each a few bytes of zstd and its table entry


@pytest.mark.parametrize("where", [0, 1, 4, 7])
def test_a_compressible_stretch_anywhere_in_a_block_is_compressed(where: int) -> None:
    """Large blocks are probed before zstd runs over them whole: text
    filling one eighth of an otherwise random block, wherever it sits, is
    still found and the block stored compressed."""
    part = (4 << 20) // 8
    pieces = [os.urandom(part) for _ in range(8)]
    pieces[where] = (b"stretch of text %d " * 100_000)[:part]
    data = b"".join(pieces)
    obj = bf.encode(data)
    assert bf.verify(obj).codec == bf.CODEC_ZSTD
    assert len(obj) < len(data) * 0.9
    assert bf.decode(obj) == data


def test_random_block_is_stored_raw() -> None:
    data = os.urandom(1 << 20)
    obj = bf.encode(data)
    header = bf.verify(obj)
    assert header.codec == bf.CODEC_RAW
    assert bf.decode(obj) == data
    assert len(obj) == header.payload_offset + len(data)


@pytest.mark.parametrize("data", [os.urandom(5000), b"abc" * 5000])
def test_every_flipped_byte_is_detected(data: bytes) -> None:
    obj = bf.encode(data)
    for pos in range(0, len(obj), max(1, len(obj) // 200)):
        bad = bytearray(obj)
        bad[pos] ^= 0x40
        with pytest.raises(bf.CorruptedObject):
            bf.decode(bytes(bad))


def test_truncated_and_extended_objects_are_detected() -> None:
    obj = bf.encode(os.urandom(3000))
    for bad in (obj[:-1], obj[:10], obj + b"x", b""):
        with pytest.raises(bf.CorruptedObject):
            bf.decode(bad)


def _pieces_body(obj: bytes, first: int, last: int) -> bytes:
    """What a data node sends for pieces first .. last (``piece_span``)."""
    header = bf.parse_header(obj)
    table = bf.read_table(header, obj)
    start, end = bf.piece_span(header, table, first, last)
    return obj[:header.payload_offset] + obj[start:end]


@pytest.mark.parametrize("kind", ["random", "text", "mixed"])
def test_any_run_of_pieces_decodes_alone(kind: str) -> None:
    """A reader of a few KiB in a block gets only the pieces it needs, and
    they decode to exactly those bytes of the block, compressed or not."""
    size = 5 * bf.PIECE_SIZE + 1234
    text = (b"piece of text %d " * 40_000)[:size]
    data = {"random": os.urandom(size), "text": text,
            "mixed": os.urandom(2 * bf.PIECE_SIZE) + text[2 * bf.PIECE_SIZE:]}[kind]
    obj = bf.encode(data)
    assert bf.verify(obj).pieces == 6
    for first, last in [(0, 0), (1, 3), (5, 5), (2, 5), (0, 5)]:
        start, got = bf.decode_range(_pieces_body(obj, first, last), first, last)
        assert start == first * bf.PIECE_SIZE
        assert bytes(got) == data[start:(last + 1) * bf.PIECE_SIZE]


def test_a_damaged_piece_or_a_short_answer_is_detected() -> None:
    obj = bf.encode(os.urandom(3 * bf.PIECE_SIZE))
    body = _pieces_body(obj, 1, 1)
    header = bf.parse_header(obj)
    for pos in (5, header.payload_offset - 3, header.payload_offset + 7, len(body) - 1):
        bad = bytearray(body)
        bad[pos] ^= 0x10
        with pytest.raises(bf.CorruptedObject):
            bf.decode_range(bytes(bad), 1, 1)
    for bad_body in (body[:-1], body + b"x", _pieces_body(obj, 1, 2)):
        with pytest.raises(bf.CorruptedObject):
            bf.decode_range(bad_body, 1, 1)


def test_an_object_without_pieces_comes_whole() -> None:
    """Format 1 objects (written before pieces, and erasure-coded shards)
    are read whole; so is a whole object sent by a node that ignores the
    request for pieces."""
    data = os.urandom(3 * bf.PIECE_SIZE)
    old = bf.encode(data, pieced=False)
    assert bf.verify(old).version == bf.VERSION
    assert bf.decode_range(old, 1, 1) == (0, data)
    new = bf.encode(data)
    start, got = bf.decode_range(new, 2, 2)
    assert (start, bytes(got)) == (0, data)


def test_what_decoding_only_checks_and_what_encoding_only_hashes() -> None:
    """Random data is stored raw, so decoding it is only checking it and
    encoding it only hashing it; data zstd shrinks is neither."""
    raw = os.urandom(4 << 20)
    packed = bytes(range(256)) * 16384
    assert bf.incompressible(raw) and not bf.incompressible(packed)
    assert not bf.incompressible(raw[:1000])        # too short to probe: tried
    assert bf.decoding_is_checking(bf.encode(raw))
    assert not bf.decoding_is_checking(bf.encode(packed))
    assert bf.decoding_is_checking(bf.encode(packed, compress=False))
    with pytest.raises(bf.CorruptedObject):
        bf.decoding_is_checking(b"not an object")


def _blake3_pieced(obj: bytes) -> bytes:
    """``obj`` as written before 2026-12-07: the same layout, its pieces'
    digests the first 16 bytes of their BLAKE3 (checksum algorithm 1)."""
    import blake3
    header = bf.parse_header(obj)
    table = bf.read_table(header, obj)
    entries, pos = [], header.payload_offset
    for piece in table:
        stored = obj[pos:pos + piece.stored_length]
        entries.append(struct.pack("<IB16s", piece.stored_length, piece.codec,
                                   blake3.blake3(stored).digest(length=16)))
        pos += piece.stored_length
    fixed = bytearray(obj[:32])
    fixed[5] = 1
    listed = b"".join(entries)
    checksum = blake3.blake3(bytes(fixed) + listed).digest()
    return bytes(fixed) + checksum + listed + obj[header.payload_offset:]


@pytest.mark.parametrize("kind", ["random", "text"])
def test_objects_with_blake3_pieces_are_still_read_and_checked(kind: str) -> None:
    size = 3 * bf.PIECE_SIZE + 77
    data = os.urandom(size) if kind == "random" else (b"old text %d " * 30_000)[:size]
    new = bf.encode(data)
    assert bf.verify(new).algo == bf.HASH_XXH3
    old = _blake3_pieced(new)
    assert bf.verify(old).algo == bf.HASH_BLAKE3
    assert bytes(bf.decode_view(old)) == data
    start, got = bf.decode_range(_pieces_body(old, 1, 2), 1, 2)
    assert bytes(got) == data[start:3 * bf.PIECE_SIZE]
    header = bf.parse_header(old)
    for pos in (header.payload_offset + 3, len(old) - 1):
        bad = bytearray(old)
        bad[pos] ^= 0x01
        with pytest.raises(bf.CorruptedObject):
            bf.decode(bytes(bad))
