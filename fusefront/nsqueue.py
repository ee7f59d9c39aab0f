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

An op the node refuses although this mount answered it already (its
lease was lost: a partition, an expired session) is reported to
``failed`` (logged as an error, the directory's cached view dropped, the
next fsyncdir fails).  An op answered "no such entry" is done: the name
is gone either way (a batch sent again after its answer was lost).
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

DRAIN_DELAY = 0.01          # seconds an op waits for others to share its batch
RETRY_DELAY = 1.0           # after a drain failed for want of the metadata node
BATCH_MAX = 256             # ops per batch RPC (the node's limit)


@dataclass
class QueuedOp:
    method: str
    parent: int
    name: bytes
    child: int
    fences: list[list[int]]         # [ino, epoch of this mount's WRITE cache lease]


class NamespaceQueue:
    def __init__(self, volume: Volume, *, failed: Callable[[QueuedOp, str], None],
                 spawn: Spawn, open_inos: Callable[[], list[int]]) -> None:
        self.v = volume
        self._failed = failed
        self._spawn = spawn
        self._open_inos = open_inos
        self._ops: list[QueuedOp] = []
        self._lock = trio.Lock()
        self._timer = False

    def __len__(self) -> int:
        return len(self._ops)

    def add(self, op: QueuedOp) -> None:
        self._ops.append(op)
        if not self._timer:
            self._timer = True
            self._spawn(self._later)

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

    async def drain(self) -> None:
        """Send everything queued now, in order; MetaUnavailable (the ops
        stay queued) when the metadata node cannot be reached."""
        if not self._ops:
            return
        async with self._lock:
            while self._ops:
                ops = self._ops[:BATCH_MAX]
                with trio.CancelScope(shield=True):
                    try:
                        answers = await self._send(ops)
                    except MetaUnavailable:
                        raise
                    except Exception as exc:        # refused whole: none was applied
                        answers = [{"errno": errno.EIO, "error": repr(exc)}] * len(ops)
                del self._ops[:len(ops)]
                for op, answer in zip(ops, answers):
                    if not isinstance(answer, dict):
                        answer = {"errno": errno.EIO, "error": f"answered {answer!r:.80}"}
                    code = answer.get("errno")
                    if code is not None and code != errno.ENOENT:
                        self._failed(op, str(answer.get("error", code)))

    async def _send(self, ops: list[QueuedOp]) -> list[Any]:
        open_now = set(self._open_inos())
        batch = [{"method": op.method, "fences": op.fences,
                  "args": {"parent": op.parent, "name": op.name}
                  if op.method == "rmdir" else
                  {"parent": op.parent, "name": op.name,
                   "open_inos": [op.child] if op.child in open_now else []}}
                 for op in ops]
        answers: list[Any] = await self.v.call("batch", ops=batch)
        return answers
