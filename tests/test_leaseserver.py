"""The lease service's async shell, on trio's fake clock."""

from __future__ import annotations

import trio
import trio.testing

from storagenode.ids import InodeId, VolumeId
from storagenode.leases import LeaseConfig, LeaseKey, Mode
from storagenode.leaseserver import LeaseServer

KEY = LeaseKey(VolumeId(1), InodeId(7))


def run(test: object) -> None:
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0.01))  # type: ignore[arg-type]


def test_a_change_waits_for_the_holder_to_release_after_its_recall() -> None:
    async def main() -> None:
        server = LeaseServer(LeaseConfig(lease_time=10.0))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.run)
            b = server.open_session()["session"]
            grant = await server.acquire(b, KEY, Mode.READ, cache=True, wait=False)
            assert grant is not None
            changed = trio.Event()

            async def change() -> None:
                grants = await server.hold(None, [(1, 7)])
                changed.set()
                server.unhold(grants)
            nursery.start_soon(change)
            recalls = await server.events(b, wait=5)
            assert [(r["ino"], r["epoch"]) for r in recalls] == [(7, grant.epoch)]
            await trio.sleep(1)
            assert not changed.is_set()          # still waiting for B
            server.release(b, [grant.epoch])
            with trio.fail_after(0.5):
                await changed.wait()
            nursery.cancel_scope.cancel()
    run(main)


def test_a_silent_holder_holds_a_change_up_until_its_session_expires() -> None:
    async def main() -> None:
        server = LeaseServer(LeaseConfig(lease_time=4.0, skew_margin=0.5))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.run)
            b = server.open_session()["session"]
            assert await server.acquire(b, KEY, Mode.WRITE, cache=True, wait=False)
            started = trio.current_time()
            grants = await server.hold(None, [(1, 7)])     # B never answers (crashed)
            assert 3.9 < trio.current_time() - started <= 4.1
            server.unhold(grants)
            nursery.cancel_scope.cancel()
    run(main)


def test_the_timer_task_sleeps_when_nothing_is_due() -> None:
    async def main() -> None:
        server = LeaseServer(LeaseConfig(lease_time=10.0))
        ticks = 0
        real_tick = server.table.tick

        def counting_tick(now: float) -> None:
            nonlocal ticks
            ticks += 1
            real_tick(now)
        server.table.tick = counting_tick  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.run)
            await trio.sleep(100)
            nursery.cancel_scope.cancel()
        assert ticks < 40, ticks      # wakes to renew its own session, not in a loop
    run(main)
