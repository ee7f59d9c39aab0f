"""Moving blocks between the mount and the data nodes.

How this works
--------------
``ClusterView`` keeps the cluster map (data nodes, their addresses, state
and admin state) fetched from the metadata node, refreshed every few seconds
and at once after a node fails us.  New objects go only to *writable* nodes
(state ``up`` and admin ``active``: not draining); reads may try any node.

Replicated volumes: ``BlockStore.upload`` frames a block (zstd + BLAKE3, in
a worker thread), ranks the writable nodes for a new object id by rendezvous
hashing, and PUTs the object to the first ``copies`` nodes in parallel.  A
node that fails is replaced at once by the next one in rank order, and one
still silent after ``PUT_HEDGE_AFTER`` gets a stand-in (the next node is
asked too; whichever stores it first holds that copy: a hung or cut-off node
costs a moment, not a timeout); ``Placing`` keeps that bookkeeping.  The
block is acknowledged only when ``copies`` distinct nodes hold it durably
(``copies`` is the volume's replica count, or the number of active nodes
when fewer exist); when nodes are down, a majority of ``copies``
(``write_quorum``) is enough, and repair adds the missing copies later.  A
copy stored twice over by a stand-in is taken back; one a cancelled request
may still have stored is left to the orphan scan.
The client sends each copy itself: on loopback one trio process pushes
~850 MiB/s of PUTs, far above what the rest of the path delivers, so a
chain (pipeline) would buy nothing here and cost latency and mid-chain
failure handling.  ``download`` tries the nodes recorded in the
block map, then the rest in rank order, and returns the first copy whose
checksum verifies; a refused connection, a timeout, a missing or a corrupt
copy all fall through to the next.  A node that did not answer a read
(refused, failed, or silent past ``HEDGE_AFTER``) is asked last for
``SUSPECT_FOR`` seconds, before the cluster map says it is down.

Erasure-coded volumes (``ec = (k, m)``): ``upload`` encodes the block into
k + m shards (``storagenode.erasure``, in a worker thread) and PUTs shard i,
object ``<oid>.<i>``, to the i-th writable node in rank order, all in
parallel; a failed or silent node is replaced (or joined) by the next
unused one, as for copies, so the k + m holders are always distinct.  The
block is acknowledged only when all k + m shards are durable (the
redundancy the volume promises); the holder list is positional
(``holders[i]`` has shard i).  ``download`` follows
``shard_fetch_plan``: the k data shards first, in parallel (no decoding
needed when they all verify), then for each shard that failed the next
position (parity shards), and last every other node in rank order (a map
gone stale); it decodes once k shards verify.

Only when too few nodes answer does the caller see ``DataUnavailable``
(``NoSpace`` when they are full).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import AbstractSet, Any, Awaitable, Callable, Sequence, TypeVar

import trio

from storagenode import blockformat, erasure
from storagenode.dataclient import DataClient, NodeError, NodeFull, NodeUnavailable, Parts
from storagenode.ids import NodeId, ObjectId, new_object_id, shard_id
from storagenode.metaclient import MetaClient
from storagenode.placement import NodeSlot, rank

log = logging.getLogger(__name__)

MAP_REFRESH = 5.0
HEDGE_AFTER = 1.5           # seconds before a read also asks the next node
SUSPECT_FOR = 10.0          # seconds a node that failed a read is asked last
PUT_HEDGE_AFTER = 2.0       # seconds before a piece being stored also goes to a spare node
DECODE_HERE = 256 * 1024   # pieces received up to this size are checked without a thread
DISCARD_WITHIN = 2.0        # seconds a best-effort discard may take (then: the orphan scan)


T = TypeVar("T")


class NoSpace(Exception):
    """Every usable data node is full."""


class DataUnavailable(Exception):
    """Not enough data nodes answered to store or fetch a block."""


@dataclass(frozen=True)
class DataNode:
    node_id: NodeId
    address: str
    up: bool
    weight: float
    domain: str
    active: bool = True        # admin state "active": not draining

    @property
    def writable(self) -> bool:
        """May new objects go here?"""
        return self.up and self.active


def _data_node(n: dict[str, Any]) -> DataNode:
    """A node of the cluster map as the mount uses it."""
    return DataNode(n["node_id"], n["address"], n["state"] == "up", float(n["weight"]),
                    n["domain"], n.get("admin", "active") == "active")


class ClusterView:
    """The mount's copy of the cluster map."""

    def __init__(self, meta: MetaClient) -> None:
        self.meta = meta
        self.nodes: dict[NodeId, DataNode] = {}
        self.suspect: dict[NodeId, float] = {}     # node -> until when reads ask it last
        self.epoch = -1
        self._fetched_at = -1e9
        self._lock = trio.Lock()

    async def refresh(self, force: bool = False) -> None:
        async with self._lock:
            if not force and trio.current_time() - self._fetched_at < MAP_REFRESH:
                return
            cmap = await self.meta.call("cluster_map")
            self.nodes = {n["node_id"]: _data_node(n) for n in cmap["nodes"]}
            self.epoch = cmap["epoch"]
            self._fetched_at = trio.current_time()

    def ranked(self, oid: ObjectId, *, writable: bool = True) -> list[DataNode]:
        """Nodes in rank order for ``oid``: the writable ones, or all."""
        slots = [NodeSlot(n.node_id, n.weight, n.domain) for n in self.nodes.values()
                 if n.writable or not writable]
        return [self.nodes[s.node_id] for s in rank(oid, slots)]

    def suspected(self, node_id: NodeId) -> bool:
        """Did ``node_id`` fail a read of this mount, or stay silent, in the
        last ``SUSPECT_FOR`` seconds?  (Until the cluster map says it is
        down, every read that named it first asked it first: a dead node
        cost each read a refused connection, a silent one ``HEDGE_AFTER``.)"""
        until = self.suspect.get(node_id)
        if until is None:
            return False
        if until <= trio.current_time():
            del self.suspect[node_id]
            return False
        return True

    def suspect_node(self, node_id: NodeId) -> None:
        self.suspect[node_id] = trio.current_time() + SUSPECT_FOR

    def active_count(self) -> int:
        return sum(n.active for n in self.nodes.values())


def write_quorum(copies: int) -> int:
    """The fewest copies a block of a replicated volume is acknowledged with
    (a majority): with a node down, writes go on with the copies that can be
    stored, and repair makes the rest once a node can take them."""
    return copies // 2 + 1


Attempt = tuple[int, NodeId]          # (shard index, node to ask for it)
Ask = tuple[int, DataNode]            # (position, node to store that piece on)


class Placing:
    """Where the pieces of one new block go (pure bookkeeping, no I/O).

    Position i is first asked of the i-th node in rank order; every other
    node is a spare, used at most once, in rank order, so holders are
    distinct.  A failure asks the next spare for that position unless
    another request for it is still out; ``hedge`` gives each position
    whose only request is still out one more (so at most two at a time).
    The first node to store a position holds it; a later success there is
    ``extra`` (a copy to take back).  Settled when every position is held
    or one has no request out and no spare left (the block failed)."""

    def __init__(self, pieces: int, ranked: Sequence[DataNode]) -> None:
        self.holders: list[NodeId | None] = [None] * pieces
        self.asking = [1] * pieces          # requests out, per position
        self.first: list[Ask] = list(enumerate(ranked[:pieces]))
        self.spare = list(ranked[pieces:])
        self.extra: list[tuple[int, NodeId]] = []
        self.full = 0                       # nodes that answered "full"

    def stored(self, position: int, node: DataNode) -> None:
        self.asking[position] -= 1
        if self.holders[position] is None:
            self.holders[position] = node.node_id
        else:
            self.extra.append((position, node.node_id))

    def failed(self, position: int, full: bool) -> list[Ask]:
        self.asking[position] -= 1
        self.full += full
        if self.holders[position] is None and not self.asking[position]:
            return self._ask(position)
        return []

    def hedge(self) -> list[Ask]:
        return [ask for i, held in enumerate(self.holders)
                if held is None and self.asking[i] == 1 for ask in self._ask(i)]

    def _ask(self, position: int) -> list[Ask]:
        if not self.spare:
            return []
        self.asking[position] += 1
        return [(position, self.spare.pop(0))]

    @property
    def settled(self) -> bool:
        return all(held is not None or not asking
                   for held, asking in zip(self.holders, self.asking))


def shard_fetch_plan(holders: Sequence[str], ranked: Sequence[NodeId],
                     up: AbstractSet[str], k: int, m: int) -> list[Attempt]:
    """Where to look for the shards of one block, best first: each shard on
    its recorded holder (holders that are up first, data shards before
    parity), then every shard on every other node in rank order."""
    recorded = [(i, NodeId(h)) for i, h in enumerate(holders[:k + m]) if h]
    recorded.sort(key=lambda a: (a[1] not in up, a[0]))
    seen = set(recorded)
    search = [(i, n) for i in range(k + m) for n in ranked if (i, n) not in seen]
    return recorded + search


class BlockStore:
    """Uploads and downloads block objects (whole, or as erasure-coded shards)."""

    def __init__(self, view: ClusterView, data: DataClient, replicas: int,
                 limiter: trio.CapacityLimiter, ec: tuple[int, int] = (0, 0)) -> None:
        self.view = view
        self.data = data
        self.replicas = replicas
        self.limiter = limiter
        self.ec_k, self.ec_m = ec

    @property
    def pieces(self) -> int:
        """Objects per block: copies, or data + parity shards."""
        return self.ec_k + self.ec_m if self.ec_k else self.replicas

    async def upload(self, block: bytes | bytearray | memoryview) -> tuple[ObjectId, list[NodeId]]:
        """Store one block; returns its object id and the nodes holding it
        (for an erasure-coded volume, the holder of each shard in order)."""
        objs: list[Parts]
        if not self.ec_k and blockformat.incompressible(block):
            objs = [blockformat.encode_parts(block, compress=False)]     # hashing: here
        else:
            objs = await trio.to_thread.run_sync(self._encode, block, limiter=self.limiter)
        await self.view.refresh()
        oid = new_object_id()
        try:
            return oid, await self._place(oid, objs)
        except DataUnavailable:
            await self.view.refresh(force=True)
            return oid, await self._place(oid, objs)

    def _encode(self, block: bytes | bytearray | memoryview) -> list[Parts]:
        """The object (replicated; its header and payload, not joined) or
        the k + m shard objects of ``block``."""
        if self.ec_k:
            return list(erasure.encode_block(block, self.ec_k, self.ec_m))
        return [blockformat.encode_parts(block)]

    def _stored_id(self, oid: ObjectId, position: int) -> ObjectId:
        """The id under which holder ``position`` stores its piece of ``oid``."""
        return shard_id(oid, position) if self.ec_k else oid

    def _pieces(self, objs: list[Parts]) -> list[Parts]:
        """What each holder stores: a shard each, or the same object on
        ``replicas`` nodes (fewer if fewer active nodes exist)."""
        if self.ec_k:
            return objs
        return objs * min(self.replicas, self.view.active_count())

    async def _place(self, oid: ObjectId, objs: list[Parts]) -> list[NodeId]:
        """Put each piece (copy or shard) on its own writable node (see
        ``Placing``); the holders, position by position."""
        pieces = self._pieces(objs)
        candidates = self.view.ranked(oid)
        if not self.ec_k and write_quorum(len(pieces)) <= len(candidates) < len(pieces):
            pieces = pieces[:len(candidates)]      # a node is down: degraded, repaired later
        if not pieces or len(candidates) < len(pieces):
            raise DataUnavailable(f"{len(candidates)} writable data nodes for "
                                  f"{len(pieces) or self.pieces} pieces of a block")
        placing = Placing(len(pieces), candidates)
        await self._put_pieces(oid, pieces, placing)
        stored = [n for n in placing.holders if n is not None]
        degraded = not self.ec_k and write_quorum(len(pieces)) <= len(stored) < len(pieces)
        if None in placing.holders and not degraded:   # not acknowledged: take it back
            await self.discard(oid, [n or "" for n in placing.holders])
        for position, node_id in placing.extra:     # stored twice over: not needed
            await self.discard(oid, [""] * position + [node_id])
        if degraded:
            log.warning("block %s stored on %d of %d nodes; repair adds the missing copies",
                        oid, len(stored), len(pieces))
            return stored
        return self._check_placed(placing.holders, placing.full)

    def _check_placed(self, placed: list[NodeId | None], full: int) -> list[NodeId]:
        stored = [n for n in placed if n is not None]
        if len(stored) < len(placed):
            if full and full + len(stored) >= sum(n.writable for n in self.view.nodes.values()):
                raise NoSpace("every data node is full")
            what = "shards" if self.ec_k else "copies"
            raise DataUnavailable(f"only {len(stored)} of {len(placed)} {what} could be stored")
        return stored

    async def _put_pieces(self, oid: ObjectId, pieces: list[Parts], placing: Placing) -> None:
        """Run ``placing`` until it settles: PUT what it asks, report each
        answer, hedge every ``PUT_HEDGE_AFTER``; then cancel what is still out."""
        send, receive = trio.open_memory_channel[tuple[Ask, NodeError | None]](math.inf)
        async with trio.open_nursery() as nursery:
            asks = placing.first
            hedge_at = trio.current_time() + PUT_HEDGE_AFTER
            while True:
                for ask in asks:
                    nursery.start_soon(self._put_piece, oid, pieces, ask, send)
                if placing.settled:
                    break
                with trio.move_on_at(hedge_at) as waiting:
                    (position, node), error = await receive.receive()
                if waiting.cancelled_caught:
                    asks, hedge_at = placing.hedge(), hedge_at + PUT_HEDGE_AFTER
                    if asks:
                        log.info("storing %s: no answer yet, also asking %s", oid,
                                 ", ".join(n.node_id for _, n in asks))
                elif error is None:
                    asks = []
                    placing.stored(position, node)
                else:
                    asks = placing.failed(position, isinstance(error, NodeFull))
            nursery.cancel_scope.cancel()

    async def _put_piece(self, oid: ObjectId, pieces: list[Parts], ask: Ask,
                         answers: trio.MemorySendChannel[tuple[Ask, NodeError | None]]
                         ) -> None:
        position, node = ask
        object_id = self._stored_id(oid, position)
        try:
            await self.data.put(node.address, object_id, pieces[position])
        except NodeError as exc:
            log.warning("storing %s on %s failed: %s", object_id, node.node_id, exc)
            answers.send_nowait((ask, exc))
        else:
            answers.send_nowait((ask, None))

    async def download(self, oid: ObjectId, holders: Sequence[str]) -> bytes | memoryview:
        """The verified, decoded block ``oid``, from any node that has it
        (or from any k of its shards)."""
        await self.view.refresh()
        block: bytes | memoryview | None
        if self.ec_k:
            block = await self._download_shards(oid, holders)
        else:
            block = await self._download_copy(oid, holders, functools.partial(self._whole, oid))
        if block is None:
            await self.view.refresh(force=True)
            raise DataUnavailable(f"no data node returned a good copy of object {oid}")
        return block

    async def download_pieces(self, oid: ObjectId, holders: Sequence[str], first: int,
                              last: int) -> tuple[int, bytes | memoryview]:
        """Pieces ``first`` .. ``last`` of block ``oid`` (``blockformat``),
        verified and decoded: where they start in the block, and their
        bytes.  The whole block (from 0) where there are no pieces to read:
        an erasure-coded volume, an object of format 1, an older node."""
        if self.ec_k:
            return 0, await self.download(oid, holders)
        await self.view.refresh()
        got = await self._download_copy(
            oid, holders, functools.partial(self._pieces_of, oid, first, last))
        if got is None:
            await self.view.refresh(force=True)
            raise DataUnavailable(f"no data node returned good pieces of object {oid}")
        return got

    async def _download_copy(self, oid: ObjectId, holders: Sequence[str],
                             read: Callable[[DataNode], Awaitable[T]]) -> T | None:
        """Ask the nodes in fetch order (``read`` one of them); a failure
        moves on at once, a node silent for ``HEDGE_AFTER`` gets company
        (the next node is asked too: a hung node costs a moment, not a
        timeout); the first good answer wins."""
        order = self._fetch_order(oid, holders)
        send, receive = trio.open_memory_channel[T | None](len(order))
        async with trio.open_nursery() as nursery:
            running = 0
            for i, node in enumerate(order):
                nursery.start_soon(self._fetch_copy, node, oid, read, send)
                running += 1
                last = i == len(order) - 1
                with trio.move_on_after(math.inf if last else HEDGE_AFTER) as waiting:
                    while running:
                        got = await receive.receive()
                        running -= 1
                        if got is not None:
                            nursery.cancel_scope.cancel()
                            return got
                        if not last:
                            break           # that one failed: ask the next now
                if waiting.cancelled_caught:
                    self.view.suspect_node(node.node_id)     # silent: ask it last a while
            nursery.cancel_scope.cancel()
        return None

    async def _fetch_copy(self, node: DataNode, oid: ObjectId,
                          read: Callable[[DataNode], Awaitable[T]],
                          send: trio.MemorySendChannel[T | None]) -> None:
        got: T | None = None
        try:
            got = await read(node)
        except (NodeError, blockformat.CorruptedObject) as exc:
            if isinstance(exc, NodeUnavailable):
                self.view.suspect_node(node.node_id)
            log.warning("reading %s from %s failed: %s", oid, node.node_id, exc)
        send.send_nowait(got)

    async def _whole(self, oid: ObjectId, node: DataNode) -> bytes | memoryview:
        """``node``'s copy of ``oid``, decoded (which checks every byte: the
        node need not check it first).  If it is bad, the copy is bad on the
        node's disk (the node checks it now, and puts it aside) or was
        damaged on the way (the copy asked for again is good)."""
        try:
            return await self._decoded(node, oid, node_verifies=False)
        except blockformat.CorruptedObject as exc:
            log.warning("%s from %s is corrupt (%s); asking it to check its copy",
                        oid, node.node_id, exc)
            return await self._decoded(node, oid, node_verifies=True)

    async def _pieces_of(self, oid: ObjectId, first: int, last: int, node: DataNode
                         ) -> tuple[int, bytes | memoryview]:
        """``node``'s pieces ``first`` .. ``last`` of ``oid``, checked and
        decoded (in this thread when small: a thread's round trip costs more
        than checking 64 KiB).  If they are bad, the node is asked for the
        whole object the checked way, as ``_whole`` does."""
        body = await self.data.get_pieces(node.address, oid, first, last)
        try:
            if len(body) <= DECODE_HERE:
                return blockformat.decode_range(body, first, last)
            return await trio.to_thread.run_sync(blockformat.decode_range, body, first, last,
                                                 limiter=self.limiter)
        except blockformat.CorruptedObject as exc:
            log.warning("pieces %d-%d of %s from %s are corrupt (%s); asking it to check "
                        "its copy", first, last, oid, node.node_id, exc)
            return 0, await self._decoded(node, oid, node_verifies=True)

    async def _decoded(self, node: DataNode, oid: ObjectId, *,
                       node_verifies: bool) -> bytes | memoryview:
        """``node``'s copy of object ``oid``, decoded (which verifies it)."""
        obj = await self.data.get_buffer(node.address, oid, node_verifies=node_verifies)
        if blockformat.decoding_is_checking(memoryview(obj)):
            return blockformat.decode_view(obj)                  # hashing: here
        return await trio.to_thread.run_sync(blockformat.decode_view, obj, limiter=self.limiter)

    def _fetch_order(self, oid: ObjectId, holders: Sequence[str]) -> list[DataNode]:
        known = [self.view.nodes[NodeId(h)] for h in holders if h in self.view.nodes]
        first = sorted(known, key=lambda n: (not n.up, self.view.suspected(n.node_id)))
        rest = [n for n in self.view.ranked(oid, writable=False) if n not in first]
        return first + rest

    # ----- erasure-coded blocks
    async def _download_shards(self, oid: ObjectId, holders: Sequence[str]) -> bytes | None:
        """Fetch shards in waves (as many as still needed, in plan order)
        until k verify, then decode; None if the plan runs out first."""
        k, m = self.ec_k, self.ec_m
        ranked = [n.node_id for n in self.view.ranked(oid, writable=False)]
        up = {n.node_id for n in self.view.nodes.values() if n.up}
        plan = shard_fetch_plan(holders, ranked, up, k, m)
        good: dict[int, erasure.Shard] = {}
        while len(good) < k:
            wave = _next_wave(plan, k - len(good), good)
            if not wave:
                return None
            await self._fetch_wave(oid, wave, good)
        try:
            return await trio.to_thread.run_sync(erasure.decode_shards, list(good.values()),
                                                 k, m, limiter=self.limiter)
        except erasure.ErasureError as exc:
            log.error("decoding %s from shards %s failed: %s", oid, sorted(good), exc)
            return None

    async def _fetch_wave(self, oid: ObjectId, wave: list[Attempt],
                          good: dict[int, erasure.Shard]) -> None:
        async def fetch(index: int, node_id: NodeId) -> None:
            node = self.view.nodes.get(node_id)
            if node is None:
                return
            try:
                obj = await self.data.get(node.address, shard_id(oid, index))
                good[index] = await trio.to_thread.run_sync(
                    erasure.verify_shard, obj, self.ec_k, self.ec_m, index,
                    limiter=self.limiter)
            except (NodeError, erasure.CorruptShard) as exc:
                log.warning("reading shard %d of %s from %s failed: %s",
                            index, oid, node_id, exc)

        async with trio.open_nursery() as nursery:
            for index, node_id in wave:
                nursery.start_soon(fetch, index, node_id)

    async def discard(self, oid: ObjectId, holders: Sequence[str]) -> None:
        """Best-effort removal of an object that was never committed: from
        every holder the map has up, in parallel, for at most
        ``DISCARD_WITHIN`` (what is left behind is the orphan collector's job;
        a caller never waits a timeout on a node that is gone)."""
        async def delete(node: DataNode, object_id: ObjectId) -> None:
            try:
                await self.data.delete(node.address, object_id)
            except NodeError as exc:
                log.info("could not discard %s on %s: %s", object_id, node.node_id, exc)

        with trio.move_on_after(DISCARD_WITHIN):
            async with trio.open_nursery() as nursery:
                for position, node_id in enumerate(holders):
                    node = self.view.nodes.get(NodeId(node_id))
                    if node is not None and node.up:
                        nursery.start_soon(delete, node, self._stored_id(oid, position))


def _next_wave(plan: list[Attempt], need: int, good: dict[int, erasure.Shard]
               ) -> list[Attempt]:
    """Take from ``plan`` the first ``need`` attempts for distinct shards
    not yet good (attempts for good shards are dropped, others kept)."""
    wave: list[Attempt] = []
    rest: list[Attempt] = []
    for attempt in plan:
        index = attempt[0]
        if index in good:
            continue
        if len(wave) < need and all(index != i for i, _ in wave):
            wave.append(attempt)
        else:
            rest.append(attempt)
    plan[:] = rest
    return wave
