"""Large byte buffers that are cheap to fill.

A fresh 4 MiB ``bytearray`` is fresh memory from the kernel: the first
write to each 4 KiB page of it faults, and the kernel zeroes the page
(1.4 ms of CPU per 4 MiB on this machine's VM, more than receiving the
bytes into it).  A block read or written by a mount or a data node is such
a buffer, so ``zeroed`` asks for private anonymous memory in transparent
huge pages instead (``madvise``, which Debian's default THP mode honours):
two faults per 4 MiB, 0.2 ms.  Buffers from ``MAPPED_FROM`` bytes on are
mapped memory, page-aligned, so a data node can write them with O_DIRECT;
smaller ones are plain ``bytearray``s.

Even two faults per 4 MiB mean the kernel zeroes 4 MiB it will overwrite:
in a cold read of four 1 GiB files, zeroing and faulting in fresh buffers
was about a seventh of the mount's CPU and a fifth of each data node's.
``scratch`` hands out a buffer of the asked length whose bytes are
whatever they were, for a caller that overwrites it whole (a body received
into it, an object file read into it): one ``Recycler`` per process keeps
the large ones it made and gives one out again once nothing refers to it
any more (Python counts the references: a cached block that is a view of
the buffer, a reply still being sent, all hold it), so a stream of 4 MiB
blocks goes round the same few mappings.
"""

from __future__ import annotations

import mmap
import sys
import threading

HUGE_PAGE = 2 << 20
MAPPED_FROM = 256 * 1024

Buffer = bytearray | mmap.mmap            # what ``zeroed`` makes
Bytes = bytes | Buffer                     # bytes as received: a body, an object


def zeroed(length: int) -> Buffer:
    """A writable buffer of ``length`` zero bytes (see the module's text)."""
    if length < MAPPED_FROM:
        return bytearray(length)
    buffer = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # not shmem
    if length >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


KEPT_MAX = 64            # large buffers a process keeps track of (in use or not)
IDLE_MAX = 4             # ... of which at most this many are left unused


class Recycler:
    """Large buffers used again once unreferenced (see the module's text).
    It refers to every buffer it keeps, in use or not; one it made while
    ``kept_max`` were kept is not kept (it is freed as any other when
    dropped), and unused ones beyond ``idle_max`` are let go, so memory held
    beyond what is in use stays under ``idle_max`` buffers.  Thread-safe."""

    def __init__(self, kept_max: int = KEPT_MAX, idle_max: int = IDLE_MAX) -> None:
        self.kept: list[mmap.mmap] = []
        self.kept_max = kept_max
        self.idle_max = idle_max
        self.lock = threading.Lock()
        self.reused = 0

    def take(self, length: int) -> Buffer:
        """A writable buffer of ``length`` bytes, its content undefined."""
        if length < MAPPED_FROM:
            return bytearray(length)
        with self.lock:
            found = self._trim(length)
            if found is not None:
                self.reused += 1
                return found
            fresh = zeroed(length)
            if len(self.kept) < self.kept_max:
                assert isinstance(fresh, mmap.mmap)
                self.kept.append(fresh)
            return fresh

    def trim(self) -> None:
        """Let go of unused buffers beyond ``idle_max`` now (a cache that
        dropped some calls this: otherwise they wait for the next ``take``)."""
        with self.lock:
            self._trim(-1)

    def _trim(self, length: int) -> mmap.mmap | None:
        """With the lock held: an unused buffer of ``length`` bytes if there
        is one (then referred to by the caller too), after letting go of the
        other unused ones beyond ``idle_max``."""
        found = None
        idle = []
        for i in range(len(self.kept)):
            # referred to by the list and getrefcount's argument alone
            if sys.getrefcount(self.kept[i]) == 2:
                if found is None and len(self.kept[i]) == length:
                    found = self.kept[i]
                else:
                    idle.append(i)
        for i in reversed(idle[self.idle_max:]):
            del self.kept[i]
        return found


_RECYCLER = Recycler()


def scratch(length: int) -> Buffer:
    """A writable buffer of ``length`` bytes holding anything, for a caller
    that overwrites all of it before anyone reads it (see the module's
    text); large ones are recycled within the process."""
    return _RECYCLER.take(length)


def trim() -> None:
    """Let go of the process's unused recycled buffers beyond a few."""
    _RECYCLER.trim()
