"""The data node: a real ``objfs-node data`` process, talked to with DataClient.

No metadata node runs here: nodes get ``--meta`` pointing at an unused
port and must serve anyway.  The registration loop is tested on its own
against a fake metadata node (an httpx MockTransport) under a fake clock.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import httpx
import pytest
import trio
import trio.testing

from storagenode.metaclient import MetaError, MetaUnavailable
from storagenode import auth, blockformat, datanode, retry
from storagenode.dataclient import (DataClient, NodeFull, NodeRejected, NodeUnavailable,
                                    ObjectCorrupted, ObjectNotFound)
from storagenode.ids import NodeId, ObjectId, new_object_id
from storagenode.objectstore import ObjectStore
from tests.procs import NodeProcess, free_port

T = TypeVar("T")

MAX_OBJECT = 256 * 1024


# -- fixtures and helpers ------------------------------------------------------



def data_node(state: Path, secret_file: Path, *extra: str, port: int | None = None
              ) -> NodeProcess:
    meta = f"127.0.0.1:{free_port()}"          # nothing listens there
    return NodeProcess("data", state, secret_file, ["--meta", meta, *extra], port)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, secret_file: Path) -> Iterator[NodeProcess]:
    state = tmp_path_factory.mktemp("node") / "state"
    with data_node(state, secret_file, "--max-object-bytes", str(MAX_OBJECT)) as proc:
        yield proc


def with_client(secret: str, fn: Callable[[DataClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with DataClient(secret) as client:
            return await fn(client)
    return trio.run(main)


def raw(node: NodeProcess, method: str, path: str, secret: str | None = None,
        **kwargs: Any) -> httpx.Response:
    """A plain request with the path sent exactly as given (no normalisation)."""
    headers = dict(kwargs.pop("headers", {}))
    if secret is not None:
        headers.update(auth.auth_header(secret))
    url = httpx.URL(f"http://{node.address}").copy_with(raw_path=path.encode())
    return httpx.request(method, url, headers=headers, timeout=10, **kwargs)


def put_new(node: NodeProcess, secret: str, data: bytes) -> tuple[ObjectId, bytes]:
    oid, obj = new_object_id(), blockformat.encode(data)
    with_client(secret, lambda c: c.put(node.address, oid, obj))
    return oid, obj


def stored_path(node: NodeProcess, oid: str) -> Path:
    return node.state / "objects" / oid[:2] / oid[2:4] / oid


def metric(node: NodeProcess, name: str) -> float:
    for line in raw(node, "GET", "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


# -- the API -------------------------------------------------------------------

def test_put_get_head_delete(node: NodeProcess, secret: str) -> None:
    oid, obj = new_object_id(), blockformat.encode(os.urandom(5000))

    async def scenario(c: DataClient) -> None:
        await c.put(node.address, oid, obj)
        await c.put(node.address, oid, obj)            # identical re-put is fine
        assert await c.head(node.address, oid) == len(obj)
        assert await c.get(node.address, oid) == obj
        assert await c.get_buffer(node.address, oid) == obj    # one buffer, same bytes
        assert await c.delete(node.address, oid) is True
        assert await c.delete(node.address, oid) is False
        assert await c.head(node.address, oid) is None
        with pytest.raises(ObjectNotFound):
            await c.get(node.address, oid)
        with pytest.raises(ObjectNotFound):
            await c.get_buffer(node.address, oid)

    with_client(secret, scenario)
    text = raw(node, "GET", "/metrics").text      # each delete was sent once
    assert 'objfs_data_requests_total{method="DELETE",status="204"} 1.0' in text
    assert 'objfs_data_requests_total{method="DELETE",status="404"} 1.0' in text


def test_put_answers_201_then_200_and_head_has_checksum(node: NodeProcess, secret: str) -> None:
    oid, obj = new_object_id(), blockformat.encode(b"status codes")
    path = f"/v1/objects/{oid}"
    assert raw(node, "PUT", path, secret, content=obj).status_code == 201
    assert raw(node, "PUT", path, secret, content=obj).status_code == 200
    head = raw(node, "HEAD", path, secret)
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(obj))
    assert head.headers["x-objfs-checksum"] == blockformat.verify(obj).checksum.hex()
    assert raw(node, "DELETE", path, secret).status_code == 204
    assert raw(node, "DELETE", path, secret).status_code == 404


def test_different_object_under_same_id_conflicts(node: NodeProcess, secret: str) -> None:
    oid, obj = put_new(node, secret, b"the first version")
    with pytest.raises(NodeRejected) as info:
        with_client(secret, lambda c: c.put(node.address, oid, blockformat.encode(b"other")))
    assert info.value.status == 409
    assert with_client(secret, lambda c: c.get(node.address, oid)) == obj


def test_list_pages_in_oid_order(tmp_path: Path, secret_file: Path, secret: str) -> None:
    with data_node(tmp_path / "state", secret_file) as proc:
        oids = sorted(put_new(proc, secret, os.urandom(100))[0] for _ in range(12))

        async def all_pages(c: DataClient) -> list[str]:
            seen: list[str] = []
            after, more = "", True
            while more:
                page, more = await c.list(proc.address, after, limit=5)
                assert len(page) <= 5
                assert all(entry["size"] > 0 for entry in page)
                seen.extend(entry["oid"] for entry in page)
                after = seen[-1]
            return seen

        assert with_client(secret, all_pages) == oids
        stats = with_client(secret, lambda c: c.stats(proc.address))
        assert stats["objects"] == 12 and stats["used"] > 0
        assert stats["capacity"] >= stats["free"] > 0
        assert raw(proc, "GET", "/v1/objects?limit=10001", secret).status_code == 400
        assert raw(proc, "GET", "/v1/objects?after=zz", secret).status_code == 400


def test_range_reads(node: NodeProcess, secret: str) -> None:
    oid, obj = put_new(node, secret, os.urandom(3000))
    path = f"/v1/objects/{oid}"
    size = len(obj)
    for header, expected in [("bytes=0-9", obj[:10]), ("bytes=100-", obj[100:]),
                             ("bytes=-7", obj[-7:]), (f"bytes=10-{size + 50}", obj[10:])]:
        answer = raw(node, "GET", path, secret, headers={"range": header})
        assert answer.status_code == 206, header
        assert answer.content == expected, header
    assert raw(node, "GET", path, secret,
               headers={"range": "bytes=5-9"}).headers["content-range"] == f"bytes 5-9/{size}"
    for bad in [f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=9-5", "bytes=-0",
                "bytes=0-1,5-6", "items=0-1", "bytes=-"]:
        assert raw(node, "GET", path, secret, headers={"range": bad}).status_code == 416, bad
    got = with_client(secret, lambda c: c.get(node.address, oid, byte_range=(56, 100)))
    assert got == obj[56:100]


def test_piece_reads(node: NodeProcess, secret: str) -> None:
    """?pieces=a-b: the header and piece table, then the stored bytes of
    those pieces only (fewer if the object has fewer), which the reader
    checks and decodes; nonsense is refused."""
    data = os.urandom(3 * blockformat.PIECE_SIZE + 100)
    oid, obj = put_new(node, secret, data)
    head = blockformat.verify(obj).payload_offset
    for first, last in [(0, 0), (1, 2), (3, 3), (2, 9)]:
        body = with_client(secret, lambda c: c.get_pieces(node.address, oid, first, last))
        upto = min(last, 3)
        assert len(body) == head + min(len(data), (upto + 1) * blockformat.PIECE_SIZE) \
            - first * blockformat.PIECE_SIZE
        start, got = blockformat.decode_range(body, first, upto)
        assert bytes(got) == data[start:(upto + 1) * blockformat.PIECE_SIZE]
    path = f"/v1/objects/{oid}"
    assert raw(node, "GET", f"{path}?pieces=4-4", secret).status_code == 416
    for bad in ["2-1", "x", "1-", "-1-2", "1-2-3", "1234567890-1234567891"]:
        assert raw(node, "GET", f"{path}?pieces={bad}", secret).status_code == 400, bad
    old = ObjectId(new_object_id())
    framed = blockformat.encode(data, pieced=False)
    with_client(secret, lambda c: c.put(node.address, old, framed))
    assert with_client(secret, lambda c: c.get_pieces(node.address, old, 1, 1)) == framed


def test_a_damaged_piece_table_is_put_aside(node: NodeProcess, secret: str) -> None:
    """The node checks the header and table it reads for a piece reader
    (not the pieces: the reader does); a damaged one is put aside."""
    oid, obj = put_new(node, secret, os.urandom(2 * blockformat.PIECE_SIZE))
    damaged = bytearray(obj)
    damaged[blockformat.HEADER2_SIZE + 2] ^= 0x01
    stored_path(node, oid).write_bytes(bytes(damaged))
    with pytest.raises(ObjectCorrupted):
        with_client(secret, lambda c: c.get_pieces(node.address, oid, 0, 0))
    assert not stored_path(node, oid).exists()


def test_parse_range_spans() -> None:
    assert datanode.parse_range("bytes=0-0", 10) == (0, 1)
    assert datanode.parse_range("bytes=3-", 10) == (3, 10)
    assert datanode.parse_range("bytes=-20", 10) == (0, 10)
    assert datanode.parse_range("bytes=8-100", 10) == (8, 10)
    with pytest.raises(datanode.HTTPError) as info:
        datanode.parse_range("bytes=10-", 10)
    assert info.value.status == 416


def test_secret_required_except_health_and_metrics(node: NodeProcess, secret: str) -> None:
    oid = new_object_id()
    for method, path in [("GET", f"/v1/objects/{oid}"), ("PUT", f"/v1/objects/{oid}"),
                         ("HEAD", f"/v1/objects/{oid}"), ("DELETE", f"/v1/objects/{oid}"),
                         ("GET", "/v1/objects"), ("GET", "/v1/stats")]:
        assert raw(node, method, path).status_code == 401, path
        assert raw(node, method, path, "wrong-secret-0123456789").status_code == 401, path
    with pytest.raises(NodeRejected) as info:
        with_client("not-the-secret-0123456789", lambda c: c.stats(node.address))
    assert info.value.status == 401
    health = raw(node, "GET", "/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["role"] == "data"
    assert raw(node, "GET", "/metrics").status_code == 200


@pytest.mark.parametrize("bad_id", [
    "..%2F..%2Fetc%2Fpasswd", "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", "ABC",
    "0123456789ABCDEF0123456789ABCDEF", "0" * 33, "0" * 31,
    "00%2F" + "0" * 30, "00/00/" + "0" * 32, ""])
def test_malformed_ids_are_refused(node: NodeProcess, secret: str, bad_id: str) -> None:
    body = blockformat.encode(b"escape attempt")
    for method in ("PUT", "GET", "DELETE"):
        answer = raw(node, method, f"/v1/objects/{bad_id}", secret, content=body)
        assert answer.status_code == 400, (method, answer.text)
    assert not (node.state.parent / "etc").exists()
    assert list((node.state / "tmp").iterdir()) == []


def test_body_over_the_limit_is_refused(node: NodeProcess, secret: str) -> None:
    big = blockformat.encode(os.urandom(MAX_OBJECT + 1))
    with pytest.raises(NodeRejected) as info:
        with_client(secret, lambda c: c.put(node.address, new_object_id(), big))
    assert info.value.status == 413


def test_checksum_mismatch_and_bad_framing_are_refused(node: NodeProcess, secret: str) -> None:
    damaged = bytearray(blockformat.encode(os.urandom(2000)))
    damaged[blockformat.HEADER_SIZE + 10] ^= 0x01
    oid = new_object_id()
    with pytest.raises(NodeRejected) as info:
        with_client(secret, lambda c: c.put(node.address, oid, bytes(damaged)))
    assert info.value.status == 422
    assert raw(node, "PUT", f"/v1/objects/{oid}", secret,
               content=b"garbage that is not an object").status_code == 400
    assert with_client(secret, lambda c: c.head(node.address, oid)) is None


def test_corrupt_stored_object_is_reported_and_quarantined(node: NodeProcess, secret: str) -> None:
    oid, obj = put_new(node, secret, os.urandom(4000))
    before = metric(node, "objfs_data_corrupt_objects_total")
    damaged = bytearray(obj)
    damaged[-100] ^= 0x01
    stored_path(node, oid).write_bytes(bytes(damaged))
    with pytest.raises(ObjectCorrupted):
        with_client(secret, lambda c: c.get_buffer(node.address, oid))
    assert metric(node, "objfs_data_corrupt_objects_total") == before + 1
    assert not stored_path(node, oid).exists()
    assert any(p.name.startswith(oid) for p in (node.state / "quarantine").iterdir())
    answer = raw(node, "GET", f"/v1/objects/{oid}", secret)
    assert answer.status_code == 404 and bytes(damaged) not in answer.content
    with_client(secret, lambda c: c.put(node.address, oid, obj))   # a re-put repairs it
    assert with_client(secret, lambda c: c.get(node.address, oid)) == obj


def test_a_reader_that_checks_itself_gets_the_copy_unchecked(node: NodeProcess,
                                                              secret: str) -> None:
    """reader_verifies=1: the node sends its copy as stored, damaged or
    not, and keeps it; asked the usual way it refuses a damaged one (422)
    and puts it aside."""
    oid, obj = put_new(node, secret, os.urandom(6000))
    assert with_client(secret, lambda c: c.get_buffer(node.address, oid,
                                                      node_verifies=False)) == obj
    damaged = bytearray(obj)
    damaged[-7] ^= 0x04
    stored_path(node, oid).write_bytes(bytes(damaged))
    got = with_client(secret, lambda c: c.get_buffer(node.address, oid, node_verifies=False))
    assert bytes(got) == bytes(damaged) and stored_path(node, oid).exists()
    with pytest.raises(ObjectCorrupted):
        with_client(secret, lambda c: c.get_buffer(node.address, oid))
    assert not stored_path(node, oid).exists()
    with pytest.raises(ObjectNotFound):
        with_client(secret, lambda c: c.get_buffer(node.address, oid, node_verifies=False))


def test_corrupt_object_answers_500_corrupt_without_its_bytes(node: NodeProcess,
                                                              secret: str) -> None:
    oid, obj = put_new(node, secret, os.urandom(4000))
    damaged = bytearray(obj)
    damaged[200] ^= 0x80
    stored_path(node, oid).write_bytes(bytes(damaged))
    answer = raw(node, "GET", f"/v1/objects/{oid}", secret, headers={"range": "bytes=0-99"})
    assert answer.status_code == 500
    assert answer.json()["error"] == "corrupt"
    assert damaged[:100] not in answer.content


def test_metrics_and_health(node: NodeProcess, secret: str) -> None:
    put_new(node, secret, b"counted")
    text = raw(node, "GET", "/metrics").text
    for name in ("objfs_data_requests_total", "objfs_data_bytes_in_total",
                 "objfs_data_bytes_out_total", "objfs_data_objects_stored",
                 "objfs_data_corrupt_objects_total", "objfs_data_put_seconds_bucket"):
        assert name in text, name
    assert 'objfs_data_requests_total{method="PUT",status="201"}' in text
    assert metric(node, "objfs_data_objects_stored") >= 1
    health = with_client(secret, lambda c: c.health(node.address))
    stats = with_client(secret, lambda c: c.stats(node.address))
    assert health == {"status": "ok", "role": "data", "node_id": stats["node_id"]}


def test_restart_keeps_objects_and_node_id(tmp_path: Path, secret_file: Path,
                                           secret: str) -> None:
    state = tmp_path / "state"
    with data_node(state, secret_file, "--node-id", "data-7") as proc:
        oid, obj = put_new(proc, secret, os.urandom(10000))
    with data_node(state, secret_file) as proc:
        assert with_client(secret, lambda c: c.get(proc.address, oid)) == obj
        stats = with_client(secret, lambda c: c.stats(proc.address))
        assert (stats["node_id"], stats["objects"]) == ("data-7", 1)


def test_whole_object_reads_reuse_connections_and_survive_a_node_restart(
        tmp_path: Path, secret_file: Path, secret: str) -> None:
    """get_buffer (every block a mount reads) keeps its connections alive;
    one the node closed meanwhile (a restart) is replaced unseen, and a node
    that stays down is NodeUnavailable."""
    state, port = tmp_path / "state", free_port()
    datas = [os.urandom(n) for n in (1, 70_000, 200_000)]

    async def scenario(c: DataClient) -> None:
        with data_node(state, secret_file, port=port) as proc:
            stored = []
            for data in datas:
                oid, obj = new_object_id(), blockformat.encode(data, compress=False)
                await c.put(proc.address, oid, obj)
                stored.append((oid, obj))
            for _ in range(5):
                for oid, obj in stored:
                    assert await c.get_buffer(proc.address, oid) == obj
        with data_node(state, secret_file, port=port) as proc:
            for oid, obj in stored:
                assert await c.get_buffer(proc.address, oid) == obj
            with pytest.raises(ObjectNotFound):
                await c.get_buffer(proc.address, new_object_id())
        with pytest.raises(NodeUnavailable):
            await c.get_buffer(proc.address, stored[0][0])

    async def main() -> None:
        async with DataClient(secret, timeout=5) as client:
            await scenario(client)
    trio.run(main)


def test_refuses_a_different_node_id(tmp_path: Path, secret_file: Path) -> None:
    state = tmp_path / "state"
    with data_node(state, secret_file, "--node-id", "data-1"):
        pass
    proc = data_node(state, secret_file, "--node-id", "data-2")
    try:
        with pytest.raises(RuntimeError, match="differs from data-1"):
            proc.start()
    finally:
        proc.stop()


def test_below_reserve_answers_507(tmp_path: Path, secret_file: Path, secret: str) -> None:
    with data_node(tmp_path / "state", secret_file, "--reserve-bytes", str(2 ** 62)) as proc:
        with pytest.raises(NodeFull) as info:
            with_client(secret, lambda c: c.put(proc.address, new_object_id(),
                                                 blockformat.encode(b"no room")))
        assert info.value.status == 507
        assert with_client(secret, lambda c: c.stats(proc.address))["objects"] == 0


def test_unreachable_node_is_temporary(secret: str) -> None:
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(NodeUnavailable) as info:
        with_client(secret, lambda c: c.stats(address))
    assert retry.is_temporary(info.value)
    assert not retry.is_temporary(NodeRejected(address, "no", 400))


def test_keeps_serving_without_metadata_node(node: NodeProcess, secret: str) -> None:
    assert with_client(secret, lambda c: c.health(node.address))["status"] == "ok"
    assert "unreachable" in node.log.read_text()


# -- registration with the metadata node (fake metadata node, fake clock) -------

class FakeMeta:
    """Answers register_node and heartbeat; forgets the node once, when asked."""

    def __init__(self, forget_after: int) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.forget_after = forget_after
        self.registered = False

    async def __call__(self, method: str, args: dict[str, Any]) -> Any:
        self.calls.append((method, args))
        if method == "register_node":
            self.registered = True
            return {}
        if not self.registered:
            raise MetaError(errno.ENOENT, "unknown node")
        if len(self.calls) == self.forget_after:
            self.registered = False
        return {"epoch": 1}


def test_registers_heartbeats_and_reregisters() -> None:
    fake = FakeMeta(forget_after=3)
    registration = {"node_id": "data-9", "address": "10.0.0.9:7000", "domain": "rack-1",
                    "weight": 2.0}

    async def heartbeat() -> dict[str, Any]:
        return {"node_id": "data-9", "capacity": 100, "free": 50, "objects": 3}

    async def main() -> None:
        with trio.move_on_after(9):
            await datanode.keep_registered(fake, "meta:1", registration, heartbeat)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    methods = [method for method, _ in fake.calls]
    # t=0 register+beat, 2 beat (then forgotten), 4 beat -> ENOENT, 6 register+beat, 8 beat
    assert methods == ["register_node", "heartbeat", "heartbeat", "heartbeat",
                       "register_node", "heartbeat", "heartbeat"]
    assert fake.calls[0][1] == registration
    assert fake.calls[1][1] == {"node_id": "data-9", "capacity": 100, "free": 50, "objects": 3}


def test_heartbeat_args_come_from_the_store(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    store.put(new_object_id(), blockformat.encode(b"one"))
    node = datanode.DataNode(store, NodeId("data-3"), "s" * 32, 1024)
    args = trio.run(node.heartbeat_args)
    assert args["node_id"] == "data-3" and args["objects"] == 1
    assert args["capacity"] >= args["free"] > 0


def test_unreachable_metadata_node_is_retried_with_few_warnings(
        caplog: pytest.LogCaptureFixture) -> None:
    async def refuse(method: str, args: dict[str, Any]) -> Any:
        raise MetaUnavailable("connection refused", sent=False)

    async def heartbeat() -> dict[str, Any]:
        return {}

    async def main() -> None:
        with trio.move_on_after(65):
            await datanode.keep_registered(refuse, "meta:1", {}, heartbeat)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3          # at 0, 30 and 60 s out of 33 attempts
