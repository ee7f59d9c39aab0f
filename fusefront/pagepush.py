"""Pieces fetched for a random read, handed to the kernel's page cache.

How this works
--------------
A random 4 KiB read that misses fetches the 64 KiB piece around it
(``blockformat``).  The kernel asked for one page; ``push`` gives it all
sixteen (FUSE ``notify_store``), so the next reads in that piece are
answered by the kernel without a request to the mount: the kernel's page
cache is far larger than the mount's block cache, and a kernel hit costs
no Python.  Only pieces of files this mount holds a lease on, with no
writable handle open here and nothing buffered, are pushed (the caller
checks); only the bytes of the file up to its size (the kernel marks a
partial page up to date only at the end of the file).

``notify_store`` waits while a request of the same inode holds the page
locks (FACTS.md 6), so it runs in a worker thread, fire and forget, one at
a time (``limiter``).  The danger is a push that lands after the pages
were meant to change: after a lease recall invalidated them (another
client is about to write), or after a writer opened the file here.  Every
push and every such *fence* take one lock, and a fence bumps the inode's
generation: a push either lands before the fence (and the invalidation
after it drops its pages) or sees the new generation and does nothing.
``fenced`` wraps the recall's invalidation (in its thread);
``fence`` is for the event loop (an open), and costs nothing when no push
of that inode is on its way; ``stop`` refuses new pushes of it until
``resume`` (a writable handle is open here, a truncate is under way).
"""

from __future__ import annotations

import collections
import functools
import threading
from contextlib import contextmanager
from typing import Any, Awaitable, Callable, Iterator

import pyfuse3
import trio

Spawn = Callable[[Callable[[], Awaitable[Any]]], None]
Pages = bytes | bytearray | memoryview


class PagePush:
    def __init__(self, spawn: Spawn) -> None:
        self.spawn = spawn
        self.limiter = trio.CapacityLimiter(1)
        self._lock = threading.Lock()
        self._gen: dict[int, int] = {}       # inode -> fences while pushes were on their way
        self._pushing: collections.Counter[int] = collections.Counter()
        self._stopped: collections.Counter[int] = collections.Counter()
        self.pushed = 0                     # pushes that reached the kernel

    def push(self, ino: int, offset: int, data: Pages) -> None:
        """Give the kernel ``data``, the file's bytes at ``offset``, in the
        background (unless pushes of ``ino`` are stopped)."""
        if ino in self._stopped:
            return
        self._pushing[ino] += 1
        self.spawn(functools.partial(self._push, ino, self._gen.get(ino, 0), offset, data))

    async def _push(self, ino: int, gen: int, offset: int, data: Pages) -> None:
        try:
            await trio.to_thread.run_sync(self._store, ino, gen, offset, data,
                                          limiter=self.limiter)
        finally:
            self._pushing[ino] -= 1
            if not self._pushing[ino]:
                del self._pushing[ino]
                self._gen.pop(ino, None)    # no push of it left to stop

    def _store(self, ino: int, gen: int, offset: int, data: Pages) -> None:
        with self._lock:
            if self._gen.get(ino, 0) != gen:
                return                      # fenced since: the pages may be changing
            try:
                pyfuse3.notify_store(ino, offset, data)     # type: ignore[arg-type]  # any buffer
                self.pushed += 1
            except OSError:
                pass                        # the kernel forgot the inode: nothing to fill

    @contextmanager
    def fenced(self, ino: int) -> Iterator[None]:
        """Around an invalidation of ``ino``'s pages (in a worker thread): no
        push of it lands after."""
        with self._lock:
            self._gen[ino] = self._gen.get(ino, 0) + 1
            yield

    async def fence(self, ino: int) -> None:
        """From the event loop: once this returns, no push of ``ino`` begun
        before lands any more."""
        if ino in self._pushing:
            await trio.to_thread.run_sync(self._fence, ino)

    def _fence(self, ino: int) -> None:
        with self.fenced(ino):
            pass

    def stop(self, ino: int) -> None:
        """No new push of ``ino`` until ``resume`` (a writer opened it here,
        or it is being truncated: a piece read before would put old bytes
        back, and past a new end make the kernel's size grow); ``fence``
        then waits out those on their way."""
        self._stopped[ino] += 1

    def resume(self, ino: int) -> None:
        self._stopped[ino] -= 1
        if not self._stopped[ino]:
            del self._stopped[ino]
