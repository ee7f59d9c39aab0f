"""Keeping every block at full redundancy on the right nodes: repair,
rebalance and drain are one loop.

How this works
--------------
For every block the *planner* (pure, no I/O) compares where the block's
pieces are with where they should be:

- a node is **eligible** to hold data when the operator has it ``active``
  and it is not **dead**; a node is dead when it has been silent longer than
  the repair grace period (a node that is merely suspect or briefly down is
  waited for, so a reboot moves nothing);
- the **desired** holders of a replicated block are ``placement.place`` of
  its object id over the eligible nodes (rendezvous hashing: adding a node
  moves to it only the objects for which it now ranks in the top R, nothing
  moves between old nodes).  An erasure-coded block has positions (shard i on
  ``nodes[i]``): a position keeps its node while that node is still desired;
  only positions whose node is gone, dead, draining or out of the desired set
  get a desired node not used yet;
- pieces are **copied** (replicated: from any reachable holder; erasure
  coded: rebuilt from k reachable shards) onto desired nodes that are up and
  lack them, and the new holder list is written with ``set_holders``, a
  compare-and-set: if the block changed meanwhile (overwritten, freed, or
  the orphan scan adopted a copy) the copies are left to the orphan scan,
  which deletes or adopts each by the block map of that moment (deleting
  them here could take away a copy that the map has named since: a
  returning node's stale copy is both "made" here, by an idempotent PUT,
  and adopted there);
- only once every desired node holds its piece are **surplus** copies
  dropped (deleted where the node answers; a dead node's copy is left for
  the orphan scan when it returns).  So redundancy never drops below what
  it was: the last good copy is never deleted.

The *executor* (async) scans the block map page by page through the
metadata RPC, runs the plans with bounded concurrency and keeps counters
for metrics and ``objfs-admin status``.  A pass that fails on one block logs
it and goes on; the next pass retries.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import trio

from . import blockformat, erasure
from .dataclient import DataClient, NodeError, NodeUnavailable
from .ids import ObjectId, shard_id
from .metaclient import MetaClient
from .placement import NodeSlot, place

log = logging.getLogger(__name__)

PAGE = 512                  # blocks per scan_blocks call
SCAN_RATE = 2000.0          # blocks a pass plans per second at most (see Repairer.run_pass)
CONCURRENT_REPAIRS = 4      # blocks repaired at once (never crowd out clients)
PROBE_SECONDS = 5.0         # a copy target must answer /health this fast (see Repairer._copy)


# ---------------------------------------------------------------- pure planning

@dataclass(frozen=True)
class NodeView:
    """A data node as the planner sees it."""
    node_id: str
    address: str
    state: str          # up / suspect / down
    admin: str          # active / draining
    silent: float       # seconds since last heard
    weight: float = 1.0
    domain: str = ""


@dataclass(frozen=True)
class Layout:
    """How a volume stores a block: ``k`` = 0 for replication."""
    replicas: int
    k: int = 0
    m: int = 0

    @property
    def pieces(self) -> int:
        return self.k + self.m if self.k else self.replicas


@dataclass
class Plan:
    """What to do for one block.  ``copies`` are (position, target node);
    for a replicated block the position is None.  ``final`` is the holder
    list to record once copies are made; ``deletes`` are (object, node) to
    remove afterwards (surplus copies on reachable nodes)."""
    copies: list[tuple[int | None, str]] = field(default_factory=list)
    final: list[str] = field(default_factory=list)
    deletes: list[tuple[str, str]] = field(default_factory=list)
    good: int = 0       # pieces on live holders now
    blocked: bool = False   # a desired node is not up yet: partial plan only

    @property
    def idle(self) -> bool:
        return not self.copies and not self.deletes


def is_dead(node: NodeView | None, grace: float) -> bool:
    return node is None or (node.state == "down" and node.silent > grace)


def desired_nodes(oid: str, nodes: Mapping[str, NodeView], count: int,
                  grace: float) -> list[str]:
    slots = [NodeSlot(n.node_id, n.weight, n.domain) for n in nodes.values()  # type: ignore[arg-type]
             if n.admin == "active" and not is_dead(n, grace)]
    return list(place(ObjectId(oid), slots, count))


def plan_replicated(oid: str, holders: Sequence[str], nodes: Mapping[str, NodeView],
                    layout: Layout, grace: float) -> Plan:
    want = desired_nodes(oid, nodes, layout.replicas, grace)
    live = [h for h in holders if not is_dead(nodes.get(h), grace)]
    plan = Plan(good=len(live))
    for target in want:
        if target in holders:
            continue
        if nodes[target].state == "up":
            plan.copies.append((None, target))
        else:
            plan.blocked = True
    placed = [h for h in holders if h in want] + [t for _, t in plan.copies]
    if plan.blocked or len(placed) < len(want):
        plan.final = list(holders) + [t for _, t in plan.copies]
        return plan
    plan.final = placed
    plan.deletes = [(oid, h) for h in holders if h not in want and _reachable(nodes, h)]
    return plan


def plan_erasure(oid: str, holders: Sequence[str], nodes: Mapping[str, NodeView],
                 layout: Layout, grace: float) -> Plan:
    want = desired_nodes(oid, nodes, layout.pieces, grace)
    positions = list(holders) + [""] * (layout.pieces - len(holders))
    keep = [h if h in want else "" for h in positions]
    spare = [n for n in want if n not in keep]
    plan = Plan(good=sum(1 for h in positions if h and not is_dead(nodes.get(h), grace)))
    final = list(positions)
    for i, h in enumerate(keep):
        if h:
            continue
        if not spare:
            plan.blocked = True
            continue
        target = spare.pop(0)
        if nodes[target].state != "up":
            plan.blocked = True
            continue
        plan.copies.append((i, target))
        final[i] = target
    plan.final = final
    plan.deletes = [(shard_id(oid, i), h) for i, h in enumerate(positions)
                    if h and final[i] != h and _reachable(nodes, h)]
    return plan


def _reachable(nodes: Mapping[str, NodeView], node_id: str) -> bool:
    node = nodes.get(node_id)
    return node is not None and node.state == "up"


def plan_block(oid: str, holders: Sequence[str], nodes: Mapping[str, NodeView],
               layout: Layout, grace: float) -> Plan:
    if layout.k:
        return plan_erasure(oid, holders, nodes, layout, grace)
    return plan_replicated(oid, holders, nodes, layout, grace)


# ---------------------------------------------------------------- progress

@dataclass
class RepairStatus:
    """What the last and the current pass found and did (soft state)."""
    passes: int = 0
    pass_started: float = 0.0
    last_pass_seconds: float = 0.0
    scanned: int = 0            # blocks seen in the current pass
    total_blocks: int = 0       # blocks seen in the last complete pass
    degraded: int = 0           # blocks with fewer live pieces than promised (last pass)
    misplaced: int = 0          # blocks not on their desired nodes (last pass)
    pending: int = 0            # degraded + misplaced found so far this pass
    copies_made: int = 0        # pieces copied or rebuilt, ever
    bytes_copied: int = 0
    deleted: int = 0            # surplus pieces removed, ever
    failures: int = 0

    def as_map(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---------------------------------------------------------------- execution

class Repairer:
    """Runs plans against the real nodes, through the metadata RPC."""

    def __init__(self, meta: MetaClient, data: DataClient, *, grace: float,
                 status: RepairStatus | None = None, rate: float = SCAN_RATE) -> None:
        self.meta = meta
        self.data = data
        self.grace = grace
        self.rate = rate
        self.status = status or RepairStatus()
        self._slots = trio.Semaphore(CONCURRENT_REPAIRS)

    async def run_pass(self) -> RepairStatus:
        """One pass over every block of every volume, at most ``rate``
        blocks a second: planning a block costs the metadata node's process
        some 50 microseconds, so an unpaced pass over a million blocks would
        take its CPU for most of a minute, every pass, away from the
        clients' requests."""
        st = self.status
        st.pass_started, st.scanned, st.pending = time.monotonic(), 0, 0
        begun = trio.current_time()
        degraded = misplaced = 0
        nodes = await self._nodes()
        layouts = await self._layouts()
        after: list[int] = [0, 0, -1]
        async with trio.open_nursery() as nursery:
            while True:
                rows = await self.meta.call("scan_blocks", after=after, limit=PAGE)
                for vol, ino, idx, oid, holders in rows:
                    plan = plan_block(oid, holders, nodes, layouts[vol], self.grace)
                    degraded += plan.good < layouts[vol].pieces
                    misplaced += not plan.idle
                    st.pending = degraded + misplaced
                    if not plan.idle:
                        await self._slots.acquire()
                        nursery.start_soon(self._carry_out, oid, holders, plan, nodes,
                                           layouts[vol])
                st.scanned += len(rows)
                if len(rows) < PAGE:
                    break
                after = rows[-1][:3]
                await trio.sleep_until(begun + st.scanned / self.rate)
        st.passes += 1
        st.total_blocks, st.degraded, st.misplaced = st.scanned, degraded, misplaced
        st.last_pass_seconds = time.monotonic() - st.pass_started
        return st

    async def _nodes(self) -> dict[str, NodeView]:
        cmap = await self.meta.call("cluster_map")
        return {n["node_id"]: NodeView(n["node_id"], n["address"], n["state"], n["admin"],
                                       float(n["silent"]), float(n["weight"]), n["domain"])
                for n in cmap["nodes"]}

    async def _layouts(self) -> dict[int, Layout]:
        return {v["vol"]: Layout(v["replicas"], v["ec_k"], v["ec_m"])
                for v in await self.meta.call("volumes")}

    async def _carry_out(self, oid: str, holders: list[str], plan: Plan,
                         nodes: Mapping[str, NodeView], layout: Layout) -> None:
        try:
            await self._execute(oid, holders, plan, nodes, layout)
        except (NodeError, blockformat.CorruptedObject, erasure.ErasureError) as exc:
            self.status.failures += 1
            log.warning("repair of %s not done this pass: %s", oid, exc)
        finally:
            self._slots.release()

    async def _execute(self, oid: str, holders: list[str], plan: Plan,
                       nodes: Mapping[str, NodeView], layout: Layout) -> None:
        made = await self._copy(oid, holders, plan, nodes, layout)
        if made:
            if not await self.meta.call("set_holders", oid=oid, old=holders, new=plan.final):
                return          # the block changed under us: see the module docstring
            self.status.copies_made += len(made)
        elif plan.final != holders and not plan.copies:
            if not await self.meta.call("set_holders", oid=oid, old=holders, new=plan.final):
                return
        await self._delete(plan.deletes, nodes)
        self.status.deleted += len(plan.deletes)

    async def _copy(self, oid: str, holders: list[str], plan: Plan,
                    nodes: Mapping[str, NodeView], layout: Layout) -> list[tuple[str, str]]:
        """Make the plan's copies; returns (object, node) of each one made.
        Each target is probed first: a node cut off or hung moments ago is
        still "up" in the map, and a copy to it would hold this pass (and the
        repair of every block that needs the next one) for a whole timeout."""
        if not plan.copies:
            return []
        for _, target in plan.copies:
            await self._probe(nodes[target].address)
        objects: list[tuple[str, bytes]]
        if layout.k:
            positions = [i or 0 for i, _ in plan.copies]
            pieces = await self._rebuild(oid, holders, positions, nodes, layout)
            objects = [(shard_id(oid, i), pieces[i]) for i in positions]
        else:
            obj = await self._fetch_any(ObjectId(oid), holders, nodes)
            objects = [(oid, obj)] * len(plan.copies)
        made: list[tuple[str, str]] = []
        for (name, obj), (_, target) in zip(objects, plan.copies):
            await self.data.put(nodes[target].address, ObjectId(name), obj)
            made.append((name, target))
            self.status.bytes_copied += len(obj)
        return made

    async def _probe(self, address: str) -> None:
        with trio.move_on_after(PROBE_SECONDS):
            await self.data.health(address)
            return
        raise NodeUnavailable(address, f"no answer to /health within {PROBE_SECONDS} s")

    async def _fetch_any(self, oid: ObjectId, holders: Sequence[str],
                         nodes: Mapping[str, NodeView]) -> bytes:
        last: Exception | None = None
        for h in holders:
            if not _reachable(nodes, h):
                continue
            try:
                return await self.data.get(nodes[h].address, oid)
            except NodeError as exc:
                last = exc
        raise last or erasure.ErasureError(f"no reachable copy of {oid}")

    async def _rebuild(self, oid: str, holders: Sequence[str], wanted: list[int],
                       nodes: Mapping[str, NodeView], layout: Layout) -> dict[int, bytes]:
        shards: dict[int, bytes] = {}
        for i, h in enumerate(holders):
            if len(shards) == layout.k:
                break
            if not h or not _reachable(nodes, h):
                continue
            try:
                shards[i] = await self.data.get(nodes[h].address, ObjectId(shard_id(oid, i)))
            except NodeError as exc:
                log.info("shard %d of %s unreadable on %s: %s", i, oid, h, exc)
        return await trio.to_thread.run_sync(erasure.rebuild_shards, shards, layout.k,
                                             layout.m, wanted)

    async def _delete(self, victims: Sequence[tuple[str, str]],
                      nodes: Mapping[str, NodeView]) -> None:
        for name, node_id in victims:
            try:
                await self.data.delete(nodes[node_id].address, ObjectId(name))
            except NodeError as exc:
                log.info("surplus %s on %s stays for the orphan scan: %s", name, node_id, exc)


async def repair_forever(meta: MetaClient, data: DataClient, *, interval: float,
                         grace: float, status: RepairStatus, rate: float = SCAN_RATE) -> None:
    """The metadata node's background repair loop; failures are logged and retried."""
    repairer = Repairer(meta, data, grace=grace, status=status, rate=rate)
    while True:
        await trio.sleep(interval)
        try:
            await repairer.run_pass()
        except Exception as exc:      # the RPC failed: next round
            log.warning("repair pass failed: %s", exc)
