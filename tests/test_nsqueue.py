"""The queue of namespace ops a mount answered itself (fusefront/nsqueue.py),
against a fake metadata node: order, batching, every answer reported,
provisional fences turned into granted ones, a commit riding at the end of
a batch, and that nothing leaves the queue without its answer."""

from __future__ import annotations

import errno
from typing import Any, Callable

import trio

from fusefront.nsqueue import NamespaceQueue, QueuedOp
from storagenode.metaclient import MetaUnavailable


class FakeVolume:
    def __init__(self, answer: Callable[[list[dict[str, Any]]], list[Any]]) -> None:
        self.answer = answer
        self.batches: list[list[dict[str, Any]]] = []
        self.unreachable = False
        self.requests = 0

    def new_request(self) -> str:
        self.requests += 1
        return f"m:{self.requests}"

    async def call(self, method: str, **args: Any) -> Any:
        assert method == "batch"
        await trio.sleep(0.01)
        self.batches.append(args["ops"])
        return self.answer(args["ops"])


def op(name: bytes, child: int) -> QueuedOp:
    return QueuedOp("unlink", {"parent": 1, "name": name}, [[1, 7], [child, 8]],
                    parent=1, name=name, child=child, at_ns=5)


def queue_of(volume: FakeVolume, answered: Callable[[QueuedOp, dict[str, Any]], None],
             open_inos: list[int], fences: dict[int, int] | None = None) -> NamespaceQueue:
    return NamespaceQueue(volume, answered=answered, spawn=lambda job: None,  # type: ignore[arg-type]
                          open_inos=lambda: open_inos,
                          fence_of=lambda ino, e: e if e >= 0 else (fences or {}).get(ino, 0))


def test_ops_go_in_order_in_one_batch_and_every_answer_is_reported() -> None:
    async def main() -> None:
        answered: list[tuple[bytes, Any]] = []
        volume = FakeVolume(lambda ops: [
            {"result": {}}, {"errno": errno.ENOENT, "error": "gone"},
            {"errno": errno.EIO, "error": "no WRITE lease"}, "junk"])
        queue = queue_of(volume, lambda o, answer: answered.append((o.name, answer)), [12])
        for name, child in ((b"a", 10), (b"b", 11), (b"c", 12), (b"d", 13)):
            queue.add(op(name, child))
        await queue.drain()
        assert len(queue) == 0 and len(volume.batches) == 1
        sent = volume.batches[0]
        assert [o["args"]["name"] for o in sent] == [b"a", b"b", b"c", b"d"]
        assert [o["args"]["open_inos"] for o in sent] == [[], [], [12], []]   # open now
        assert sent[0]["fences"] == [[1, 7], [10, 8]] and sent[0]["time_ns"] == 5
        assert [name for name, _ in answered] == [b"a", b"b", b"c", b"d"]
        assert answered[2][1]["errno"] == errno.EIO
        assert answered[3][1]["errno"] == errno.EIO       # an answer that is no answer
    trio.run(main)


def test_a_commit_rides_at_the_end_of_the_batch_with_its_create() -> None:
    async def main() -> None:
        answered: list[QueuedOp] = []
        volume = FakeVolume(lambda ops: [{"result": {"ino": o["args"].get("ino")}}
                                         for o in ops])
        granted: dict[int, int] = {}
        queue = queue_of(volume, lambda o, answer: answered.append(o), [], granted)
        # nothing queued: the commit goes the usual way
        assert await queue.ride("commit_blocks", {"ino": 9, "fence": 3}, [[9, 3]]) is None
        queue.add(QueuedOp("mknod", {"parent": 1, "name": b"f", "ino": 20}, [[1, 7]],
                           parent=1, name=b"f", made=20))
        answer = await queue.ride("commit_blocks", {"ino": 20, "size": 1, "fence": -20},
                                  [[20, -20]])
        assert answer == {"result": {"ino": 20}}
        assert len(volume.batches) == 1 and [o["method"] for o in volume.batches[0]] == [
            "mknod", "commit_blocks"]
        commit = volume.batches[0][1]
        # the lease of a create in the same batch: 0, "granted by this batch"
        assert commit["fences"] == [[20, 0]] and commit["args"]["fence"] == 0
        assert [o.made for o in answered] == [20]       # the rider's answer is its own
        granted[20] = 44                # once granted, the provisional fence is that lease
        queue.add(QueuedOp("unlink", {"parent": 1, "name": b"f"}, [[1, 7], [20, -20]],
                           parent=1, name=b"f", child=20))
        await queue.drain()
        assert volume.batches[1][0]["fences"] == [[1, 7], [20, 44]]
    trio.run(main)


def test_nothing_leaves_the_queue_without_its_answer() -> None:
    async def main() -> None:
        down = True

        def answer(ops: list[dict[str, Any]]) -> list[Any]:
            if down:
                raise MetaUnavailable("connection refused", sent=True)
            return [{"result": {}} for _ in ops]
        volume = FakeVolume(answer)
        failed: list[QueuedOp] = []
        queue = queue_of(volume, lambda o, answer: failed.append(o) if "errno" in answer
                         else None, [])
        queue.add(op(b"a", 10))
        try:
            await queue.drain()
            raise AssertionError("a drain with the node down must fail")
        except MetaUnavailable:
            pass
        assert len(queue) == 1                       # still queued, sent again later
        assert queue.stalled                         # the mount answers nothing more itself
        down = False
        async with trio.open_nursery() as nursery:   # a drain cancelled mid-way
            nursery.start_soon(queue.drain)
            await trio.sleep(0.005)                  # the batch is on its way
            nursery.cancel_scope.cancel()
        assert len(queue) == 0 and not failed        # it landed, and was answered
        assert not queue.stalled
        assert [o["args"]["name"] for b in volume.batches for o in b] == [b"a", b"a"]
        # sent again under the same name: the node answers it as the first time
        assert volume.batches[0][0]["req"] == volume.batches[1][0]["req"]
    trio.run(main)


def test_ops_queued_while_a_batch_is_on_its_way_wait_to_share_the_next() -> None:
    """A drain sends what was queued when it was asked (and what is queued
    by the time its batch leaves), not a batch for each op that comes while
    one is on its way: those wait for the timer, and go together; a rider
    is sent with everything queued before it."""
    async def main() -> None:
        answered: list[bytes] = []
        volume = FakeVolume(lambda ops: [{"result": {}}] * len(ops))
        queue = queue_of(volume, lambda o, answer: answered.append(o.name), [])
        queue.add(op(b"a", 10))

        async def more() -> None:
            await trio.sleep(0.005)           # while a's batch is on its way
            for i in range(5):
                queue.add(op(b"m%d" % i, 20 + i))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(more)
            await queue.drain()
        assert [len(b) for b in volume.batches] == [1] and len(queue) == 5
        answer = await queue.ride("commit_blocks", {"ino": 30}, [[30, 1]])
        assert answer == {"result": {}}
        assert [len(b) for b in volume.batches] == [1, 6] and len(queue) == 0
        assert answered == [b"a", b"m0", b"m1", b"m2", b"m3", b"m4"]
    trio.run(main)
