"""The data of one regular file as this mount sees it: committed blocks plus
buffered writes.

How this works
--------------
A file is a sequence of blocks of ``block_size`` bytes.  ``spans`` is the
committed block map (index -> object id, valid length, holders), fetched
from the metadata node one span of ``MAP_SPAN`` indexes at a time when a
block in it is first needed (a huge sparse file costs only the spans it
touches); an absent index is a hole (zeros).  ``map_gen`` counts commits and
truncates: a span fetched across one is fetched again.
Bytes of a block past its valid length, or past the file size, read as zeros.

Writes go into ``dirty`` (index -> bytearray holding the block's bytes from
its start; shorter than a block when the tail is zeros).  A block written
only in part is first filled from its stored content.  Write-behind: when a
write reaches the end of a block (a sequential writer has passed it), the
block uploads in the background; if it was not written again meanwhile
(``gen`` unchanged) it moves to ``uploaded`` (stored, not yet committed),
otherwise its object is discarded as ``stale``.  ``flush`` (close, fsync,
the dirty limit, or ``COMMIT_BATCH`` uploaded blocks) waits for those
uploads, uploads the rest (all-zero blocks become holes, nothing stored) and
commits the new block map, size and mtime in one metadata operation, so
another reader sees either the old or the new file, never a mix.
Small files skip the data nodes: block 0 of a file of at most ``INLINE_MAX``
bytes (at flush) is sent inside the commit and kept in the block map (a ref
with no object, ``data`` holding the bytes); it is never uploaded in the
background, never stale or discarded, and stored as an object at the next
flush once the file has outgrown ``INLINE_MAX``.  Memory is
bounded: uploads in flight and read-ahead are limited over the whole mount,
and writers flush when the mount's unwritten data passes ``dirty_limit``.

``lock`` serialises writes, truncates and flushes of one file; reads take no
lock: they read dirty buffers synchronously and committed objects, which
never change.
"""

from __future__ import annotations

import errno
import functools
import stat
import time
import uuid
from dataclasses import dataclass
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import trio

from storagenode import buffers
from storagenode.blockformat import PIECE_SHIFT, PIECE_SIZE
from storagenode.ids import InodeId, ObjectId
from storagenode.metaclient import MetaClient, MetaUnavailable
from storagenode.metastate import INLINE_MAX, MetaError
from storagenode.metastate import QUERIES
from storagenode.retry import retrying

from .blockcache import Block, BlockCache
from .datapath import BlockStore

log = logging.getLogger(__name__)
Spawn = Callable[[Callable[[], Awaitable[Any]]], None]

RELATIME_NS = 24 * 3600 * 10**9
MAX_INFLIGHT = 8        # background block uploads over the whole mount
MAX_PREFETCH = 8        # read-ahead fetches over the whole mount
RECYCLED_FROM = 512 * 1024   # a block being written this long moves to a recycled buffer
COMMIT_BATCH = 256      # uploaded blocks that force a commit
MAP_SPAN = 65536        # block map entries fetched per request
MAP_REF_BYTES = 200     # about what one loaded block map entry costs in memory
STREAMS = 4             # readers of one file told apart as sequential streams
STREAM_BACK = 128 * 1024     # a read starting this far before a stream's end ...
STREAM_AHEAD = 512 * 1024    # ... or this far after it continues that stream
STREAM_AFTER = 2             # continuations that make a stream (then: whole blocks)


@dataclass(frozen=True)
class BlockRef:
    """A stored block: an object (``oid``, on ``holders``), or inline
    (``oid`` None, the block's bytes in ``data``)."""
    oid: ObjectId | None
    length: int
    holders: tuple[str, ...]
    data: bytes | None = None

    @classmethod
    def from_row(cls, row: list[Any]) -> BlockRef:
        """A block as get_blocks answers it (5 elements when inline)."""
        return cls(row[1], row[2], tuple(row[3]), row[4] if len(row) > 4 else None)

    def as_entry(self, idx: int) -> list[Any]:
        """Block ``idx`` as commit_blocks takes it."""
        entry = [idx, self.oid, self.length, list(self.holders)]
        return entry if self.data is None else entry + [self.data]


def spans_bytes(spans: dict[int, dict[int, BlockRef]]) -> int:
    """About what a block map (span number -> its refs) holds in memory."""
    return sum(MAP_REF_BYTES + len(ref.data or b"")
               for span in spans.values() for ref in span.values())


def piece_key(oid: ObjectId, index: int) -> ObjectId:
    """The block cache's key for piece ``index`` of object ``oid``."""
    return ObjectId(f"{oid}/{index}")


def atime_due(attrs: dict[str, Any], now: int) -> bool:
    """relatime: record a read if the last one is older than the last
    change, or a day old."""
    return (attrs["atime_ns"] <= max(attrs["mtime_ns"], attrs["ctime_ns"])
            or now - attrs["atime_ns"] >= RELATIME_NS)


async def _no_retake(ino: InodeId, fence: int) -> tuple[int, tuple[int, int, int]] | None:
    return None


async def _no_small_map(ino: InodeId, view: tuple[int, int, int]) -> list[Any] | None:
    return None


class Volume:
    """What every file of the mount shares."""

    def __init__(self, vol: int, block_size: int, meta: MetaClient, store: BlockStore,
                 cache: BlockCache, readahead: int = 4, upload_slots: int = 8,
                 dirty_limit: int = 128 << 20) -> None:
        self.vol = vol
        self.block_size = block_size
        self.meta = meta
        self.store = store
        self.cache = cache
        self.readahead = readahead
        self.upload_slots = trio.CapacityLimiter(upload_slots)
        self._zeros = bytearray(block_size)
        self.retry_window = 60.0
        self.dirty_limit = dirty_limit
        self.dirty_blocks = 0         # dirty block buffers over all files of the mount
        self.inflight = trio.Semaphore(MAX_INFLIGHT)
        self.prefetching = 0
        # this mount's names for the ops it sends in batches: one sent again
        # after its answer was lost gets its first outcome (MetaState.request)
        self.client_id = uuid.uuid4().hex
        self._requests = 0
        # set by the lease client: the metadata node forgot our session
        self.lost_session: Callable[[str | None], Awaitable[None]] | None = None
        # set by the mount: op ``method`` sent at ``stamp()`` changed these
        # inodes (None: maybe anything), and here are the new attrs of some
        self.stamp: Callable[[], int] = lambda: 0
        self.touched: Callable[[str, list[int] | None, list[dict[str, Any]], int], None] = \
            lambda method, inos, attrs, since: None
        # set by the mount: before an op on an inode, what keeps its answer
        # (the inode's new attrs) if nothing else changed it meanwhile
        self.keeper: Callable[[int], Callable[[dict[str, Any]], None]] = \
            lambda ino: lambda attrs: None
        # set by the mount: sends the namespace ops it answered already
        # (nsqueue), so that the node sees every change in the mount's order
        self.before_rpc: Callable[[], Awaitable[None]] | None = None
        # set by the mount: the block map rows of a small file if its view
        # is ``view``, fetched with those of files likely read next (or None)
        self.small_map: Callable[[InodeId, tuple[int, int, int]],
                                 Awaitable[list[Any] | None]] = _no_small_map
        # set by the mount: hand a fetched piece, the file's bytes at an
        # offset, to the kernel's page cache if this mount may (pagepush)
        self.offer_pages: Callable[[InodeId, int, Block], None] = \
            lambda ino, offset, data: None
        # set by the mount: sends a commit with the queued ops, at the end
        # of their batch (None: nothing queued), and the epoch to send for a
        # WRITE lease held provisionally (a file whose create is queued)
        self.ride: Callable[[str, dict[str, Any], list[list[int]], bool, str | None],
                            Awaitable[dict[str, Any] | None]] | None = None
        self.fence_of: Callable[[int, int], int] = lambda ino, epoch: epoch
        # set by the mount: the node refused a commit fenced by ``fence``;
        # take a new WRITE lease on the inode: its epoch and the node's view
        # of the file now (None: not to be had, or the file is gone)
        self.retake: Callable[[InodeId, int], Awaitable[tuple[int, tuple[int, int, int]] | None]] \
            = _no_retake
        # the metadata node was out of reach at the last try of an RPC that
        # is still being retried, or has not answered one since
        self.unreachable = False

    def new_request(self) -> str:
        """A name for an op, never given before by any mount."""
        self._requests += 1
        return f"{self.client_id}:{self._requests}"

    def over_dirty_limit(self) -> bool:
        """Do buffered writes of all files exceed the mount's budget?"""
        return self.dirty_blocks * self.block_size > self.dirty_limit

    async def call(self, method: str, **args: Any) -> Any:
        """One metadata RPC about this volume, retried while the metadata node
        is unreachable (a restart): queries always, operations only when the
        request surely never arrived, so that no outcome is guessed."""
        req = args.pop("req", None)
        if method == "commit_blocks" and self.ride is not None:
            since = self.stamp()
            # a closed file's commit (it has the ctime shown) goes with the others
            answer = await self.ride(method, args, [[args["ino"], args.get("fence") or 0]],
                                     "ctime_ns" in args, req)
            if answer is not None:
                if "errno" in answer:
                    raise MetaError(answer["errno"], str(answer.get("error", "")))
                self.touched(method, [args["ino"]], [], since)
                return answer["result"]
        if self.before_rpc is not None and method != "batch":
            await self.before_rpc()
        fence = args.get("fence")
        if fence is not None and fence < 0:
            args = dict(args, fence=self.fence_of(args["ino"], fence))
        answer = await self._session_call(method, lambda: retrying(
            lambda: self.meta.exchange(method, dict(args, vol=self.vol)),
            deadline=trio.current_time() + self.retry_window, temporary=self._temporary(method)))
        return answer["result"]

    def _temporary(self, method: str) -> Callable[[BaseException], bool]:
        """When to send ``method`` again: the node out of reach (noted in
        ``unreachable``), for a query always, for an operation only when the
        request surely never arrived, so that no outcome is guessed."""
        def temporary(exc: BaseException) -> bool:
            if not isinstance(exc, MetaUnavailable):
                return False
            self.unreachable = True
            return not exc.sent or method in QUERIES
        return temporary

    async def _session_call(self, method: str, send: Callable[[], Awaitable[dict[str, Any]]]
                            ) -> dict[str, Any]:
        """``send()``, once more under a new session if the node forgot ours
        (a request refused for that was not applied); tells ``touched`` what
        the op changed, or that anything may have changed when its outcome
        is unknown."""
        since, session = self.stamp(), self.meta.session
        try:
            try:
                answer = await send()
            except MetaError as exc:
                if exc.errno != errno.ENOTCONN or self.lost_session is None:
                    raise
                self.unreachable = False
                await self.lost_session(session)
                answer = await send()
        except MetaUnavailable:
            if method not in QUERIES and method != "batch":   # a batch is sent again
                self.touched(method, None, [], since)
            raise
        self.unreachable = False
        if "touched" in answer:
            self.touched(method, answer["touched"], answer.get("touched_attrs") or [], since)
        return answer

    async def call_leased(self, method: str, **args: Any) -> tuple[Any, list[Any]]:
        """A query with the READ leases that come with it (retried like ``call``)."""
        if self.before_rpc is not None:
            await self.before_rpc()
        answer = await self._session_call(method, lambda: retrying(
            lambda: self.meta.exchange(method, dict(args, vol=self.vol), lease=True),
            deadline=trio.current_time() + self.retry_window, temporary=self._temporary(method)))
        return answer["result"], list(answer.get("leases") or [])

    def is_zero(self, data: Block) -> bool:
        """Is ``data`` all zeros?  A ``bytearray`` on the left of ``==``
        compares with any buffer by ``memcmp``; a ``memoryview`` on the left
        goes byte by byte (9 ms for a block of zeros)."""
        zeros = self._zeros if len(data) == len(self._zeros) else bytearray(len(data))
        return zeros == data


def view_of(attrs: dict[str, Any]) -> tuple[int, int, int]:
    """What tells one state of a file on the metadata node from another: any
    change there sets its ctime (the node's clock)."""
    return attrs["size"], attrs["mtime_ns"], attrs["ctime_ns"]


class DirtyBlock:
    """A block being written: its first ``len()`` bytes are the block's.

    A file written in order fills each block from many writes.  Grown as a
    ``bytearray``, each block was fresh memory from the kernel, every 4 KiB
    page of it faulted in and zeroed before being overwritten: a quarter of
    the mount's loop thread while writing a large file.  So once a block
    grows past ``RECYCLED_FROM`` its bytes move into a buffer of the
    whole block's size from the process's recycler, which hands out again
    the buffers of blocks uploaded and let go (what lies past ``len()`` in
    it is anything: it is never read).  A small file's block stays a small
    ``bytearray``: the whole block's buffer, in 2 MiB huge pages, would
    hold four times the bytes of a 512 KiB one until its upload."""

    __slots__ = ("buf", "n", "size")

    def __init__(self, size: int, base: Block = b"") -> None:
        self.size = size             # the block size: the most it holds
        self.n = 0
        self.buf: buffers.Buffer = bytearray()
        self.write(0, base)

    def __len__(self) -> int:
        return self.n

    def view(self) -> memoryview:
        """The block's bytes, not copied (an upload keeps its view: see copy)."""
        return memoryview(self.buf)[:self.n]

    def copy(self) -> DirtyBlock:
        """A block of the same bytes that writes may change while this one is uploaded."""
        return DirtyBlock(self.size, self.view())

    def write(self, at: int, data: Block) -> None:
        """Put ``data`` at ``at`` (at most ``size``), zeros in any gap before it."""
        end = at + len(data)
        self._reserve(end)
        if at > self.n:
            self.buf[self.n:at] = bytes(at - self.n)
        self.buf[at:end] = data
        self.n = max(self.n, end)

    def _reserve(self, end: int) -> None:
        if end <= len(self.buf) or isinstance(self.buf, bytearray) and \
                (end < RECYCLED_FROM or self.size < RECYCLED_FROM):
            return
        big = buffers.scratch(self.size)
        big[:self.n] = memoryview(self.buf)[:self.n]
        self.buf = big

    def cached(self) -> Block:
        """What the block cache keeps once it is uploaded: this buffer when
        the block fills it, else a copy of its bytes (a short block would
        hold a whole block's memory that the cache does not count)."""
        return self.view() if self.n == len(self.buf) else bytes(self.view())


class FileData:
    def __init__(self, volume: Volume, attrs: dict[str, Any]) -> None:
        self.v = volume
        self.ino = InodeId(attrs["ino"])
        self.size = attrs["size"]
        self.committed_size = attrs["size"]   # no committed block lies past this
        self.mtime_ns = attrs["mtime_ns"]
        self.atime_ns = attrs["atime_ns"]
        self.ctime_ns = attrs["ctime_ns"]
        self.view = view_of(attrs)    # the node's file these blocks and sizes are of
        self.bs = volume.block_size
        self.spans: dict[int, dict[int, BlockRef]] = {}   # span number -> its block refs
        self.map_gen = 0              # commits and truncates so far (see _span)
        self.dirty: dict[int, DirtyBlock] = {}
        self.gen: dict[int, int] = {}          # writes into each dirty buffer so far
        self.uploaded: dict[int, BlockRef | None] = {}   # stored, not yet committed
        self.inflight: dict[int, trio.Event] = {}         # background uploads running
        self.stale: list[BlockRef] = []        # uploaded, then rewritten: never committed
        self.fence: int | None = None          # epoch of the WRITE lease the buffers are under
        # the last commit sent whose answer was lost (its args and request
        # name: sent again unchanged, it is named the same), and the objects
        # any such commit named: the node may refer to them, so they are
        # never deleted from here (the node's orphan scan collects them)
        self.unanswered: tuple[dict[str, Any], str] | None = None
        self.unsure: set[str] = set()
        self.changed = False          # size or mtime differ from the metadata node
        self.due = False              # closed: its commit is due (store_behind)
        self.attr_changes: dict[str, int] = {}   # setattrs' mode, uid, gid, atime, to commit
        self.lock = trio.Lock()
        self.opens = 0
        self.maybe_orphan = False     # lost a name while open here: check at last release
        self.last_read = -2
        self.read_ends: list[tuple[int, int]] = []   # recent streams: (end, continuations)

    # ----- the committed block map
    async def _span(self, idx: int) -> dict[int, BlockRef]:
        """The committed refs of the span holding block ``idx``."""
        number = idx // MAP_SPAN
        if number * MAP_SPAN * self.bs >= self.committed_size:
            self.spans.setdefault(number, {})     # past the committed end: nothing stored
        while number not in self.spans:
            gen = self.map_gen
            first = number * MAP_SPAN
            rows = None
            if number == 0 and self.committed_size <= INLINE_MAX:
                rows = await self.v.small_map(self.ino, self.view)
            if rows is None:
                rows = await self.v.call("get_blocks", ino=self.ino, first=first,
                                         last=first + MAP_SPAN - 1)
            if gen == self.map_gen:       # else a commit overtook the answer: ask again
                self.spans[number] = {r[0]: BlockRef.from_row(r) for r in rows}
        return self.spans[number]

    def map_bytes(self) -> int:
        """About what the loaded block map holds in memory."""
        return spans_bytes(self.spans)

    def _known_ref(self, idx: int) -> BlockRef | None:
        """Block ``idx``'s committed ref if its span is loaded (no fetching)."""
        return self.spans.get(idx // MAP_SPAN, {}).get(idx)

    def _forget_map(self) -> None:
        self.spans.clear()
        self.map_gen += 1

    async def _stored_ref(self, idx: int) -> BlockRef | None:
        """Block ``idx``'s ref: uploaded and awaiting commit, or committed
        (None: a hole)."""
        if idx in self.uploaded:
            return self.uploaded[idx]
        return (await self._span(idx)).get(idx)

    async def _stored(self, idx: int) -> memoryview:
        """Stored bytes of block ``idx`` up to its valid length (empty for a hole)."""
        ref = await self._stored_ref(idx)
        if ref is None:
            return memoryview(b"")
        return memoryview(await self._fetch(ref))[:ref.length]

    async def _content(self, idx: int) -> memoryview:
        buf = self.dirty.get(idx)
        return buf.view() if buf is not None else await self._stored(idx)

    # ----- reading
    def atime_due(self, now: int) -> bool:
        return atime_due({"atime_ns": self.atime_ns, "mtime_ns": self.mtime_ns,
                          "ctime_ns": self.ctime_ns}, now)

    def refresh(self, attrs: dict[str, Any]) -> None:
        """Take the metadata node's view (close-to-open: at open, when idle here)."""
        self.size, self.mtime_ns = attrs["size"], attrs["mtime_ns"]
        self.committed_size = attrs["size"]
        self.atime_ns, self.ctime_ns = attrs["atime_ns"], attrs["ctime_ns"]
        self.view = view_of(attrs)
        self._forget_map()

    def behind(self, attrs: dict[str, Any]) -> bool:
        """Is ``attrs`` a later state of the file on the metadata node than
        this view (every change there moves the ctime, on the node's clock),
        with nothing of this mount's buffered or on its way?"""
        return attrs["ctime_ns"] > self.view[2] and not self.pending() \
            and not self.lock.locked()

    def outdated(self, attrs: dict[str, Any]) -> bool:
        """Has the file changed on the metadata node since this view was taken?"""
        return self.view != view_of(attrs)

    async def read(self, offset: int, length: int, prefetch: Spawn) -> bytes | memoryview:
        """The bytes at ``offset``: a view of a fetched block or piece where
        one holds them all (pyfuse3 replies from any buffer, so the
        mebibyte is copied once, into the kernel, not twice; fetched data
        is never changed), else a fresh copy.  A read that continues a
        stream of reads fetches whole blocks and reads ahead; any other
        (random access) fetches only the pieces it touches."""
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        streaming = self._streaming(offset, end)
        first, last = offset // self.bs, (end - 1) // self.bs
        if first == last and first not in self.dirty:
            start = first * self.bs
            if streaming:
                stored = (await self._stored(first))[offset - start:end - start]
            else:
                stored = await self._stored_span(first, offset - start, end - start)
            if first not in self.dirty and len(stored) == end - offset:
                self._read_ahead(first, last, prefetch, streaming)
                return stored
        parts = []
        for idx in range(first, last + 1):
            start = idx * self.bs
            lo, hi = max(offset, start) - start, min(end, start + self.bs) - start
            piece = bytes((await self._content(idx))[lo:hi])
            parts.append(piece + bytes(hi - lo - len(piece)))
        self._read_ahead(first, last, prefetch, streaming)
        return b"".join(parts)

    def _streaming(self, offset: int, end: int) -> bool:
        """Does a read of [offset, end) start at 0, or continue one of the
        last ``STREAMS`` streams of reads of this file that had already
        continued once (``STREAM_AFTER``)?  Noted either way.  (A random
        reader lands near the end of some earlier read now and then; one
        such read fetching a whole 4 MiB block cost more than all the
        64 KiB pieces around it.)"""
        ends = self.read_ends
        for i, (at, run) in enumerate(ends):
            if at - STREAM_BACK <= offset <= at + STREAM_AHEAD:
                ends[i] = (max(at, end), run + 1)
                return run + 1 >= STREAM_AFTER or offset == 0
        ends.append((end, 0))
        if len(ends) > STREAMS:
            del ends[0]
        return offset == 0

    async def _stored_span(self, idx: int, lo: int, hi: int) -> memoryview:
        """Stored bytes [lo, hi) of block ``idx`` (fewer past its valid
        length): from its cached block or pieces, else by fetching just the
        pieces they lie in."""
        ref = await self._stored_ref(idx)
        if ref is None:
            return memoryview(b"")
        hi = min(hi, ref.length)
        oid = ref.oid
        if oid is None or lo >= hi or self.v.cache.peek(oid) is not None \
                or self.v.cache.fetching(oid):
            return memoryview(await self._fetch(ref))[lo:hi]
        first, last = lo >> PIECE_SHIFT, (hi - 1) >> PIECE_SHIFT
        if first == last:
            piece = await self.v.cache.get(piece_key(oid, first),
                                           lambda: self._fetch_piece(idx, ref, first))
            return memoryview(piece)[lo - (first << PIECE_SHIFT):hi - (first << PIECE_SHIFT)]
        start, data = await self._fetch_pieces(idx, ref, first, last)
        if not (start <= lo and hi <= start + len(data)):
            return memoryview(await self._fetch(ref))[lo:hi]
        return memoryview(data)[lo - start:hi - start]

    async def _fetch_piece(self, idx: int, ref: BlockRef, index: int) -> Block:
        """Piece ``index`` of block ``idx`` (``ref``), fetched on its own (or
        cut from the whole block where that came instead)."""
        start, data = await self._fetch_pieces(idx, ref, index, index)
        at = (index << PIECE_SHIFT) - start
        if at < 0 or at >= len(data):
            return memoryview(await self._fetch(ref))[index << PIECE_SHIFT:][:PIECE_SIZE]
        return memoryview(data)[at:at + PIECE_SIZE]

    async def _fetch_pieces(self, idx: int, ref: BlockRef, first: int, last: int
                            ) -> tuple[int, Block]:
        """Pieces ``first`` .. ``last`` of block ``idx`` (``ref``): where they
        start in the block, and their bytes (or the whole block).  Kept in
        the block cache, and offered to the kernel's page cache when no
        write or commit here overtook the fetch."""
        assert ref.oid is not None
        gen = self.map_gen
        start, data = await self.v.store.download_pieces(ref.oid, ref.holders, first, last)
        if start == 0 and len(data) > (last + 1 - first) * PIECE_SIZE:
            self.v.cache.put(ref.oid, data)         # the whole block came
            return start, data
        if start != first << PIECE_SHIFT:
            return start, data                      # pieces of another size: not kept
        self._cache_pieces(ref.oid, start, data)
        if gen == self.map_gen and not self.pending() and not self.lock.locked():
            base = idx * self.bs
            end = min(start + len(data), ref.length, self.size - base)
            if end > start:
                self.v.offer_pages(self.ino, base + start, memoryview(data)[:end - start])
        return start, data

    def _cache_pieces(self, oid: ObjectId, start: int, data: Block) -> None:
        """Keep the pieces ``download_pieces`` brought, each on its own."""
        view = memoryview(data)
        for at in range(0, len(view), PIECE_SIZE):
            self.v.cache.put(piece_key(oid, (start + at) >> PIECE_SHIFT),
                             view[at:at + PIECE_SIZE])

    def _read_ahead(self, first: int, last: int, prefetch: Spawn, streaming: bool) -> None:
        sequential = streaming and first in (self.last_read, self.last_read + 1)
        self.last_read = last
        if not sequential:
            return
        final = (self.size - 1) // self.bs
        for idx in range(last + 1, min(last + 1 + self.v.readahead, final + 1)):
            ref = self._known_ref(idx)
            if self.v.prefetching >= MAX_PREFETCH:
                return                  # enough read-ahead in flight over the mount
            if ref and ref.oid and idx not in self.dirty and self.v.cache.peek(ref.oid) is None \
                    and not self.v.cache.fetching(ref.oid):
                self.v.prefetching += 1
                prefetch(functools.partial(self._prefetch, ref))

    async def _prefetch(self, ref: BlockRef) -> None:
        try:
            await self._fetch(ref)
        finally:
            self.v.prefetching -= 1

    async def _fetch(self, ref: BlockRef) -> Block:
        oid = ref.oid
        if oid is None:
            return ref.data or b""
        return await self.v.cache.get(oid, lambda: self.v.store.download(oid, ref.holders))

    # ----- writing
    async def write(self, offset: int, data: bytes, spawn: Spawn, *,
                    lease: Callable[[], int | None] | None = None) -> bool:
        """Buffer ``data``; with leases, under the WRITE lease whose epoch
        ``lease()`` gives now.  False (nothing written) if there is no such
        lease (its grant was recalled before it arrived) or it is not the one
        the caller saw when it sent us here: a recall came between, and the
        caller must take a new lease first.  (Data buffered under no lease
        would be committed unfenced, waiting for an op lease behind the
        other client's request, which waits for this mount's recall flush,
        which waits for this file's lock.)  Data still buffered under an
        older lease is committed under that lease's fence first (a lost
        lease fails it: it is never committed under a newer one)."""
        fence = lease() if lease is not None else None
        if lease is not None and fence is None:
            return False
        async with self.lock:
            if lease is not None and not await self._under(fence, lease):
                return False
            passed = []            # blocks this write filled up to their end
            pos = 0
            while pos < len(data):
                idx, boff = divmod(offset + pos, self.bs)
                n = min(self.bs - boff, len(data) - pos)
                buf = await self._dirty_block(idx, whole=(boff == 0 and n == self.bs))
                buf.write(boff, memoryview(data)[pos:pos + n])
                self.gen[idx] = self.gen.get(idx, 0) + 1
                if boff + n == self.bs:
                    passed.append(idx)
                pos += n
            self.size = max(self.size, offset + len(data))
            self.mtime_ns = self.ctime_ns = time.time_ns()
            self.changed = True
            if self.v.over_dirty_limit() or len(self.uploaded) >= COMMIT_BATCH:
                await self._flush_all()
                return True
            for idx in passed:
                await self._start_upload(idx, spawn)
            return True

    async def _under(self, fence: int | None, lease: Callable[[], int | None]) -> bool:
        """With the lock held: make ``fence``, the WRITE lease the caller saw,
        the one what is buffered from now on goes under; False if it is no
        longer held.  What is buffered under an older one is committed first."""
        if lease() != fence:
            return False
        if fence != self.fence and self.pending():
            try:
                await self._flush_all()
            except Exception:
                await self._discard_locked()
                raise
        self.fence = fence
        return True

    @asynccontextmanager
    async def _locked_under(self, lease: Callable[[], int | None]) -> AsyncIterator[bool]:
        """Hold the file's lock with what is buffered going under the WRITE
        lease ``lease()`` gives now (``_under``); yields False, and changes
        nothing, if there is none or it changed meanwhile."""
        fence = lease()
        if fence is None:
            yield False
            return
        async with self.lock:
            yield await self._under(fence, lease)

    async def buffer_attrs(self, changes: dict[str, int],
                           lease: Callable[[], int | None]) -> bool:
        """Keep a setattr's ``changes`` (mode, uid, gid, atime, mtime; no size)
        with the buffered writes, under the WRITE lease ``lease()`` gives, to
        be committed with them (at close, fsync, or a recall of the lease:
        nobody else sees the file's attributes before).  tar and cp -a set
        times, owner and mode before close: one commit, not one per call.
        False (nothing kept) without that lease."""
        async with self._locked_under(lease) as held:
            if not held:
                return False
            if "mtime_ns" in changes:
                self.mtime_ns = changes["mtime_ns"]
            if "atime_ns" in changes:
                self.atime_ns = changes["atime_ns"]
            self.attr_changes.update((k, v) for k, v in changes.items() if k != "mtime_ns")
            self.ctime_ns = time.time_ns()
            self.changed = True
            return True

    def overlay(self, a: dict[str, Any]) -> dict[str, Any]:
        """The metadata node's ``a`` with what is buffered here applied."""
        if self.changed:
            # the node counts the stored bytes in 512-byte units, rounded up:
            # exact for a file with none stored yet (a new one)
            delta = self.unstored_bytes()
            blocks = -(-delta // 512) if a["blocks"] == 0 else a["blocks"] + delta // 512
            a = dict(a, size=self.size, mtime_ns=self.mtime_ns,
                     ctime_ns=max(a["ctime_ns"], self.ctime_ns), blocks=max(0, blocks))
            changes = self.attr_changes
            if changes:
                a.update((k, v) for k, v in changes.items() if k != "mode")
                if "mode" in changes:
                    a["mode"] = stat.S_IFMT(a["mode"]) | (changes["mode"] & 0o7777)
        if self.atime_ns > a["atime_ns"]:
            a = dict(a, atime_ns=self.atime_ns)      # a read access still on its way
        return a

    async def _dirty_block(self, idx: int, whole: bool) -> DirtyBlock:
        buf = self.dirty.get(idx)
        if buf is not None and idx in self.inflight:
            buf = self.dirty[idx] = buf.copy()    # the upload keeps the old one
        elif buf is None:
            base = memoryview(b"") if whole else await self._stored(idx)
            if idx in self.uploaded:          # rewritten before its commit
                self._drop_uploaded(idx)
            valid = max(0, min(len(base), self.size - idx * self.bs))
            buf = self.dirty[idx] = DirtyBlock(self.bs, base[:valid])
            self.v.dirty_blocks += 1
        return buf

    def _drop_uploaded(self, idx: int) -> None:
        """Block ``idx`` will not be committed as uploaded: its object is stale."""
        ref = self.uploaded.pop(idx)
        if ref is not None and ref.oid is not None:
            self.stale.append(ref)

    def _forget_dirty(self, idx: int) -> None:
        del self.dirty[idx]
        self.gen.pop(idx, None)
        self.v.dirty_blocks -= 1

    # ----- write-behind: full blocks upload while the writer goes on
    async def _start_upload(self, idx: int, spawn: Spawn) -> None:
        if idx in self.inflight or idx not in self.dirty or self._may_inline(idx):
            return
        await self.v.inflight.acquire()          # backpressure: bounded over the mount
        if idx in self.inflight or idx not in self.dirty:
            self.v.inflight.release()
            return
        done = self.inflight[idx] = trio.Event()
        spawn(functools.partial(self._background_upload, idx, self.dirty[idx],
                                self.gen[idx], done))

    async def _background_upload(self, idx: int, data: DirtyBlock, gen: int,
                                 done: trio.Event) -> None:
        """Upload the dirty buffer ``data`` of block ``idx`` as it is: no
        write changes it meanwhile (``_dirty_block`` gives a write to a block
        being uploaded a copy), and once uploaded it is the cached block."""
        try:
            ref = await self._upload(data)
            if self.gen.get(idx) == gen:
                self.uploaded[idx] = ref
                self._forget_dirty(idx)
            elif ref is not None:
                self.stale.append(ref)     # rewritten meanwhile: the buffer stays dirty
        except Exception as exc:
            log.warning("background upload of block %d of inode %d failed (flush retries): %s",
                        idx, self.ino, exc)
        finally:
            del self.inflight[idx]
            self.v.inflight.release()
            done.set()

    def stores_inline(self) -> bool:
        """Would storing what is buffered ask no data node (at most block 0,
        and it goes inline)?"""
        return not self.inflight and self.dirty.keys() <= {0} and self._may_inline(0)

    def _may_inline(self, idx: int) -> bool:
        """Would block ``idx`` go inline if flushed now?"""
        return idx == 0 and self.size <= INLINE_MAX

    async def _store(self, idx: int, data: Block | DirtyBlock) -> BlockRef | None:
        """Block ``idx`` made ready to commit: inline if it may be, else uploaded."""
        block = data.view() if isinstance(data, DirtyBlock) else data
        if self._may_inline(idx) and not self.v.is_zero(block):
            return BlockRef(None, len(block), (), bytes(block))
        return await self._upload(data)

    async def _upload(self, data: Block | DirtyBlock) -> BlockRef | None:
        """Store one block as an object; None for an all-zero block (a hole,
        nothing stored)."""
        block = data.view() if isinstance(data, DirtyBlock) else data
        if self.v.is_zero(block):
            return None
        async with self.v.upload_slots:
            oid, nodes = await self.v.store.upload(block)
        # a buffer no write changes once uploaded
        self.v.cache.put(oid, data.cached() if isinstance(data, DirtyBlock) else block)
        return BlockRef(oid, len(block), tuple(nodes))

    async def _wait_uploads(self) -> None:
        while self.inflight:
            await next(iter(self.inflight.values())).wait()

    def unstored_bytes(self) -> int:
        """How far this file's stored bytes will move at the next commit:
        buffered and uploaded blocks less the committed blocks they replace
        (for an honest st_blocks before the commit)."""
        delta = 0
        for idx in set(self.dirty) | set(self.uploaded):
            buf = self.dirty.get(idx)
            if buf is not None:
                delta += len(buf)
            else:
                ref = self.uploaded[idx]
                delta += ref.length if ref is not None else 0
            old = self._known_ref(idx)
            delta -= old.length if old is not None else 0
        return delta

    async def flush_with(self, changes: dict[str, int]) -> dict[str, Any] | None:
        """Commit the buffered writes and a setattr's ``changes`` (no size) in
        one metadata op: the first futimens, fchown or fchmod after writing
        (tar, cp -a) costs one commit, not two.  None when nothing was
        buffered: the caller sends the setattr itself."""
        async with self.lock:
            if not self.pending():
                return None
            if "mtime_ns" in changes:
                self.mtime_ns = changes["mtime_ns"]
            self.attr_changes.update((k, v) for k, v in changes.items() if k != "mtime_ns")
            self.ctime_ns = time.time_ns()      # a closed file's commit is stamped with it
            try:
                return await self._flush_all()
            finally:
                self.attr_changes = {}     # sent, or reported failed to this setattr

    # ----- flushing
    def pending(self) -> bool:
        return bool(self.dirty or self.uploaded or self.inflight or self.changed)

    async def flush(self) -> dict[str, Any] | None:
        """Upload buffered blocks and commit them; the new attrs, or None if clean."""
        async with self.lock:
            if not self.pending():
                return None
            return await self._flush_all()

    async def store_behind(self, store: bool = True) -> bool:
        """Leave the commit of what is buffered to ``flush``, called soon by
        the mount (``Operations.commit_due``), or by a recall of the lease,
        fsync, unmount, whichever comes first; the commit then carries this
        file's ctime as the mount showed it.  With ``store``, first store
        it on the data nodes (their failures are the caller's: close
        reports them); without, that ``flush`` stores it too.  False when
        nothing is buffered."""
        async with self.lock:
            if not self.pending():
                return False
            if store:
                await self._store_all()
            self.due = True
            return True

    async def _flush_all(self) -> dict[str, Any]:
        await self._store_all()
        return await self._commit()

    async def _store_all(self) -> None:
        await self._wait_uploads()
        # No copies: the lock keeps writers out until the buffers are dropped,
        # and a later write to the block starts a new buffer.
        snapshot = dict(self.dirty)

        async def upload(idx: int, data: Block | DirtyBlock) -> None:
            ref = await self._store(idx, data)
            if idx in self.uploaded:         # stored by a flush that failed later
                self._drop_uploaded(idx)
            self.uploaded[idx] = ref

        outgrown = self.uploaded.get(0)      # inline at a flush that failed, file grew since
        if outgrown and outgrown.data is not None and 0 not in snapshot \
                and not self._may_inline(0):
            blocks: list[tuple[int, Block | DirtyBlock]] = [*snapshot.items(),
                                                             (0, outgrown.data)]
        else:
            blocks = list(snapshot.items())
        if len(blocks) == 1:
            # one block, as a small file has: stored here, without a nursery
            # and a task of its own (a third of a small file's close)
            await upload(*blocks[0])
        else:
            async with trio.open_nursery() as nursery:
                for idx, data in blocks:
                    nursery.start_soon(upload, idx, data)
        for idx in snapshot:
            self._forget_dirty(idx)

    async def _commit(self) -> dict[str, Any]:
        try:
            attrs = await self._send_commit()
        except MetaError as exc:
            if exc.errno == errno.ESTALE:
                await self._store_again()     # uploaded too long ago (see metastate._check_fresh)
            elif exc.errno != errno.EIO or not await self._retake():
                raise
            attrs = await self._send_commit()
        self.committed_size = attrs["size"]
        self.view = view_of(attrs)
        self.map_gen += 1
        for idx, ref in self.uploaded.items():
            span = self.spans.get(idx // MAP_SPAN)
            if span is None:
                continue              # fetched when needed, committed state then
            if ref is None:
                span.pop(idx, None)
            else:
                span[idx] = ref
        self.uploaded.clear()
        self.attr_changes = {}
        self.changed = bool(self.dirty)
        self.due = False
        stale, self.stale = self.stale, []
        for ref in stale:                  # never committed: no one else can refer to it
            await self._discard(ref)
        return attrs

    async def _discard(self, ref: BlockRef) -> None:
        if ref.oid is not None and ref.oid not in self.unsure:
            await self.v.store.discard(ref.oid, ref.holders)

    async def _retake(self) -> bool:
        """The node refused the commit under the WRITE lease it went under:
        lost (a restart of the metadata node forgets every lease, and an
        answer lost on the way may have been a create's that was applied).
        Take a new one and commit under it if the node's file still has the
        size and mtime of the one this mount's writes were made on: nobody
        wrote it meanwhile (a write elsewhere moves its mtime), and the
        commit lands as it would have.  (Not the ctime: this mount's own
        changes since, an xattr, a rename, move it.)  Every commit path
        comes here (a close's, a later open's, fsync's, unmount's, a write
        under the new lease's), so none drops data another could commit.
        False (the refusal stands) when the file was written or is gone."""
        if self.fence is None:
            return False
        got = await self.v.retake(self.ino, self.fence)
        sent = self.unanswered
        if got is None or (got[1][:2] != self.view[:2] and (
                sent is None or got[1][:2] != (sent[0]["size"], sent[0]["mtime_ns"]))):
            log.warning("inode %d: its WRITE lease (fence %s) was lost, and the file is %s on "
                        "the metadata node (size and mtime %s here, %s in a commit whose "
                        "answer was lost)", self.ino, self.fence,
                        "gone" if got is None else f"changed ({got[1][:2]})", self.view[:2],
                        None if sent is None else (sent[0]["size"], sent[0]["mtime_ns"]))
            return False
        log.warning("inode %d: committed under a new WRITE lease, the old one was lost "
                    "(the file was unchanged on the metadata node)", self.ino)
        self.fence = got[0]
        return True

    async def _send_commit(self) -> dict[str, Any]:
        blocks = [r.as_entry(i) if r else [i, None, 0, []]
                  for i, r in sorted(self.uploaded.items())]
        keep = self.v.keeper(self.ino)
        # a closed file's ctime as this mount showed it after the close
        ctime = {"ctime_ns": self.ctime_ns} if self.due else {}
        args = dict(ino=self.ino, size=self.size, blocks=blocks, mtime_ns=self.mtime_ns,
                    fence=self.fence, **self.attr_changes, **ctime)
        sent = self.unanswered
        # the same commit if only the fence differs (the lease it goes under
        # now: the one a create's answer named, or one taken again)
        same = sent is not None and {**sent[0], "fence": None} == {**args, "fence": None}
        req = sent[1] if sent is not None and same else self.v.new_request()
        try:
            attrs: dict[str, Any] = await self.v.call("commit_blocks", req=req, **args)
        except MetaUnavailable:
            # its outcome is not known: it may have landed
            log.info("commit %s of inode %d (fence %s): no answer", req, self.ino, args["fence"])
            self.unanswered = (args, req)
            self.unsure.update(r.oid for r in self.uploaded.values()
                               if r is not None and r.oid is not None)
            raise
        self.unanswered = None        # (a refusal of another one says nothing of it)
        keep(attrs)               # a stat after close needs no round trip
        return attrs

    async def _store_again(self) -> None:
        """Copy every uploaded, uncommitted block to a fresh object (the old
        ones are still stored: the orphan scan waits twice the commit limit)."""
        for idx, ref in list(self.uploaded.items()):
            if ref is None or ref.oid is None:
                continue              # a hole, or inline: nothing stored to age
            data = await self.v.store.download(ref.oid, ref.holders)
            self.uploaded[idx] = await self._upload(data[:ref.length])
            self.stale.append(ref)

    async def discard(self) -> None:
        """Drop the data that could not be stored (close or fsync reported
        why), so that it never lands later over what others wrote since."""
        async with self.lock:
            await self._discard_locked()

    async def _discard_locked(self) -> None:
        await self._wait_uploads()
        for idx in list(self.dirty):
            self._forget_dirty(idx)
        dropped = [r for r in self.uploaded.values() if r is not None] + self.stale
        self.uploaded.clear()
        self.stale = []
        self.attr_changes = {}
        self.changed = False
        self.due = False
        self._forget_map()
        for ref in dropped:          # never committed: no one else refers to them
            await self._discard(ref)

    # ----- truncating
    async def truncate(self, size: int, commit: Callable[[], Awaitable[dict[str, Any]]]
                       ) -> dict[str, Any]:
        """Cut or extend to ``size`` after committing what is buffered;
        ``commit`` sends the change to the metadata node (no leases)."""
        async with self.lock:
            if self.pending():
                await self._flush_all()
            return self._truncated(size, await commit())

    async def truncate_under(self, size: int, changes: dict[str, Any],
                             lease: Callable[[], int | None]) -> dict[str, Any] | None:
        """Cut or extend to ``size`` (and apply a setattr's ``changes``) under
        the WRITE lease ``lease()`` gives, fenced by it as a commit of
        buffered writes is: it never waits for an op lease while holding the
        file's lock (that wait may be behind another mount's request, which
        waits for this mount's recall flush, which waits for the lock).
        None (nothing changed) if that lease is not held, or was lost before
        the change reached the metadata node: take a new one and try again."""
        async with self._locked_under(lease) as held:
            if not held:
                return None
            fence = self.fence
            if self.pending():
                await self._flush_all()
            keep = self.v.keeper(self.ino)
            try:
                attrs: dict[str, Any] = await self.v.call(
                    "commit_blocks", ino=self.ino, size=size, blocks=[], fence=fence,
                    **{"mtime_ns": None, **changes})
            except MetaError as exc:
                if exc.errno == errno.EIO and lease() != fence:
                    return None          # recalled meanwhile: nothing was changed
                raise
            keep(attrs)
            return self._truncated(size, attrs)

    def _truncated(self, size: int, attrs: dict[str, Any]) -> dict[str, Any]:
        self.size = self.committed_size = size
        self.mtime_ns = attrs["mtime_ns"]
        self.view = view_of(attrs)
        self._forget_map()    # the metadata node dropped and clipped blocks
        return attrs
