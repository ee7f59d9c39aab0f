"""The metadata node as a real ``objfs-node meta`` process, spoken to over HTTP."""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import httpx
import msgpack
import pytest
import trio

from storagenode.auth import auth_header, create_secret
from storagenode.metaclient import BadRequest, MetaClient, MetaError, MetaUnavailable
from tests.procs import NodeProcess, free_port

DIR = 0o040000


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    create_secret(path)
    return path


@pytest.fixture
def meta(tmp_path: Path, secret_file: Path) -> Iterator[NodeProcess]:
    node = NodeProcess("meta", tmp_path / "meta", secret_file)
    try:
        yield node.start()
    finally:
        node.stop()


def with_client(node: NodeProcess, secret_file: Path,
                body: Callable[[MetaClient], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with MetaClient(node.address, secret_file.read_text().strip()) as client:
            return await body(client)
    return trio.run(main)


def test_namespace_over_rpc(meta: NodeProcess, secret_file: Path) -> None:
    async def body(client: MetaClient) -> None:
        volume = await client.call("create_volume", name="v", block_size=1 << 20, replicas=3)
        vol = volume["vol"]
        assert await client.call("volume", name="v") == volume
        d = await client.call("mkdir", vol=vol, parent=1, name=b"d\xff", mode=0o755,
                              uid=1, gid=2)
        assert d["mode"] == DIR | 0o755 and d["nlink"] == 2
        assert await client.call("lookup", vol=vol, parent=1, name=b"d\xff") == dict(d, xattrs=0)
        entries = await client.call("readdir", vol=vol, ino=1, after=0, limit=10)
        assert [(e[1], e[2]["ino"]) for e in entries] == [(b"d\xff", d["ino"])]
        with pytest.raises(MetaError) as info:
            await client.call("mkdir", vol=vol, parent=1, name=b"d\xff", mode=0o755,
                              uid=1, gid=2)
        assert info.value.errno == errno.EEXIST
        with pytest.raises(MetaError) as info:
            await client.call("lookup", vol=vol, parent=1, name=b"nope")
        assert info.value.errno == errno.ENOENT
        with pytest.raises(BadRequest):
            await client.call("no_such_method")
    with_client(meta, secret_file, body)


def test_auth_and_malformed_requests(meta: NodeProcess, secret_file: Path) -> None:
    url = f"http://{meta.address}"
    auth = auth_header(secret_file.read_text().strip())
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "role": "meta"}
    body = msgpack.packb({"method": "volumes", "args": {}})
    assert httpx.post(f"{url}/v1/rpc", content=body).status_code == 401
    assert httpx.post(f"{url}/v1/rpc", content=body,
                      headers={"authorization": "Bearer wrong-secret-123"}).status_code == 401
    ok = httpx.post(f"{url}/v1/rpc", content=body, headers=auth)
    assert ok.status_code == 200 and msgpack.unpackb(ok.content) == {"result": []}
    for garbage in (b"\xc1\xc1garbage", msgpack.packb([1, 2]), msgpack.packb({"method": 5}),
                    msgpack.packb({"method": "mkdir", "args": {"vol": "x"}}),
                    msgpack.packb({"method": "volumes", "args": [], "x": 1})):
        assert httpx.post(f"{url}/v1/rpc", content=garbage, headers=auth).status_code == 400
    huge = httpx.post(f"{url}/v1/rpc", content=b"\0" * (8 * 1024 * 1024 + 1), headers=auth)
    assert huge.status_code == 413


def test_concurrent_ops_share_commits(meta: NodeProcess, secret_file: Path) -> None:
    async def body(client: MetaClient) -> list[Any]:
        vol = (await client.call("create_volume", name="v", block_size=4096, replicas=1))["vol"]
        results: list[Any] = []

        async def mkdir(i: int) -> None:
            results.append(await client.call("mkdir", vol=vol, parent=1, name=b"d%d" % i,
                                             mode=0o755, uid=0, gid=0))
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(mkdir, i)
        assert (await client.call("getattr", vol=vol, ino=1))["nlink"] == 202
        return await client.call("readdir", vol=vol, ino=1, after=0, limit=1000)
    entries = with_client(meta, secret_file, body)
    assert sorted(e[1] for e in entries) == sorted(b"d%d" % i for i in range(200))
    metrics = httpx.get(f"http://{meta.address}/metrics").text
    batches = _metric(metrics, "objfs_meta_commit_batch_ops_count")
    ops = _metric(metrics, "objfs_meta_commit_batch_ops_sum")
    # 200 mkdirs, create_volume, and the node's own "configure" at start
    assert ops == 202 and batches < ops, (batches, ops)
    assert _metric(metrics, 'objfs_meta_rpc_total{method="mkdir",outcome="ok"}') == 200


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def test_acknowledged_ops_survive_kill(tmp_path: Path, secret_file: Path) -> None:
    node = NodeProcess("meta", tmp_path / "meta", secret_file)
    try:
        node.start()

        async def write(client: MetaClient) -> int:
            vol = (await client.call("create_volume", name="v", block_size=4096,
                                     replicas=1))["vol"]
            async with trio.open_nursery() as nursery:
                for i in range(50):
                    nursery.start_soon(lambda i=i: client.call(  # type: ignore[misc]
                        "mknod", vol=vol, parent=1, name=b"f%d" % i, mode=0o100644,
                        rdev=0, uid=0, gid=0))
            return int(vol)
        vol = with_client(node, secret_file, write)
        node.kill()
        node.start()

        async def read(client: MetaClient) -> list[Any]:
            return await client.call("readdir", vol=vol, ino=1, after=0, limit=100)
        entries = with_client(node, secret_file, read)
        assert sorted(e[1] for e in entries) == sorted(b"f%d" % i for i in range(50))
    finally:
        node.stop()


def test_cluster_map_and_heartbeats(meta: NodeProcess, secret_file: Path) -> None:
    async def body(client: MetaClient) -> None:
        with pytest.raises(MetaError) as info:
            await client.call("heartbeat", node_id="n1", capacity=1, free=1, objects=0)
        assert info.value.errno == errno.ENOENT
        assert await client.call("register_node", node_id="n1", address="127.0.0.1:7001",
                                 domain="rack1", weight=1.0) == {}
        down = await client.call("cluster_map")
        # never heard from: not up (suspect while the metadata node is young)
        assert down["epoch"] == 1 and down["nodes"][0]["state"] in ("suspect", "down")
        beat = await client.call("heartbeat", node_id="n1", capacity=1000, free=600,
                                 objects=3)
        assert beat == {"epoch": 1}
        nodes = (await client.call("cluster_map"))["nodes"]
        assert nodes == [
            {"node_id": "n1", "address": "127.0.0.1:7001", "domain": "rack1", "weight": 1.0,
             "state": "up", "admin": "active", "silent": nodes[0]["silent"],
             "capacity": 1000, "free": 600}]
        assert 0 <= nodes[0]["silent"] < 2
        vol = (await client.call("create_volume", name="v", block_size=4096, replicas=1))["vol"]
        statfs = await client.call("statfs", vol=vol)
        assert statfs == {"capacity": 1000, "free": 600, "replicas": 1, "ec_k": 0,
                          "ec_m": 0, "inodes": 1, "block_size": 4096}
    with_client(meta, secret_file, body)


def test_client_reports_unreachable_node(secret_file: Path) -> None:
    async def main() -> None:
        async with MetaClient(f"127.0.0.1:{free_port()}", "x" * 32, timeout=2) as client:
            with pytest.raises(MetaUnavailable) as info:
                await client.call("volumes")
            assert info.value.temporary
    trio.run(main)


def test_a_batch_applies_only_what_the_sessions_write_leases_cover(
        meta: NodeProcess, secret_file: Path) -> None:
    """Unlinks a mount answered itself (fusefront/nsqueue.py) arrive in a
    batch; each is admitted only under that session's WRITE cache leases on
    the directory and the file, never waiting for one."""
    async def body(client: MetaClient) -> None:
        vol = (await client.call("create_volume", name="v", block_size=1 << 20,
                                 replicas=1))["vol"]
        client.session = (await client.call("open_session"))["session"]
        d = (await client.call("mkdir", vol=vol, parent=1, name=b"d", mode=0o755,
                               uid=0, gid=0))["ino"]
        ino = {}
        for name in (b"a", b"b", b"c"):
            ino[name] = (await client.call("mknod", vol=vol, parent=d, name=name,
                                           mode=0o100644, rdev=0, uid=0, gid=0))["ino"]

        async def write_lease(i: int) -> int:
            grant = await client.call("acquire", vol=vol, ino=i, mode="write", wait=1)
            return int(grant["epoch"])
        dl, al, bl = await write_lease(d), await write_lease(ino[b"a"]), await write_lease(ino[b"b"])

        def unlink(name: bytes, fences: list[list[int]]) -> dict[str, Any]:
            return {"method": "unlink", "args": {"parent": d, "name": name, "open_inos": []},
                    "fences": fences}
        answers = await client.call("batch", vol=vol, ops=[
            unlink(b"a", [[d, dl], [ino[b"a"], al]]),
            unlink(b"b", [[d, dl], [ino[b"b"], bl + 1000]]),     # not this lease
            unlink(b"c", [[d, dl]]),                              # no lease on the file
            unlink(b"zz", [[d, dl]])])                            # no such name
        # the file is gone, and the lease on it ended with it
        assert answers[0] == {"result": {"ino": ino[b"a"], "nlink": 0}, "released": True}
        assert [a.get("errno") for a in answers[1:]] == [errno.EIO, errno.EIO, errno.ENOENT]
        entries = await client.call("readdir", vol=vol, ino=d, after=0, limit=10)
        assert sorted(e[1] for e in entries) == [b"b", b"c"]
        for name in (b"e1", b"e2"):
            ino[name] = (await client.call("mkdir", vol=vol, parent=d, name=name, mode=0o755,
                                           uid=0, gid=0))["ino"]
        e1l = await write_lease(ino[b"e1"])
        answers = await client.call("batch", vol=vol, ops=[
            {"method": "rmdir", "args": {"parent": d, "name": b"e1"},
             "fences": [[d, dl], [ino[b"e1"], e1l]]},
            {"method": "rmdir", "args": {"parent": d, "name": b"e2"}, "fences": [[d, dl]]}])
        assert answers[0] == {"result": {"ino": ino[b"e1"]}, "released": True}
        assert answers[1]["errno"] == errno.EIO
        entries = await client.call("readdir", vol=vol, ino=d, after=0, limit=10)
        assert sorted(e[1] for e in entries) == [b"b", b"c", b"e2"]
        with pytest.raises(BadRequest):
            await client.call("batch", vol=vol, ops=[{"method": "mkdir", "args": {},
                                                      "fences": []}])
        with pytest.raises(BadRequest):          # a malformed op: none of the batch applied
            await client.call("batch", vol=vol, ops=[
                unlink(b"b", [[d, dl], [ino[b"b"], bl]]),
                {"method": "unlink", "args": {"parent": d}, "fences": []}])
        await client.call("mkdir", vol=vol, parent=d, name=b"e3", mode=0o755, uid=0,
                          gid=0)                 # after anything queued before it
        entries = await client.call("readdir", vol=vol, ino=d, after=0, limit=10)
        assert sorted(e[1] for e in entries) == [b"b", b"c", b"e2", b"e3"]
    with_client(meta, secret_file, body)


def two_sessions(meta: NodeProcess, secret_file: Path,
                 body: Callable[[MetaClient, MetaClient, int], Awaitable[None]]) -> None:
    """``body(a, b, vol)``: two clients, each with its own lease session, and a volume."""
    async def main() -> None:
        secret = secret_file.read_text().strip()
        async with MetaClient(meta.address, secret) as a, MetaClient(meta.address, secret) as b:
            vol = (await a.call("create_volume", name="v", block_size=1 << 20,
                                replicas=1))["vol"]
            a.session = (await a.call("open_session"))["session"]
            b.session = (await b.call("open_session"))["session"]
            await body(a, b, vol)
    trio.run(main)


def test_batched_creates_name_reserved_inodes_and_bring_their_write_leases(
        meta: NodeProcess, secret_file: Path) -> None:
    """A mount's queued mkdir and create name inode numbers reserved for its
    session; each is granted a WRITE cache lease on the new inode, under
    which later ops of the same batch (a create in the new directory, the
    new file's data commit: fence 0) are admitted.  Numbers not reserved
    for the session, or used already, are refused; the mount's time is the
    op's time."""
    async def main(a: MetaClient, b: MetaClient, vol: int) -> None:
        root = (await a.call("acquire", vol=vol, ino=1, mode="write", wait=1))["epoch"]
        got = await a.call("reserve_inodes", vol=vol, count=4)
        theirs = await b.call("reserve_inodes", vol=vol, count=4)
        assert got["count"] == 4 and theirs["first"] == got["first"] + 4
        d, f = got["first"], got["first"] + 1
        at = 1_700_000_000_123_456_789
        new = {"uid": 5, "gid": 6, "mode": 0o755}
        answers = await a.call("batch", vol=vol, ops=[
            {"method": "mkdir", "args": {"parent": 1, "name": b"d", "ino": d, **new},
             "fences": [[1, root]], "time_ns": at},
            {"method": "mknod", "args": {"parent": d, "name": b"f", "ino": f, "rdev": 0,
                                         **new, "mode": 0o100600},
             "fences": [[d, 0]], "time_ns": at + 1},
            {"method": "commit_blocks", "args": {
                "ino": f, "size": 3, "fence": 0, "mtime_ns": None,
                "blocks": [[0, None, 3, [], b"abc"]]}, "fences": [[f, 0]]},
            {"method": "mknod", "args": {"parent": d, "name": b"g", "rdev": 0, **new,
                                         "ino": theirs["first"]},     # B's number
             "fences": [[d, 0]]},
            {"method": "mkdir", "args": {"parent": 1, "name": b"e", "ino": d, **new},
             "fences": [[1, root]]}])                               # used already
        assert answers[0]["result"]["ino"] == d and answers[0]["lease"]["mode"] == "write"
        assert answers[0]["result"]["mtime_ns"] == at
        assert answers[1]["result"]["ino"] == f and answers[1]["result"]["ctime_ns"] == at + 1
        assert answers[2]["result"]["size"] == 3
        assert [x.get("errno") for x in answers[3:]] == [errno.EINVAL, errno.EINVAL]
        # the create's lease is this session's, as any WRITE lease is: it fences
        fl = answers[1]["lease"]["epoch"]
        again = await a.call("commit_blocks", vol=vol, ino=f, size=3, fence=fl, blocks=[])
        assert again["size"] == 3
        assert (await b.call("lookup", vol=vol, parent=1, name=b"d"))["ino"] == d
        assert sorted(e[1] for e in await b.call("readdir", vol=vol, ino=d, after=0,
                                                 limit=10)) == [b"f"]
        d_attrs = await b.call("getattr", vol=vol, ino=1)
        assert d_attrs["nlink"] == 3 and d_attrs["mtime_ns"] == at
        with pytest.raises(BadRequest):          # a number is given only in a batch
            await a.call("mkdir", vol=vol, parent=1, name=b"x", ino=got["first"] + 2,
                         **new)
        # an op's inodes are found before the batch: the name an earlier op
        # freed (f, unlinked) is covered by that op's lease, for a rename over it
        dl, fl = [(await a.call("acquire", vol=vol, ino=i, mode="write", wait=1))["epoch"]
                  for i in (d, f)]     # B looked at both: A's leases on them were recalled
        g = got["first"] + 2
        answers = await a.call("batch", vol=vol, ops=[
            {"method": "mknod", "args": {"parent": d, "name": b"g", "ino": g, "rdev": 0, **new},
             "fences": [[d, dl]]},
            {"method": "unlink", "args": {"parent": d, "name": b"f", "open_inos": []},
             "fences": [[d, dl], [f, fl]]},
            {"method": "rename", "args": {"parent": d, "name": b"g", "new_parent": d,
                                          "new_name": b"f"}, "fences": [[d, dl], [g, 0]]}])
        assert [x.get("errno") for x in answers] == [None, None, None]
        assert [(e[1], e[2]["ino"]) for e in await b.call("readdir", vol=vol, ino=d, after=0,
                                                          limit=10)] == [(b"f", g)]
        b.session = None
        with pytest.raises(MetaError) as info:   # no session: no numbers
            await b.call("reserve_inodes", vol=vol, count=4)
        assert info.value.errno == errno.ENOTCONN
    two_sessions(meta, secret_file, main)


def test_a_lookup_waits_until_another_mount_with_the_directory_leased_has_sent_its_changes(
        meta: NodeProcess, secret_file: Path) -> None:
    """While session A holds a WRITE cache lease on a directory (changes
    answered there may still be queued), session B's lookup in it recalls
    that lease and is answered only after A's batch and release."""
    async def main(a: MetaClient, b: MetaClient, vol: int) -> None:
        d = (await a.call("mkdir", vol=vol, parent=1, name=b"d", mode=0o755,
                          uid=0, gid=0))["ino"]
        f = (await a.call("mknod", vol=vol, parent=d, name=b"f", mode=0o100644,
                          rdev=0, uid=0, gid=0))["ino"]
        dl = (await a.call("acquire", vol=vol, ino=d, mode="write", wait=1))["epoch"]
        fl = (await a.call("acquire", vol=vol, ino=f, mode="write", wait=1))["epoch"]
        seen: list[Any] = []

        async def look() -> None:
            answer = await b.exchange("lookup", {"vol": vol, "parent": d, "name": b"f"},
                                      lease=True)
            seen.append(answer)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(look)
            recalls = await a.call("events", wait=5)
            assert [r["ino"] for r in recalls] == [d]
            await trio.sleep(0.3)
            assert not seen                      # waits for A's queued unlink
            await a.call("batch", vol=vol, ops=[{
                "method": "unlink", "args": {"parent": d, "name": b"f", "open_inos": []},
                "fences": [[d, dl], [f, fl]]}])
            await a.call("release", epochs=[dl])
        assert seen[0]["result"] is None         # the name is gone
    two_sessions(meta, secret_file, main)


def test_a_batch_sent_again_after_its_answer_was_lost_gets_its_first_answers(
        tmp_path: Path, secret_file: Path) -> None:
    """A mount whose batch's answer was lost (the metadata node killed
    between the commit and the answer) sends it again under the same names
    (``req``): the ops are not applied twice, nor refused under the leases
    the restart forgot; their first answers come back.  An op under a new
    name and a lost lease is refused; a malformed name is a bad request."""
    node = NodeProcess("meta", tmp_path / "meta", secret_file)
    secret = secret_file.read_text().strip()
    try:
        node.start()

        async def first(a: MetaClient) -> tuple[int, list[Any], list[Any]]:
            vol = (await a.call("create_volume", name="v", block_size=4096, replicas=1))["vol"]
            a.session = (await a.call("open_session"))["session"]
            root = (await a.call("acquire", vol=vol, ino=1, mode="write", wait=1))["epoch"]
            f = (await a.call("reserve_inodes", vol=vol, count=4))["first"]
            ops = [
                {"method": "mknod", "args": {"parent": 1, "name": b"f", "ino": f, "rdev": 0,
                                             "uid": 0, "gid": 0, "mode": 0o100644},
                 "fences": [[1, root]], "time_ns": 5, "req": "m1:1"},
                {"method": "commit_blocks", "args": {
                    "ino": f, "size": 3, "fence": 0, "mtime_ns": 7,
                    "blocks": [[0, None, 3, [], b"abc"]]}, "fences": [[f, 0]], "req": "m1:2"},
                {"method": "unlink", "args": {"parent": 1, "name": b"nothing",
                                              "open_inos": []},
                 "fences": [[1, root]], "req": "m1:3"}]
            answers = await a.call("batch", vol=vol, ops=ops)
            for bad in (7, "", "x" * 81):
                with pytest.raises(BadRequest):
                    await a.call("batch", vol=vol, ops=[dict(ops[2], req=bad)])
            return vol, ops, answers
        vol, ops, answers = with_client(node, secret_file, lambda a: first(a))
        assert [x.get("errno") for x in answers] == [None, None, errno.ENOENT]
        node.kill()
        node.start()

        async def again(a: MetaClient) -> None:
            a.session = (await a.call("open_session"))["session"]
            later = {"method": "commit_blocks", "args": {      # queued after the first send
                "ino": ops[0]["args"]["ino"], "size": 5, "fence": 0, "mtime_ns": 9,
                "blocks": [[0, None, 5, [], b"abcde"]]}, "fences": [[ops[0]["args"]["ino"], 0]],
                "req": "m1:5"}
            resent = await a.call("batch", vol=vol, ops=ops + [later])
            assert [x.get("result") for x in resent[:3]] == [x.get("result") for x in answers]
            assert [x.get("errno") for x in resent] == [None, None, errno.ENOENT, None]
            # the new file's lease is granted again: what was queued after it lands
            assert resent[0]["lease"]["mode"] == "write"
            assert resent[3]["result"]["size"] == 5
            renamed = await a.call("batch", vol=vol, ops=[dict(ops[2], req="m1:4")])
            assert renamed[0]["errno"] == errno.EIO   # a new op, under a lost lease
            entries = await a.call("readdir", vol=vol, ino=1, after=0, limit=10)
            assert [e[1] for e in entries] == [b"f"]
            attrs = await a.call("getattr", vol=vol, ino=answers[0]["result"]["ino"])
            assert (attrs["size"], attrs["mtime_ns"], attrs["nlink"]) == (5, 9, 1)
        async def run() -> None:
            async with MetaClient(node.address, secret) as a:
                await again(a)
        trio.run(run)
    finally:
        node.stop()


def test_ops_queued_under_a_lease_the_restart_forgot_are_taken_back_if_nothing_changed(
        tmp_path: Path, secret_file: Path) -> None:
    """Ops a mount queued under its WRITE lease on a directory, sent only
    after a restart of the node (which forgot the lease), are admitted if
    they say what the inode was made on (its ctime, in the fence) and it is
    still so: a create naming an inode number reserved before the restart,
    and the new file's data.  A fence whose ctime is not the inode's, or
    one nobody gave a ctime for, is refused, as is a directory another
    mount looked at since the restart."""
    node = NodeProcess("meta", tmp_path / "meta", secret_file)
    secret = secret_file.read_text().strip()
    new = {"uid": 0, "gid": 0, "mode": 0o100644, "rdev": 0}
    try:
        node.start()

        async def before(a: MetaClient) -> tuple[int, int, int, int, int]:
            vol = (await a.call("create_volume", name="v", block_size=4096, replicas=1))["vol"]
            await a.call("mkdir", vol=vol, parent=1, name=b"other", uid=0, gid=0, mode=0o755)
            a.session = (await a.call("open_session"))["session"]
            root = (await a.call("acquire", vol=vol, ino=1, mode="write", wait=1))["epoch"]
            other = (await a.call("lookup", vol=vol, parent=1, name=b"other"))["ino"]
            sub = (await a.call("acquire", vol=vol, ino=other, mode="write", wait=1))["epoch"]
            f = (await a.call("reserve_inodes", vol=vol, count=4))["first"]
            return vol, root, other, sub, f
        vol, root, other, sub, f = with_client(node, secret_file, before)
        node.kill()
        node.start()

        async def after(a: MetaClient, b: MetaClient) -> None:
            a.session = (await a.call("open_session"))["session"]
            b.session = (await b.call("open_session"))["session"]
            ctime = (await b.call("getattr", vol=vol, ino=1))["ctime_ns"]
            sub_ctime = (await b.call("getattr", vol=vol, ino=other))["ctime_ns"]
            await b.call("acquire", vol=vol, ino=other, mode="read", wait=1)   # B looks
            create = {"method": "mknod", "args": {"parent": 1, "name": b"f", "ino": f, **new},
                      "fences": [[1, root, ctime]], "time_ns": 5}
            commit = {"method": "commit_blocks", "args": {
                "ino": f, "size": 3, "fence": 0, "mtime_ns": 7,
                "blocks": [[0, None, 3, [], b"abc"]]}, "fences": [[f, 0]]}
            refused = await a.call("batch", vol=vol, ops=[
                dict(create, fences=[[1, root, ctime + 1]]),          # changed since
                dict(create, fences=[[1, root]]),                     # made on what?
                {"method": "mknod", "args": {"parent": other, "name": b"g", "ino": f + 1,
                                             **new},
                 "fences": [[other, sub, sub_ctime]]}])                 # B looked at it
            assert [x.get("errno") for x in refused] == [errno.EIO] * 3
            second = {"method": "mknod", "args": {"parent": 1, "name": b"f2", "ino": f + 2,
                                                  **new},
                      "fences": [[1, root, 5]], "time_ns": 6}    # made after the first
            answers = await a.call("batch", vol=vol, ops=[create, second, commit])
            assert [x.get("errno") for x in answers] == [None, None, None]
            assert answers[0]["lease"]["mode"] == answers[1]["lease"]["mode"] == "write"
            attrs = await b.call("getattr", vol=vol, ino=f)
            assert (attrs["size"], attrs["mtime_ns"], attrs["nlink"]) == (3, 7, 1)
            assert [e[1] for e in await b.call("readdir", vol=vol, ino=1, after=0,
                                               limit=10)] == [b"other", b"f", b"f2"]

        async def run() -> None:
            async with MetaClient(node.address, secret) as a, \
                    MetaClient(node.address, secret) as b:
                await after(a, b)
        trio.run(run)
    finally:
        node.stop()
