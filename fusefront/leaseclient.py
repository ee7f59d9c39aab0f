"""The mount's side of leases (docs/LEASES.md): what this client may cache.

How this works
--------------
At mount the client opens a session with the metadata node; every RPC then
carries the session id.  A renewal every third of the lease time keeps the
session (and so every lease) alive; ``valid_until`` is when the client must
stop trusting its leases if renewals stop answering: the send time of the
last answered renewal plus the lease time minus the skew margin, which is
always before the server's own end of the session.

Leases arrive with query answers (``lookup``, ``getattr``, ``readdir`` ask
for READ leases, granted now or never) and from ``acquire`` (opens wait for
them).  ``held`` maps an inode to its lease.  The kernel may cache an
inode's attributes, entries and pages only while a lease is held, and never
longer than the session is surely valid: ``cache_time`` is 0 without a
lease, else the time left (capped).  So when renewals stop (a partition, a
crashed metadata node), every cache in the kernel times out by itself
before anyone else can be granted a conflicting lease.

A recall (from the long-poll ``events`` call, or repeated in a renewal)
drops the lease, flushes the file's buffered writes if it was a WRITE lease
(the commit still carries the lease's epoch, so it is admitted), starts the
kernel invalidations in a separate task (they can block behind a request in
flight on that inode, FACTS.md 6) and waits for them at most
``INVALIDATE_WAIT``, then releases.  When a request of this mount that holds
the directory's lock in the kernel (a create, unlink, lookup ... in it) is
in flight, the invalidation waits for that request, which may itself wait
for this release (two mounts creating in one directory): then the recall
waits only ``BUSY_INVALIDATE_WAIT``.  The kernel may then serve the
directory's old entries to this mount's processes until that request
returns (the mount's own cache is already dropped, so ``readdir`` and
lookups that reach the mount are current).  A lost session (ENOTCONN) drops every
lease and opens a new session; buffered writes of the old session can then
no longer be committed (fenced out) unless nobody changed the file since.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

import trio

from storagenode.metaclient import BadRequest, MetaClient, MetaError, MetaUnavailable

log = logging.getLogger(__name__)

CACHE_MAX = 60.0            # longest the kernel may cache anything, seconds
INVALIDATE_WAIT = 1.0       # most a recall waits for the kernel's invalidations
BUSY_INVALIDATE_WAIT = 0.02     # ... while a request holds the directory's lock
BUSY_POLL = 0.005               # how often a recall looks for such a request
EVENTS_WAIT = 20.0          # long-poll length
LATE_INVALIDATIONS = (0.005, 0.05)    # after a release, the kernel's attributes again
TRIM_AT = 40_000            # leases held past which the oldest idle ones are given back
TRIM_BATCH = 256            # leases given back per release call


@dataclass
class Held:
    epoch: int
    mode: str               # "read" / "write" / "recalled" (a WRITE lease being flushed)


Invalidate = Callable[[int, list[bytes]], None]     # sync; run in a thread
Flush = Callable[[int], Awaitable[None]]
Drop = Callable[[int | None], None]     # sync: forget an inode's cached views; None: all


class Leases:
    def __init__(self, meta: MetaClient, *, flush: Flush, invalidate: Invalidate,
                 vol: int, drop: Drop | None = None,
                 busy: Callable[[int], bool] | None = None,
                 began: Callable[[int], None] | None = None,
                 invalidate_attrs: Callable[[int], None] | None = None,
                 idle: Callable[[int], bool] | None = None, trim_at: int = TRIM_AT) -> None:
        self.meta = meta
        self.trim_at, self.trim_to = trim_at, trim_at * 3 // 4
        self._idle = idle or (lambda ino: True)     # may its lease be given back?
        self._trimming = False
        self.trimmed = 0                            # leases given back unasked
        self._began = began or (lambda ino: None)
        self._busy = busy or (lambda ino: False)
        self.vol = vol
        self._flush = flush
        self._invalidate = invalidate
        self._invalidate_attrs = invalidate_attrs or (lambda ino: None)
        self._drop: Drop = drop or (lambda ino: None)
        # epochs recalled lately: a grant can arrive after its recall (they
        # travel on different paths) and must then not be taken as held
        self.recalled: dict[int, float] = {}
        self.held: dict[int, Held] = {}
        self.names: dict[int, set[bytes]] = {}     # dir ino -> names the kernel was told
        self.lease_time = 0.0
        self.margin = 0.0
        self.valid_until = -1.0
        self.recalls = 0
        # inodes made here in a queued create (nsqueue) -> the epoch of the
        # WRITE lease its create was granted (absent until it is answered);
        # until then the lease is held under the provisional epoch -ino
        self.created: dict[int, int] = {}
        self._recalling: set[int] = set()      # epochs whose recall is running
        self._session_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None       # run()'s, for late invalidations
        # trio.current_time, bound to the running clock once it runs (see
        # _bind_clock): serves() asks it several times per kernel request
        self._now: Callable[[], float] = trio.current_time

    # ---- session

    async def open(self) -> None:
        """Open a new session.  Until it is open every call carries the old
        one (a call without any would be refused as malformed, or run
        unfenced); a failure leaves it there, refused with ENOTCONN, so the
        next call that meets the refusal tries again."""
        self._bind_clock()
        sent = trio.current_time()
        answer = await self.meta.call("open_session")
        self.meta.session = answer["session"]
        self.lease_time, self.margin = answer["lease_time"], answer["skew_margin"]
        self.valid_until = sent + self.lease_time - self.margin

    def _bind_clock(self) -> None:
        """Read the running trio clock directly from now on: the same time as
        trio.current_time(), without its two calls of lookups (a tenth of
        the mount's time in an rm -rf went to serves() and the clock)."""
        self._now = trio.lowlevel.current_clock().current_time

    async def run(self) -> None:
        """Renewals and recalls, until cancelled (unmount)."""
        self._bind_clock()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._renew_loop)
            nursery.start_soon(self._events_loop)

    async def close(self) -> None:
        if self.meta.session is not None:
            try:
                await self.meta.call("close_session")
            except (MetaError, MetaUnavailable) as exc:
                log.info("closing the lease session: %s", exc)

    async def _renew_loop(self) -> None:
        """Nothing that happens to a renewal ends the loop (it would end the
        mount): a node that cannot be reached or refuses is asked again at
        the next turn, while the caches time out by themselves."""
        while True:
            await trio.sleep(max(self.lease_time / 3, 0.2))
            try:
                await self._renew()
            except (MetaUnavailable, MetaError, BadRequest) as exc:
                log.warning("lease renewal failed (caches time out by themselves): %s", exc)
            except Exception:
                log.exception("bug in a lease renewal")

    async def _renew(self) -> None:
        sent, session = trio.current_time(), self.meta.session
        try:
            answer = await self.meta.call("renew")
        except MetaError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
            await self.lost_session(session)
            return
        self.valid_until = sent + self.lease_time - self.margin
        for recall in answer["recalls"]:
            await self.recall(recall["ino"], recall["epoch"])

    async def _events_loop(self) -> None:
        while True:
            try:
                recalls = (await self.meta.exchange("events", {"wait": EVENTS_WAIT},
                                                    timeout=EVENTS_WAIT + 10))["result"]
            except (MetaUnavailable, MetaError, BadRequest) as exc:
                log.info("waiting for lease events failed: %s", exc)
                await trio.sleep(1.0)
                continue
            except Exception:
                log.exception("bug in waiting for lease events")
                await trio.sleep(1.0)
                continue
            async with trio.open_nursery() as nursery:
                for recall in recalls:
                    nursery.start_soon(self.recall, recall["ino"], recall["epoch"])

    async def lost_session(self, refused: str | None = None) -> None:
        """The metadata node forgot us (expiry, restart): drop every lease
        (the kernel's caches run out by themselves) and start again.
        ``refused`` is the session a refused call carried: once a new one is
        open, the others that met the same refusal just send again (a
        second new session would hold the leases granted under the first
        one until it expired, and other mounts would wait for them).
        MetaUnavailable if the new session could not be opened."""
        async with self._session_lock:
            if refused is not None and self.meta.session != refused:
                return
            log.warning("lease session lost; dropping %d leases", len(self.held))
            self.held.clear()
            self.names.clear()
            self.created.clear()
            self._drop(None)
            await self.open()

    # ---- what may be cached

    def serves(self, ino: int) -> bool:
        """May what is known of ``ino`` be served from cache now?  (The
        test every cache read makes, several per request: kept cheap.)
        ``held`` is kept in the order of last use (what ``_trim`` gives
        back first is what was used longest ago)."""
        held = self.held.pop(ino, None)
        if held is None:
            return False
        self.held[ino] = held
        return self.valid_until > self._now()

    def cache_time(self, ino: int) -> float:
        if ino not in self.held:
            return 0.0
        return max(0.0, min(CACHE_MAX, self.valid_until - self._now()))

    def note(self, ino: int, grant: dict[str, Any] | None) -> None:
        """Hold the lease ``grant`` on ``ino`` (None: nothing was granted).
        A READ grant never replaces a WRITE lease held here (or one being
        flushed for a recall): one session may hold both on an inode, and
        forgetting the WRITE one would make its recall release it without
        committing the writes buffered under it (EIO at close, data lost).

        A lease held from now is told to ``began``: an answer sent before
        may predate another client's change that this mount was not told
        of.  One that replaces a lease of the same mode means the old one
        ended at the node: what was cached under it is dropped."""
        if grant is None or not grant.get("cache", True) or grant["epoch"] in self.recalled:
            return
        held = self.held.get(ino)
        if held is not None and held.mode != "read" and grant["mode"] == "read":
            return
        self.held[ino] = Held(grant["epoch"], grant["mode"])
        self._trim_soon()
        if held is None or held.epoch != grant["epoch"]:
            if held is not None and held.mode == grant["mode"]:
                self._drop(ino)
            self._began(ino)

    def epoch(self, ino: int) -> int | None:
        """The epoch of the lease held on ``ino`` (None: none)."""
        held = self.held.get(ino)
        return held.epoch if held is not None else None

    def holds(self, ino: int, grant: dict[str, Any] | None) -> bool:
        """Is ``grant`` (as an answer brought it) the lease held on ``ino`` now?"""
        held = self.held.get(ino)
        return grant is not None and held is not None and held.epoch == grant["epoch"]

    def provisional(self, ino: int) -> int:
        """Hold a WRITE lease on ``ino``, which a create queued here names
        (nsqueue): the node grants it when it applies the create (the number
        is reserved for this mount: nobody else can ask for it first).  Its
        epoch until then, -ino, is what fences this mount's writes to the
        new file; ``fence_of`` turns it into the granted one."""
        self.held[ino] = Held(-ino, "write")
        self._trim_soon()
        self._began(ino)
        return -ino

    def confirm(self, ino: int, grant: dict[str, Any] | None) -> None:
        """The queued create of ``ino`` was applied with ``grant`` (None:
        refused; the provisional lease is dropped)."""
        held = self.held.get(ino)
        if grant is None or not grant.get("cache", True):
            if held is not None and held.epoch == -ino:
                del self.held[ino]
            return
        self.created[ino] = grant["epoch"]
        if held is not None and held.epoch == -ino:
            held.epoch = grant["epoch"]

    def fence_of(self, ino: int, epoch: int) -> int:
        """The epoch to send for a lease seen as ``epoch``: a provisional one
        (negative) is the one the create was granted, 0 if not known yet
        (in a batch: "the lease this batch's create is granted"; anywhere
        else refused, as a lost lease is)."""
        return epoch if epoch >= 0 else self.created.get(ino, 0)

    def lost(self, ino: int, epoch: int) -> None:
        """The node refused an op fenced by lease ``epoch`` on ``ino``: it no
        longer holds (a restart of the node forgets every lease, without
        ending sessions it keeps)."""
        held = self.held.get(ino)
        if held is not None and held.epoch == epoch:
            del self.held[ino]
            self._drop(ino)

    def ended(self, ino: int) -> None:
        """The node freed ``ino`` (an unlink of its last name, an rmdir, a
        rename over it) and ended this mount's lease on it with it: nothing
        is kept of it (else each file an rm -rf removed stayed held until
        ``_trim`` gave it back)."""
        if self.held.pop(ino, None) is not None:
            self._drop(ino)
        self.names.pop(ino, None)
        self.created.pop(ino, None)

    def note_name(self, parent: int, name: bytes) -> None:
        if parent in self.held:
            self.names.setdefault(parent, set()).add(name)

    def write_epoch(self, ino: int) -> int | None:
        held = self.held.get(ino)
        return held.epoch if held is not None and held.mode == "write" else None

    async def acquire(self, ino: int, mode: str) -> bool:
        """Wait for a lease on ``ino``; False if the node could not grant one."""
        held = self.held.get(ino)
        if held is not None and (held.mode == "write" or mode == "read"):
            return True
        session = self.meta.session
        try:
            grant = await self.meta.call("acquire", vol=self.vol, ino=ino, mode=mode, wait=1)
        except MetaError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
            await self.lost_session(session)
            grant = await self.meta.call("acquire", vol=self.vol, ino=ino, mode=mode, wait=1)
        self.note(ino, grant)
        return grant is not None

    # ---- recalls

    async def recall(self, ino: int, epoch: int) -> None:
        """Flush, invalidate, release.  The same recall also comes again in
        renewal answers while it is outstanding: a repeat that arrives while
        the first is still flushing is dropped; it must not release the
        lease under the flush's feet (the commit would then be refused)."""
        if epoch in self._recalling:
            return
        self._recalling.add(epoch)
        try:
            await self._recall(ino, epoch)
        except (MetaUnavailable, MetaError, BadRequest) as exc:
            log.warning("recall of inode %d failed (the lease runs out by itself): %s", ino, exc)
        except Exception:
            log.exception("bug in the recall of inode %d", ino)
        finally:
            self._recalling.discard(epoch)

    def _recalled(self, epochs: Iterable[int]) -> None:
        """Never take these epochs as held again: a grant can arrive after
        the recall (they travel on different paths), and a lease given back
        unasked is granted again as it is (the node still holds it for this
        session) until the release lands, which would then end it under
        the ops fenced by it."""
        now = trio.current_time()
        for old in [e for e, t in self.recalled.items() if t < now - 2 * self.lease_time - 5]:
            del self.recalled[old]
        for epoch in epochs:
            self.recalled[epoch] = now

    async def _recall(self, ino: int, epoch: int) -> None:
        self._recalled([epoch])
        mine = await self._give_up(ino, epoch)
        await self.release([epoch])
        if mine and self._nursery is not None:       # see _kernel_forget
            self._nursery.start_soon(self._invalidate_attrs_later, ino)

    async def _give_up(self, ino: int, epoch: int, flush: bool = True) -> bool:
        """A recall's work before the release: flush (a WRITE lease, unless
        not ``flush``: nothing is buffered or queued under it), stop
        holding, drop what the mount and the kernel cache of ``ino``.  Was
        ``epoch`` the lease held?"""
        held = self.held.get(ino)
        if held is not None and held.epoch < 0:     # recalled before its create's answer
            await self._flush(ino)                  # came: sending the queue brings it
            held = self.held.get(ino)
        mine = held is not None and held.epoch == epoch
        if held is not None and mine:
            self.recalls += 1
            self._drop(ino)
            if held.mode == "write" and flush:
                # from now on a write takes a new lease: what the flush below
                # does not commit must not be buffered under this one
                held = self.held[ino] = Held(epoch, "recalled")
                try:
                    await self._flush(ino)
                except Exception as exc:    # the data stays buffered; close reports it
                    log.warning("flush for a recall of inode %d failed: %s", ino, exc)
            if self.held.get(ino) is held:
                del self.held[ino]
            if self.created.get(ino) == epoch:
                del self.created[ino]
            self._drop(ino)
            await self._kernel_forget(ino, sorted(self.names.pop(ino, ())))
        return mine

    # ---- giving leases back

    def _trim_soon(self) -> None:
        if len(self.held) > self.trim_at and not self._trimming and self._nursery is not None:
            self._trimming = True
            self._nursery.start_soon(self._trim)

    async def _trim(self) -> None:
        """Give back the leases used longest ago of inodes nothing here uses, as if
        they had been recalled, until three quarters of ``trim_at`` are held.  Without this a
        mount that made 50,000 files held a lease on each for as long as it
        lived: past ``HELD_MAX_HERE`` (and the node's limit per session) its
        creates went one round trip each, an untar 60 % slower."""
        try:
            while len(self.held) > self.trim_to:
                batch = []
                for ino, held in self.held.items():
                    if held.epoch > 0 and held.mode in ("read", "write") \
                            and held.epoch not in self._recalling and self._idle(ino):
                        batch.append((ino, held.epoch))
                        if len(batch) == TRIM_BATCH:
                            break
                if not batch:
                    return
                self._recalled(())
                for ino, epoch in batch:
                    self._recalling.add(epoch)
                try:
                    given = []
                    for ino, epoch in batch:
                        # idle (looked at again: a write may have begun
                        # meanwhile): nothing buffered or queued under it
                        if self._idle(ino):
                            self.recalled[epoch] = trio.current_time()
                            if await self._give_up(ino, epoch, flush=False):
                                given.append(epoch)
                    self.trimmed += len(given)
                    await self.release(given)
                finally:
                    self._recalling.difference_update(epoch for _, epoch in batch)
        except (MetaUnavailable, MetaError, BadRequest) as exc:
            log.warning("giving leases back failed (they run out by themselves): %s", exc)
        finally:
            self._trimming = False

    async def _kernel_forget(self, ino: int, names: list[bytes]) -> None:
        """The kernel's attributes of ``ino`` at once, here (that never waits:
        FACTS.md 6), so that they are gone before the release; then its
        pages and names, in a thread, waited for only so long (see
        ``_wait_invalidated``).  When the release went before the attributes
        were dropped, the kernel kept a size the other client had changed
        since, under its timeout: a reader there got the file cut at the
        old size (seen in tools/mcx, one run in about twenty).

        The kernel applies an answer's attributes in the thread that asked,
        once it runs again: an answer this mount sent under the lease just
        before the recall can be applied after the invalidation, and here
        (Linux 6.18) the kernel then keeps it under its timeout (seen: a
        lookup's answer).  So ``_recall`` invalidates them again a little
        after the release, to bound how long such an answer stays."""
        self._invalidate_attrs(ino)
        done = trio.Event()

        async def invalidate() -> None:
            try:
                await trio.to_thread.run_sync(self._invalidate, ino, names,
                                              abandon_on_cancel=True)
            finally:
                done.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(invalidate)
            await self._wait_invalidated(ino, done)
            nursery.cancel_scope.cancel()

    async def _invalidate_attrs_later(self, ino: int) -> None:
        """(See ``_kernel_forget``.)  Not once a new lease on ``ino`` is held:
        what this mount answers now is the node's fresh view, and an
        invalidation while the kernel waits for such an answer makes it
        drop it (its attribute version is older), keeping the old size,
        which a reader then took for the end of the file (a ``tail -f`` of
        a file the other mount appends to read nothing after an fstat had
        shown the new size)."""
        for delay in LATE_INVALIDATIONS:
            await trio.sleep(delay)
            held = self.held.get(ino)
            if held is not None and held.epoch > 0 and held.epoch not in self.recalled:
                return
            self._invalidate_attrs(ino)

    async def _wait_invalidated(self, ino: int, done: trio.Event) -> None:
        """Until the invalidation is done, or at most ``INVALIDATE_WAIT``; but
        only ``BUSY_INVALIDATE_WAIT`` once a request of this mount holding
        the directory's lock in the kernel is seen in flight: it blocks the
        invalidation and may itself wait for this recall's release.  (The
        kernel also holds the lock between the requests of one call, a
        lookup and then the mkdir: hence looking again every few ms.)"""
        with trio.move_on_after(INVALIDATE_WAIT):
            while not done.is_set():
                if self._busy(ino):
                    with trio.move_on_after(BUSY_INVALIDATE_WAIT):
                        await done.wait()
                    return
                with trio.move_on_after(BUSY_POLL):
                    await done.wait()

    async def release(self, epochs: Iterable[int]) -> None:
        try:
            await self.meta.call("release", epochs=list(epochs))
        except (MetaError, MetaUnavailable) as exc:
            log.info("release failed (the lease runs out by itself): %s", exc)
