"""Moving blocks between the mount and the data nodes.

How this works
--------------
``ClusterView`` keeps the cluster map (data nodes, their addresses and
state) fetched from the metadata node, refreshed every few seconds and at
once after a node fails us.

``BlockStore.upload`` frames a block (zstd + BLAKE3, in a worker thread),
ranks the data nodes for a new object id by rendezvous hashing, and PUTs
the object to the first ``copies`` nodes in parallel.  A node that fails is
replaced by the next one in rank order; the block is acknowledged only when
``copies`` distinct nodes hold it durably (``copies`` is the volume's replica
count, or the number of nodes when fewer exist).  The client sends each
copy itself: on loopback one trio process pushes ~850 MiB/s of PUTs, far
above what the rest of the path delivers, so a chain (pipeline) would buy
nothing here and cost latency and mid-chain failure handling.

``BlockStore.download`` tries the nodes recorded in the block map, then the
rest in rank order, and returns the first copy whose checksum verifies; a
refused connection, a timeout, a missing or a corrupt copy all fall through
to the next.  Only when no copy verifies does the caller see an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import trio

from storagenode import blockformat
from storagenode.dataclient import DataClient, NodeError, NodeFull
from storagenode.ids import NodeId, ObjectId, new_object_id
from storagenode.metaclient import MetaClient
from storagenode.placement import NodeSlot, rank

log = logging.getLogger(__name__)

MAP_REFRESH = 5.0


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


class ClusterView:
    """The mount's copy of the cluster map."""

    def __init__(self, meta: MetaClient) -> None:
        self.meta = meta
        self.nodes: dict[NodeId, DataNode] = {}
        self.epoch = -1
        self._fetched_at = -1e9
        self._lock = trio.Lock()

    async def refresh(self, force: bool = False) -> None:
        async with self._lock:
            if not force and trio.current_time() - self._fetched_at < MAP_REFRESH:
                return
            cmap = await self.meta.call("cluster_map")
            self.nodes = {n["node_id"]: DataNode(n["node_id"], n["address"], n["state"] == "up",
                                                 float(n["weight"]), n["domain"])
                          for n in cmap["nodes"]}
            self.epoch = cmap["epoch"]
            self._fetched_at = trio.current_time()

    def ranked(self, oid: ObjectId, *, up_only: bool = True) -> list[DataNode]:
        slots = [NodeSlot(n.node_id, n.weight, n.domain) for n in self.nodes.values()
                 if n.up or not up_only]
        return [self.nodes[s.node_id] for s in rank(oid, slots)]


class BlockStore:
    """Uploads and downloads block objects."""

    def __init__(self, view: ClusterView, data: DataClient, replicas: int,
                 limiter: trio.CapacityLimiter) -> None:
        self.view = view
        self.data = data
        self.replicas = replicas
        self.limiter = limiter

    async def upload(self, block: bytes | bytearray) -> tuple[ObjectId, list[NodeId]]:
        """Store one block; returns its object id and the nodes holding it."""
        obj = await trio.to_thread.run_sync(blockformat.encode, block, limiter=self.limiter)
        await self.view.refresh()
        oid = new_object_id()
        try:
            return oid, await self._place(oid, obj)
        except DataUnavailable:
            await self.view.refresh(force=True)
            return oid, await self._place(oid, obj)

    async def _place(self, oid: ObjectId, obj: bytes) -> list[NodeId]:
        candidates = self.view.ranked(oid)
        want = min(self.replicas, len(self.view.nodes))
        if want == 0:
            raise DataUnavailable("no data nodes are registered")
        stored: list[NodeId] = []
        full = 0
        while len(stored) < want and candidates:
            batch, candidates = candidates[:want - len(stored)], candidates[want - len(stored):]
            results = await self._put_all(batch, oid, obj)
            stored += [n.node_id for n, r in zip(batch, results) if r is None]
            full += sum(isinstance(r, NodeFull) for r in results)
        if len(stored) < want:
            if full and full + len(stored) >= len(self.view.nodes):
                raise NoSpace("every data node is full")
            raise DataUnavailable(f"only {len(stored)} of {want} copies could be stored")
        return stored

    async def _put_all(self, nodes: Sequence[DataNode], oid: ObjectId,
                       obj: bytes) -> list[Exception | None]:
        results: list[Exception | None] = [None] * len(nodes)

        async def put(i: int, node: DataNode) -> None:
            try:
                await self.data.put(node.address, oid, obj)
            except NodeError as exc:
                log.warning("storing %s on %s failed: %s", oid, node.node_id, exc)
                results[i] = exc

        async with trio.open_nursery() as nursery:
            for i, node in enumerate(nodes):
                nursery.start_soon(put, i, node)
        return results

    async def download(self, oid: ObjectId, holders: Sequence[str]) -> bytes:
        """The verified, decoded block ``oid``, from any node that has it."""
        await self.view.refresh()
        for node in self._fetch_order(oid, holders):
            try:
                obj = await self.data.get(node.address, oid)
                return await trio.to_thread.run_sync(blockformat.decode, obj,
                                                     limiter=self.limiter)
            except (NodeError, blockformat.CorruptedObject) as exc:
                log.warning("reading %s from %s failed: %s", oid, node.node_id, exc)
        await self.view.refresh(force=True)
        raise DataUnavailable(f"no data node returned a good copy of object {oid}")

    def _fetch_order(self, oid: ObjectId, holders: Sequence[str]) -> list[DataNode]:
        known = [self.view.nodes[NodeId(h)] for h in holders if h in self.view.nodes]
        first = [n for n in known if n.up] + [n for n in known if not n.up]
        rest = [n for n in self.view.ranked(oid, up_only=False) if n not in first]
        return first + rest

    async def discard(self, oid: ObjectId, holders: Sequence[str]) -> None:
        """Best-effort removal of an object that was never committed (left
        behind on failure: the orphan collector's job)."""
        for node_id in holders:
            node = self.view.nodes.get(NodeId(node_id))
            if node is None:
                continue
            try:
                await self.data.delete(node.address, oid)
            except NodeError as exc:
                log.info("could not discard %s on %s: %s", oid, node_id, exc)
