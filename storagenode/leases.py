"""Leases and recalls: which client may cache what, as a pure state machine.

How this works
--------------
A client (one mount) opens a *session* and renews it by keepalive; a session
not renewed for ``lease_time`` seconds expires, and every cache lease it
holds and every request it has queued ends with it.

A lease names a key, one inode ``(vol, ino)``, and a mode.  READ is shared:
its holder may cache the inode's attributes and data, or a directory's
entries (negative lookups included).  WRITE is exclusive: its holder may
buffer writes and own size and mtime.  Two leases conflict when they belong
to different sessions and one of them is WRITE; a session never conflicts
with itself, so a client's own change keeps its own READ lease.

A lease is a *cache lease* (``cache=True``: held by a client, lives as long
as its session and, once recalled, no longer than its recall deadline) or an
*op lease* (``cache=False``: held by the metadata node for one operation on
behalf of a session, never expires, released by the node before it answers
that operation).  Every change to an inode (create/unlink/rename in a
directory, setattr, a commit) runs under a WRITE lease on that inode.

Per key the states are: no leases; READ leases held; one session's leases
(READ and/or WRITE) held; and, in any of these, a FIFO queue of waiting
requests.  A request is granted at once when no lease of another session
conflicts with it and nobody is queued (or the session already holds a
non-recalled cache lease that covers it, which cannot hurt anyone queued);
otherwise it queues.  Queued requests are granted strictly in order, as far
as the head allows, so a stream of readers cannot starve a writer.  Every
cache lease that conflicts with a queued request of another session is
*recalled*: its holder must flush, invalidate and release it.  A recalled
lease is renewed by keepalives only up to its recall deadline,
``max(session expiry at the recall, recall time + recall_timeout)``, so it
ends without the holder's help at the latest then.

Invariants (``check_invariants`` asserts them; the tests use it as oracle):
- no two leases on one key conflict;
- every cache lease that conflicts with a queued request is recalled;
- the head of every queue is blocked (all that can be granted, is);
- every cache lease and every queued request belongs to a live session;
- a lease's end never moves earlier: the server never forgets a lease
  before the time its holder was told;
- epochs come from one counter, so every grant on a key carries a larger
  epoch than every earlier one; the epoch names the lease and fences its
  writes (``check_fence``, ``admit_write``).

Time is an argument (monotonic float seconds, never backwards).  Calls
return their answer; messages for other parties (recalls, grants to queued
requests, dropped requests) collect in an outbox (``take_events``);
``next_deadline`` says when ``tick`` must run next.  No I/O, no clock.
See docs/LEASES.md for the protocol around it.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, NamedTuple, NewType, Union

from .ids import InodeId, VolumeId

SessionId = NewType("SessionId", str)
Epoch = NewType("Epoch", int)      # names one grant; also its fencing token
Ticket = NewType("Ticket", int)    # names one queued request
NEVER = math.inf


class Mode(Enum):
    READ = "read"
    WRITE = "write"


def conflicts(a: Mode, b: Mode) -> bool:
    """Whether leases in modes ``a`` and ``b`` of two sessions conflict."""
    return a is Mode.WRITE or b is Mode.WRITE


def covers(held: Mode, wanted: Mode) -> bool:
    return held is Mode.WRITE or wanted is Mode.READ


class LeaseKey(NamedTuple):
    """One inode, file or directory.  Ordered: take several in ascending order."""

    vol: VolumeId
    ino: InodeId


@dataclass(frozen=True)
class LeaseConfig:
    """Timeouts (seconds) and bounds."""

    lease_time: float = 10.0        # a session lives this long after a renewal
    recall_timeout: float = 30.0    # a recalled holder may renew this long to flush
    skew_margin: float = 1.0        # a client stops using leases this much early
    max_sessions: int = 10_000
    max_leases_per_session: int = 100_000   # cache leases; beyond: no-cache grants
    max_cached_leases: int = 1_000_000      # cache leases in all; beyond: no-cache
    max_waiters_per_key: int = 64           # beyond: Busy
    max_waiters: int = 10_000               # beyond: Busy

    def __post_init__(self) -> None:
        if not 0 <= self.skew_margin < self.lease_time:
            raise ValueError("need 0 <= skew_margin < lease_time")
        if self.recall_timeout < 0:
            raise ValueError("recall_timeout must be >= 0")
        if min(self.max_sessions, self.max_waiters_per_key, self.max_waiters) < 1:
            raise ValueError("session and waiter bounds must be >= 1")


def client_valid_until(sent_at: float, config: LeaseConfig) -> float:
    """Until when (client clock) a client may use its cache leases.

    ``sent_at`` is when the client sent the last renewal that was answered:
    the server started its count later, so the client's end comes first,
    and the margin covers clocks that run at different rates.
    """
    return sent_at + config.lease_time - config.skew_margin


# ---- answers --------------------------------------------------------------

@dataclass(frozen=True)
class Grant:
    """A lease granted.  ``cache=False``: an op lease, for one operation only
    (the node releases it before answering; the client must not cache).
    ``expires``: for a cache lease its session's expiry at the grant (the
    wire carries ``expires - now``); NEVER for an op lease."""

    key: LeaseKey
    session: SessionId
    epoch: Epoch
    mode: Mode
    cache: bool
    expires: float


@dataclass(frozen=True)
class Wait:
    """Queued: a ``Granted`` (or ``Dropped``) event with this ticket follows."""

    ticket: Ticket


@dataclass(frozen=True)
class Busy:
    """Not queued: a waiter bound is reached.  Retry after a backoff."""

    reason: str


Answer = Union[Grant, Wait, Busy]


# ---- events (the outbox) --------------------------------------------------

@dataclass(frozen=True)
class Recall:
    """To ``session``: flush, invalidate and release lease ``epoch``.
    Without a release the lease ends at ``deadline`` (or session expiry)."""

    session: SessionId
    key: LeaseKey
    epoch: Epoch
    deadline: float


@dataclass(frozen=True)
class Granted:
    """Answer queued request ``ticket`` with ``grant``."""

    ticket: Ticket
    grant: Grant


@dataclass(frozen=True)
class Dropped:
    """Queued request ``ticket`` ends unanswered: its session ended."""

    ticket: Ticket
    session: SessionId
    key: LeaseKey


@dataclass(frozen=True)
class SessionExpired:
    session: SessionId


@dataclass(frozen=True)
class LeaseExpired:
    """A recalled lease reached its deadline without a release."""

    session: SessionId
    key: LeaseKey
    epoch: Epoch


Event = Union[Recall, Granted, Dropped, SessionExpired, LeaseExpired]


@dataclass(frozen=True)
class Renewal:
    """Answer to a keepalive: the new session expiry and every outstanding
    recall of the session again (a recall message may have been lost)."""

    expires: float
    recalls: tuple[Recall, ...]


class LeaseError(Exception):
    """A request the table refuses; the wrapper maps it to an RPC error."""


class NoSession(LeaseError):
    """Unknown or expired session: its leases are gone; open a new one."""


class SessionExists(LeaseError):
    pass


class SessionLimit(LeaseError):
    pass


# ---- internal state -------------------------------------------------------

@dataclass
class _Session:
    expires: float
    cached: set[Epoch] = field(default_factory=set)     # its cache leases
    recalled: set[Epoch] = field(default_factory=set)   # those being recalled
    tickets: set[Ticket] = field(default_factory=set)   # its queued requests


@dataclass
class _Lease:
    epoch: Epoch
    session: SessionId
    key: LeaseKey
    mode: Mode
    cache: bool
    recalled: bool = False
    deadline: float = NEVER     # recall deadline, once recalled


@dataclass
class _Waiter:
    ticket: Ticket
    session: SessionId
    key: LeaseKey
    mode: Mode
    cache: bool


@dataclass
class _Key:
    leases: dict[Epoch, _Lease] = field(default_factory=dict)
    queue: deque[_Waiter] = field(default_factory=deque)


class LeaseTable:
    """Sessions, leases and queued requests of one metadata primary.

    ``first_epoch`` must exceed every epoch an earlier table handed out
    (persist a high-water mark); ``not_before`` holds back every grant until
    then (a new primary waits out the leases of the old one).

    Until ``reclaim_until``, a session may take back a WRITE lease of the
    node's earlier life for one change (``reclaim_write``): the ops a mount
    queued under it, refused otherwise once a restart forgot it.  Only on
    a key no other session was granted anything on in this life (so
    nobody saw or changed it since the restart); the caller checks that
    nothing changed it before (the inode's ctime is the one the op was
    made on).
    """

    def __init__(self, config: LeaseConfig | None = None, *, now: float,
                 first_epoch: int = 1, not_before: float = -NEVER,
                 reclaim_until: float = -NEVER) -> None:
        self.config = config or LeaseConfig()
        self._now = now
        self._quiet_until = not_before
        self._first_epoch = first_epoch
        self._next_epoch = first_epoch
        self._reclaim_until = reclaim_until
        # while reclaims are taken: the one session granted a lease on a
        # key in this life, or None once several were
        self._life: dict[LeaseKey, SessionId | None] = {}
        self._next_ticket = 1
        self._sessions: dict[SessionId, _Session] = {}
        self._leases: dict[Epoch, _Lease] = {}
        self._waiters: dict[Ticket, _Waiter] = {}
        self._keys: dict[LeaseKey, _Key] = {}
        self._cached_count = 0
        self._session_timers: list[tuple[float, SessionId]] = []
        self._recall_timers: list[tuple[float, Epoch]] = []
        self._outbox: list[Event] = []

    # ---- sessions ---------------------------------------------------------

    def open_session(self, session: SessionId, now: float) -> float:
        """Start ``session`` (a fresh, unguessable id); returns its expiry."""
        self._advance(now)
        if session in self._sessions:
            raise SessionExists(session)
        if len(self._sessions) >= self.config.max_sessions:
            raise SessionLimit(f"{len(self._sessions)} sessions open")
        self._sessions[session] = _Session(expires=NEVER)
        return self._extend(session)

    def renew(self, session: SessionId, now: float) -> Renewal:
        """Keepalive.  NoSession once the session has expired (at expiry or later)."""
        self._advance(now)
        self._live(session)
        expires = self._extend(session)
        return Renewal(expires, self._recalls_of(session))

    def close_session(self, session: SessionId, now: float) -> None:
        """Clean end (unmount, after flushing): drop all its leases and requests."""
        self._advance(now)
        if session in self._sessions:
            self._pump_all(self._end_session(session))

    # ---- leases -----------------------------------------------------------

    def acquire(self, session: SessionId, key: LeaseKey, mode: Mode, now: float,
                *, cache: bool = True) -> Answer:
        """Ask for a lease: a Grant now, a Wait (Granted event later) or Busy."""
        self._advance(now)
        self._live(session)
        ks = self._keys.setdefault(key, _Key())
        own = self._covering(ks, session, mode)
        if own is not None and cache:
            return self._view(own)
        if self._grantable(ks, session, mode) and (not ks.queue or own is not None):
            grant = self._grant(session, key, mode, cache)
            self._recall_conflicts(ks)
            return grant
        return self._enqueue(ks, _Waiter(Ticket(0), session, key, mode, cache))

    def release(self, session: SessionId, epoch: Epoch, now: float) -> bool:
        """Give lease ``epoch`` back; False if it is not (or no longer) held."""
        self._advance(now)
        lease = self._leases.get(epoch)
        if lease is None or lease.session != session:
            return False
        self._drop_lease(lease)
        self._pump(lease.key)
        return True

    def cancel(self, ticket: Ticket, now: float) -> bool:
        """Withdraw a queued request (its RPC gave up); False if not queued."""
        self._advance(now)
        waiter = self._waiters.get(ticket)
        if waiter is None:
            return False
        self._unqueue(waiter)
        self._pump(waiter.key)
        return True

    def check_fence(self, session: SessionId, key: LeaseKey, epoch: Epoch,
                    now: float) -> bool:
        """Whether ``session`` holds the live WRITE cache lease ``epoch`` on ``key``."""
        self._advance(now)
        lease = self._leases.get(epoch)
        return (lease is not None and lease.cache and lease.session == session
                and lease.key == key and lease.mode is Mode.WRITE)

    def admit_write(self, session: SessionId, key: LeaseKey, epoch: Epoch,
                    now: float) -> Grant | None:
        """Admit one change carried under WRITE lease ``epoch``: an op lease
        that pins the key until the node releases it after applying the
        change (so the lease cannot end mid-change), or None: fenced out."""
        if not self.check_fence(session, key, epoch, now):
            return None
        return self._grant(session, key, Mode.WRITE, cache=False)

    # ---- time and outbox --------------------------------------------------

    def tick(self, now: float) -> None:
        """Expire what is due at ``now`` and grant what that unblocks."""
        self._advance(now)

    def next_deadline(self) -> float | None:
        """When ``tick`` must run next (None: nothing is timed)."""
        times = [t for t in (self._next_session_timer(), self._next_recall_timer())
                 if t is not None and t != NEVER]
        if self._quiet_until > self._now and self._waiters:
            times.append(self._quiet_until)
        return min(times, default=None)

    def take_events(self) -> list[Event]:
        """Messages to send, in order; the outbox is emptied."""
        events, self._outbox = self._outbox, []
        return events

    # ---- introspection ----------------------------------------------------

    def holders(self, key: LeaseKey) -> list[Grant]:
        ks = self._keys.get(key)
        return [] if ks is None else [self._view(lease) for lease in ks.leases.values()]

    def queued(self, key: LeaseKey) -> list[Ticket]:
        ks = self._keys.get(key)
        return [] if ks is None else [w.ticket for w in ks.queue]

    def lease_count(self) -> int:
        """Leases held now, of every session and kind (a metric)."""
        return len(self._leases)

    def session_expires(self, session: SessionId) -> float | None:
        s = self._sessions.get(session)
        return None if s is None else s.expires

    def check_invariants(self) -> None:
        """Raise AssertionError if the table's invariants do not hold."""
        for key, ks in self._keys.items():
            assert ks.leases or ks.queue, f"idle key kept {key}"
            self._check_key(ks)
        self._check_indexes()

    # ---- granting ---------------------------------------------------------

    def _grantable(self, ks: _Key, session: SessionId, mode: Mode) -> bool:
        if self._now < self._quiet_until:
            return False
        return not any(lease.session != session and conflicts(lease.mode, mode)
                       for lease in ks.leases.values())

    def _covering(self, ks: _Key, session: SessionId, mode: Mode) -> _Lease | None:
        """The session's live cache lease that covers ``mode``; its WRITE
        lease if it holds one too (so a READ request of a writer answers
        with the lease its buffered writes are under)."""
        found = None
        for lease in ks.leases.values():
            if (lease.session == session and lease.cache and not lease.recalled
                    and covers(lease.mode, mode)):
                if lease.mode is Mode.WRITE:
                    return lease
                found = found or lease
        return found

    def reclaim_write(self, session: SessionId, key: LeaseKey, epoch: Epoch,
                      now: float) -> Grant | None:
        """An op lease for a change carried under WRITE lease ``epoch`` of
        the node's earlier life (see the class), or None."""
        self._advance(now)
        if now >= self._reclaim_until or not 0 < epoch < self._first_epoch \
                or session not in self._sessions \
                or self._life.get(key, session) != session:
            return None
        ks = self._keys.setdefault(key, _Key())
        if any(lease.session != session for lease in ks.leases.values()):
            self._forget_if_idle(key)
            return None
        return self._grant(session, key, Mode.WRITE, cache=False)

    def _grant(self, session: SessionId, key: LeaseKey, mode: Mode,
               cache: bool) -> Grant:
        if self._now < self._reclaim_until:
            if self._life.setdefault(key, session) != session:
                self._life[key] = None
        elif self._life:
            self._life.clear()
        cache = cache and self._may_cache(session)
        lease = _Lease(Epoch(self._next_epoch), session, key, mode, cache)
        self._next_epoch += 1
        self._leases[lease.epoch] = lease
        self._keys[key].leases[lease.epoch] = lease
        if cache:
            self._sessions[session].cached.add(lease.epoch)
            self._cached_count += 1
        return self._view(lease)

    def _may_cache(self, session: SessionId) -> bool:
        held = len(self._sessions[session].cached)
        return (held < self.config.max_leases_per_session
                and self._cached_count < self.config.max_cached_leases)

    def _view(self, lease: _Lease) -> Grant:
        expires = NEVER
        if lease.cache:
            expires = min(self._sessions[lease.session].expires, lease.deadline)
        return Grant(lease.key, lease.session, lease.epoch, lease.mode,
                     lease.cache, expires)

    def _enqueue(self, ks: _Key, waiter: _Waiter) -> Answer:
        busy = self._busy(ks)
        if busy is not None:
            self._forget_if_idle(waiter.key)
            return Busy(busy)
        waiter.ticket = Ticket(self._next_ticket)
        self._next_ticket += 1
        ks.queue.append(waiter)
        self._waiters[waiter.ticket] = waiter
        self._sessions[waiter.session].tickets.add(waiter.ticket)
        self._recall_conflicts(ks)
        return Wait(waiter.ticket)

    def _busy(self, ks: _Key) -> str | None:
        if len(ks.queue) >= self.config.max_waiters_per_key:
            return f"{len(ks.queue)} requests queued on this key"
        if len(self._waiters) >= self.config.max_waiters:
            return f"{len(self._waiters)} requests queued"
        return None

    def _forget_if_idle(self, key: LeaseKey) -> None:
        ks = self._keys[key]
        if not ks.leases and not ks.queue:
            del self._keys[key]

    def _unqueue(self, waiter: _Waiter) -> None:
        self._keys[waiter.key].queue.remove(waiter)
        del self._waiters[waiter.ticket]
        self._sessions[waiter.session].tickets.discard(waiter.ticket)

    def _pump(self, key: LeaseKey) -> None:
        """Grant queued requests in order while the head can be granted."""
        ks = self._keys.get(key)
        if ks is None:
            return
        while ks.queue and self._grantable(ks, ks.queue[0].session, ks.queue[0].mode):
            waiter = ks.queue[0]
            self._unqueue(waiter)
            grant = self._grant(waiter.session, key, waiter.mode, waiter.cache)
            self._outbox.append(Granted(waiter.ticket, grant))
        self._recall_conflicts(ks)
        self._forget_if_idle(key)

    def _pump_all(self, keys: Iterable[LeaseKey]) -> None:
        for key in sorted(set(keys)):
            self._pump(key)

    # ---- recalling --------------------------------------------------------

    def _recall_conflicts(self, ks: _Key) -> None:
        """Recall every cache lease a queued request of another session needs."""
        waiting = {w.session for w in ks.queue}
        writing = {w.session for w in ks.queue if w.mode is Mode.WRITE}
        for lease in ks.leases.values():
            wanted_by = waiting if lease.mode is Mode.WRITE else writing
            if lease.cache and not lease.recalled and wanted_by - {lease.session}:
                self._recall(lease)

    def _recall(self, lease: _Lease) -> None:
        session = self._sessions[lease.session]
        lease.recalled = True
        lease.deadline = max(session.expires, self._now + self.config.recall_timeout)
        session.recalled.add(lease.epoch)
        heapq.heappush(self._recall_timers, (lease.deadline, lease.epoch))
        self._outbox.append(self._recall_message(lease))

    def _recall_message(self, lease: _Lease) -> Recall:
        return Recall(lease.session, lease.key, lease.epoch, lease.deadline)

    def _recalls_of(self, session: SessionId) -> tuple[Recall, ...]:
        epochs = sorted(self._sessions[session].recalled)
        return tuple(self._recall_message(self._leases[e]) for e in epochs)

    # ---- ending things ----------------------------------------------------

    def _drop_lease(self, lease: _Lease) -> None:
        del self._leases[lease.epoch]
        del self._keys[lease.key].leases[lease.epoch]
        session = self._sessions.get(lease.session)
        if lease.cache and session is not None:
            session.cached.discard(lease.epoch)
            session.recalled.discard(lease.epoch)
            self._cached_count -= 1

    def _end_session(self, session: SessionId) -> list[LeaseKey]:
        """Drop a session's cache leases and queued requests (not its op
        leases: the node still runs those operations); the keys touched."""
        s = self._sessions[session]
        touched = [self._leases[e].key for e in s.cached]
        for epoch in sorted(s.cached):
            self._drop_lease(self._leases[epoch])
        for ticket in sorted(s.tickets):
            waiter = self._waiters[ticket]
            self._unqueue(waiter)
            touched.append(waiter.key)
            self._outbox.append(Dropped(ticket, session, waiter.key))
        del self._sessions[session]
        return touched

    # ---- time -------------------------------------------------------------

    def _advance(self, now: float) -> None:
        if now < self._now:
            raise ValueError(f"time went backwards: {now} < {self._now}")
        self._now = now
        touched = self._expire_sessions() + self._expire_recalled()
        if self._quiet_until != -NEVER and now >= self._quiet_until:
            self._quiet_until = -NEVER
            touched += [w.key for w in self._waiters.values()]
        self._pump_all(touched)

    def _extend(self, session: SessionId) -> float:
        expires = self._now + self.config.lease_time
        self._sessions[session].expires = expires
        heapq.heappush(self._session_timers, (expires, session))
        return expires

    def _live(self, session: SessionId) -> None:
        if session not in self._sessions:
            raise NoSession(session)

    def _next_session_timer(self) -> float | None:
        """Earliest live session timer; stale ones (renewed since) are dropped."""
        timers = self._session_timers
        while timers:
            when, sid = timers[0]
            s = self._sessions.get(sid)
            if s is not None and s.expires == when:
                return when
            heapq.heappop(timers)
        return None

    def _next_recall_timer(self) -> float | None:
        timers = self._recall_timers
        while timers:
            when, epoch = timers[0]
            lease = self._leases.get(epoch)
            if lease is not None and lease.recalled and lease.deadline == when:
                return when
            heapq.heappop(timers)
        return None

    def _expire_sessions(self) -> list[LeaseKey]:
        touched: list[LeaseKey] = []
        while (when := self._next_session_timer()) is not None and when <= self._now:
            _, sid = heapq.heappop(self._session_timers)
            touched += self._end_session(sid)
            self._outbox.append(SessionExpired(sid))
        return touched

    def _expire_recalled(self) -> list[LeaseKey]:
        touched: list[LeaseKey] = []
        while (when := self._next_recall_timer()) is not None and when <= self._now:
            _, epoch = heapq.heappop(self._recall_timers)
            lease = self._leases[epoch]
            self._drop_lease(lease)
            touched.append(lease.key)
            self._outbox.append(LeaseExpired(lease.session, lease.key, epoch))
        return touched

    # ---- invariant checks -------------------------------------------------

    def _check_key(self, ks: _Key) -> None:
        leases = list(ks.leases.values())
        for i, a in enumerate(leases):
            for b in leases[i + 1:]:
                assert a.session == b.session or not conflicts(a.mode, b.mode), (a, b)
        for w in ks.queue:
            assert w.session in self._sessions, w
            for lease in leases:
                if lease.cache and lease.session != w.session \
                        and conflicts(lease.mode, w.mode):
                    assert lease.recalled, (lease, w)
        if ks.queue:
            head = ks.queue[0]
            assert not self._grantable(ks, head.session, head.mode), head

    def _check_indexes(self) -> None:
        cached = 0
        for epoch, lease in self._leases.items():
            assert self._keys[lease.key].leases[epoch] is lease
            assert lease.epoch < self._next_epoch
            if lease.cache:
                cached += 1
                s = self._sessions[lease.session]
                assert epoch in s.cached and (epoch in s.recalled) == lease.recalled
                assert lease.deadline > self._now
        assert cached == self._cached_count
        assert sum(len(ks.leases) for ks in self._keys.values()) == len(self._leases)
        for sid, s in self._sessions.items():
            assert s.expires > self._now, sid
            assert all(self._waiters[t].session == sid for t in s.tickets)
        assert sum(len(ks.queue) for ks in self._keys.values()) == len(self._waiters)
