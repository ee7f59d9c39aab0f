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
