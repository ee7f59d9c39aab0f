"""The data really lives as chunked, compressed, checksummed, replicated
objects on the data nodes: inspected in the nodes' own stores."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import trio
import trio.testing

from storagenode import blockformat
from storagenode.dataclient import Parts
from storagenode.ids import ObjectId

from .cluster import Cluster

MiB = 1 << 20


def stored_objects(cluster: Cluster) -> dict[str, list[Path]]:
    """object id -> the files holding it, over every data node's store."""
    out: dict[str, list[Path]] = {}
    for node in cluster.data:
        for path in (node.state / "objects").rglob("*"):
            if path.is_file():
                out.setdefault(path.name, []).append(path)
    return out


def store_bytes(cluster: Cluster) -> int:
    return sum(p.stat().st_size for paths in stored_objects(cluster).values() for p in paths)


def du_kib(cluster: Cluster) -> int:
    out = subprocess.run(["du", "-sk"] + [str(n.state / "objects") for n in cluster.data],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(line.split()[0]) for line in out.splitlines())


def test_gib_of_zeros_costs_almost_nothing(cluster: Cluster, mnt: Path) -> None:
    before = du_kib(cluster)
    with open(mnt / "zeros", "wb") as f:
        chunk = bytes(MiB)
        for _ in range(1024):
            f.write(chunk)
    assert (mnt / "zeros").stat().st_size == 1 << 30
    assert du_kib(cluster) - before < 512
    with open(mnt / "zeros", "rb") as f:
        f.seek(700 * MiB)
        assert f.read(MiB) == bytes(MiB)


def test_random_file_raw_blocks_on_three_distinct_nodes(cluster: Cluster, mnt: Path) -> None:
    data = os.urandom(64 * MiB)
    (mnt / "random").write_bytes(data)
    objects = stored_objects(cluster)
    assert len(objects) == 16                       # 64 MiB in 4 MiB blocks
    for oid, paths in objects.items():
        assert len({p.parts[-5] for p in paths}) == 3 == len(paths)   # 3 distinct nodes
        for p in paths:
            header = blockformat.verify(p.read_bytes())
            assert header.codec == blockformat.CODEC_RAW
            assert header.raw_length == 4 * MiB
    assert (mnt / "random").read_bytes() == data


def bytes_sent(cluster: Cluster) -> float:
    """Bytes the data nodes have sent so far (their metrics)."""
    total = 0.0
    for node in cluster.data:
        text = httpx.get(f"http://{node.address}/metrics", timeout=10).text
        total += sum(float(line.split()[1]) for line in text.splitlines()
                     if line.startswith("objfs_data_bytes_out_total "))
    return total


def test_random_reads_fetch_the_pieces_they_touch_not_blocks(cluster: Cluster, mnt: Path,
                                                             tmp_path: Path) -> None:
    """4 KiB read at random places of a big file cost about a 64 KiB piece
    each from the data nodes, not their 4 MiB block; every byte is right."""
    data = os.urandom(32 * MiB)
    (mnt / "big").write_bytes(data)
    fresh = tmp_path / "fresh"           # nothing of the file cached there
    cluster.mount(fresh)
    rng = random.Random(7)
    before = bytes_sent(cluster)
    fd = os.open(fresh / "big", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for _ in range(40):
            at = rng.randrange(len(data) // 4096) * 4096
            assert os.pread(fd, 4096, at) == data[at:at + 4096]
    finally:
        os.close(fd)
    assert bytes_sent(cluster) - before < 40 * 80 * 1024
    assert (fresh / "big").read_bytes() == data


def resident_pages(fd: int, size: int) -> list[bool]:
    """Which pages of the open file the kernel's page cache holds (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        vec = ctypes.create_string_buffer(-(-size // 4096))
        assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        return [bool(b & 1) for b in vec.raw]
    finally:
        libc.munmap(addr, size)


def test_a_random_read_fills_the_kernel_cache_with_its_piece_and_changes_win(
        cluster: Cluster, mnt: Path, tmp_path: Path) -> None:
    """A random 4 KiB read that fetches its 64 KiB piece hands all of it to
    the kernel's page cache (the next reads there cost no request); a write
    or a truncate here afterwards is what later reads see, and the file
    does not grow back."""
    data = bytearray(os.urandom(8 * MiB))
    (mnt / "f").write_bytes(data)
    fresh = tmp_path / "fresh"
    cluster.mount(fresh)
    path = fresh / "f"
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        at = 3 * MiB + 5 * 4096
        assert os.pread(fd, 4096, at) == data[at:at + 4096]
        piece = range(3 * MiB // 4096, (3 * MiB + 65536) // 4096)
        deadline = time.monotonic() + 5
        while not all(resident_pages(fd, len(data))[i] for i in piece):
            assert time.monotonic() < deadline, "the piece never reached the page cache"
            time.sleep(0.05)
        assert sum(resident_pages(fd, len(data))) == len(piece)
        assert os.pread(fd, 65536, 3 * MiB) == data[3 * MiB:3 * MiB + 65536]

        with open(path, "r+b") as w:                # a writer here, then more reads
            w.seek(at + 100)
            w.write(b"new bytes")
        data[at + 100:at + 109] = b"new bytes"
        for off in range(0, len(data), 64 * 1024 + 4096):
            assert os.pread(fd, 4096, off) == data[off:off + 4096]
        os.truncate(path, 2 * MiB + 10)
        time.sleep(0.3)
        assert os.fstat(fd).st_size == 2 * MiB + 10 == path.stat().st_size
        assert os.pread(fd, 8192, 2 * MiB) == data[2 * MiB:2 * MiB + 10]
    finally:
        os.close(fd)
    assert (mnt / "f").read_bytes() == data[:2 * MiB + 10]


def test_text_is_compressed_and_checksummed(cluster: Cluster, mnt: Path) -> None:
    text = b"".join(b"line %d of a very compressible text file\n" % i for i in range(200000))
    (mnt / "text").write_bytes(text)
    objects = stored_objects(cluster)
    assert objects
    total = 0
    for paths in objects.values():
        header = blockformat.verify(paths[0].read_bytes())
        assert header.codec == blockformat.CODEC_ZSTD
        total += header.stored_length
    assert total < len(text) / 4
    first_holders = cluster.block_holders()           # flip a byte in the copy read first
    victims = [cluster.root / nodes[0] / "objects" / oid[:2] / oid[2:4] / oid
               for oid, nodes in first_holders.items()]
    good = {v: v.read_bytes() for v in victims}
    for v in victims:
        v.write_bytes(good[v][:-10] + bytes([good[v][-10] ^ 0xFF]) + good[v][-9:])
    cluster.umount(mnt)
    cluster.mount(mnt)
    assert (mnt / "text").read_bytes() == text        # served from the good copies
    quarantined = {p.name.split(".")[0] for n in cluster.data
                   for p in (n.state / "quarantine").glob("*")}
    assert quarantined == set(first_holders)          # each node noticed, never served it
    for v in victims:                                 # undo the damage (repair is issue 4)
        v.write_bytes(good[v])


def wait_for(predicate, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_unreferenced_blocks_are_deleted(cluster: Cluster, mnt: Path) -> None:
    (mnt / "a").write_bytes(os.urandom(12 * MiB))      # 3 blocks
    (mnt / "b").write_bytes(os.urandom(8 * MiB))       # 2 blocks
    assert wait_for(lambda: len(stored_objects(cluster)) == 5)   # just after the closes
    with open(mnt / "a", "r+b") as f:                  # overwrite one block
        f.write(os.urandom(4 * MiB))
    assert wait_for(lambda: len(stored_objects(cluster)) == 5)
    os.truncate(mnt / "a", 4 * MiB)                    # drop two blocks
    assert wait_for(lambda: len(stored_objects(cluster)) == 3)
    (mnt / "b").unlink()
    assert wait_for(lambda: len(stored_objects(cluster)) == 1)


def fake_store(data: Any) -> Any:
    """A replicated BlockStore over four data nodes held in ``data`` (FakeData)."""
    from .test_erasure import FakeMeta, node
    from fusefront.datapath import BlockStore, ClusterView
    return BlockStore(ClusterView(FakeMeta([node(n) for n in "abcd"])),  # type: ignore[arg-type]
                      data, 3, trio.CapacityLimiter(2))


def test_a_hung_holder_costs_a_moment_not_a_timeout() -> None:
    """Reads ask the next node when the first stays silent (hedging): with
    the first holder hung forever, the block arrives after HEDGE_AFTER."""
    from storagenode.ids import NodeId
    from .test_erasure import FakeData
    from fusefront.datapath import HEDGE_AFTER

    class HungData(FakeData):
        hung: set[str] = set()

        async def get(self, address: str, oid: ObjectId,
                      byte_range: tuple[int, int] | None = None, *,
                      verify: bool = True) -> bytes:
            if address in self.hung:
                await trio.sleep_forever()
            return await super().get(address, oid, byte_range, verify=verify)

    async def main() -> None:
        data = HungData()
        store = fake_store(data)
        block = os.urandom(50_000)
        oid, holders = await store.upload(block)
        data.hung = {holders[0]}
        started = trio.current_time()
        assert await store.download(oid, [NodeId(h) for h in holders]) == block
        assert HEDGE_AFTER <= trio.current_time() - started < HEDGE_AFTER + 1
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.01))


def test_a_damaged_copy_is_refused_put_aside_and_the_next_one_read() -> None:
    """The mount checks each copy it receives (while decoding it; the node
    sends it unchecked): a flipped byte makes it ask that node again, the
    checked way, which puts a copy bad on its disk aside, then read the
    next holder."""
    from storagenode.ids import NodeId
    from .test_erasure import FakeData

    async def main() -> None:
        data = FakeData()
        store = fake_store(data)
        block = os.urandom(50_000)
        oid, holders = await store.upload(block)
        for h in holders[:2]:
            damaged = bytearray(data.stores[h][oid])
            damaged[len(damaged) // 2] ^= 1
            data.stores[h][oid] = bytes(damaged)
        assert await store.download(oid, [NodeId(h) for h in holders]) == block
        assert [a for a, _ in data.gets] == [holders[0]] * 2 + [holders[1]] * 2 + [holders[2]]
        assert [oid in data.stores[h] for h in holders] == [False, False, True]
    trio.run(main)


def test_pieces_are_read_alone_and_a_damaged_one_is_put_aside() -> None:
    """A reader of a few KiB asks for the pieces they lie in, not the block;
    a damaged piece makes it ask that node for the whole copy the checked
    way (which puts it aside), then the next holder."""
    from storagenode.ids import NodeId
    from .test_erasure import FakeData

    async def main() -> None:
        data = FakeData()
        store = fake_store(data)
        block = os.urandom(10 * blockformat.PIECE_SIZE)
        oid, holders = await store.upload(block)
        nodes = [NodeId(h) for h in holders]
        start, got = await store.download_pieces(oid, nodes, 3, 4)
        assert (start, bytes(got)) == (3 * blockformat.PIECE_SIZE,
                                       block[start:5 * blockformat.PIECE_SIZE])
        stored = data.stores[holders[0]][oid]
        damaged = bytearray(stored)
        damaged[len(stored) - 4 * blockformat.PIECE_SIZE] ^= 1      # in piece 6
        data.stores[holders[0]][oid] = bytes(damaged)
        data.gets.clear()
        start, got = await store.download_pieces(oid, nodes, 6, 6)
        assert (start, bytes(got)) == (6 * blockformat.PIECE_SIZE,
                                       block[start:start + blockformat.PIECE_SIZE])
        assert [a for a, _ in data.gets] == [holders[0]] * 2 + [holders[1]]
        assert oid not in data.stores[holders[0]]
    trio.run(main)


def test_a_node_that_failed_a_read_is_asked_last_for_a_while() -> None:
    """Until the cluster map says a node is down, every read named it
    first: a dead node cost each read a refused connection (3,000 of them
    in 9 s of random reads).  Once it fails a read it is asked last."""
    from storagenode.ids import NodeId
    from .test_erasure import FakeData

    async def main() -> None:
        data = FakeData()
        store = fake_store(data)
        blocks = [os.urandom(1000 + i) for i in range(5)]
        placed = [await store.upload(b) for b in blocks]
        dead = placed[0][1][0]
        data.dead.add(dead)
        data.gets.clear()
        for block, (oid, holders) in zip(blocks, placed):
            first = [dead] + [h for h in holders if h != dead]     # the map names it first
            assert await store.download(oid, [NodeId(h) for h in first]) == block
        assert [a for a, _ in data.gets].count(dead) == 1
    trio.run(main)


def test_placing_replaces_failures_hedges_silence_and_keeps_holders_distinct() -> None:
    from storagenode.ids import NodeId
    from fusefront.datapath import DataNode, Placing
    a, b, c, d, e = (DataNode(NodeId(n), n, True, 1.0, "") for n in "abcde")
    placing = Placing(3, [a, b, c, d, e])
    assert placing.first == [(0, a), (1, b), (2, c)]
    placing.stored(0, a)
    assert placing.hedge() == [(1, d), (2, e)]      # both still silent: a spare each
    assert placing.hedge() == []                    # at most two requests per position
    placing.stored(2, e)
    placing.stored(2, c)                            # the slow one answered too
    assert placing.extra == [(2, NodeId("c"))]
    assert placing.failed(1, full=True) == []       # d is still out for position 1
    assert not placing.settled
    assert placing.failed(1, full=False) == []      # no spare left: the block failed
    assert placing.settled and placing.holders == ["a", None, "e"] and placing.full == 1

    placing = Placing(2, [a, b, c])
    assert placing.failed(0, full=False) == [(0, c)]    # a failure asks the next at once
    placing.stored(1, b)
    placing.stored(0, c)
    assert placing.settled and placing.holders == ["c", "b"] and not placing.extra


def test_a_hung_node_costs_a_write_a_moment_not_a_timeout() -> None:
    """Stores also go to a spare node when one stays silent (hedging): with
    a node hung forever, a block whose first nodes include it is stored after
    PUT_HEDGE_AFTER, on three other nodes; taking a block back never waits
    on the hung node longer than DISCARD_WITHIN."""
    from .test_erasure import FakeData, FakeMeta, node
    from fusefront.datapath import DISCARD_WITHIN, PUT_HEDGE_AFTER, BlockStore, ClusterView

    class HungData(FakeData):
        hung = "a"
        asked: list[str] = []

        async def put(self, address: str, oid: ObjectId, obj: Parts) -> None:
            self.asked.append(address)
            if address == self.hung:
                await trio.sleep_forever()
            await super().put(address, oid, obj)

        async def delete(self, address: str, oid: ObjectId) -> bool:
            if address == self.hung:
                await trio.sleep_forever()
            return await super().delete(address, oid)

    async def main() -> None:
        data = HungData()
        view = ClusterView(FakeMeta([node(n) for n in "abcd"]))  # type: ignore[arg-type]
        store = BlockStore(view, data, 3, trio.CapacityLimiter(2))  # type: ignore[arg-type]
        block = os.urandom(50_000)
        while "a" not in data.asked:         # until a block's first three nodes include a
            data.asked.clear()
            started = trio.current_time()
            oid, holders = await store.upload(block)
        assert PUT_HEDGE_AFTER <= trio.current_time() - started < PUT_HEDGE_AFTER + 1
        assert sorted(holders) == ["b", "c", "d"]
        assert all(oid in data.stores[h] for h in holders)
        started = trio.current_time()
        await store.discard(oid, ["a", *holders])
        assert trio.current_time() - started <= DISCARD_WITHIN
        assert not any(oid in data.stores.get(h, {}) for h in holders)
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.01))
