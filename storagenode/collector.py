"""The collector: deletes objects that no block map references any more.

How this works
--------------
Metadata operations that drop a block (overwrite, truncate, unlink, purge)
queue its object in ``pending_deletes`` in the same transaction.  The
collector reads that queue, deletes each object from every node that holds
it (an absent object counts as deleted), and only then removes it from the
queue with ``forget_deleted``.  An object whose holder is down stays queued
and is retried on the next pass, so a node that comes back loses its stale
copies too; a holder that has been down longer than the repair grace
period counts as done (its copy, if it ever returns, is an orphan).

The **orphan scan** finds objects on the nodes that the metadata does not
account for: left by a client that died between upload and commit, by a
node that was written off and came back, or by a failed delete.  It lists
each up node's objects and, for each one older than the orphan grace
period (its age is in its id, ``ids.object_age_ns``):

- no block map uses it (or only pending_deletes does): delete it;
- a block map uses it but does not list this node: **adopt** it (add the
  node to the holders, compare-and-set) rather than delete it, because it
  may be the last good copy; repair then trims any surplus safely;
- an erasure-coded shard whose position is held by another node: delete it
  only when that node is up and holds its own copy.

Why the grace period makes uploads safe: ``commit_blocks`` refuses objects
older than ``commit_max_age`` (the client then stores the block again), and
the scan only takes objects older than twice that, so an object that can
still be committed is never collected.

Used by the metadata node's background loops and by ``objfs-admin gc``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import trio

from .dataclient import DataClient, NodeError
from .ids import ObjectId, object_age_ns, parse_object_id, shard_id, split_shard_id
from .metaclient import MetaClient

log = logging.getLogger(__name__)
CONCURRENT_DELETES = 8


async def _delete_everywhere(data: DataClient, addresses: dict[str, str | None],
                             oid: str, holders: list[str]) -> bool:
    for node_id in holders:
        address = addresses.get(node_id)
        if address is None:
            continue      # node removed or written off: the orphan scan's job
        try:
            await data.delete(address, parse_object_id(oid))
        except NodeError as exc:
            log.info("could not delete %s from %s yet: %s", oid, node_id, exc)
            return False
    return True


def _addresses(cmap: dict[str, Any], dead_after: float) -> dict[str, str | None]:
    """Node id -> address; None for a node down longer than ``dead_after``."""
    return {n["node_id"]: None if n["state"] == "down" and n["silent"] > dead_after
            else n["address"] for n in cmap["nodes"]}


async def collect_once(meta: MetaClient, data: DataClient, limit: int = 256,
                       grace: float = 0.0, dead_after: float = float("inf")) -> int:
    """One pass over the queue; returns how many objects were deleted.

    Only objects queued at least ``grace`` seconds ago are deleted, so that a
    reader that fetched the old block map a moment ago still finds them.
    """
    before = time.time_ns() - int(grace * 1e9)
    rows: list[Any] = await meta.call("pending_deletes", limit=limit, before_ns=before)
    if not rows:
        return 0
    addresses = _addresses(await meta.call("cluster_map"), dead_after)
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


async def collect_all(meta: MetaClient, data: DataClient, grace: float = 0.0,
                      dead_after: float = float("inf")) -> int:
    total = 0
    while True:
        n = await collect_once(meta, data, grace=grace, dead_after=dead_after)
        total += n
        if n == 0:
            return total


async def collect_forever(meta: MetaClient, data: DataClient, *, interval: float,
                          grace: float, dead_after: float) -> None:
    """The metadata node's background collector; failures are logged and retried."""
    while True:
        await trio.sleep(interval)
        try:
            await collect_all(meta, data, grace=grace, dead_after=dead_after)
        except Exception as exc:      # a node or the RPC failed: next round
            log.warning("collector pass failed: %s", exc)


# ---------------------------------------------------------------- orphans

def base_id(name: str) -> str:
    return split_shard_id(name)[0]


def shard_index(name: str) -> int | None:
    return split_shard_id(name)[1]


ORPHAN_PAGE = 1000


def orphan_verdict(name: str, node_id: str, ref: dict[str, Any] | None) -> str:
    """What to do with object ``name`` found on ``node_id`` (old enough):
    'keep', 'delete', 'adopt', or 'check' (an EC shard whose position is
    held elsewhere: delete only if that holder has its copy)."""
    if ref is None or "nodes" not in ref:
        return "delete"
    holders: list[str] = ref["nodes"]
    index = shard_index(name)
    if index is None:
        return "keep" if node_id in holders else "adopt"
    if index >= len(holders):
        return "delete"
    if holders[index] == node_id:
        return "keep"
    return "adopt" if holders[index] == "" else "check"


@dataclass
class OrphanReport:
    scanned: int = 0
    deleted: int = 0
    adopted: int = 0
    young: int = 0
    missing: int = 0        # listed holders found not to hold their piece (dropped)


async def scan_orphans(meta: MetaClient, data: DataClient, *, grace: float,
                       dry_run: bool = False, report: OrphanReport | None = None
                       ) -> OrphanReport:
    """One orphan scan over every up data node."""
    report = report or OrphanReport()
    cmap = await meta.call("cluster_map")
    up = {n["node_id"]: n["address"] for n in cmap["nodes"] if n["state"] == "up"}
    listings: dict[str, set[str]] = {}
    for node_id, address in up.items():
        after = ""
        names: set[str] = set()
        while True:
            listing, more = await data.list(address, after=after, limit=ORPHAN_PAGE)
            names.update(o["oid"] for o in listing)
            await _judge_page(meta, data, node_id, up, [o["oid"] for o in listing], grace,
                              dry_run, report)
            if not more or not listing:
                break
            after = listing[-1]["oid"]
        listings[node_id] = names
    if not dry_run:
        report.missing += await drop_missing(meta, data, up, listings)
    return report


async def drop_missing(meta: MetaClient, data: DataClient, up: dict[str, str],
                       listings: dict[str, set[str]]) -> int:
    """Holders the block map names that do not hold their piece (a wiped or
    damaged store the node never reported): confirmed one by one (HEAD, so
    a piece stored after its node was listed is not mistaken), then dropped
    from the block map so that repair copies them again."""
    ec = {v["vol"]: v["ec_k"] > 0 for v in await meta.call("volumes")}
    suspects: list[tuple[str, str]] = []
    after: list[int] = [0, 0, -1]
    while True:
        rows = await meta.call("scan_blocks", after=after, limit=ORPHAN_PAGE)
        for vol, _ino, _idx, oid, holders in rows:
            for i, node in enumerate(holders):
                name = shard_id(oid, i) if ec[vol] else oid
                if node in listings and name not in listings[node]:
                    suspects.append((node, name))
        if len(rows) < ORPHAN_PAGE:
            break
        after = rows[-1][:3]
    gone: dict[str, list[str]] = {}
    for node, name in suspects:
        if await data.head(up[node], ObjectId(name)) is None:
            gone.setdefault(node, []).append(name)
    for node, names in gone.items():
        log.warning("node %s lost %d pieces it never reported; repair restores them",
                    node, len(names))
        await meta.call("drop_copies", node_id=node, oids=names)
    return sum(len(names) for names in gone.values())


async def _judge_page(meta: MetaClient, data: DataClient, node_id: str, up: dict[str, str],
                      names: list[str], grace: float, dry_run: bool,
                      report: OrphanReport) -> None:
    now = time.time_ns()
    old = [n for n in names if object_age_ns(base_id(n), now) > grace * 1e9]
    report.scanned += len(names)
    report.young += len(names) - len(old)
    if not old:
        return
    refs = await meta.call("object_refs", oids=sorted({base_id(n) for n in old}))
    for name in old:
        ref = refs.get(base_id(name))
        verdict = orphan_verdict(name, node_id, ref)
        if verdict == "check":
            verdict = await _other_holder_has(data, up, name, ref)
        if dry_run or verdict == "keep":
            continue
        if verdict == "delete":
            await data.delete(up[node_id], ObjectId(name))
            report.deleted += 1
        elif await _adopt(meta, base_id(name), node_id, shard_index(name), ref):
            report.adopted += 1


async def _other_holder_has(data: DataClient, up: dict[str, str], name: str,
                            ref: Any) -> str:
    index = shard_index(name)
    holder = ref["nodes"][index] if index is not None else ""
    if holder not in up:
        return "keep"
    try:
        return "delete" if await data.head(up[holder], ObjectId(name)) is not None else "keep"
    except NodeError:
        return "keep"


async def _adopt(meta: MetaClient, oid: str, node_id: str, index: int | None,
                 ref: Any) -> bool:
    old: list[str] = ref["nodes"]
    new = list(old)
    if index is None:
        new.append(node_id)
    else:
        new[index] = node_id
    return bool(await meta.call("set_holders", oid=oid, old=old, new=new))


async def orphans_forever(meta: MetaClient, data: DataClient, *, interval: float,
                          grace: float, report: OrphanReport) -> None:
    while True:
        await trio.sleep(interval)
        try:
            await scan_orphans(meta, data, grace=grace, report=report)
        except Exception as exc:
            log.warning("orphan scan failed: %s", exc)
