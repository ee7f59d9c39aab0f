"""The metadata node's lease service: the async shell around ``leases.LeaseTable``.

How this works
--------------
``LeaseTable`` decides (pure, clock injected); this class only moves
messages and time:

- one timer task (``run``) sleeps until the table's next deadline or until
  a call wakes it, ticks the table and delivers its events: a ``Recall``
  goes to its session's mailbox (read by the client's long-poll ``events``
  call and repeated in every ``renew`` answer); a ``Granted`` or ``Dropped``
  wakes the RPC waiting on that ticket;
- ``hold`` takes WRITE *op leases* for one metadata operation on every
  inode it changes (a directory gaining or losing an entry, an inode whose
  attributes change), in ascending key order so two operations never
  deadlock; taking them recalls every other client's cached view of those
  inodes, and the operation proceeds only when those clients have released
  (or their leases have run out).  ``unhold`` releases them after the
  operation is committed;
- ``acquire`` gives a client a *cache lease* now or never (``wait=False``:
  a lookup that cannot cache simply answers without caching) or waits for
  it (opens);
- operations from callers without a session (admin tools, the node's own
  background work) run under one internal session kept alive here.

Epochs are fencing tokens and must grow across restarts: the first epoch is
the wall clock in microseconds.  A restarted node grants nothing for one
lease time plus the skew margin (the ``not_before`` quiet period), so every
lease of its previous life has ended on the clients before a conflicting
one is granted.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import trio

from .ids import InodeId, VolumeId
from .leases import (Busy, Dropped, Epoch, Grant, Granted, LeaseConfig, LeaseKey, LeaseTable,
                     Mode, NoSession, Recall, SessionId, Ticket, Wait)

log = logging.getLogger(__name__)

INTERNAL = SessionId("meta-internal")
EVENTS_WAIT_MAX = 25.0         # longest a long-poll ``events`` call is held


@dataclass
class _Mailbox:
    recalls: list[Recall] = field(default_factory=list)
    ready: trio.Event = field(default_factory=trio.Event)


@dataclass
class _Waiting:
    done: trio.Event = field(default_factory=trio.Event)
    grant: Grant | None = None


def grant_map(grant: Grant, now: float) -> dict[str, Any]:
    return {"vol": grant.key.vol, "ino": grant.key.ino, "epoch": grant.epoch,
            "mode": grant.mode.value, "cache": grant.cache,
            "expires_in": None if math.isinf(grant.expires) else grant.expires - now}


def recall_map(recall: Recall, now: float) -> dict[str, Any]:
    return {"vol": recall.key.vol, "ino": recall.key.ino, "epoch": recall.epoch,
            "deadline_in": recall.deadline - now}


class LeaseServer:
    def __init__(self, config: LeaseConfig | None = None,
                 clock: Callable[[], float] = trio.current_time,
                 quiet: bool = False) -> None:
        self.config = config or LeaseConfig()
        self._clock = clock
        now = clock()
        not_before = now + self.config.lease_time + self.config.skew_margin if quiet else -math.inf
        # a mount's ops queued under leases of this node's earlier life are
        # sent again within a second or two of the restart (reclaim_write)
        self.table = LeaseTable(self.config, now=now, first_epoch=time.time_ns() // 1000,
                                not_before=not_before,
                                reclaim_until=now + self.config.lease_time)
        self.table.open_session(INTERNAL, now)
        self._mail: dict[SessionId, _Mailbox] = {}
        self._waiting: dict[Ticket, _Waiting] = {}
        self._wake = trio.Event()

    # ---- the timer task

    async def run(self) -> None:
        renew_at = self._clock()
        while True:
            deadline = self.table.next_deadline()
            with trio.move_on_at(min(deadline or math.inf, renew_at)):
                await self._wake.wait()
            self._wake = trio.Event()
            now = self._clock()
            if now >= renew_at:
                self.table.renew(INTERNAL, now)
                renew_at = now + self.config.lease_time / 3
            self.table.tick(now)
            self._send_events()

    def _deliver(self) -> None:
        """Send the table's events and let the timer task re-plan (a call
        may have moved the next deadline)."""
        self._send_events()
        self._wake.set()

    def _send_events(self) -> None:
        for event in self.table.take_events():
            if isinstance(event, Recall):
                box = self._mail.setdefault(event.session, _Mailbox())
                box.recalls.append(event)
                box.ready.set()
            elif isinstance(event, (Granted, Dropped)):
                waiting = self._waiting.pop(event.ticket, None)
                if waiting is not None:
                    waiting.grant = event.grant if isinstance(event, Granted) else None
                    waiting.done.set()

    # ---- sessions

    def open_session(self) -> dict[str, Any]:
        session = SessionId(secrets.token_hex(16))
        self.table.open_session(session, self._clock())
        self._deliver()
        return {"session": session, "lease_time": self.config.lease_time,
                "skew_margin": self.config.skew_margin}

    def renew(self, session: str) -> dict[str, Any]:
        now = self._clock()
        renewal = self.table.renew(SessionId(session), now)
        self._deliver()
        return {"expires_in": renewal.expires - now,
                "recalls": [recall_map(r, now) for r in renewal.recalls]}

    def close_session(self, session: str) -> None:
        self.table.close_session(SessionId(session), self._clock())
        self._mail.pop(SessionId(session), None)
        self._deliver()

    async def events(self, session: str, wait: float) -> list[dict[str, Any]]:
        """Recalls for ``session``, waiting up to ``wait`` seconds for one."""
        sid = SessionId(session)
        if self.table.session_expires(sid) is None:
            raise NoSession(session)
        box = self._mail.setdefault(sid, _Mailbox())
        if not box.recalls:
            with trio.move_on_after(min(wait, EVENTS_WAIT_MAX)):
                await box.ready.wait()
        recalls, box.recalls = box.recalls, []
        box.ready = trio.Event()
        now = self._clock()
        return [recall_map(r, now) for r in recalls]

    # ---- leases

    async def acquire(self, session: str | None, key: LeaseKey, mode: Mode, *,
                      cache: bool, wait: bool) -> Grant | None:
        """A lease now, after waiting (``wait``), or None (not now / busy / session gone)."""
        if not wait:
            return self.try_acquire(session, key, mode, cache=cache)
        sid = SessionId(session) if session else INTERNAL
        answer = self.table.acquire(sid, key, mode, self._clock(), cache=cache)
        self._deliver()
        if isinstance(answer, Grant):
            return answer
        if isinstance(answer, Busy):
            return None
        assert isinstance(answer, Wait)
        return await self._wait_for(answer.ticket)

    def try_acquire(self, session: str | None, key: LeaseKey, mode: Mode, *,
                    cache: bool) -> Grant | None:
        """A lease now or None; synchronous, so no other task runs meanwhile."""
        sid = SessionId(session) if session else INTERNAL
        answer = self.table.acquire(sid, key, mode, self._clock(), cache=cache)
        self._deliver()
        if isinstance(answer, Wait):
            self.table.cancel(answer.ticket, self._clock())
            self._deliver()
            return None
        return answer if isinstance(answer, Grant) else None

    async def _wait_for(self, ticket: Ticket) -> Grant | None:
        waiting = self._waiting[ticket] = _Waiting()
        try:
            await waiting.done.wait()
        except BaseException:         # cancelled (the caller gave up): withdraw
            if self._waiting.pop(ticket, None) is not None:
                self.table.cancel(ticket, self._clock())
                self._deliver()
            if waiting.grant is not None:
                self.release(waiting.grant.session, [waiting.grant.epoch])
            raise
        return waiting.grant

    def release(self, session: str | None, epochs: Iterable[int]) -> None:
        sid = SessionId(session) if session else INTERNAL
        now = self._clock()
        for epoch in epochs:
            self.table.release(sid, Epoch(epoch), now)
        self._deliver()

    async def hold(self, session: str | None, keys: Iterable[tuple[int, int]]) -> list[Grant]:
        """WRITE op leases on ``keys`` for one operation (waits out recalls)."""
        grants: list[Grant] = []
        try:
            for vol, ino in sorted(set(keys)):
                grant = await self.acquire(session, LeaseKey(VolumeId(vol), InodeId(ino)),
                                           Mode.WRITE, cache=False, wait=True)
                if grant is None:
                    raise NoSession(session or INTERNAL)
                grants.append(grant)
        except BaseException:
            self.unhold(grants)
            raise
        return grants

    def unhold(self, grants: Iterable[Grant]) -> None:
        now = self._clock()
        for grant in grants:
            self.table.release(grant.session, grant.epoch, now)
        self._deliver()

    async def after_writer(self, session: str, key: LeaseKey, limit: float) -> Grant | None:
        """If another session holds a WRITE cache lease on ``key`` (it may be
        buffering writes and attribute changes), a READ lease for
        ``session`` once that one is recalled and released, waiting at most
        ``limit`` seconds; None if there is no such writer or it took longer."""
        if not any(g.mode is Mode.WRITE and g.cache and g.session != session
                   for g in self.table.holders(key)):
            return None
        with trio.move_on_after(limit):
            return await self.acquire(session, key, Mode.READ, cache=True, wait=True)
        return None

    def reclaim_write(self, session: str, vol: int, ino: int, epoch: int) -> Grant | None:
        """``admit_write`` for a WRITE lease of the node's earlier life, if it
        may be taken back (``LeaseTable.reclaim_write``)."""
        grant = self.table.reclaim_write(SessionId(session), LeaseKey(VolumeId(vol), InodeId(ino)),
                                         Epoch(epoch), self._clock())
        self._deliver()
        return grant

    def admit_write(self, session: str, vol: int, ino: int, epoch: int) -> Grant | None:
        """An op lease for a commit carried under WRITE cache lease ``epoch``,
        or None: the lease is gone (expired or recalled and released)."""
        grant = self.table.admit_write(SessionId(session),
                                       LeaseKey(VolumeId(vol), InodeId(ino)),
                                       Epoch(epoch), self._clock())
        self._deliver()
        return grant
