"""The stored object format: round trips, compression choice, corruption."""

import os

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
    assert len(obj) < 1024


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
    assert len(obj) == bf.HEADER_SIZE + len(data)


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
