"""Erasure-coded blocks: the pure codec (storagenode/erasure.py), shard ids,
the metadata state's per-shard deletes, and the mount's shard placement and
fallback reads against fake data nodes (no network, no clock)."""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from fusefront.datapath import (BlockStore, ClusterView, DataUnavailable, NoSpace,
                                shard_fetch_plan)
from storagenode import blockformat, erasure, metaschema
from storagenode.dataclient import NodeFull, NodeUnavailable, ObjectCorrupted, ObjectNotFound, Parts
from storagenode.erasure import CorruptShard, NotEnoughShards
from storagenode.ids import (NodeId, ObjectId, is_block_id, is_object_id, new_object_id,
                             parse_object_id, shard_id, split_shard_id)
from storagenode.metastate import BadRequest, MetaState, fsck

MiB = 1 << 20
CODES = [(1, 1), (2, 1), (3, 2), (4, 2), (6, 3), (16, 8)]
SIZES = [0, 1, 5, 4097, 100_003]


def text(n: int) -> bytes:
    return b"".join(b"line %d of some compressible text\n" % i for i in range(n // 30 + 1))[:n]


def as_map(shards: list[bytes]) -> dict[int, bytes]:
    return dict(enumerate(shards))


# ---------------------------------------------------------------- the codec

@pytest.mark.parametrize("k,m", CODES)
@pytest.mark.parametrize("size", SIZES)
def test_round_trip(k: int, m: int, size: int) -> None:
    block = os.urandom(size)
    shards = erasure.encode_block(block, k, m)
    assert len(shards) == k + m
    assert erasure.decode_block(as_map(shards), k, m) == block
    last_k = {i: shards[i] for i in range(m, k + m)}       # m data shards lost
    assert erasure.decode_block(last_k, k, m) == block


def test_four_mib_random_and_compressible() -> None:
    for block in (os.urandom(4 * MiB), text(4 * MiB)):
        shards = erasure.encode_block(block, 4, 2)
        assert erasure.decode_block({i: shards[i] for i in (1, 3, 4, 5)}, 4, 2) == block
    framed = len(blockformat.encode(text(4 * MiB)))
    assert sum(map(len, erasure.encode_block(text(4 * MiB), 4, 2))) < 1.5 * framed + 6 * 100


def test_every_subset_of_four_decodes() -> None:
    block = os.urandom(300_001)
    shards = erasure.encode_block(block, 4, 2)
    for subset in itertools.combinations(range(6), 4):
        assert erasure.decode_block({i: shards[i] for i in subset}, 4, 2) == block


def test_shards_are_checksummed_objects_of_equal_size() -> None:
    shards = erasure.encode_block(os.urandom(MiB + 3), 4, 2)
    sizes = {len(s) for s in shards}
    assert len(sizes) == 1
    for i, s in enumerate(shards):
        header = blockformat.verify(s)
        assert header.codec == blockformat.CODEC_RAW
        assert erasure.verify_shard(s, 4, 2, i).index == i


def test_a_corrupt_shard_is_rejected_and_skipped() -> None:
    block = os.urandom(200_000)
    shards = erasure.encode_block(block, 4, 2)
    bad = bytearray(shards[1])
    bad[len(bad) // 2] ^= 0x01
    with pytest.raises(CorruptShard):
        erasure.verify_shard(bytes(bad), 4, 2, 1)
    assert erasure.decode_block({**as_map(shards), 1: bytes(bad)}, 4, 2) == block
    with pytest.raises(NotEnoughShards, match="checksum"):
        erasure.decode_block({0: shards[0], 1: bytes(bad), 2: shards[2], 3: shards[3]}, 4, 2)


def test_a_misplaced_shard_is_rejected() -> None:
    shards = erasure.encode_block(os.urandom(50_000), 4, 2)
    with pytest.raises(CorruptShard, match="holds shard 2"):
        erasure.verify_shard(shards[2], 4, 2, 3)
    with pytest.raises(CorruptShard, match="of a 4\\+2 code"):
        erasure.verify_shard(shards[2], 3, 3, 2)
    swapped = {0: shards[0], 1: shards[1], 2: shards[3], 3: shards[2]}
    with pytest.raises(NotEnoughShards):
        erasure.decode_block(swapped, 4, 2)


def test_a_shard_of_another_block_is_outvoted() -> None:
    block = os.urandom(80_000)
    shards = erasure.encode_block(block, 4, 2)
    other = erasure.encode_block(os.urandom(80_000), 4, 2)
    mixed = {**as_map(shards), 2: other[2]}      # right place, wrong block
    assert erasure.decode_block(mixed, 4, 2) == block
    with pytest.raises(NotEnoughShards):
        erasure.decode_block({0: shards[0], 1: shards[1], 2: other[2], 3: shards[3]}, 4, 2)


def test_plain_objects_are_not_shards() -> None:
    with pytest.raises(CorruptShard, match="not a shard"):
        erasure.verify_shard(blockformat.encode(text(10_000)), 4, 2, 0)
    with pytest.raises(CorruptShard):
        erasure.verify_shard(b"garbage", 4, 2, 0)


def test_rebuild_gives_identical_shards() -> None:
    shards = erasure.encode_block(text(3 * MiB), 4, 2)
    for lost in itertools.combinations(range(6), 2):
        have = {i: s for i, s in enumerate(shards) if i not in lost}
        assert erasure.rebuild_shards(have, 4, 2, lost) == {i: shards[i] for i in lost}
    with pytest.raises(ValueError):
        erasure.rebuild_shards(as_map(shards), 4, 2, [6])


def test_bad_codes_are_refused() -> None:
    for k, m in ((0, 2), (4, 0), (17, 1), (4, 9)):
        with pytest.raises(ValueError):
            erasure.encode_block(b"x", k, m)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=20_000), k=st.integers(1, 8), m=st.integers(1, 4),
       seed=st.integers(0, 2**32))
def test_any_k_shards_give_the_block_back(data: bytes, k: int, m: int, seed: int) -> None:
    shards = erasure.encode_block(data, k, m)
    keep = random.Random(seed).sample(range(k + m), k)
    have = {i: shards[i] for i in keep}
    assert erasure.decode_block(have, k, m) == data
    lost = [i for i in range(k + m) if i not in keep]
    assert erasure.rebuild_shards(have, k, m, lost) == {i: shards[i] for i in lost}


def test_speed_of_four_plus_two() -> None:
    """Encode and decode speed for 4 MiB blocks (printed; -s to see)."""
    block = os.urandom(4 * MiB)
    shards = erasure.encode_block(block, 4, 2)
    rounds = 5
    t0 = time.perf_counter()
    for _ in range(rounds):
        erasure.encode_block(block, 4, 2)
    t1 = time.perf_counter()
    for _ in range(rounds):
        erasure.decode_block({i: shards[i] for i in range(4)}, 4, 2)
    t2 = time.perf_counter()
    for _ in range(rounds):
        erasure.decode_block({i: shards[i] for i in range(2, 6)}, 4, 2)
    t3 = time.perf_counter()
    mib = 4 * rounds
    print(f"\n4+2, 4 MiB random blocks: encode {mib / (t1 - t0):.0f} MiB/s, decode from "
          f"data shards {mib / (t2 - t1):.0f} MiB/s, with 2 data shards lost "
          f"{mib / (t3 - t2):.0f} MiB/s")


# ---------------------------------------------------------------- shard ids

def test_shard_ids() -> None:
    oid = new_object_id()
    assert shard_id(oid, 0) == f"{oid}.0" and shard_id(oid, 5) == f"{oid}.5"
    assert is_object_id(shard_id(oid, 23)) and not is_block_id(shard_id(oid, 23))
    assert split_shard_id(shard_id(oid, 12)) == (oid, 12)
    assert split_shard_id(oid) == (oid, None)
    for bad in (f"{oid}.", f"{oid}.123", f"{oid}.a", f"{oid}.1.2", f"{oid}/../x",
                f"{oid}.-1", f"{oid}.1\n"):
        assert not is_object_id(bad), bad
        with pytest.raises(ValueError):
            parse_object_id(bad)
    with pytest.raises(ValueError):
        shard_id(shard_id(oid, 1), 2)
    with pytest.raises(ValueError):
        shard_id(oid, 100)


# ---------------------------------------------------------------- metadata state

T0 = 1_700_000_000_000_000_000


class EcState:
    """A MetaState with one 4+2 volume and one file."""

    def __init__(self) -> None:
        self.conn = metaschema.open_db(":memory:")
        self.st = MetaState(self.conn)
        self.now = T0
        self.vol = self.op("create_volume", name="ec", block_size=4096, replicas=1,
                           ec_k=4, ec_m=2)["vol"]
        self.ino = self.op("mknod", vol=self.vol, parent=1, name=b"f", mode=0o100644,
                           uid=0, gid=0)["ino"]

    def op(self, method: str, **args: Any) -> Any:
        self.now += 1000
        outcome = self.st.append({"method": method, "args": args, "time_ns": self.now})
        if outcome.error is not None:
            raise outcome.error
        return outcome.result

    def commit(self, size: int, blocks: list[Any]) -> Any:
        return self.op("commit_blocks", vol=self.vol, ino=self.ino, size=size, blocks=blocks)

    def pending(self) -> list[Any]:
        return sorted(self.st.query("pending_deletes", {"limit": 100}))


NODES6 = ["a", "b", "c", "d", "e", "f"]


def test_dropping_an_ec_block_queues_each_shard_on_its_node() -> None:
    s = EcState()
    oids = [new_object_id(T0) for _ in range(3)]
    s.commit(3 * 4096, [[i, oids[i], 4096, NODES6] for i in range(3)])
    s.commit(3 * 4096, [[0, new_object_id(T0), 4096, NODES6]])         # overwrite block 0
    assert s.pending() == [[shard_id(oids[0], i), [n]] for i, n in enumerate(NODES6)]
    s.op("forget_deleted", oids=[p[0] for p in s.pending()])
    s.op("drop_copies", node_id="c", oids=[oids[1]])                    # shard 2 lost
    s.op("setattr", vol=s.vol, ino=s.ino, size=4096)                   # truncate
    assert s.pending() == sorted([[shard_id(oids[1], i), [n]] for i, n in enumerate(NODES6)
                                  if n != "c"] + [[shard_id(oids[2], i), [n]]
                                                  for i, n in enumerate(NODES6)])
    s.op("unlink", vol=s.vol, parent=1, name=b"f")
    assert len(s.pending()) == 5 + 6 + 6
    assert fsck(s.conn) == []


def test_recommitting_an_ec_block_unqueues_its_shards() -> None:
    s = EcState()
    oid = new_object_id(T0)
    s.commit(4096, [[0, oid, 4096, NODES6]])
    s.commit(4096, [[0, None, 0, []]])
    assert len(s.pending()) == 6
    s.commit(4096, [[0, oid, 4096, NODES6]])
    assert s.pending() == []
    assert fsck(s.conn) == []


def test_block_maps_take_block_ids_and_forget_takes_shard_ids() -> None:
    s = EcState()
    oid = new_object_id(T0)
    with pytest.raises(BadRequest):
        s.commit(4096, [[0, shard_id(oid, 1), 4096, NODES6]])
    s.op("forget_deleted", oids=[shard_id(oid, 1), oid])


def test_fsck_sees_a_queued_shard_of_a_live_block() -> None:
    s = EcState()
    oid = new_object_id(T0)
    s.commit(4096, [[0, oid, 4096, NODES6]])
    s.conn.execute("INSERT INTO pending_deletes VALUES (?, ?, 0)",
                   (shard_id(oid, 3), json.dumps(["d"])))
    assert any("pending delete but still referenced" in p for p in fsck(s.conn))


# ---------------------------------------------------------------- the mount's data path

def test_fetch_plan_data_shards_first_then_parity_then_search() -> None:
    holders = ["a", "b", "", "d", "e", "f"]
    up = {NodeId(n) for n in "abcdefg"} - {NodeId("b")}
    ranked = [NodeId(n) for n in "gfedcba"]
    plan = shard_fetch_plan(holders, ranked, up, 4, 2)
    assert plan[:5] == [(0, "a"), (3, "d"), (4, "e"), (5, "f"), (1, "b")]
    assert plan[5:12] == [(0, n) for n in "gfedcb"] + [(1, "g")]
    assert (2, "c") in plan and len(plan) == 5 + 6 * 7 - 5


class FakeMeta:
    def __init__(self, nodes: list[dict[str, Any]]) -> None:
        self.nodes = nodes

    async def call(self, method: str, **args: Any) -> Any:
        assert method == "cluster_map"
        return {"epoch": 1, "nodes": self.nodes}


class FakeData:
    """Data nodes in memory: address -> {oid: object}; some addresses fail."""

    def __init__(self) -> None:
        self.stores: dict[str, dict[str, bytes]] = {}
        self.dead: set[str] = set()
        self.full: set[str] = set()
        self.gets: list[tuple[str, str]] = []

    def _check(self, address: str) -> dict[str, bytes]:
        if address in self.dead:
            raise NodeUnavailable(address, "connection refused")
        return self.stores.setdefault(address, {})

    async def put(self, address: str, oid: ObjectId, obj: Parts) -> None:
        store = self._check(address)
        if address in self.full:
            raise NodeFull(address, "full")
        store[oid] = obj if isinstance(obj, bytes) else b"".join(obj)   # as sent

    async def get(self, address: str, oid: ObjectId,
                  byte_range: tuple[int, int] | None = None, *, verify: bool = True) -> bytes:
        self.gets.append((address, oid))
        store = self._check(address)
        if oid not in store:
            raise ObjectNotFound(address, "no such object")
        return store[oid]

    async def get_buffer(self, address: str, oid: ObjectId, *,
                         node_verifies: bool = True) -> bytes:
        """As a node answers: checked first unless the reader checks it (a
        bad copy checked is put aside and refused)."""
        obj = await self.get(address, oid, verify=False)
        if node_verifies:
            try:
                blockformat.verify(obj)
            except blockformat.CorruptedObject:
                del self.stores[address][oid]
                raise ObjectCorrupted(address, "stored object is corrupt", 422) from None
        return obj

    async def get_pieces(self, address: str, oid: ObjectId, first: int, last: int) -> bytes:
        """As a node answers: header, table and those pieces, unchecked."""
        obj = await self.get(address, oid, verify=False)
        header = blockformat.parse_header(obj)
        table = blockformat.read_table(header, obj)
        start, end = blockformat.piece_span(header, table, first, min(last, len(table) - 1))
        return obj[:header.payload_offset] + obj[start:end]

    async def delete(self, address: str, oid: ObjectId) -> bool:
        return self._check(address).pop(oid, None) is not None


def node(name: str, state: str = "up", admin: str = "active") -> dict[str, Any]:
    return {"node_id": name, "address": name, "domain": "", "weight": 1.0,
            "state": state, "admin": admin}


def ec_store(nodes: list[dict[str, Any]]) -> tuple[BlockStore, FakeData]:
    data = FakeData()
    store = BlockStore(ClusterView(FakeMeta(nodes)), data, 1,  # type: ignore[arg-type]
                       trio.CapacityLimiter(2), ec=(4, 2))
    return store, data


def run(fn: Any, *args: Any) -> Any:
    return trio.run(fn, *args)


def test_upload_puts_each_shard_on_a_distinct_node_and_reads_survive_two_losses() -> None:
    store, data = ec_store([node(n) for n in "abcdefg"])
    block = os.urandom(100_000)
    oid, holders = run(store.upload, block)
    assert len(set(holders)) == 6
    for i, h in enumerate(holders):
        assert shard_id(oid, i) in data.stores[h]
    data.gets.clear()
    assert run(store.download, oid, holders) == block
    assert sorted(o for _, o in data.gets) == [shard_id(oid, i) for i in range(4)]
    data.dead |= {holders[0], holders[2]}
    assert run(store.download, oid, holders) == block
    data.dead.add(holders[4])
    with pytest.raises(DataUnavailable):
        run(store.download, oid, holders)


def test_a_corrupt_data_shard_falls_back_to_parity() -> None:
    store, data = ec_store([node(n) for n in "abcdef"])
    block = text(300_000)
    oid, holders = run(store.upload, block)
    data.stores[holders[1]][shard_id(oid, 1)] = data.stores[holders[2]][shard_id(oid, 2)]
    assert run(store.download, oid, holders) == block


def test_a_moved_shard_is_found_by_search() -> None:
    store, data = ec_store([node(n) for n in "abcdefg"])
    block = os.urandom(10_000)
    oid, holders = run(store.upload, block)
    spare = next(n for n in "abcdefg" if n not in holders)
    for i in (0, 1, 2):                        # repair moved three shards; the map is stale
        moved = data.stores[holders[i]].pop(shard_id(oid, i))
        data.stores.setdefault(spare if i == 0 else holders[5 - i], {})[shard_id(oid, i)] = moved
    assert run(store.download, oid, holders) == block


def test_a_failing_node_is_replaced_and_draining_nodes_get_nothing() -> None:
    store, data = ec_store([node(n) for n in "abcdefg"] + [node("h", admin="draining")])
    data.dead.add("c")
    oid, holders = run(store.upload, os.urandom(5000))
    assert sorted(holders) == ["a", "b", "d", "e", "f", "g"]
    assert "h" not in data.stores


def test_too_few_writable_nodes_fail_cleanly() -> None:
    store, data = ec_store([node(n) for n in "abcd"] + [node("e", state="down"),
                                                         node("f", admin="draining")])
    with pytest.raises(DataUnavailable):
        run(store.upload, b"x" * 1000)
    assert not any(data.stores.values())
    store, data = ec_store([node(n) for n in "abcdef"])
    data.full |= set("abcdef")
    with pytest.raises(NoSpace):
        run(store.upload, b"x" * 1000)


def test_a_failed_upload_leaves_no_shards_behind() -> None:
    store, data = ec_store([node(n) for n in "abcdef"])
    data.dead.add("d")                  # still "up" in the map: found out by the PUT
    with pytest.raises(DataUnavailable, match="5 of 6 shards"):
        run(store.upload, os.urandom(1000))
    assert not any(data.stores.values())


def test_discard_removes_every_shard() -> None:
    store, data = ec_store([node(n) for n in "abcdef"])
    oid, holders = run(store.upload, os.urandom(1000))
    run(store.discard, oid, holders)
    assert not any(data.stores.values())
