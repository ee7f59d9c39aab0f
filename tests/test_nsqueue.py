"""The queue of unlinks a mount answered itself (fusefront/nsqueue.py),
against a fake metadata node: order, batching, what counts as refused,
and that nothing leaves the queue without its answer."""

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

    async def call(self, method: str, **args: Any) -> Any:
        assert method == "batch"
        await trio.sleep(0.01)
        self.batches.append(args["ops"])
        return self.answer(args["ops"])


def op(name: bytes, child: int) -> QueuedOp:
    return QueuedOp("unlink", 1, name, child, [[1, 7], [child, 8]])


def test_ops_go_in_order_in_one_batch_and_refusals_are_reported() -> None:
    async def main() -> None:
        failed: list[tuple[bytes, str]] = []
        volume = FakeVolume(lambda ops: [
            {"result": {}}, {"errno": errno.ENOENT, "error": "gone"},
            {"errno": errno.EIO, "error": "no WRITE lease"}, "junk"])
        queue = NamespaceQueue(volume, failed=lambda o, why: failed.append((o.name, why)),  # type: ignore[arg-type]
                               spawn=lambda job: None, open_inos=lambda: [12])
        for name, child in ((b"a", 10), (b"b", 11), (b"c", 12), (b"d", 13)):
            queue.add(op(name, child))
        await queue.drain()
        assert len(queue) == 0 and len(volume.batches) == 1
        sent = volume.batches[0]
        assert [o["args"]["name"] for o in sent] == [b"a", b"b", b"c", b"d"]
        assert [o["args"]["open_inos"] for o in sent] == [[], [], [12], []]   # open now
        assert sent[0]["fences"] == [[1, 7], [10, 8]]
        # "no such entry": gone either way (a batch sent again); the rest failed
        assert [name for name, _ in failed] == [b"c", b"d"]
        assert "no WRITE lease" in failed[0][1]
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
        queue = NamespaceQueue(volume, failed=lambda o, why: failed.append(o),  # type: ignore[arg-type]
                               spawn=lambda job: None, open_inos=lambda: [])
        queue.add(op(b"a", 10))
        try:
            await queue.drain()
            raise AssertionError("a drain with the node down must fail")
        except MetaUnavailable:
            pass
        assert len(queue) == 1                       # still queued, sent again later
        down = False
        async with trio.open_nursery() as nursery:   # a drain cancelled mid-way
            nursery.start_soon(queue.drain)
            await trio.sleep(0.005)                  # the batch is on its way
            nursery.cancel_scope.cancel()
        assert len(queue) == 0 and not failed        # it landed, and was answered
        assert [o["args"]["name"] for b in volume.batches for o in b] == [b"a", b"a"]
    trio.run(main)
