"""Clean block data kept in memory, shared by every file of the mount.

How this works
--------------
Objects are immutable, so clean data is cached by object id and never goes
stale: a file whose block changes points at a new object id.  The cache is an
LRU bounded in bytes.  Concurrent requests for one object share a single
fetch (``inflight``), which is also how read-ahead and a reader meet.  A
block just uploaded is cached as the very buffer it was written into (a
``bytearray`` nobody changes from then on), and a block fetched as a view of
the buffer it was received into: not copies.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Awaitable, Callable

import trio

from storagenode import buffers
from storagenode.ids import ObjectId

Block = bytes | bytearray | memoryview      # never changed once cached


class BlockCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self._lru: OrderedDict[ObjectId, Block] = OrderedDict()
        self._inflight: dict[ObjectId, trio.Event] = {}
        self.hits = 0
        self.misses = 0

    def put(self, oid: ObjectId, data: Block) -> None:
        if oid in self._lru or len(data) > self.capacity:
            return
        self._lru[oid] = data
        self.size += len(data)
        if self.size > self.capacity:
            while self.size > self.capacity:
                _, old = self._lru.popitem(last=False)
                self.size -= len(old)
            del old
            buffers.trim()      # a fetched block's buffer, unused now, is let go

    def peek(self, oid: ObjectId) -> Block | None:
        data = self._lru.get(oid)
        if data is not None:
            self._lru.move_to_end(oid)
        return data

    def fetching(self, oid: ObjectId) -> bool:
        return oid in self._inflight

    async def get(self, oid: ObjectId, fetch: Callable[[], Awaitable[Block]]) -> Block:
        """The data of ``oid``, from memory or by one shared call of ``fetch``."""
        while True:
            data = self.peek(oid)
            if data is not None:
                self.hits += 1
                return data
            event = self._inflight.get(oid)
            if event is None:
                break
            await event.wait()   # then look again: cached, or failed and ours to fetch
        self.misses += 1
        event = self._inflight[oid] = trio.Event()
        try:
            data = await fetch()
            self.put(oid, data)
            return data
        finally:
            del self._inflight[oid]
            event.set()
