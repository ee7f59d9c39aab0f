"""Namespace ops this mount applied in its own cache and answered, on their
way to the metadata node (docs/DESIGN.md, "asynchronous namespace
operations").

How this works
--------------
Under a WRITE cache lease on a directory (nobody else can read or change
it without recalling the lease first) and one on a file in it, this mount
knows what unlinking the file does: ``Operations.unlink`` applies it to the
mount's cache, answers at once and queues it here; so does ``rmdir`` for
an empty directory it holds a WRITE lease on too (one it made).  ``drain`` sends what
is queued, in order, as one ``batch`` RPC: the node admits each op under
the leases it names (``fences``), never waiting for a lease, and commits
them together.

Every other metadata RPC of the mount drains first (``Volume.call``), so
the node sees this mount's changes in the order they were made; the flush
of a recalled WRITE lease drains before the lease is released, so another
mount that looks sees them; a timer drains ``DRAIN_DELAY`` after an op is
queued; fsyncdir and unmount drain.  A drain's RPC is shielded from
cancellation: an op leaves the queue only with its answer.

Creates (mkdir, and a new regular file) are queued too: they name an
inode number reserved ahead for this mount, and this mount holds a
provisional WRITE lease on it until the node's answer brings the real one
(``Leases.provisional``).  A new file's data commit rides at the end of
the batch that carries its create (``ride``): one round trip for both.

Every answer goes to ``answered`` (the mount confirms a create's lease; an
op the node refused although this mount answered it already, its lease
lost in a partition or an expired session, is logged as an error, the
directory's cached view dropped, and the next fsyncdir fails).
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Any, Callable

import trio

from storagenode.metaclient import MetaUnavailable

from .filedata import Spawn, Volume

log = logging.getLogger(__name__)

DRAIN_DELAY = 0.005         # seconds an op waits for others to share its batch
RETRY_DELAY = 1.0           # after a drain failed for want of the metadata node
BATCH_MAX = 256             # ops per batch RPC (the node's limit)


@dataclass
class QueuedOp:
    method: str
    args: dict[str, Any]            # as the node takes them, without the volume
    fences: list[list[int]]         # [ino, epoch of this mount's WRITE cache lease]
    parent: int = 0                 # the directory whose entry it changes (0: none)
    name: bytes = b""
    child: int = 0                  # an unlink's file (named open_inos if open at send)
    made: int = 0                   # a create's new inode
    at_ns: int = 0                  # when it was answered here (the node stamps it so)
    rider: bool = False             # its caller waits for ``answer`` (see ``ride``)
    answer: dict[str, Any] | None = None
    seq: int = 0                    # its place in the order ops were queued in
    req: str = ""                   # the mount's name for it (the same when sent again)


class NamespaceQueue:
    def __init__(self, volume: Volume, *, answered: Callable[[QueuedOp, dict[str, Any]], None],
                 spawn: Spawn, open_inos: Callable[[], list[int]],
                 fence_of: Callable[[int, int], int],
                 ctime_of: Callable[[int], int | None] = lambda ino: None) -> None:
        self.v = volume
        self._answered = answered
        self._ctime_of = ctime_of
        self._spawn = spawn
        self._open_inos = open_inos
        self._fence_of = fence_of
        self._ops: list[QueuedOp] = []
        self._lock = trio.Lock()
        self._timer = False
        self._seq = 0                   # the last op queued (QueuedOp.seq)
        # the last send found the node unreachable: ops are not answered
        # here until one lands (a restarted node forgets the leases they are
        # sent under, so the fewer wait in the queue, the fewer are refused)
        self._stalled = False

    @property
    def stalled(self) -> bool:
        """Should the mount answer nothing itself now?  While the last send
        failed, or any metadata RPC of the mount is being retried because
        the node is out of reach (``Volume.unreachable``): a send of the
        queue retries for a minute before it fails, and meanwhile the mount
        would answer creates and closes that a restarted node refuses."""
        return self._stalled or self.v.unreachable

    def __len__(self) -> int:
        return len(self._ops)

    def names(self, ino: int) -> bool:
        """Does a queued op change ``ino`` or its entries, or go under its lease?"""
        return any(ino in (op.parent, op.child, op.made) or any(f[0] == ino for f in op.fences)
                   for op in self._ops)

    def _append(self, op: QueuedOp) -> None:
        self._seq += 1
        op.seq = self._seq
        op.req = op.req or self.v.new_request()
        self._ops.append(op)

    def add(self, op: QueuedOp) -> None:
        """Queue ``op``, before the mount applies it to its cache: each lease
        it goes under carries the inode's ctime now, what the op was made on
        (a restarted node takes such a lease back if that is still so:
        ``MetaNode._reclaim``)."""
        for fence in op.fences:
            # (a provisional lease too: the inode's attrs are those its
            # queued create makes)
            ctime = self._ctime_of(fence[0]) if fence[1] and len(fence) == 2 else None
            if ctime is not None:
                fence.append(ctime)
        self._append(op)
        if not self._timer:
            self._timer = True
            self._spawn(self._later)

    async def ride(self, method: str, args: dict[str, Any], fences: list[list[int]],
                   always: bool = False, req: str | None = None) -> dict[str, Any] | None:
        """Send the op ``method`` at the end of the queue's next batch and
        wait for its answer (one round trip for the queued ops and this one:
        a new file's create and the commit of its data); None when nothing is
        queued (send it the usual way), unless ``always`` (the commits of
        files closed a moment ago, sent together).  MetaUnavailable: its
        outcome is not known (it no longer waits in the queue)."""
        if not self._ops and not always:
            return None
        op = QueuedOp(method, args, fences, rider=True, req=req or "")
        self._append(op)
        try:
            if always:
                # the commits of other files closed then, started with this
                # one, join it here before it is sent
                await trio.sleep(0)
            await self.drain(op)
        finally:
            if op in self._ops:
                self._ops.remove(op)
        return op.answer or {"errno": errno.EIO, "error": "no answer"}

    async def _later(self) -> None:
        try:
            delay = DRAIN_DELAY
            while True:
                await trio.sleep(delay)
                try:
                    await self.drain()
                    break
                except MetaUnavailable as exc:
                    log.warning("sending %d queued namespace ops failed (trying again): %s",
                                len(self._ops), exc)
                    delay = RETRY_DELAY
        finally:
            self._timer = False
        if self._ops:                   # queued while the last batch was on its way
            self._timer = True
            self._spawn(self._later)

    async def drain(self, upto: QueuedOp | None = None) -> None:
        """Send everything queued now (or up to ``upto``), in order;
        MetaUnavailable (the ops stay queued) when the metadata node cannot
        be reached.  Ops queued meanwhile ride along in a batch that is sent
        anyway, but none is sent for them alone: they wait for the timer (a
        create loop sent a batch each round trip, one or two creates in
        each, where ten milliseconds gather a dozen)."""
        if not self._ops:
            return
        goal = self._seq if upto is None else upto.seq
        async with self._lock:
            while self._ops and self._ops[0].seq <= goal:
                ops = self._ops[:BATCH_MAX]
                with trio.CancelScope(shield=True):
                    try:
                        answers = await self._send(ops)
                    except MetaUnavailable:
                        self._stalled = True
                        raise
                    except Exception as exc:        # refused whole: none was applied
                        answers = [{"errno": errno.EIO, "error": repr(exc)}] * len(ops)
                self._stalled = False
                del self._ops[:len(ops)]
                for op, answer in zip(ops, answers):
                    if not isinstance(answer, dict):
                        answer = {"errno": errno.EIO, "error": f"answered {answer!r:.80}"}
                    if op.rider:
                        op.answer = answer
                    else:
                        self._answered(op, answer)

    async def _send(self, ops: list[QueuedOp]) -> list[Any]:
        open_now = set(self._open_inos())
        batch = []
        for op in ops:
            args = op.args
            if op.method in ("unlink", "rename"):       # what it removes may be open here
                args = dict(args, open_inos=[op.child] if op.child in open_now else [])
            if (args.get("fence") or 0) < 0:
                args = dict(args, fence=self._fence_of(args["ino"], args["fence"]))
            batch.append({"method": op.method, "args": args, "time_ns": op.at_ns, "req": op.req,
                          "fences": [[f[0], self._fence_of(f[0], f[1]), *f[2:]]
                                     for f in op.fences]})
        answers: list[Any] = await self.v.call("batch", ops=batch)
        return answers
