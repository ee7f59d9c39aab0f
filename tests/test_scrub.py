"""The data node's background scrub and its reporting of lost copies.

Pure pieces first (the token bucket under a fake clock, the bounded lost
set), then the store, then a ``DataNode`` in this process under trio's
MockClock (pacing, heartbeats), then a real ``objfs-node data`` process.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from storagenode import blockformat, datanode
from storagenode.datanode import DataNode, ScrubSettings, TokenBucket
from storagenode.ids import NodeId, ObjectId, new_object_id
from storagenode.main import build_parser
from storagenode.metaclient import MetaUnavailable
from storagenode.objectstore import LostCopies, NoSuchObject, ObjectStore, QuarantinedObject
from tests.procs import NodeProcess
from tests.test_datanode import data_node, metric, put_new, raw, stored_path, with_client




def flip_byte(path: Path, offset: int) -> None:
    """Damage one byte in place (no truncation, no new file)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0x01]))


def halve(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def quarantined(root: Path) -> set[str]:
    return {p.name.split(".")[0] for p in (root / "quarantine").iterdir()}


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# -- the token bucket (fake clock) ----------------------------------------------

def test_bucket_allows_a_burst_then_paces() -> None:
    bucket = TokenBucket(rate=100, burst=100)
    assert bucket.take(100, now=0.0) == 0.0          # the burst
    assert bucket.take(50, now=0.0) == 0.5           # 50 units of debt at 100/s
    assert bucket.take(0, now=0.5) == 0.0            # paid off
    assert bucket.take(200, now=1.0) == 1.5          # 50 refilled, 150 owed


def test_bucket_refills_only_up_to_the_burst() -> None:
    bucket = TokenBucket(rate=10, burst=30)
    bucket.take(30, now=0.0)
    assert bucket.take(30, now=1000.0) == 0.0        # a long idle time refills 30, no more
    assert bucket.take(10, now=1000.0) == 1.0


def test_bucket_ignores_a_clock_going_back() -> None:
    bucket = TokenBucket(rate=10, burst=0)
    assert bucket.take(10, now=5.0) == 1.0
    assert bucket.take(10, now=4.0) == 2.0           # no refill for negative time


def test_bucket_rejects_a_zero_rate() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)


@given(rate=st.integers(1, 10**8), burst=st.integers(0, 10**8),
       works=st.lists(st.tuples(st.integers(0, 10**8), st.floats(0, 10)), max_size=40))
def test_bucket_never_exceeds_its_rate(rate: int, burst: int,
                                       works: list[tuple[int, float]]) -> None:
    """Doing each piece of work after the wait ``take`` returns (plus any idle
    gap), the work done by any moment is at most burst + rate * elapsed."""
    bucket, now, done = TokenBucket(rate, burst), 0.0, 0
    for amount, gap in works:
        now += gap
        now += bucket.take(amount, now)
        done += amount
        assert done <= burst + rate * now + 1e-6 * max(done, 1)


@given(rate=st.integers(1, 10**6), burst=st.integers(0, 10**6),
       amounts=st.lists(st.integers(0, 10**6), min_size=1, max_size=40))
def test_bucket_without_idle_gaps_runs_at_full_rate(rate: int, burst: int,
                                                    amounts: list[int]) -> None:
    bucket, now = TokenBucket(rate, burst), 0.0
    for amount in amounts:
        now += bucket.take(amount, now)
    assert now == pytest.approx(max(0.0, (sum(amounts) - burst) / rate), abs=1e-6)


# -- the lost set ----------------------------------------------------------------

def oids(n: int) -> list[ObjectId]:
    return [ObjectId(f"{i:032x}") for i in range(n)]


def test_lost_set_keeps_order_and_forgets_what_was_reported() -> None:
    lost, ids = LostCopies(), oids(5)
    for oid in ids + ids[:2]:
        lost.add(oid)
    assert lost.pending(3) == ids[:3] and len(lost) == 5
    lost.forget(ids[:3])
    lost.discard(ids[4])
    assert lost.pending(10) == [ids[3]]


def test_lost_set_is_bounded_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    lost, ids = LostCopies(cap=3), oids(6)
    with caplog.at_level(logging.WARNING):
        for oid in ids:
            lost.add(oid)
    assert lost.pending(10) == ids[:3]
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1


# -- the store -------------------------------------------------------------------

def store_with(root: Path, count: int) -> tuple[ObjectStore, list[tuple[ObjectId, bytes]]]:
    store = ObjectStore(root)
    stored = [(new_object_id(), blockformat.encode(os.urandom(3000))) for _ in range(count)]
    for oid, obj in stored:
        store.put(oid, obj)
    return store, stored


def stored_path_in(root: Path, oid: str) -> Path:
    return root / "objects" / oid[:2] / oid[2:4] / oid


def test_verify_quarantines_flipped_and_truncated_objects(tmp_path: Path) -> None:
    store, [(good, _), (flipped, _), (cut, _)] = store_with(tmp_path, 3)
    flip_byte(stored_path_in(tmp_path, flipped), 500)
    halve(stored_path_in(tmp_path, cut))
    store.verify(good)
    for oid in (flipped, cut):
        with pytest.raises(QuarantinedObject):
            store.verify(oid)
        with pytest.raises(NoSuchObject):
            store.verify(oid)
    assert quarantined(tmp_path) == {flipped, cut}
    assert sorted(store.lost.pending(10)) == sorted([flipped, cut])
    assert store.stats().objects == 1


def test_a_reput_takes_the_id_out_of_the_lost_set(tmp_path: Path) -> None:
    store, [(oid, obj)] = store_with(tmp_path, 1)
    halve(stored_path_in(tmp_path, oid))
    with pytest.raises(QuarantinedObject):
        store.get(oid)
    assert store.lost.pending(10) == [oid]
    assert store.put(oid, obj) is True
    assert store.lost.pending(10) == []


def test_reopened_store_reports_what_it_lost_but_not_what_came_back(tmp_path: Path) -> None:
    store, [_, (gone, _), (back, back_obj)] = store_with(tmp_path, 3)
    flip_byte(stored_path_in(tmp_path, gone), 100)
    with pytest.raises(QuarantinedObject):
        store.get(gone)
    flip_byte(stored_path_in(tmp_path, back), 100)
    assert store.put(back, back_obj) is True      # quarantines the bad copy, stores this one
    assert quarantined(tmp_path) == {gone, back}
    (tmp_path / "quarantine" / "not-an-object.123").write_bytes(b"stray")
    assert ObjectStore(tmp_path).lost.pending(10) == [gone]


# -- a DataNode in this process (MockClock) ------------------------------------------

def corrupt_two(root: Path, store: ObjectStore) -> tuple[ObjectId, ObjectId]:
    (flipped, _), (cut, _) = store.list("", 2)[0]
    flip_byte(stored_path_in(root, flipped), blockformat.HEADER_SIZE + 7)
    halve(stored_path_in(root, cut))
    return flipped, cut


def sample(node: DataNode, name: str) -> float:
    value = node.metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


def test_scrub_pass_finds_corrupt_objects_at_the_set_pace(tmp_path: Path) -> None:
    store, stored = store_with(tmp_path, 6)
    flipped, cut = corrupt_two(tmp_path, store)
    total = sum(size for _, size in store.list("", 100)[0])     # as found on disk
    rate = 4000
    node = DataNode(store, NodeId("data-1"), "s" * 32, 1024, ScrubSettings(rate, 60))

    async def main() -> tuple[list[ObjectId], float]:
        start = trio.current_time()
        found = await node.scrubber.scrub_pass()
        return found, trio.current_time() - start

    found, took = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert sorted(found) == sorted([flipped, cut])
    assert took == pytest.approx((total - rate) / rate)      # the burst is one second's worth
    assert quarantined(tmp_path) == {flipped, cut}
    for oid, obj in stored:
        if oid not in (flipped, cut):
            assert bytes(store.get(oid)) == obj
    assert sample(node, "objfs_scrub_objects_total") == 6
    assert sample(node, "objfs_scrub_bytes_total") == total
    assert sample(node, "objfs_scrub_corrupt_total") == 2
    assert sample(node, "objfs_scrub_passes_total") == 1
    assert sample(node, "objfs_scrub_pass_progress") == 1
    assert sample(node, "objfs_data_lost_copies") == 2
    assert node.scrubber.status()["corrupt"] == 2 and node.scrubber.last_pass_at is not None
    assert sorted(trio.run(node.heartbeat_args)["lost"]) == sorted([flipped, cut])


def test_scrub_runs_pass_after_pass_with_the_interval_between(tmp_path: Path) -> None:
    store, _ = store_with(tmp_path, 2)
    node = DataNode(store, NodeId("data-1"), "s" * 32, 1024, ScrubSettings(10**9, 100))
    ends: list[float] = []

    async def main() -> None:
        with trio.CancelScope() as scope:
            def pass_ends() -> float:          # the scrubber's wall clock, read as a pass ends
                ends.append(trio.current_time())
                if len(ends) == 3:
                    scope.cancel()
                return 1e9
            node.scrubber.wall_clock = pass_ends
            await node.scrubber.run()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert ends == pytest.approx([0, 100, 200])
    assert node.scrubber.passes == 3 and node.scrubber.status()["last_pass_at"] == 1e9


def test_disabled_scrub_returns_at_once(tmp_path: Path) -> None:
    store, _ = store_with(tmp_path, 1)
    node = DataNode(store, NodeId("data-1"), "s" * 32, 1024, ScrubSettings(0, 100))
    trio.run(node.scrubber.run)
    assert node.scrubber.passes == 0


class FlakyMeta:
    """Heartbeats fail while ``down``; records what each call carried."""

    def __init__(self, down: set[int], stop_after: int, scope: trio.CancelScope) -> None:
        self.down = down
        self.stop_after = stop_after
        self.scope = scope
        self.beats: list[tuple[bool, list[str]]] = []

    async def __call__(self, method: str, args: dict[str, Any]) -> Any:
        if method != "heartbeat":
            return {}
        ok = len(self.beats) not in self.down
        self.beats.append((ok, list(args["lost"])))
        if len(self.beats) == self.stop_after:
            self.scope.cancel()
        if not ok:
            raise MetaUnavailable("connection refused", sent=False)
        return {"epoch": 1}


def beats_of(node: DataNode, down: set[int], count: int) -> list[tuple[bool, list[str]]]:
    """The first ``count`` heartbeats ``node`` sends to a metadata node failing at ``down``."""
    async def main() -> list[tuple[bool, list[str]]]:
        with trio.CancelScope() as scope:
            fake = FlakyMeta(down, count, scope)
            await datanode.keep_registered(fake, "meta:1", {}, node.heartbeat_args,
                                           node.heartbeat_delivered)
        return fake.beats
    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_lost_ids_are_forgotten_only_after_a_heartbeat_succeeded(tmp_path: Path) -> None:
    store, _ = store_with(tmp_path, 3)
    flipped, cut = corrupt_two(tmp_path, store)
    node = DataNode(store, NodeId("data-1"), "s" * 32, 1024, ScrubSettings(10**9, 60))
    trio.run(node.scrubber.scrub_pass)
    lost = sorted([flipped, cut])
    beats = beats_of(node, down={0, 1}, count=4)
    assert [(ok, sorted(ids)) for ok, ids in beats] == [
        (False, lost), (False, lost), (True, lost), (True, [])]
    assert len(store.lost) == 0


def test_a_heartbeat_carries_at_most_a_thousand_lost_ids(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    for oid in oids(2500):
        store.lost.add(oid)
    node = DataNode(store, NodeId("data-1"), "s" * 32, 1024)
    beats = beats_of(node, down=set(), count=4)
    assert [len(ids) for _, ids in beats] == [1000, 1000, 500, 0]
    assert sum((ids for _, ids in beats), []) == oids(2500)


# -- flags -----------------------------------------------------------------------------

def test_scrub_flags() -> None:
    common = ["data", "--state", "s", "--listen", "h:1", "--secret-file", "f", "--meta", "h:2"]
    args = build_parser().parse_args(common)
    assert (args.scrub_rate, args.scrub_interval) == (16 * 1024 * 1024, 86400.0)
    args = build_parser().parse_args(common + ["--scrub-rate", "0", "--scrub-interval", "5"])
    assert (args.scrub_rate, args.scrub_interval) == (0, 5.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(common + ["--scrub-rate", "-1"])


# -- a real data node process ------------------------------------------------------------

def stats(proc: NodeProcess, secret: str) -> dict[str, Any]:
    return with_client(secret, lambda c: c.stats(proc.address))


def test_node_scrubs_quarantines_and_remembers_lost_copies(tmp_path: Path, secret_file: Path,
                                                           secret: str) -> None:
    state = tmp_path / "state"
    scrub = ["--scrub-rate", str(10**9), "--scrub-interval", "0.1"]
    with data_node(state, secret_file, *scrub) as proc:
        stored = [put_new(proc, secret, os.urandom(5000)) for _ in range(6)]
        (flipped, _), (cut, _) = stored[1], stored[4]
        flip_byte(stored_path(proc, flipped), 3000)
        halve(stored_path(proc, cut))
        wait_for(lambda: quarantined(state) == {flipped, cut})
        for oid, obj in stored:
            if oid not in (flipped, cut):
                assert with_client(secret, lambda c: c.get(proc.address, oid)) == obj
        wait_for(lambda: metric(proc, "objfs_scrub_corrupt_total") == 2)
        assert metric(proc, "objfs_scrub_passes_total") >= 1
        assert metric(proc, "objfs_scrub_objects_total") >= 6
        assert metric(proc, "objfs_data_lost_copies") == 2     # no metadata node to tell
        assert stats(proc, secret)["scrub"]["corrupt"] == 2
        assert stats(proc, secret)["objects"] == 4
    with data_node(state, secret_file, "--scrub-rate", "0") as proc:
        assert stats(proc, secret)["lost"] == 2                # seeded from quarantine/
        assert stats(proc, secret)["scrub"]["passes"] == 0
        with_client(secret, lambda c: c.put(proc.address, cut, stored[4][1]))
        assert stats(proc, secret)["lost"] == 1
        assert raw(proc, "GET", "/metrics").status_code == 200
        assert metric(proc, "objfs_data_lost_copies") == 1
    assert "scrub disabled" in proc.log.read_text()
