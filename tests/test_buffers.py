"""Large buffers (storagenode.buffers): zeroed, writable, of the asked length."""

import mmap
import os

import pytest

from storagenode import blockformat, buffers


@pytest.mark.parametrize("length", [0, 1, buffers.MAPPED_FROM - 1, buffers.MAPPED_FROM,
                                    buffers.HUGE_PAGE, (4 << 20) + 56])
def test_a_buffer_is_zeroed_writable_and_exactly_as_long_as_asked(length: int) -> None:
    buf = buffers.zeroed(length)
    assert len(buf) == length
    assert bytes(buf) == bytes(length)
    if length:
        buf[length - 1] = 7
        assert bytes(buf[-2:]) == bytes(min(length, 2) - 1) + b"\x07"
    assert isinstance(buf, mmap.mmap) == (length >= buffers.MAPPED_FROM)   # O_DIRECT-able


def test_a_block_received_into_a_buffer_decodes_as_a_view_of_it() -> None:
    """The mount decodes a fetched raw block without copying it: the view
    it caches shows the buffer's bytes, and equals what ``decode`` gives."""
    data = bytes(range(256)) * 16384           # 4 MiB that zstd shrinks
    raw = os.urandom(4 << 20)                 # 4 MiB it does not
    for block in (data, raw):
        obj = blockformat.encode(block)
        buf = buffers.zeroed(len(obj))
        buf[:] = obj
        assert bytes(blockformat.decode_view(buf)) == block == blockformat.decode(obj)


def test_a_recycled_buffer_is_handed_out_again_only_when_nothing_refers_to_it() -> None:
    """A block fetched into a recycled buffer and cached as a view of it
    must never be overwritten by the next fetch: the buffer comes back only
    once the view and the buffer itself are dropped."""
    recycler = buffers.Recycler(kept_max=8, idle_max=2)
    length = (4 << 20) + 1400
    first = recycler.take(length)
    first[:] = b"a" * length
    cached = memoryview(first)[64:]             # what a cache would hold
    del first
    second = recycler.take(length)
    assert bytes(cached[:3]) == b"aaa"
    assert len(second) == length
    second[:] = b"b" * length
    assert bytes(cached[-3:]) == b"aaa"         # untouched by the second's use
    cached.release()
    del cached
    third = recycler.take(length)               # the first one, now free
    assert recycler.reused == 1
    assert bytes(third[:1]) == b"a"             # not zeroed: its user overwrites it
    assert len(recycler.take(buffers.MAPPED_FROM - 1)) == buffers.MAPPED_FROM - 1
    assert isinstance(recycler.take(buffers.MAPPED_FROM - 1), bytearray)   # small: plain
    del second, third


def test_a_recycler_lets_go_of_unused_buffers_beyond_its_idle_limit() -> None:
    recycler = buffers.Recycler(kept_max=8, idle_max=2)
    held = [recycler.take(buffers.MAPPED_FROM + i) for i in range(6)]
    assert len(recycler.kept) == 6
    del held
    recycler.take(buffers.MAPPED_FROM + 100)    # a length none has: a new one
    assert len(recycler.kept) == 3              # 2 idle kept, and the new one
    many = [recycler.take(buffers.MAPPED_FROM) for _ in range(12)]
    assert len(recycler.kept) == 8              # beyond kept_max: made, not kept
    assert len({id(b) for b in many}) == 12


def test_trimming_lets_go_of_unused_buffers_without_waiting_for_a_take() -> None:
    recycler = buffers.Recycler(kept_max=8, idle_max=1)
    held = [recycler.take(buffers.MAPPED_FROM) for _ in range(5)]
    del held[1:]                                # four dropped, one still in use
    recycler.trim()
    assert len(recycler.kept) == 2              # the one in use and one unused
    assert held[0] in recycler.kept


def test_a_block_being_written_shows_zeros_in_its_gaps_whatever_its_buffer_held() -> None:
    """A mount's dirty block moves into a recycled buffer once it grows
    large; that buffer may hold an earlier block's bytes, none of which may
    show through a gap the writes left."""
    from fusefront.filedata import DirtyBlock
    size = 4 << 20
    for _ in range(3):                         # recycled buffers full of old bytes
        old = buffers.scratch(size)
        old[:] = b"\xee" * size
        del old
    block = DirtyBlock(size, b"base" * 10)
    block.write(100, b"a" * 1000)              # a gap 40..100, small buffer
    block.write(3 << 20, b"b" * 5000)          # a gap of 3 MiB, now a recycled buffer
    assert not isinstance(block.buf, bytearray)
    expected = bytearray(b"base" * 10) + bytes(60) + b"a" * 1000
    expected += bytes((3 << 20) - len(expected)) + b"b" * 5000
    assert len(block) == len(expected)
    assert bytes(block.view()) == bytes(expected)
    twin = block.copy()
    twin.write(size - 1, b"z")
    expected_twin = expected + bytes(size - 1 - len(expected)) + b"z"
    assert bytes(twin.view()) == bytes(expected_twin) and len(twin) == size
    assert bytes(block.view()) == bytes(expected)            # the copy is its own
    assert isinstance(twin.cached(), memoryview)             # full: the buffer itself
    assert bytes(block.cached()) == bytes(expected) and isinstance(block.cached(), bytes)
