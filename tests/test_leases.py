"""The lease and recall state machine, driven directly with a fake clock: no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from storagenode.ids import InodeId, VolumeId
from storagenode.leases import (
    NEVER, Answer, Busy, Dropped, Epoch, Event, Grant, Granted, LeaseConfig,
    LeaseExpired, LeaseKey, LeaseTable, Mode, NoSession, Recall, SessionExists,
    SessionExpired, SessionId, SessionLimit, Ticket, Wait, client_valid_until,
    conflicts,
)

R, W = Mode.READ, Mode.WRITE
CFG = LeaseConfig(lease_time=10.0, recall_timeout=20.0, skew_margin=1.0)
F = LeaseKey(VolumeId(1), InodeId(5))      # a file
G = LeaseKey(VolumeId(1), InodeId(6))      # another file
D = LeaseKey(VolumeId(1), InodeId(1))      # a directory
A, B, C, E = (SessionId(s) for s in "abce")


def table(*sessions: SessionId, config: LeaseConfig = CFG, now: float = 0.0,
          not_before: float = -NEVER) -> LeaseTable:
    t = LeaseTable(config, now=now, not_before=not_before)
    for s in sessions:
        t.open_session(s, now)
    return t


def granted(answer: Answer) -> Grant:
    assert isinstance(answer, Grant), answer
    return answer


def waits(answer: Answer) -> Ticket:
    assert isinstance(answer, Wait), answer
    return answer.ticket


def recalled(events: list[Event]) -> list[tuple[SessionId, Epoch]]:
    return [(e.session, e.epoch) for e in events if isinstance(e, Recall)]


def grants(events: list[Event]) -> dict[Ticket, Grant]:
    return {e.ticket: e.grant for e in events if isinstance(e, Granted)}


# ---- the rules, one by one -------------------------------------------------

def test_a_write_lease_of_the_earlier_life_is_taken_back_only_if_nobody_had_the_key() -> None:
    """After a restart (a new table, epochs from ``first_epoch`` on), a
    session may take back a WRITE lease of the earlier life for one change,
    during the reclaim window, on a key nobody else was granted anything
    on since; again and again for its queued ops; never an epoch of this
    life, nor after another session held the key, nor after the window."""
    t = LeaseTable(CFG, now=0.0, first_epoch=1000, reclaim_until=10.0)
    for s in (A, B):
        t.open_session(s, 0.0)
    first = t.reclaim_write(A, D, Epoch(7), 1.0)
    assert first is not None and first.mode is W and not first.cache
    assert t.reclaim_write(B, D, Epoch(8), 1.0) is None         # A holds it now
    t.release(A, first.epoch, 1.0)
    assert t.reclaim_write(A, D, Epoch(7), 1.5) is not None     # A's next queued op
    assert t.reclaim_write(B, D, Epoch(8), 1.5) is None         # A had it in this life
    assert t.reclaim_write(A, F, Epoch(1000), 1.5) is None      # not an earlier life's
    granted(t.acquire(B, G, R, 2.0))
    t.release(B, t.holders(G)[0].epoch, 2.0)
    assert t.reclaim_write(A, G, Epoch(7), 2.0) is None         # B saw it since
    assert t.reclaim_write(A, F, Epoch(7), 10.0) is None        # the window is over
    plain = LeaseTable(CFG, now=0.0, first_epoch=1000)
    plain.open_session(A, 0.0)
    assert plain.reclaim_write(A, D, Epoch(7), 0.0) is None     # no window: none


def test_a_read_request_of_a_writer_answers_with_its_write_lease() -> None:
    """A session holding a READ and then a WRITE lease on one file is told
    of the WRITE one when it asks to read (its buffered writes are under it)."""
    t = table(A)
    read = granted(t.acquire(A, F, R, 0.0))
    write = granted(t.acquire(A, F, W, 1.0))
    assert write.epoch != read.epoch
    again = granted(t.acquire(A, F, R, 2.0))
    assert (again.epoch, again.mode) == (write.epoch, W)


def test_shared_reads_are_granted_together() -> None:
    t = table(A, B)
    ga = granted(t.acquire(A, F, R, 0.0))
    gb = granted(t.acquire(B, F, R, 1.0))
    assert ga.cache and gb.cache and ga.expires == 10.0
    assert gb.epoch > ga.epoch
    assert t.take_events() == []
    assert {g.session for g in t.holders(F)} == {A, B}
    t.check_invariants()


def test_repeated_acquire_returns_the_same_lease() -> None:
    t = table(A)
    ga = granted(t.acquire(A, F, W, 0.0))
    assert granted(t.acquire(A, F, W, 1.0)) == ga
    assert granted(t.acquire(A, F, R, 1.0)) == ga     # WRITE covers READ
    assert len(t.holders(F)) == 1


def test_writer_recalls_every_reader_and_waits_for_all() -> None:
    t = table(A, B, C)
    ga = granted(t.acquire(A, F, R, 0.0))
    gb = granted(t.acquire(B, F, R, 0.0))
    ticket = waits(t.acquire(C, F, W, 1.0))
    events = t.take_events()
    assert recalled(events) == [(A, ga.epoch), (B, gb.epoch)]
    assert all(e.deadline == 21.0 for e in events if isinstance(e, Recall))
    assert t.release(A, ga.epoch, 2.0)
    assert t.take_events() == []                       # B still holds READ
    assert t.release(B, gb.epoch, 3.0)
    gc = grants(t.take_events())[ticket]
    assert (gc.session, gc.mode, gc.cache) == (C, W, True)
    assert gc.epoch > gb.epoch
    t.check_invariants()


def test_reader_of_a_file_being_written_recalls_the_writer() -> None:
    t = table(A, B)
    ga = granted(t.acquire(A, F, W, 0.0))
    ticket = waits(t.acquire(B, F, R, 1.0))
    assert recalled(t.take_events()) == [(A, ga.epoch)]
    op = t.admit_write(A, F, ga.epoch, 1.5)            # A flushes under its lease
    assert op is not None and not op.cache
    assert t.release(A, op.epoch, 1.6)                  # the node applied the commit
    assert t.take_events() == []                        # A has not released yet
    assert t.release(A, ga.epoch, 2.0)
    assert grants(t.take_events())[ticket].mode is R


def test_directory_change_recalls_other_clients_but_not_the_changer() -> None:
    t = table(A, B, C)
    da = granted(t.acquire(A, D, R, 0.0))
    db = granted(t.acquire(B, D, R, 0.0))
    dc = granted(t.acquire(C, D, R, 0.0))
    ticket = waits(t.acquire(A, D, W, 1.0, cache=False))    # A creates in D
    assert recalled(t.take_events()) == [(B, db.epoch), (C, dc.epoch)]
    t.release(B, db.epoch, 2.0)
    t.release(C, dc.epoch, 3.0)
    op = grants(t.take_events())[ticket]
    assert not op.cache and op.expires == NEVER
    assert da in t.holders(D)                               # A keeps its entries
    assert t.release(A, op.epoch, 3.1)
    assert t.holders(D) == [da]
    t.check_invariants()


def test_change_by_the_only_holder_is_immediate() -> None:
    t = table(A)
    da = granted(t.acquire(A, D, R, 0.0))
    op = granted(t.acquire(A, D, W, 1.0, cache=False))
    assert t.take_events() == [] and not op.cache
    t.release(A, op.epoch, 1.0)
    assert t.holders(D) == [da]


def test_release_answers_the_waiter_and_is_idempotent() -> None:
    t = table(A, B)
    ga = granted(t.acquire(A, F, W, 0.0))
    ticket = waits(t.acquire(B, F, W, 0.0))
    assert not t.release(B, ga.epoch, 1.0)      # not B's lease
    assert t.release(A, ga.epoch, 1.0)
    assert ticket in grants(t.take_events())
    assert not t.release(A, ga.epoch, 2.0)      # late duplicate: nothing happens
    assert [g.session for g in t.holders(F)] == [B]


def test_unresponsive_holder_expires_exactly_at_its_session_deadline() -> None:
    t = table(A, B)
    granted(t.acquire(A, F, W, 0.0))
    t.renew(B, 5.0)
    ticket = waits(t.acquire(B, F, R, 5.0))
    t.take_events()
    assert t.next_deadline() == 10.0
    t.tick(9.999)
    assert t.take_events() == []
    t.tick(10.0)
    events = t.take_events()
    assert SessionExpired(A) in events and ticket in grants(events)
    t.check_invariants()


def test_recalled_holder_that_renews_but_never_releases_ends_at_recall_deadline() -> None:
    t = table(A, B)
    ga = granted(t.acquire(A, F, W, 0.0))
    ticket = waits(t.acquire(B, F, R, 0.0))
    [rc] = [e for e in t.take_events() if isinstance(e, Recall)]
    assert rc.deadline == 20.0
    for now in (5.0, 10.0, 15.0):
        assert t.renew(A, now).recalls == (rc,)       # the recall again, every time
        t.renew(B, now)
    assert t.holders(F)[0].expires == 20.0            # renewals stop at the deadline
    t.tick(19.999)
    assert t.take_events() == [] and t.check_fence(A, F, ga.epoch, 19.999)
    t.tick(20.0)
    assert t.take_events() == [LeaseExpired(A, F, ga.epoch),
                               Granted(ticket, t.holders(F)[0])]
    assert not t.check_fence(A, F, ga.epoch, 20.0)
    assert t.renew(A, 20.0).recalls == ()             # A's session lives on


def test_a_recall_never_cuts_a_lease_short() -> None:
    t = table(A, B, config=LeaseConfig(lease_time=10.0, recall_timeout=0.0))
    granted(t.acquire(A, F, R, 0.0))
    t.renew(A, 8.0)                                   # A may cache until 18
    t.renew(B, 8.0)
    ticket = waits(t.acquire(B, F, W, 9.0))
    [rc] = [e for e in t.take_events() if isinstance(e, Recall)]
    assert rc.deadline == 18.0
    t.renew(A, 12.0)
    t.renew(B, 12.0)
    assert t.next_deadline() == 18.0
    t.tick(17.9)
    assert t.take_events() == []
    t.tick(18.0)
    assert ticket in grants(t.take_events())


def test_holder_asking_again_during_its_recall_queues_behind_the_writer() -> None:
    t = table(A, B)
    ga = granted(t.acquire(A, F, R, 0.0))
    tb = waits(t.acquire(B, F, W, 1.0))
    t.take_events()
    ta = waits(t.acquire(A, F, R, 2.0))               # not the recalled lease again
    assert waits(t.acquire(A, F, R, 2.0, cache=False)) > ta   # no uncached peek either
    t.release(A, ga.epoch, 3.0)
    events = t.take_events()
    gb = grants(events)[tb]
    assert recalled(events) == [(B, gb.epoch)]        # A waits for B's write now
    t.release(B, gb.epoch, 4.0)
    again = grants(t.take_events())[ta]
    assert again.session == A and again.epoch > gb.epoch
    t.check_invariants()


def test_new_reader_does_not_overtake_a_queued_writer() -> None:
    t = table(A, B, C)
    ga = granted(t.acquire(A, F, R, 0.0))
    tb = waits(t.acquire(B, F, W, 1.0))
    tc = waits(t.acquire(C, F, R, 2.0))               # compatible with A, still queued
    t.take_events()
    t.release(A, ga.epoch, 3.0)
    events = t.take_events()
    gb = grants(events)[tb]
    assert tc not in grants(events) and recalled(events) == [(B, gb.epoch)]
    t.release(B, gb.epoch, 4.0)
    assert tc in grants(t.take_events())


def test_stale_release_after_a_new_grant_releases_nothing() -> None:
    t = table(A, B)
    ga = granted(t.acquire(A, F, R, 0.0))
    tb = waits(t.acquire(B, F, W, 0.0))
    t.release(A, ga.epoch, 1.0)
    gb = grants(t.take_events())[tb]
    t.release(B, gb.epoch, 2.0)
    ga2 = granted(t.acquire(A, F, R, 3.0))
    assert not t.release(A, ga.epoch, 3.0)            # the old release, delivered late
    assert t.holders(F) == [ga2]


def test_renewal_just_before_expiry_keeps_the_session() -> None:
    t = table(A)
    ga = granted(t.acquire(A, F, W, 0.0))
    assert t.renew(A, 9.5).expires == 19.5
    t.tick(19.0)
    assert t.check_fence(A, F, ga.epoch, 19.0)


def test_renewal_at_the_instant_of_expiry_is_too_late() -> None:
    t = table(A)
    ga = granted(t.acquire(A, F, W, 0.0))
    with pytest.raises(NoSession):
        t.renew(A, 10.0)
    assert t.take_events() == [SessionExpired(A)]
    assert t.holders(F) == [] and t.session_expires(A) is None
    with pytest.raises(NoSession):
        t.acquire(A, F, R, 10.0)
    assert not t.check_fence(A, F, ga.epoch, 10.0)


def test_fifo_order_with_alternating_readers_and_writers() -> None:
    sessions = [SessionId(f"s{i}") for i in range(8)]
    t = table(A, *sessions)
    first = granted(t.acquire(A, F, W, 0.0))
    modes = [R, R, W, R, W, W, R, R]
    tickets = [waits(t.acquire(s, F, m, 0.0)) for s, m in zip(sessions, modes)]
    t.release(A, first.epoch, 0.0)
    order: list[Ticket] = []
    while len(order) < len(tickets):
        batch = grants(t.take_events())
        assert batch, "a waiter was left behind"
        order += sorted(batch)
        for g in batch.values():
            t.release(g.session, g.epoch, 0.0)
    assert order == tickets


def test_stream_of_readers_does_not_starve_a_writer() -> None:
    t = table(A, B, C)
    ga = granted(t.acquire(A, F, R, 0.0))
    tw = waits(t.acquire(B, F, W, 0.0))
    now, held = 0.0, ga
    for _ in range(5):                                # readers keep coming
        now += 1.0
        assert isinstance(t.acquire(C, F, R, now), Wait)
        t.release(held.session, held.epoch, now)
        if tw in (g := grants(t.take_events())):
            break
    else:
        pytest.fail("writer starved")
    assert g[tw].session == B


def test_fencing_after_expiry_and_epochs_grow() -> None:
    t = table(A, B)
    ga = granted(t.acquire(A, F, W, 0.0))
    assert t.check_fence(A, F, ga.epoch, 5.0)
    assert not t.check_fence(B, F, ga.epoch, 5.0)     # not B's
    assert not t.check_fence(A, G, ga.epoch, 5.0)     # not that key
    t.renew(B, 9.0)                                   # A is partitioned: no renewals
    t.tick(10.0)
    gb = granted(t.acquire(B, F, W, 11.0))
    assert gb.epoch > ga.epoch
    assert not t.check_fence(A, F, ga.epoch, 11.0)
    assert t.admit_write(A, F, ga.epoch, 11.0) is None
    a2 = SessionId("a2")                              # A comes back as a new session
    t.open_session(a2, 12.0)
    assert t.admit_write(a2, F, ga.epoch, 12.0) is None


def test_read_lease_does_not_pass_the_fence() -> None:
    t = table(A)
    ga = granted(t.acquire(A, F, R, 0.0))
    assert t.admit_write(A, F, ga.epoch, 0.0) is None


def test_admitted_write_pins_the_key_until_the_node_releases_it() -> None:
    t = table(A, B)
    ga = granted(t.acquire(A, F, W, 0.0))
    t.renew(B, 5.0)
    ticket = waits(t.acquire(B, F, R, 5.0))
    op = t.admit_write(A, F, ga.epoch, 9.5)           # commit arrives in time...
    assert op is not None
    t.tick(10.0)                                      # ...A's session ends mid-commit
    assert ticket not in grants(t.take_events())
    t.release(A, op.epoch, 10.5)                      # commit applied
    assert ticket in grants(t.take_events())


def test_session_cap_gives_no_cache_grants() -> None:
    t = table(A, B, config=LeaseConfig(max_leases_per_session=1, max_cached_leases=2))
    assert granted(t.acquire(A, F, R, 0.0)).cache
    g = granted(t.acquire(A, G, R, 0.0))
    assert not g.cache and g.expires == NEVER
    t.release(A, g.epoch, 0.0)
    assert granted(t.acquire(B, G, R, 0.0)).cache
    c = SessionId("c")
    t.open_session(c, 0.0)
    assert not granted(t.acquire(c, D, R, 0.0)).cache    # total cap


def test_waiter_caps_answer_busy() -> None:
    t = table(A, B, C, E, config=LeaseConfig(max_waiters_per_key=1, max_waiters=2))
    granted(t.acquire(A, F, W, 0.0))
    granted(t.acquire(A, G, W, 0.0))
    waits(t.acquire(B, F, R, 0.0))
    assert isinstance(t.acquire(C, F, R, 0.0), Busy)     # per key
    waits(t.acquire(B, G, R, 0.0))
    t.acquire(C, D, R, 0.0)                              # D is free: granted at once
    assert isinstance(t.acquire(C, F, R, 0.0), Busy)
    t.check_invariants()


def test_quiet_period_holds_back_every_grant() -> None:
    t = table(A, not_before=10.0)
    ticket = waits(t.acquire(A, F, R, 1.0))
    assert t.next_deadline() == 10.0
    t.renew(A, 9.0)
    t.tick(9.99)
    assert t.take_events() == []
    t.tick(10.0)
    assert ticket in grants(t.take_events())
    assert granted(t.acquire(A, G, W, 10.0)).cache


def test_expired_waiter_is_dropped() -> None:
    t = table(A, B)
    granted(t.acquire(A, F, W, 0.0))
    ticket = waits(t.acquire(B, F, R, 0.0))
    t.renew(A, 5.0)
    t.tick(10.0)
    events = t.take_events()
    assert Dropped(ticket, B, F) in events and SessionExpired(B) in events
    assert t.queued(F) == []
    t.check_invariants()


def test_close_session_releases_everything_and_drops_its_requests() -> None:
    t = table(A, B)
    granted(t.acquire(A, F, R, 0.0))
    granted(t.acquire(B, G, W, 0.0))
    ticket = waits(t.acquire(A, G, R, 0.0))
    t.take_events()
    t.close_session(A, 1.0)
    assert t.take_events() == [Dropped(ticket, A, G)]
    assert t.holders(F) == [] and t.session_expires(A) is None
    t.check_invariants()


def test_cancel_unblocks_those_behind() -> None:
    t = table(A, B, C)
    granted(t.acquire(A, F, R, 0.0))
    tb = waits(t.acquire(B, F, W, 0.0))
    tc = waits(t.acquire(C, F, R, 0.0))
    assert t.cancel(tb, 1.0) and not t.cancel(tb, 1.0)
    assert tc in grants(t.take_events())


def test_upgrade_from_read_to_write_recalls_only_the_others() -> None:
    t = table(A, B)
    ga = granted(t.acquire(A, F, R, 0.0))
    gb = granted(t.acquire(B, F, R, 0.0))
    ticket = waits(t.acquire(A, F, W, 1.0))
    assert recalled(t.take_events()) == [(B, gb.epoch)]
    t.release(B, gb.epoch, 2.0)
    gw = grants(t.take_events())[ticket]
    assert gw.mode is W and gw.epoch > gb.epoch
    assert {g.epoch for g in t.holders(F)} == {ga.epoch, gw.epoch}


def test_sessions_are_bounded_and_unique() -> None:
    t = table(A, config=LeaseConfig(max_sessions=1))
    with pytest.raises(SessionExists):
        t.open_session(A, 0.0)
    with pytest.raises(SessionLimit):
        t.open_session(B, 0.0)


def test_time_never_goes_backwards() -> None:
    t = table(A, now=5.0)
    with pytest.raises(ValueError):
        t.tick(4.0)


def test_idle_table_has_no_deadline_and_client_stops_early() -> None:
    t = LeaseTable(CFG, now=0.0)
    assert t.next_deadline() is None
    assert client_valid_until(100.0, CFG) == 109.0


# ---- random histories: safety, liveness, epochs -----------------------------

SLOTS = 3
KEYS = [F, G]
SCFG = LeaseConfig(lease_time=10.0, recall_timeout=4.0, skew_margin=1.0,
                   max_leases_per_session=3, max_cached_leases=7,
                   max_waiters_per_key=4, max_waiters=7)
LT = SCFG.lease_time


@dataclass
class Held:
    """A grant as its client sees it, and the recall deadline it was told."""

    grant: Grant
    deadline: float = NEVER


class LeaseMachine(RuleBasedStateMachine):
    """Clients that hold, renew, release, fence and wait, against a model of
    what each client believes it holds (a cache lease ends when the client's
    session or the recall deadline it was told ends; an op lease when the
    node releases it).  No two beliefs may conflict; epochs only grow; a
    fence admits exactly the writes of believed WRITE leases; with the
    node's ops released and every client alive but ignoring recalls, every
    waiter is granted as the clock runs past the deadlines."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.t = LeaseTable(SCFG, now=0.0)
        self.incarnation = [0] * SLOTS
        self.renewed: dict[SessionId, float] = {}      # open sessions: last renewal
        self.held: dict[Epoch, Held] = {}
        self.tickets: dict[Ticket, SessionId] = {}
        self.top: dict[LeaseKey, int] = {}

    def sid(self, slot: int) -> SessionId:
        return SessionId(f"s{slot}.{self.incarnation[slot]}")

    def alive(self, sid: SessionId) -> bool:
        return sid in self.renewed and self.now < self.renewed[sid] + LT

    def believed(self, h: Held) -> bool:
        if not h.grant.cache:
            return True
        return self.alive(h.grant.session) and self.now < h.deadline

    # -- what the clients hear --

    def on_grant(self, g: Grant) -> None:
        assert self.alive(g.session)
        assert g.expires == (self.renewed[g.session] + LT if g.cache else NEVER)
        if g.epoch in self.held:                       # the same lease again
            assert self.held[g.epoch].grant.key == g.key and g.cache
            return
        assert g.epoch > self.top.get(g.key, 0), "epochs on a key must grow"
        self.top[g.key] = g.epoch
        self.held[g.epoch] = Held(g)

    def on_recall(self, rc: Recall) -> None:
        h = self.held[rc.epoch]
        assert h.grant.cache and h.grant.session == rc.session
        if h.deadline == NEVER:
            assert rc.deadline >= self.renewed[rc.session] + LT, "recall cut a lease short"
            h.deadline = rc.deadline
        assert h.deadline == rc.deadline

    def on_event(self, ev: Event) -> None:
        if isinstance(ev, Recall):
            self.on_recall(ev)
        elif isinstance(ev, Granted):
            assert self.tickets.pop(ev.ticket) == ev.grant.session
            self.on_grant(ev.grant)
        elif isinstance(ev, Dropped):
            assert not self.alive(self.tickets.pop(ev.ticket))
        elif isinstance(ev, SessionExpired):
            assert not self.alive(ev.session)
        elif isinstance(ev, LeaseExpired) and ev.epoch in self.held:
            assert self.now >= self.held[ev.epoch].deadline

    def drain(self) -> None:
        for ev in self.t.take_events():
            self.on_event(ev)

    # -- rules --

    @rule(slot=st.integers(0, SLOTS - 1))
    def open(self, slot: int) -> None:
        if self.alive(self.sid(slot)):
            with pytest.raises(SessionExists):
                self.t.open_session(self.sid(slot), self.now)
            return
        self.incarnation[slot] += 1
        sid = self.sid(slot)
        assert self.t.open_session(sid, self.now) == self.now + LT
        self.renewed[sid] = self.now
        self.drain()

    @rule(slot=st.integers(0, SLOTS - 1))
    def renew(self, slot: int) -> None:
        sid = self.sid(slot)
        if not self.alive(sid):
            with pytest.raises(NoSession):
                self.t.renew(sid, self.now)
        else:
            renewal = self.t.renew(sid, self.now)
            assert renewal.expires == self.now + LT
            self.renewed[sid] = self.now
            for rc in renewal.recalls:
                self.on_recall(rc)
        self.drain()

    @rule(slot=st.integers(0, SLOTS - 1))
    def close(self, slot: int) -> None:
        sid = self.sid(slot)
        self.t.close_session(sid, self.now)
        self.renewed.pop(sid, None)
        self.drain()

    @rule(slot=st.integers(0, SLOTS - 1), key=st.sampled_from(KEYS),
          mode=st.sampled_from(Mode), cache=st.booleans())
    def acquire(self, slot: int, key: LeaseKey, mode: Mode, cache: bool) -> None:
        sid = self.sid(slot)
        if not self.alive(sid):
            with pytest.raises(NoSession):
                self.t.acquire(sid, key, mode, self.now, cache=cache)
            return
        answer = self.t.acquire(sid, key, mode, self.now, cache=cache)
        self.drain()
        if isinstance(answer, Grant):
            self.on_grant(answer)
        elif isinstance(answer, Wait):
            self.tickets[answer.ticket] = sid
        else:
            queued = [t for t in self.tickets if t in self.t.queued(key)]
            assert (len(queued) >= SCFG.max_waiters_per_key
                    or len(self.tickets) >= SCFG.max_waiters)

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        epoch = data.draw(st.sampled_from(sorted(self.held)))
        h = self.held.pop(epoch)
        assert self.t.release(h.grant.session, epoch, self.now) == self.believed(h)
        self.drain()

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data(), slot=st.integers(0, SLOTS - 1))
    def release_foreign(self, data: st.DataObject, slot: int) -> None:
        epoch = data.draw(st.sampled_from(sorted(self.held)))
        if self.held[epoch].grant.session != self.sid(slot):
            assert not self.t.release(self.sid(slot), epoch, self.now)

    @rule()
    def obey_recalls(self) -> None:
        for epoch in [e for e, h in self.held.items() if h.deadline != NEVER]:
            h = self.held.pop(epoch)
            self.t.release(h.grant.session, epoch, self.now)
        self.drain()

    @rule()
    def finish_ops(self) -> None:
        for epoch in [e for e, h in self.held.items() if not h.grant.cache]:
            assert self.t.release(self.held.pop(epoch).grant.session, epoch, self.now)
        self.drain()

    @precondition(lambda self: any(h.grant.cache and h.grant.mode is W
                                   for h in self.held.values()))
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        epoch = data.draw(st.sampled_from(sorted(
            e for e, h in self.held.items() if h.grant.cache and h.grant.mode is W)))
        h = self.held[epoch]
        expected = self.believed(h)
        g = h.grant
        assert self.t.check_fence(g.session, g.key, epoch, self.now) == expected
        op = self.t.admit_write(g.session, g.key, epoch, self.now)
        assert (op is not None) == expected
        self.drain()
        if op is not None:
            self.on_grant(op)

    @precondition(lambda self: bool(self.tickets))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        ticket = data.draw(st.sampled_from(sorted(self.tickets)))
        assert self.t.cancel(ticket, self.now)
        del self.tickets[ticket]
        self.drain()

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.5, 5.0, 9.5, 10.0, 15.0]))
    def advance(self, dt: float) -> None:
        self.now += dt
        self.t.tick(self.now)
        self.drain()

    @rule()
    def advance_to_next_deadline(self) -> None:
        deadline = self.t.next_deadline()
        if deadline is not None:
            self.now = deadline
            self.t.tick(self.now)
            self.drain()

    # -- what must always hold --

    @invariant()
    def no_conflicting_beliefs(self) -> None:
        self.t.check_invariants()
        live = [h.grant for h in self.held.values() if self.believed(h)]
        for a, b in combinations(live, 2):
            if a.key == b.key and a.session != b.session:
                assert not conflicts(a.mode, b.mode), (a, b, self.now)
        assert all(self.alive(s) for s in self.tickets.values())
        deadline = self.t.next_deadline()
        assert deadline is None or deadline > self.now

    def teardown(self) -> None:
        """Liveness: the node finishes its ops; every client stays alive
        (renews) but ignores recalls; still every waiter must be granted."""
        for _ in range(100):
            self.finish_ops()
            if not self.tickets:
                return
            for sid in [s for s in self.renewed if self.alive(s)]:
                self.renewed[sid] = self.now
                self.t.renew(sid, self.now)
            deadline = self.t.next_deadline()
            step = self.now + LT / 2
            self.now = step if deadline is None else min(deadline, step)
            self.t.tick(self.now)
            self.drain()
            self.no_conflicting_beliefs()
        pytest.fail(f"waiters never granted: {self.tickets}")


LeaseMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=50,
                                          deadline=None)
TestLeaseMachine = LeaseMachine.TestCase
