"""The collector: deletes objects that no block map references any more.

How this works
--------------
Metadata operations that drop a block (overwrite, truncate, unlink, purge)
queue its object in ``pending_deletes`` in the same transaction.  The
collector reads that queue, deletes each object from every node that holds
it (an absent object counts as deleted), and only then removes it from the
queue with ``forget_deleted``.  An object whose holder is down stays queued
and is retried on the next pass, so a node that comes back loses its stale
copies too.  Used by the metadata node's background loop and by
``objfs-admin gc``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from .dataclient import DataClient, NodeError
from .ids import parse_object_id
from .metaclient import MetaClient

log = logging.getLogger(__name__)
CONCURRENT_DELETES = 8


async def _delete_everywhere(data: DataClient, addresses: dict[str, str],
                             oid: str, holders: list[str]) -> bool:
    for node_id in holders:
        address = addresses.get(node_id)
        if address is None:
            continue      # node removed from the cluster: nothing left to delete
        try:
            await data.delete(address, parse_object_id(oid))
        except NodeError as exc:
            log.info("could not delete %s from %s yet: %s", oid, node_id, exc)
            return False
    return True


async def collect_once(meta: MetaClient, data: DataClient, limit: int = 256,
                       grace: float = 0.0) -> int:
    """One pass over the queue; returns how many objects were deleted.

    Only objects queued at least ``grace`` seconds ago are deleted, so that a
    reader that fetched the old block map a moment ago still finds them.
    """
    before = time.time_ns() - int(grace * 1e9)
    rows: list[Any] = await meta.call("pending_deletes", limit=limit, before_ns=before)
    if not rows:
        return 0
    cmap = await meta.call("cluster_map")
    addresses = {n["node_id"]: n["address"] for n in cmap["nodes"]}
    done: list[str] = []
    slots = trio.CapacityLimiter(CONCURRENT_DELETES)    # never crowd out live traffic
    async with trio.open_nursery() as nursery:
        async def one(oid: str, holders: list[str]) -> None:
            async with slots:
                if await _delete_everywhere(data, addresses, oid, holders):
                    done.append(oid)
        for oid, holders in rows:
            nursery.start_soon(one, oid, holders)
    if done:
        await meta.call("forget_deleted", oids=done)
    return len(done)


async def collect_all(meta: MetaClient, data: DataClient, grace: float = 0.0) -> int:
    total = 0
    while True:
        n = await collect_once(meta, data, grace=grace)
        total += n
        if n == 0:
            return total


async def collect_forever(meta: MetaClient, data: DataClient, *, interval: float,
                          grace: float) -> None:
    """The metadata node's background collector; failures are logged and retried."""
    while True:
        await trio.sleep(interval)
        try:
            await collect_all(meta, data, grace=grace)
        except Exception as exc:      # a node or the RPC failed: next round
            log.warning("collector pass failed: %s", exc)
