"""``objfs-admin fsck``: compare the metadata with what the data nodes hold.

How this works
--------------
1. The metadata node checks its own namespace (``metastate.fsck``, through
   the ``fsck`` query): links, parents, block lengths, orphans.
2. Every up data node lists its objects; every block map entry is compared
   with those listings.  A piece named by the block map but absent from its
   node's listing is **missing**; with ``--verify`` every listed piece is
   also read back and checked (BLAKE3), and a failing one is **corrupt**.
   A block with fewer good pieces than its volume promises is
   **under-replicated**; one that no node can serve at all is **lost**.
3. Objects on a node that no block map names for that node, and no pending
   delete accounts for, are **orphans** (a young one may be an upload about
   to be committed: only those older than the orphan grace are collectable).

``--repair`` takes missing and corrupt pieces out of the block map
(``drop_copies``) so the metadata node's repair loop rebuilds them from the
good ones, and deletes or adopts old orphans exactly as the background
orphan scan does.  Progress is drawn on stderr while it works.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from storagenode import collector
from storagenode.dataclient import DataClient, NodeError, ObjectCorrupted
from storagenode.ids import ObjectId, object_age_ns, shard_id, split_shard_id
from storagenode.metaclient import MetaClient

PAGE = 1000


@dataclass
class Report:
    namespace: list[str] = field(default_factory=list)
    blocks: int = 0
    pieces: int = 0
    missing: list[tuple[str, str]] = field(default_factory=list)     # (object, node)
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    under_replicated: list[str] = field(default_factory=list)        # block ids
    lost: list[str] = field(default_factory=list)
    orphans: list[tuple[str, str]] = field(default_factory=list)
    young_orphans: int = 0
    unreachable: list[str] = field(default_factory=list)             # node ids

    @property
    def clean(self) -> bool:
        return not (self.namespace or self.missing or self.corrupt or self.under_replicated
                    or self.lost or self.orphans)


def progress(label: str, done: int, total: int) -> None:
    """A one-line progress bar on stderr (when it is a terminal)."""
    if not sys.stderr.isatty():
        return
    width = 30
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r{label:<12} [{'#' * filled}{' ' * (width - filled)}] "
                     f"{done}/{total}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


async def list_node(data: DataClient, address: str) -> set[str]:
    names: set[str] = set()
    after = ""
    while True:
        listing, more = await data.list(address, after=after, limit=PAGE)
        names.update(o["oid"] for o in listing)
        if not more or not listing:
            return names
        after = listing[-1]["oid"]


async def check(meta: MetaClient, data: DataClient, *, verify: bool,
                orphan_grace: float) -> Report:
    report = Report(namespace=await meta.call("fsck"))
    cmap = await meta.call("cluster_map")
    up = {n["node_id"]: n["address"] for n in cmap["nodes"] if n["state"] == "up"}
    report.unreachable = [n["node_id"] for n in cmap["nodes"] if n["state"] != "up"]
    stored: dict[str, set[str]] = {}
    for i, (node_id, address) in enumerate(sorted(up.items())):
        progress("listing", i, len(up))
        try:
            stored[node_id] = await list_node(data, address)
        except NodeError:
            report.unreachable.append(node_id)
    progress("listing", len(up), len(up))
    layouts = {v["vol"]: v for v in await meta.call("volumes")}
    accounted = await _check_blocks(meta, data, report, stored, up, layouts, verify)
    await _find_orphans(meta, report, stored, accounted, orphan_grace)
    return report


async def _check_blocks(meta: MetaClient, data: DataClient, report: Report,
                        stored: dict[str, set[str]], up: dict[str, str],
                        layouts: dict[int, Any], verify: bool) -> set[tuple[str, str]]:
    accounted: set[tuple[str, str]] = set()
    total = sum(len(s) for s in stored.values())
    after: list[int] = [0, 0, -1]
    while True:
        rows = await meta.call("scan_blocks", after=after, limit=PAGE)
        for vol, _ino, _idx, oid, holders in rows:
            await _check_block(data, report, stored, up, layouts[vol], oid, holders, verify,
                               accounted)
        progress("blocks", min(report.pieces, total), total)
        if len(rows) < PAGE:
            return accounted
        after = rows[-1][:3]


async def _check_block(data: DataClient, report: Report, stored: dict[str, set[str]],
                       up: dict[str, str], volume: Any, oid: str, holders: list[str],
                       verify: bool, accounted: set[tuple[str, str]]) -> None:
    ec = volume["ec_k"] > 0
    promised = volume["ec_k"] + volume["ec_m"] if ec else volume["replicas"]
    names = [shard_id(oid, i) if ec else oid for i in range(len(holders))]
    good = 0
    for name, node in zip(names, holders):
        if not node:
            continue
        accounted.add((name, node))
        report.pieces += 1
        if node not in stored:
            continue                    # node unreachable: neither good nor bad
        if name not in stored[node]:
            report.missing.append((name, node))
        elif verify and not await _reads_back(data, up[node], name):
            report.corrupt.append((name, node))
        else:
            good += 1
    report.blocks += 1
    if good < promised:
        report.under_replicated.append(oid)
    every_holder_answered = all(h in stored for h in holders if h)
    if good < (volume["ec_k"] if ec else 1) and every_holder_answered:
        report.lost.append(oid)


async def _reads_back(data: DataClient, address: str, name: str) -> bool:
    try:
        await data.get(address, ObjectId(name))
        return True
    except ObjectCorrupted:
        return False
    except NodeError:
        return True                     # gone or unreachable now: not evidence of rot


async def _find_orphans(meta: MetaClient, report: Report, stored: dict[str, set[str]],
                        accounted: set[tuple[str, str]], grace: float) -> None:
    now = time.time_ns()
    candidates = [(name, node) for node, names in stored.items() for name in names
                  if (name, node) not in accounted]
    for start in range(0, len(candidates), PAGE):
        page = candidates[start:start + PAGE]
        pending = await meta.call("object_refs", oids=sorted({n for n, _ in page}))
        for name, node in page:
            if (pending.get(name) or {}).get("pending"):
                continue                # the collector deletes it
            if object_age_ns(split_shard_id(name)[0], now) <= grace * 1e9:
                report.young_orphans += 1
            else:
                report.orphans.append((name, node))


async def repair(meta: MetaClient, data: DataClient, report: Report, grace: float) -> None:
    """Hand missing and corrupt pieces to the repair loop; collect old orphans."""
    bad: dict[str, list[str]] = {}
    for name, node in report.missing + report.corrupt:
        bad.setdefault(node, []).append(split_shard_id(name)[0])
    for node, oids in bad.items():
        for start in range(0, len(oids), PAGE):
            await meta.call("drop_copies", node_id=node, oids=oids[start:start + PAGE])
    if report.orphans:
        await collector.scan_orphans(meta, data, grace=grace)


def print_report(report: Report, out: Any = sys.stdout) -> None:
    print(f"{report.blocks} blocks, {report.pieces} pieces checked", file=out)
    sections = [("namespace problems", report.namespace),
                ("missing pieces", [f"{o} on {n}" for o, n in report.missing]),
                ("corrupt pieces", [f"{o} on {n}" for o, n in report.corrupt]),
                ("under-replicated blocks", report.under_replicated),
                ("lost blocks (no readable copy)", report.lost),
                ("orphan objects", [f"{o} on {n}" for o, n in report.orphans]),
                ("unreachable nodes", report.unreachable)]
    for title, items in sections:
        print(f"{title}: {len(items)}", file=out)
        for item in items[:20]:
            print(f"  {item}", file=out)
        if len(items) > 20:
            print(f"  ... and {len(items) - 20} more", file=out)
    if report.young_orphans:
        print(f"recent unreferenced objects (may be uploads in progress): "
              f"{report.young_orphans}", file=out)
    print("clean" if report.clean else "PROBLEMS FOUND", file=out)
