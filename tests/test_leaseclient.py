"""The mount's side of leases (fusefront.leaseclient), without I/O: a fake
metadata node records what the client sends."""

from __future__ import annotations

import errno
import functools
import threading
from typing import Any

import trio
import trio.testing

from fusefront.filedata import FileData, Volume
from fusefront.leaseclient import Leases
from storagenode.metaclient import MetaError, MetaUnavailable


class FakeMeta:
    def __init__(self) -> None:
        self.session = "s"
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def call(self, method: str, **args: Any) -> Any:
        self.calls.append((method, args))
        return {}


def test_a_repeated_recall_never_releases_under_the_first_ones_flush() -> None:
    """A recall also comes again in renewal answers while outstanding.  The
    repeat must not release the WRITE lease while the first recall is still
    committing under it (the commit would be refused: EIO, data dropped),
    and from the first moment of the recall, writes need a new lease."""
    async def main() -> None:
        meta = FakeMeta()
        flushing, go = trio.Event(), trio.Event()
        order: list[str] = []

        async def flush(ino: int) -> None:
            order.append("flush starts")
            flushing.set()
            await go.wait()
            order.append("flush ends")
        leases = Leases(meta, flush=flush, invalidate=lambda ino, names: None,  # type: ignore[arg-type]
                        vol=1)
        leases.note(5, {"epoch": 7, "mode": "write", "cache": True})
        assert leases.write_epoch(5) == 7
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leases.recall, 5, 7)
            await flushing.wait()
            assert leases.write_epoch(5) is None        # a write now takes a new lease
            await leases.recall(5, 7)                   # the renewal's repeat
            assert not [c for c in meta.calls if c[0] == "release"]
            go.set()
        assert order == ["flush starts", "flush ends"]
        assert meta.calls == [("release", {"epochs": [7]})]
        await leases.recall(5, 7)                       # a late repeat: released again, harmless
        assert order == ["flush starts", "flush ends"]
    trio.run(main)


def test_a_write_lease_recalled_before_its_grant_arrived_buffers_nothing() -> None:
    """A recall can overtake its grant (they travel on different paths): the
    grant is then not held, and a write must not buffer data under no lease
    (it would be committed unfenced, waiting behind the other client, which
    waits for this mount: a deadlock until timeouts, EIO); it asks again."""
    async def main() -> None:
        meta = FakeMeta()
        leases = Leases(meta, flush=lambda ino: trio.sleep(0),  # type: ignore[arg-type]
                        invalidate=lambda ino, names: None, vol=1)
        await leases.recall(5, 9)                       # the recall comes first ...
        leases.note(5, {"epoch": 9, "mode": "write", "cache": True})   # ... then the grant
        assert leases.write_epoch(5) is None
        volume = Volume(1, 1 << 20, meta, store=None, cache=None)  # type: ignore[arg-type]
        f = FileData(volume, {"ino": 5, "size": 0, "mtime_ns": 1, "atime_ns": 1,
                              "ctime_ns": 1})
        written = await f.write(0, b"data", lambda fn: None,
                                lease=functools.partial(leases.write_epoch, 5))
        assert not written
        assert not f.pending() and f.size == 0
        leases.note(5, {"epoch": 10, "mode": "write", "cache": True})
        assert await f.write(0, b"data", lambda fn: None,
                             lease=functools.partial(leases.write_epoch, 5))
        assert f.pending() and f.size == 4 and f.fence == 10
    trio.run(main)


def test_a_read_grant_never_hides_the_write_lease_held() -> None:
    """One session can hold a READ and a WRITE lease on one inode (the READ
    one from a lookup before the file was opened for writing).  A query
    answered with the READ one must not replace the WRITE one here: its
    recall would then find no WRITE lease, release it without flushing, and
    the buffered writes would be refused at close (EIO)."""
    async def main() -> None:
        meta = FakeMeta()
        flushed: list[int] = []

        async def flush(ino: int) -> None:
            flushed.append(ino)
        leases = Leases(meta, flush=flush, invalidate=lambda ino, names: None,  # type: ignore[arg-type]
                        vol=1)
        leases.note(5, {"epoch": 3, "mode": "read", "cache": True})
        leases.note(5, {"epoch": 7, "mode": "write", "cache": True})
        leases.note(5, {"epoch": 3, "mode": "read", "cache": True})    # a getattr's answer
        assert leases.write_epoch(5) == 7
        await leases.recall(5, 7)
        assert flushed == [5]
        assert meta.calls == [("release", {"epochs": [7]})]
    trio.run(main)


def test_a_new_lease_is_told_to_the_cache_and_a_replaced_one_drops_its_views() -> None:
    """Answers sent before a lease began are not kept under it (see
    MetaCache.fresh): the cache hears of every lease held anew.  A READ
    lease replaced by another READ lease means the first ended at the node
    (expired): what was cached under it is dropped."""
    began: list[int] = []
    dropped: list[int | None] = []
    leases = Leases(FakeMeta(), flush=lambda ino: trio.sleep(0),  # type: ignore[arg-type]
                    invalidate=lambda ino, names: None, vol=1, drop=dropped.append,
                    began=began.append)
    leases.note(5, {"epoch": 7, "mode": "read", "cache": True})
    leases.note(5, {"epoch": 7, "mode": "read", "cache": True})      # the same lease again
    assert began == [5] and dropped == []
    assert leases.holds(5, {"epoch": 7}) and not leases.holds(5, {"epoch": 8})
    leases.note(5, {"epoch": 9, "mode": "write", "cache": True})     # an upgrade: views stay
    assert began == [5, 5] and dropped == []
    leases.note(6, {"epoch": 10, "mode": "read", "cache": True})
    leases.note(6, {"epoch": 11, "mode": "read", "cache": True})
    assert began == [5, 5, 6, 6] and dropped == [6]
    leases.note(6, None)                                             # nothing granted
    assert began == [5, 5, 6, 6] and leases.epoch(6) == 11


class ForgetfulMeta:
    """A metadata node that has forgotten session s1 and cannot be reached
    for a new one until ``reachable`` is set."""

    def __init__(self) -> None:
        self.session: str | None = "s1"
        self.reachable = False
        self.tries = 0
        self.opened: list[str] = []

    async def call(self, method: str, **args: Any) -> Any:
        await trio.sleep(0.01)
        if method == "open_session":
            self.tries += 1
            if not self.reachable:
                raise MetaUnavailable("node: open_session: connection refused", sent=False)
            self.opened.append(f"s{len(self.opened) + 2}")
            return {"session": self.opened[-1], "lease_time": 1.0, "skew_margin": 0.1}
        if self.session == "s1":
            raise MetaError(errno.ENOTCONN, "session expired or unknown")
        return {"recalls": []} if method == "renew" else {}

    async def exchange(self, method: str, args: dict[str, Any],
                       timeout: float | None = None) -> dict[str, Any]:
        return {"result": await self.call(method, **args)}


def test_a_new_session_that_cannot_be_opened_is_tried_again_and_the_mount_goes_on() -> None:
    """The node forgot the session, and opening a new one fails (it is gone
    again, or the link flaps): the renewals go on and open one once the node
    answers.  (A failure that escaped the renewal loop ended the mount: its
    processes saw ECONNABORTED, then an empty mount point.)  Calls that met
    the same refusal open one new session between them, not one each."""
    async def main() -> None:
        meta = ForgetfulMeta()
        leases = Leases(meta, flush=lambda ino: trio.sleep(0),  # type: ignore[arg-type]
                        invalidate=lambda ino, names: None, vol=1)
        leases.lease_time = 0.6
        leases.note(5, {"epoch": 7, "mode": "read", "cache": True})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leases.run)
            while meta.tries < 3:
                await trio.sleep(0.1)
            assert meta.session == "s1" and not leases.held    # every lease dropped
            meta.reachable = True
            with trio.fail_after(5):
                while meta.session == "s1":
                    await trio.sleep(0.05)
            assert meta.opened == ["s2"]
            async with trio.open_nursery() as callers:      # three calls refused under s2
                for _ in range(3):
                    callers.start_soon(leases.lost_session, "s2")
            assert meta.opened == ["s2", "s3"]
            await trio.sleep(2)
            assert meta.opened == ["s2", "s3"]
            nursery.cancel_scope.cancel()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_recall_drops_the_kernels_attributes_before_it_releases() -> None:
    """The release lets the other client change the file: by then this
    mount's kernel must have no attributes of it left (a size kept under
    its timeout cut reads at the old end), even when the invalidation of
    its pages is stuck behind a request in flight."""
    async def main() -> None:
        meta = FakeMeta()
        order: list[str] = []
        stuck = threading.Event()

        def invalidate(ino: int, names: list[bytes]) -> None:
            stuck.wait(10)            # pages locked by a read in flight
            order.append("pages")
        leases = Leases(meta, flush=lambda ino: trio.sleep(0),  # type: ignore[arg-type]
                        invalidate=invalidate, vol=1, busy=lambda ino: True,
                        invalidate_attrs=lambda ino: order.append(f"attrs of {ino}"))

        async def release(epochs: list[int]) -> None:
            order.append("release")
        leases.release = release  # type: ignore[method-assign]
        leases.note(5, {"epoch": 7, "mode": "read", "cache": True})
        await leases.recall(5, 7)
        stuck.set()
        assert order[:2] == ["attrs of 5", "release"]
    trio.run(main)


def test_a_recall_drops_the_kernels_attributes_again_after_the_release() -> None:
    """The kernel applies an answer's attributes when the thread that asked
    runs again: an answer sent just before the recall may land after the
    first invalidation.  They are dropped again shortly after the release."""
    async def main() -> None:
        meta = ForgetfulMeta()
        meta.session, meta.reachable = "s2", True
        dropped: list[float] = []
        released: list[float] = []
        leases = Leases(meta, flush=lambda ino: trio.sleep(0),  # type: ignore[arg-type]
                        invalidate=lambda ino, names: None, vol=1,
                        invalidate_attrs=lambda ino: dropped.append(trio.current_time()))

        async def release(epochs: list[int]) -> None:
            released.append(trio.current_time())
        leases.release = release  # type: ignore[method-assign]
        leases.lease_time = 30.0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leases.run)
            await trio.sleep(0.1)
            leases.note(5, {"epoch": 7, "mode": "read", "cache": True})
            await leases.recall(5, 7)
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
        assert len(released) == 1 and len(dropped) >= 2
        assert dropped[0] <= released[0] < dropped[-1]
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
