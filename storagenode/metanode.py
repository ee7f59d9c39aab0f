"""The metadata node: serves the metadata RPC (docs/DESIGN.md) over HTTP.

How this works
--------------
Requests arrive on ``POST /v1/rpc`` as msgpack ``{"method", "args"}`` and
take one of three paths:

- **ops** (state changes) are validated, put on a bounded queue (a full
  queue makes callers wait: backpressure) and answered only after they are
  durable.  One writer task drains everything queued, stamps the batch with
  the current time, and in a worker thread (``trio.to_thread.run_sync``)
  appends each op to the log and applies it through ``MetaState`` inside ONE
  SQLite transaction, then commits (one fsync for the whole batch: group
  commit).  The write connection is used by that one worker call only, so it
  never sees two threads at once, and no ``await`` happens inside a
  transaction.  After the commit every waiter gets its own result or errno.
- **queries** run on a second, read-only connection on the event loop; they
  are short, and WAL lets them read the last committed state while a commit
  is in progress.  Each query reads one snapshot (``MetaState.query``).
- **heartbeats** are soft state: the last time each data node was heard from
  and its capacity live in memory only, are never logged, and decide whether
  the cluster map shows a node ``up``.

Invariant: an answered op is in the committed database, together with its
log entry; a crash loses only ops nobody was told about.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import msgpack
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import collector, metaschema, metastate, repair
from .auth import authorized
from .dataclient import DataClient
from .h11serve import serve
from .httpserve import HTTPError, Request, Response
from .ids import InodeId, VolumeId
from .leases import LeaseConfig, LeaseKey, Mode, NoSession, SessionId
from .leaseserver import LeaseServer, grant_map
from .metaclient import MetaClient
from .retry import retrying
from .metastate import (HEARTBEAT_SPEC, LEASE_SPECS, LIVENESS_QUERIES, OPS, QUERIES, VOL,
                        BadRequest, Liveness, MetaError, MetaState, Outcome, check_request, op_keys,
                        validate)

log = logging.getLogger(__name__)

RPC_BODY_MAX = 8 * 1024 * 1024
PENDING_MAX = 4096          # ops waiting for the writer before callers must wait
BATCH_MAX = 1024            # most ops in one transaction
LOG_KEEP = 100_000          # log entries kept; older ones are trimmed
NODE_UP_SECONDS = 6.0       # a data node is up when heard from this recently (3 beats)
NODE_DOWN_SECONDS = 15.0    # ... suspect until then, down after
DB_NAME = "meta.db"
LEASE_RPCS = ("open_session", "renew", "close_session", "events", "acquire", "release")
SOFT = ("heartbeat", "repair_status", "fsck") + LEASE_RPCS   # answered from memory, not logged
# Ops a mount may apply in its own cache first and send later in a ``batch``
# (fusefront/nsqueue.py), each admitted under the mount's WRITE cache
# leases on every inode it changes, never waiting for a lease.
# A create names its inode (reserved ahead by ``reserve_inodes``) and gets a
# WRITE cache lease on it; a ``commit_blocks`` of a file the same batch made
# rides along (fence 0: the lease that create granted).
BATCHABLE = frozenset({"unlink", "rmdir", "rename", "mkdir", "mknod", "symlink",
                       "commit_blocks", "setattr"})
CREATES = ("mkdir", "mknod", "symlink")
BATCH_MAX = 256
RESERVED_SESSIONS_MAX = 10_000  # sessions with inode numbers kept (ended ones pruned)
LEASED_QUERIES = ("lookup", "getattr", "readdir", "revalidate")
LEASED_OPS = ("mknod", "mkdir", "symlink", "link", "setattr")
WRITER_WAIT = 5.0           # most a stat waits for another mount's buffered changes


@dataclass
class _Pending:
    """One op waiting for its commit."""
    op: dict[str, Any]
    at_ns: int = 0          # the op's time as its mount stamped it (0: the node's clock)
    done: trio.Event = field(default_factory=trio.Event)
    outcome: Outcome | None = None
    failure: BaseException | None = None


@dataclass
class _Heard:
    at: float
    capacity: int
    free: int
    objects: int


class _Metrics:
    def __init__(self, node: "MetaNode") -> None:
        self.registry = CollectorRegistry()
        for name, doc in [("degraded", "blocks below their promised redundancy (last pass)"),
                          ("misplaced", "blocks not on their desired nodes (last pass)"),
                          ("pending", "blocks found needing work in the current pass"),
                          ("copies_made", "pieces copied or rebuilt by repair"),
                          ("bytes_copied", "bytes written by repair"),
                          ("deleted", "surplus pieces removed by repair"),
                          ("failures", "repairs that failed and wait for the next pass"),
                          ("passes", "repair passes completed")]:
            Gauge(f"objfs_repair_{name}", doc, registry=self.registry).set_function(
                functools.partial(lambda n: float(getattr(node.repair, n)), name))
        for name in ("deleted", "adopted", "missing"):
            Gauge(f"objfs_orphans_{name}", f"orphan objects {name}",
                  registry=self.registry).set_function(
                functools.partial(lambda n: float(getattr(node.orphans, n)), name))
        Gauge("objfs_meta_leases", "leases held now (every session; cache and op leases)",
              registry=self.registry).set_function(
            lambda: float(node.leases.table.lease_count()))
        self.rpcs = Counter("objfs_meta_rpc", "metadata RPCs by method and outcome",
                            ["method", "outcome"], registry=self.registry)
        self.commit_seconds = Histogram(
            "objfs_meta_commit_seconds", "time to apply and commit one batch of ops",
            registry=self.registry)
        self.batch_ops = Histogram(
            "objfs_meta_commit_batch_ops", "ops committed together in one transaction",
            buckets=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024], registry=self.registry)


class MetaNode:
    """The metadata role over the database at ``db_path``."""

    def __init__(self, db_path: Path, secret: str, *,
                 clock: Callable[[], int] = time.time_ns,
                 monotonic: Callable[[], float] = trio.current_time,
                 log_keep: int = LOG_KEEP, pending_max: int = PENDING_MAX,
                 node_down_after: float = NODE_DOWN_SECONDS,
                 lease_config: LeaseConfig | None = None, lease_quiet: bool = False) -> None:
        self.secret = secret
        self._down_after = max(node_down_after, NODE_UP_SECONDS)
        self._clock = clock
        self._monotonic = monotonic
        self._log_keep = log_keep
        self._last_ns = 0
        self._writer = MetaState(metaschema.open_db(db_path, check_same_thread=False))
        self._reader = MetaState(metaschema.open_db(db_path))
        self._send, self._receive = trio.open_memory_channel[_Pending](pending_max)
        self._heard: dict[str, _Heard] = {}
        self._started = self._monotonic()
        # data nodes registered before this start: up until silent too long
        self._presumed_up = set(self._reader.node_ids())
        self.leases = LeaseServer(lease_config, clock=monotonic, quiet=lease_quiet)
        # session -> [next unused, end) ranges of inode numbers it reserved
        self._reserved: dict[str, list[list[int]]] = {}
        # volume -> the first inode number not handed out before this start
        # (a create reclaimed after a restart names one reserved before it)
        self._earlier_inos = dict(self._reader.conn.execute(
            "SELECT vol, next_ino FROM volumes").fetchall())
        self.repair = repair.RepairStatus()
        self.orphans = collector.OrphanReport()
        self.metrics = _Metrics(self)

    def close(self) -> None:
        self._writer.conn.close()
        self._reader.conn.close()

    # ---- HTTP

    async def handle(self, request: Request) -> Response:
        route = (request.method, request.path)
        if route == ("GET", "/health"):
            return Response.json({"status": "ok", "role": "meta"})
        if route == ("GET", "/metrics"):
            return Response(200, generate_latest(self.metrics.registry),
                            {"content-type": CONTENT_TYPE_LATEST})
        if route == ("POST", "/v1/rpc"):
            return await self._rpc(request)
        raise HTTPError(404, f"no route {request.method} {request.path}")

    async def _rpc(self, request: Request) -> Response:
        if not authorized(request.header("authorization"), self.secret):
            raise HTTPError(401, "missing or wrong bearer secret")
        method, args, session, lease = _decode(await request.body(RPC_BODY_MAX))
        label = method if method in OPS or method in QUERIES or method in SOFT \
            or method == "batch" else "unknown"
        outcome = "failed"
        try:
            answer = await self._answer(method, args, session, lease)
            outcome = "error" if "errno" in answer else "ok"
            return _msgpack(answer)
        except BadRequest as exc:
            outcome = "bad_request"
            raise HTTPError(400, str(exc)) from None
        finally:
            self.metrics.rpcs.labels(label, outcome).inc()

    async def _answer(self, method: str, args: Any, session: str | None,
                      lease: bool) -> dict[str, Any]:
        try:
            if lease and method in LEASED_QUERIES and session:
                result, grants = await self.leased_query(method, args, session)
                return {"result": result, "leases": grants}
            if lease and method in LEASED_OPS and session:
                result, grant, touched = await self.leased_op(method, args, session)
                return {"result": result, "leases": [grant], "touched": touched,
                        **self._touched_attrs(args, touched, result)}
            if method == "batch" and session:
                return await self.batch(args, session)
            if method == "reserve_inodes":
                return {"result": await self.reserve_inodes(args, session)}
            if method in OPS:
                result, touched = await self.op_touching(method, args, session)
                if not session or method == "touch_atimes":     # its result has them
                    return {"result": result, "touched": touched}
                return {"result": result, "touched": touched,
                        **self._touched_attrs(args, touched, result)}
            return {"result": await self.call(method, args, session)}
        except MetaError as exc:
            return {"errno": exc.errno, "error": exc.message}
        except NoSession:
            return {"errno": errno.ENOTCONN, "error": "session expired or unknown"}

    def _touched_attrs(self, args: Any, touched: list[int], result: Any) -> dict[str, Any]:
        """The new attrs of the other inodes an op changed (a directory's
        mtime and link count after a name in it came or went), so that the
        client, which the kernel asks for them right after the op, needs no
        round trip.  The client keeps them only while its lease on each one
        holds and no other change to it crossed this answer (a change by
        another client recalls that lease first)."""
        own = result.get("ino") if isinstance(result, dict) else None
        inos = [ino for ino in dict.fromkeys(touched) if ino != own]
        if not inos or len(inos) > 8:
            return {}
        try:
            found = self._reader.query("getattrs", {"vol": args.get("vol"), "inos": inos})
        except (MetaError, BadRequest):
            return {}
        return {"touched_attrs": [a for a in found if a is not None]}

    async def call(self, method: str, args: Any, session: str | None = None) -> Any:
        """Run one RPC: its result, or MetaError / BadRequest / NoSession."""
        if method in OPS:
            return await self.op(method, args, session)
        if method in QUERIES:
            return self._reader.query(
                method, args, self.liveness() if method in LIVENESS_QUERIES else None)
        if method in LEASE_RPCS:
            return await self.lease_rpc(method, args, session)
        if method == "heartbeat":
            return await self.heartbeat(args)
        if method == "fsck":           # the namespace checker, on the read connection
            return metastate.fsck(self._reader.conn)
        if method == "repair_status":
            return {"repair": self.repair.as_map(), "orphans": dict(self.orphans.__dict__)}
        raise BadRequest(f"unknown method {method!r:.80}")

    # ---- leases

    async def lease_rpc(self, method: str, args: Any, session: str | None) -> Any:
        a = validate(LEASE_SPECS[method], args)
        if method == "open_session":
            return self.leases.open_session()
        if not session:
            raise BadRequest(f"{method} needs a session")
        if method == "renew":
            return self.leases.renew(session)
        if method == "close_session":
            self.leases.close_session(session)
            return {}
        if method == "events":
            return await self.leases.events(session, a["wait"])
        if method == "release":
            self.leases.release(session, a["epochs"])
            return {}
        mode = Mode.WRITE if a["mode"] == "write" else Mode.READ
        grant = await self.leases.acquire(session, LeaseKey(a["vol"], a["ino"]), mode,
                                          cache=True, wait=a["wait"])
        return None if grant is None else grant_map(grant, self._monotonic())

    async def leased_query(self, method: str, args: Any,
                           session: str) -> tuple[Any, list[Any]]:
        """A query whose answer the client may cache, with READ leases
        (granted now or not at all).  lookup: [parent, child]; getattr:
        [inode]; readdir: [dir, then one per entry]; revalidate: one per
        inode asked about (none for one that is gone).

        The read and the grants run without a checkpoint in between, so no
        op can finish between them: an op holds WRITE op leases on what it
        changes from before it is applied until after its commit, so either
        the read saw the op's result, or the grant on that inode is refused
        (the answer is then not cached).

        The attributes of a file another mount holds a WRITE lease on
        (getattr, lookup) are the ones that mount buffers: its size, times,
        mode, owner.  Its lease is recalled and the answer waits (at most
        ``WRITER_WAIT``) until it has committed them, so that a stat shows
        what a stat on the writing mount shows (as on a local filesystem)."""
        vol = args.get("vol")
        grab = functools.partial(self._try_read_lease, session, vol)
        if method == "revalidate":
            result = self._reader.query(method, args, {})
            return result, [grab(ino) if answer != 0 else None
                            for ino, answer in zip(args["inos"], result)]
        key = args.get("parent") if method == "lookup" else args.get("ino")
        first = grab(key)
        if first is None:
            # another mount may hold it under a WRITE lease: buffered writes
            # to a file, a directory's changes made there and still queued
            first = await self._after_writer(session, vol, key)
        try:
            result = self._reader.query(method, args)
        except MetaError as exc:
            if method == "lookup" and exc.errno == errno.ENOENT:
                return None, [first, None]     # the absence may be cached too
            raise
        if method == "getattr":
            return result, [first]
        if method == "lookup":
            child = grab(result["ino"])
            if child is None:
                child = await self._after_writer(session, vol, result["ino"])
                if child is not None:     # the writer committed meanwhile: read again
                    result, child = self._lookup_again(session, args, child)
            return result, [first, child]
        return result, [first] + [grab(entry[2]["ino"]) for entry in result]

    def _lookup_again(self, session: str, args: Any, child: Any) -> tuple[Any, Any]:
        """A lookup read again after waiting for ``child``'s lease.  An unlink
        or a rename over the name queued before that lease ran meanwhile:
        then the lease says nothing of the answer and is given back."""
        try:
            result = self._reader.query("lookup", args)
        except MetaError as exc:
            if exc.errno != errno.ENOENT:
                raise
            result = None
        if result is None or result["ino"] != child["ino"]:
            self.leases.release(session, [child["epoch"]])
            child = None
        return result, child

    async def _after_writer(self, session: str, vol: Any, ino: Any) -> Any:
        """A READ lease on the inode once another mount holding a WRITE lease
        on it has committed what it buffers (None: no such mount, or it took
        longer than ``WRITER_WAIT``)."""
        if not isinstance(vol, int) or not isinstance(ino, int):
            return None
        grant = await self.leases.after_writer(session, LeaseKey(VolumeId(vol), InodeId(ino)),
                                               WRITER_WAIT)
        return None if grant is None else grant_map(grant, self._monotonic())

    async def leased_op(self, method: str, args: Any,
                        session: str) -> tuple[Any, Any, list[int]]:
        """An op whose resulting attributes the client may cache: a lease on
        the inode it made or changed (WRITE for a new regular file, so its
        creator can buffer writes, and for a new directory or symlink, so
        that it can remove what it makes there, and the directory or the
        symlink, on its own: see ``batch``; READ otherwise), taken after the op (now or never), then
        the attributes read again, so that any change made between the op
        and the grant is in the answer."""
        result, touched = await self.op_touching(method, args, session)
        key = LeaseKey(VolumeId(args["vol"]), InodeId(result["ino"]))
        mode = Mode.WRITE if method in ("mkdir", "symlink") or (
            method == "mknod" and stat.S_ISREG(result["mode"])) else Mode.READ
        grant = await self.leases.acquire(session, key, mode, cache=True, wait=False)
        if grant is None:
            return result, None, touched
        fresh = self._reader.query("getattr", {"vol": key.vol, "ino": key.ino}, {})
        return fresh, grant_map(grant, self._monotonic()), touched

    def _try_read_lease(self, session: str, vol: Any, ino: Any) -> Any:
        """A READ cache lease now or None; never waits (see leased_query)."""
        if not isinstance(vol, int) or not isinstance(ino, int):
            return None
        grant = self.leases.try_acquire(session, LeaseKey(VolumeId(vol), InodeId(ino)),
                                        Mode.READ, cache=True)
        return None if grant is None else grant_map(grant, self._monotonic())

    # ---- ops and group commit

    async def op(self, method: str, args: Any, session: str | None = None) -> Any:
        return (await self.op_touching(method, args, session))[0]

    async def op_touching(self, method: str, args: Any,
                          session: str | None = None) -> tuple[Any, list[int]]:
        """Apply one op durably; answered after its batch commits, with the
        inodes whose attributes or entries it changed (so the client drops
        its own cached views of them).  First the op takes WRITE op leases
        on those inodes, which recalls other clients' cached views of them
        (see leaseserver)."""
        self._reader.check(method, args)
        if method in CREATES and args.get("ino") is not None:
            raise BadRequest("a create names its inode only in a batch")
        keys = op_keys(self._reader, method, args)
        fence = args.get("fence") if method == "commit_blocks" else None
        if fence is not None and session:
            grant = self.leases.admit_write(session, args["vol"], args["ino"], fence)
            if grant is None:
                raise MetaError(errno.EIO, "write lease lost (expired or recalled): "
                                           "the buffered data was not committed")
            grants = [grant]
        else:
            grants = await self.leases.hold(session, keys)
        try:
            result = await self._apply(method, args)
        finally:
            self.leases.unhold(grants)
        touched = [ino for _, ino in keys]
        if method == "touch_atime":     # leaves others' caches be (relatime), not ours
            touched.append(args["ino"])
        elif method == "touch_atimes":
            touched.extend(ino for ino, _ in args["touches"])
        ended = self._leases_of_freed(session, args.get("vol"), method, result)
        if ended:
            self.leases.release(session, ended)
            result = dict(result, released=True)
        return result, touched

    async def reserve_inodes(self, args: Any, session: str | None) -> dict[str, Any]:
        """Inode numbers this session may give the files and directories it
        makes in ``batch``es (kept in memory with the session; numbers a
        session never used are skipped, never handed out again)."""
        if not session or self.leases.table.session_expires(SessionId(session)) is None:
            raise NoSession()
        result = await self.op("reserve_inodes", args, session)
        if len(self._reserved) >= RESERVED_SESSIONS_MAX:
            for old in [s for s in self._reserved
                        if self.leases.table.session_expires(SessionId(s)) is None]:
                del self._reserved[old]
        ranges = self._reserved.setdefault(session, [])
        ranges.append([result["first"], result["first"] + result["count"]])
        return dict(result)

    def _take_reserved(self, session: str, ino: Any) -> bool:
        """Use ``ino`` from this session's reserved numbers: each at most once,
        in increasing order (a mount hands them out in the order it queues)."""
        ranges = self._reserved.get(session, [])
        while ranges and ranges[0][0] >= ranges[0][1]:
            ranges.pop(0)
        for r in ranges:
            if type(ino) is int and r[0] <= ino < r[1]:
                r[0] = ino + 1
                return True
        return False

    async def batch(self, args: Any, session: str) -> dict[str, Any]:
        """Ops one mount applied in its own cache under its WRITE cache
        leases and answered already, in the order it made them: each is
        admitted under the leases it names for every inode it changes
        (``fences``: [ino, epoch] pairs), never waiting for one (a recall of
        another mount could be waiting for this very batch), and applied in
        that order, all in one group commit.  An op not so covered fails
        with EIO, as a commit whose WRITE lease was lost does.

        A create (mkdir, mknod) names its inode, one reserved for this
        session (``reserve_inodes``), and is granted a WRITE cache lease on
        it at once, so that later ops of the batch on the new inode (a
        commit of its data, a create in the new directory) are admitted
        under that lease: their fence for it is 0.  The create's answer
        brings the grant ("lease").  Its time (``time_ns``) is the mount's,
        so that what the mount answered matches what is stored.

        The answer names no touched inodes: the mount changed its own views
        of them when it applied the ops, and nothing it asks after them is
        answered before this batch (it sends the batch first)."""
        if not isinstance(args, dict) or type(args.get("ops")) is not list \
                or len(args["ops"]) > BATCH_MAX:
            raise BadRequest(f"batch needs a list of at most {BATCH_MAX} ops")
        vol = validate({"vol": VOL}, {"vol": args.get("vol")})["vol"]
        if self.leases.table.session_expires(SessionId(session)) is None:
            # (a restart forgot it): refused whole, so that the mount opens
            # a new session and sends it again, its leases taken back then
            raise NoSession()
        ops = []            # every op is checked (BadRequest) before any is applied
        for op in args["ops"]:
            checked = _batched(op)
            checked = checked._replace(args=dict(checked.args, vol=vol))
            self._reader.check(checked.method, checked.args)
            if checked.method in CREATES and checked.args.get("ino") is None:
                raise BadRequest("a batched create names its reserved inode")
            ops.append(checked)
        admitted: list[tuple[_Pending | MetaError, list[Any]]] = []
        made: dict[int, Any] = {}       # new inode -> the WRITE cache lease its create got
        # inode -> the WRITE lease an earlier op of this batch was admitted
        # under (pinned until the batch is done).  An op's inodes are found
        # in the state before the batch: one an earlier op removed or moved
        # away (an unlink, then a rename over that name) is covered by that
        # op's lease; one it made or moved in is not found, and is covered
        # by the lease that op was admitted under.
        known: dict[int, int] = {}
        # inode -> the fence an op lease taken by an earlier op of this
        # batch, admitted whole, holds it under until the batch is done: a
        # later op changing it under the same lease needs no op lease of
        # its own (a directory's creates took one each, and every release
        # looked at all the others: quadratic in the batch)
        pinned: dict[int, int] = {}
        taken_back: set[int] = set()    # of those, leases of before a restart (_reclaim)
        ended: list[int] = []           # this session's leases on inodes its ops freed
        try:
            for method, op_args, fences, made_on, at_ns, req in ops:
                grants: list[Any] = []
                pins: dict[int, int] = {}
                reclaimed = False
                done = self._reader.request(req) if req is not None else None
                if done is not None:
                    # sent again, its answer lost: the first outcome, under
                    # no lease (a restart forgot the ones it went under)
                    ready = _Pending({}, 0, outcome=done)
                    ready.done.set()
                    admitted.append((ready, []))
                    if method in CREATES and done.error is None:
                        # the ops queued after it on the new inode (fence 0)
                        # go under a WRITE lease on it, as after a create
                        grant = self.leases.try_acquire(
                            session, LeaseKey(VolumeId(vol), InodeId(op_args["ino"])),
                            Mode.WRITE, cache=True)
                        if grant is not None:
                            made[op_args["ino"]] = grant
                            known[op_args["ino"]] = grant.epoch
                    continue
                try:
                    for _, ino in op_keys(self._reader, method, op_args):
                        fence = fences.get(ino, 0) or known.get(ino, 0)
                        if method != "commit_blocks" and pinned.get(ino) == fence:
                            reclaimed = reclaimed or ino in taken_back
                            continue
                        grant = self.leases.admit_write(session, vol, ino, fence)
                        if grant is None and ino in made_on:
                            grant = self._reclaim(session, vol, ino, fence, made_on[ino])
                            if grant is not None:
                                reclaimed = True
                                taken_back.add(ino)
                        if grant is None:
                            raise MetaError(errno.EIO, (
                                f"{method} of inode {ino}: no WRITE lease of this mount covers it "
                                f"(lost or recalled; fence {fence})"))
                        grants.append(grant)
                        known[ino] = pins[ino] = fence
                    if method == "commit_blocks":
                        op_args["fence"] = grants[0].epoch
                    if method in CREATES:
                        new = made[op_args["ino"]] = self._lease_new(session, vol, op_args["ino"],
                                                                     reclaimed)
                        known[op_args["ino"]] = new.epoch
                except MetaError as exc:
                    self.leases.unhold(grants)
                    admitted.append((exc, []))
                    continue
                pinned.update(pins)
                named = {"req": req} if req is not None else {}
                pending = _Pending({"method": method, "args": op_args, "time_ns": 0, **named},
                                   at_ns if method != "commit_blocks" else 0)
                admitted.append((pending, grants))
                try:        # no checkpoint between a batch's ops: one commit takes them all
                    self._send.send_nowait(pending)
                except trio.WouldBlock:
                    await self._send.send(pending)
            results: list[dict[str, Any]] = []
            for (item, _), (method, op_args, *_) in zip(admitted, ops):
                new = made.get(op_args["ino"]) if method in CREATES else None
                try:
                    if isinstance(item, MetaError):
                        raise item
                    answer = {"result": await self._outcome(item)}
                    mine = self._leases_of_freed(session, vol, method, answer["result"])
                    if mine:        # released once the batch's op leases are
                        ended.extend(mine)
                        answer["released"] = True
                    if new is not None:
                        answer["lease"] = grant_map(new, self._monotonic())
                    if method in CREATES:
                        # its place in the listing: the mount keeps the
                        # listing of a directory it fills (rm -rf reads it)
                        entry = self._reader.entry(vol, op_args["parent"], op_args["name"])
                        if entry is not None and entry.ino == op_args["ino"]:
                            answer["cursor"] = entry.cursor
                    results.append(answer)
                except MetaError as exc:
                    if new is not None:
                        self.leases.release(session, [new.epoch])
                    results.append({"errno": exc.errno, "error": exc.message})
        finally:
            for _, grants in admitted:
                self.leases.unhold(grants)
        self.leases.release(session, ended)
        return {"result": results}

    def _leases_of_freed(self, session: str | None, vol: Any, method: str,
                         result: Any) -> list[int]:
        """The epochs of ``session``'s cache leases on the inode an applied
        unlink, rmdir or rename over a file removed for good (its last
        name, not open anywhere: not an orphan).  Such a lease guards
        nothing any more: the caller gives them back and tells the mount
        so ("released"), which forgets them.  Kept, every file an rm -rf
        removed (or an editor's save replaced) left one behind on both
        sides, until the mount held ``TRIM_AT`` and spent its time giving
        them back."""
        if not session or method not in ("unlink", "rmdir", "rename") \
                or type(vol) is not int or not isinstance(result, dict):
            return []
        ino = result.get("replaced" if method == "rename" else "ino")
        if type(ino) is not int or result.get("nlink", 0) != 0:
            return []
        try:
            self._reader.inode(vol, ino)
            return []                   # an orphan: open on a mount, still fenced
        except MetaError:
            pass
        return [g.epoch for g in self.leases.table.holders(LeaseKey(VolumeId(vol), InodeId(ino)))
                if g.session == session and g.cache]

    def _reclaim(self, session: str, vol: int, ino: int, epoch: int, ctime: int) -> Any:
        """An op lease for an op a mount queued under WRITE lease ``epoch``
        of this node's earlier life (its restart forgot it), made on the
        inode as it was with ``ctime``: taken back if the inode still has
        that ctime (nothing changed it since: every change sets it) and no
        other session was granted anything on it since the restart
        (``LeaseTable.reclaim_write``); else None.  Without it a mount's
        creates and closes of the last moments before a restart were
        refused, and their files lost."""
        try:
            if self._reader.inode(vol, ino).ctime_ns != ctime:
                return None
        except MetaError:
            return None
        grant = self.leases.reclaim_write(session, vol, ino, epoch)
        if grant is not None:
            log.info("session %s took back its WRITE lease %d on inode %d/%d of before "
                     "the restart", session[:8], epoch, vol, ino)
        return grant

    def _lease_new(self, session: str, vol: int, ino: int, reclaimed: bool = False) -> Any:
        """The WRITE cache lease on an inode a batched create will make with
        a number reserved for this session (nobody else can know it yet);
        one reserved before this node's restart when the create's directory
        lease was taken back (``_reclaim``)."""
        if not self._take_reserved(session, ino) and not (
                reclaimed and type(ino) is int and ino < self._earlier_inos.get(vol, 0)):
            raise MetaError(errno.EINVAL, f"inode number {ino} is not one reserved for "
                                          "this mount, or was used already")
        grant = self.leases.try_acquire(session, LeaseKey(VolumeId(vol), InodeId(ino)),
                                        Mode.WRITE, cache=True)
        if grant is None:
            raise MetaError(errno.EIO, f"no WRITE lease for new inode {ino}")
        return grant

    async def _apply(self, method: str, args: Any) -> Any:
        pending = _Pending({"method": method, "args": args, "time_ns": 0})
        await self._send.send(pending)
        return await self._outcome(pending)

    async def _outcome(self, pending: _Pending) -> Any:
        """The result of an op sent to the writer, once committed."""
        await pending.done.wait()
        if pending.outcome is None:
            raise HTTPError(500, f"op failed to commit: {pending.failure!r:.200}")
        if pending.outcome.error is not None:
            raise pending.outcome.error
        return pending.outcome.result

    async def write_loop(self) -> None:
        """The single writer: commit whatever is queued, batch after batch."""
        while True:
            batch = [await self._receive.receive()]
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            await self._commit_batch(batch)

    async def _commit_batch(self, batch: list[_Pending]) -> None:
        self._last_ns = max(self._last_ns, self._clock())
        for pending in batch:
            pending.op["time_ns"] = pending.at_ns or self._last_ns
        started = time.monotonic()
        try:
            await trio.to_thread.run_sync(self._commit, batch)
        except Exception as exc:
            log.exception("commit of %d ops failed", len(batch))
            for pending in batch:
                pending.outcome, pending.failure = None, exc
        self.metrics.commit_seconds.observe(time.monotonic() - started)
        self.metrics.batch_ops.observe(len(batch))
        for pending in batch:
            pending.done.set()

    def _commit(self, batch: list[_Pending]) -> None:
        """Log and apply ``batch`` in one transaction (runs in a worker thread)."""
        conn = self._writer.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for pending in batch:
                self._apply_one(pending)
            self._writer.trim_log(self._log_keep)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _apply_one(self, pending: _Pending) -> None:
        try:
            pending.outcome = self._writer.append(pending.op)
        except Exception as exc:        # a bug: the op is rolled back and not logged
            log.exception("op %s failed unexpectedly", pending.op.get("method"))
            pending.failure = exc

    # ---- soft state

    async def heartbeat(self, args: Any) -> dict[str, int]:
        a = validate(HEARTBEAT_SPEC, args)
        if not self._reader.has_node(a["node_id"]):
            raise MetaError(errno.ENOENT, f"node {a['node_id']} is not registered")
        if a["lost"]:       # copies the node found corrupt: no longer count them
            await self.op("drop_copies", {"node_id": a["node_id"], "oids": a["lost"]})
        self._heard[a["node_id"]] = _Heard(self._monotonic(), a["capacity"], a["free"],
                                           a["objects"])
        return {"epoch": self._reader.epoch()}

    def liveness(self) -> dict[str, Liveness]:
        """Every registered node's state; one never heard from counts as silent
        since this metadata node started.  One registered before that start
        counts as up for as long as one heard from then would: a restart of
        this node must not stop every write until each data node's next
        heartbeat (they were seen failing with EIO for a second or two; a
        node that is really gone fails an upload at once, and the mount
        takes the next one)."""
        now = self._monotonic()
        live = {}
        for node_id in self._reader.node_ids():
            h = self._heard.get(node_id)
            silent = now - (h.at if h else self._started)
            up = h is not None or node_id in self._presumed_up
            state = ("up" if up and silent <= NODE_UP_SECONDS else
                     "suspect" if silent <= self._down_after else "down")
            live[node_id] = Liveness(state, h.capacity if h else 0, h.free if h else 0, silent)
        return live


class _BatchedOp(NamedTuple):
    """One op of a ``batch``, checked."""
    method: str
    args: dict[str, Any]
    fences: dict[int, int]          # inode -> the WRITE lease epoch it goes under
    made_on: dict[int, int]         # inode -> its ctime the op was made on ([ino, epoch, ctime])
    at_ns: int                      # the mount's time for it (0: none)
    req: str | None                 # the mount's name for it (MetaState.request)


def _batched(op: Any) -> _BatchedOp:
    """One op of a ``batch`` (BadRequest if malformed)."""
    if not isinstance(op, dict) or op.get("method") not in BATCHABLE \
            or not isinstance(op.get("args"), dict) or type(op.get("fences")) is not list \
            or len(op["fences"]) > 8:
        raise BadRequest(f"a batch holds only {sorted(BATCHABLE)} ops, with their fences")
    at_ns = op.get("time_ns", 0)
    if type(at_ns) is not int or not 0 <= at_ns < 1 << 63:
        raise BadRequest("a batched op's time_ns is an integer of nanoseconds")
    fences, made_on = {}, {}
    for pair in op["fences"]:
        if type(pair) is not list or len(pair) not in (2, 3) \
                or not all(type(x) is int for x in pair):
            raise BadRequest("a fence is an [ino, epoch] pair or [ino, epoch, ctime]")
        fences[pair[0]] = pair[1]
        if len(pair) == 3:
            made_on[pair[0]] = pair[2]
    req = op.get("req")
    if req is not None:
        check_request(req)
    return _BatchedOp(op["method"], op["args"], fences, made_on, at_ns, req)


def _decode(body: bytes) -> tuple[str, Any, str | None, bool]:
    """The method, args, session and lease wish of an RPC body; HTTPError 400
    when malformed."""
    try:
        request = msgpack.unpackb(body, raw=False)
    except Exception:
        raise HTTPError(400, "body is not msgpack") from None
    if not isinstance(request, dict) or not isinstance(request.get("method"), str):
        raise HTTPError(400, "body must be a map with a str 'method'")
    args = request.get("args", {})
    if not isinstance(args, dict) or set(request) - {"method", "args", "session", "lease"}:
        raise HTTPError(400, "body holds only 'method', an 'args' map, 'session', 'lease'")
    session = request.get("session")
    if session is not None and (not isinstance(session, str) or len(session) > 64):
        raise HTTPError(400, "session must be a short str")
    return request["method"], args, session, request.get("lease") is True


def _msgpack(value: Any) -> Response:
    return Response(200, msgpack.packb(value, use_bin_type=True),
                    {"content-type": "application/msgpack"})


async def _background(node: "MetaNode", args: argparse.Namespace, secret: str) -> None:
    """The collector, the orphan scan and repair, each talking to us through
    our own RPC (so they see exactly what clients see)."""
    async with MetaClient(args.listen, secret) as meta:
        data = DataClient(secret, timeout=30.0)
        commit_max_age = int(args.orphan_grace * 1e9) // 2
        try:
            await retrying(lambda: meta.call("configure", commit_max_age_ns=commit_max_age),
                           deadline=trio.current_time() + 60)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(
                    collector.collect_forever, meta, data, interval=args.gc_interval,
                    grace=args.gc_grace, dead_after=args.repair_grace))
                nursery.start_soon(functools.partial(
                    collector.orphans_forever, meta, data, interval=args.orphan_interval,
                    grace=args.orphan_grace, report=node.orphans))
                nursery.start_soon(functools.partial(
                    repair.repair_forever, meta, data, interval=args.repair_interval,
                    grace=args.repair_grace, status=node.repair, rate=args.repair_rate))
        finally:
            await data.aclose()


async def run(args: argparse.Namespace, secret: str) -> None:
    """Serve the metadata role with its state under ``args.state``."""
    state: Path = args.state
    state.mkdir(parents=True, exist_ok=True)
    try:
        node = MetaNode(state / DB_NAME, secret, node_down_after=args.node_down_after,
                        lease_config=LeaseConfig(lease_time=args.lease_time,
                                                 skew_margin=min(1.0, args.lease_time / 4)))
    except metaschema.SchemaError as exc:
        log.critical("%s", exc)
        raise SystemExit(2) from None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.write_loop)
            nursery.start_soon(node.leases.run)
            nursery.start_soon(_background, node, args, secret)
            await serve(node.handle, args.listen, body_max=RPC_BODY_MAX,
                        admit=lambda fields: authorized(fields.get("authorization"),
                                                        node.secret))
    finally:
        node.close()
