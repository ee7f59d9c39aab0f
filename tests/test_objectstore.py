"""The local-disk object store, called directly (no HTTP, no threads)."""

from __future__ import annotations

import mmap
import os
import shutil
from pathlib import Path

import pytest

from storagenode import blockformat
from storagenode.ids import ObjectId, new_object_id, shard_id
from storagenode.objectstore import (BadFraming, CorruptedObject, NodeIdMismatch,
                                     NoSuchObject, ObjectExists, ObjectStore,
                                     QuarantinedObject, StoreFull, load_node_id)


def obj_of(data: bytes) -> bytes:
    return blockformat.encode(data)


def stored_path(root: Path, oid: str) -> Path:
    return root / "objects" / oid[:2] / oid[2:4] / oid


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return ObjectStore(tmp_path / "state")


def test_put_get_head_delete(store: ObjectStore) -> None:
    oid, obj = new_object_id(), obj_of(b"some block data" * 50)
    assert store.put(oid, obj) is True
    assert stored_path(store.root, oid).read_bytes() == obj
    assert bytes(store.get(oid)) == obj
    size, checksum = store.head(oid)
    assert size == len(obj)
    assert checksum == blockformat.verify(obj).checksum
    assert store.delete(oid) is True
    assert store.delete(oid) is False
    with pytest.raises(NoSuchObject):
        store.get(oid)
    with pytest.raises(NoSuchObject):
        store.head(oid)


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_a_page_aligned_buffer_is_stored_whole(tmp_path: Path, where: str) -> None:
    """A PUT body as a data node receives it (an mmap, written with O_DIRECT
    where the filesystem allows, its unaligned tail through the page cache)
    is stored byte for byte, on a disk and on tmpfs alike."""
    root = tmp_path if where == "disk" else Path("/dev/shm")
    if not root.is_dir():
        pytest.skip("no /dev/shm")
    state = root / f"objfs-test-{os.getpid()}"
    try:
        store = ObjectStore(state)
        for size in (5_000, 1 << 20, (4 << 20) + 12_345):
            obj = obj_of(os.urandom(size))
            body = mmap.mmap(-1, len(obj))
            body[:] = obj
            oid = new_object_id()
            assert store.put(oid, body) is True
            assert stored_path(store.root, oid).read_bytes() == obj
            assert bytes(store.get(oid)) == obj
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_put_leaves_nothing_in_tmp(store: ObjectStore) -> None:
    store.put(new_object_id(), obj_of(b"x"))
    assert list((store.root / "tmp").iterdir()) == []


def test_identical_reput_is_ok_and_different_reput_conflicts(store: ObjectStore) -> None:
    oid, obj = new_object_id(), obj_of(b"first")
    assert store.put(oid, obj) is True
    assert store.put(oid, obj) is False
    with pytest.raises(ObjectExists):
        store.put(oid, obj_of(b"second"))
    assert bytes(store.get(oid)) == obj
    assert store.stats().objects == 1


def test_bad_framing_and_bad_checksum_are_refused(store: ObjectStore) -> None:
    with pytest.raises(BadFraming):
        store.put(new_object_id(), b"not an object at all, not even a header")
    damaged = bytearray(obj_of(b"payload bytes" * 10))
    damaged[-1] ^= 0xFF
    with pytest.raises(CorruptedObject) as info:
        store.put(new_object_id(), bytes(damaged))
    assert not isinstance(info.value, BadFraming)
    assert store.stats().objects == 0


@pytest.mark.parametrize("oid", ["../../etc/passwd", "ABC", "A" * 32, "0" * 33,
                                 "0" * 31, "00/0" + "0" * 28, ""])
def test_malformed_ids_are_rejected(store: ObjectStore, oid: str) -> None:
    obj = obj_of(b"x")
    for call in (lambda: store.put(ObjectId(oid), obj), lambda: store.get(ObjectId(oid)),
                 lambda: store.head(ObjectId(oid)), lambda: store.delete(ObjectId(oid))):
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("size,at", [(1000, -10), (1 << 20, 300_000), (1 << 20, -1)],
                         ids=["small", "large-page", "large-tail"])
def test_corrupt_object_on_disk_is_quarantined(store: ObjectStore, size: int, at: int) -> None:
    """Also a large object, read with O_DIRECT, flipped in a whole page or
    in its unaligned tail."""
    oid, obj = new_object_id(), obj_of(os.urandom(size))
    store.put(oid, obj)
    flip_byte(stored_path(store.root, oid), at % len(obj))
    with pytest.raises(QuarantinedObject):
        store.get(oid)
    assert not stored_path(store.root, oid).exists()
    assert [p.name.split(".")[0] for p in (store.root / "quarantine").iterdir()] == [oid]
    assert store.corrupt_found == 1
    assert store.stats().objects == 0
    with pytest.raises(NoSuchObject):
        store.get(oid)


def test_truncated_object_is_quarantined(store: ObjectStore) -> None:
    oid, obj = new_object_id(), obj_of(os.urandom(1000))
    store.put(oid, obj)
    stored_path(store.root, oid).write_bytes(obj[:500])
    with pytest.raises(QuarantinedObject):
        store.get(oid)
    assert store.corrupt_found == 1


def test_reput_repairs_a_corrupt_copy(store: ObjectStore) -> None:
    oid, obj = new_object_id(), obj_of(os.urandom(1000))
    store.put(oid, obj)
    flip_byte(stored_path(store.root, oid), 100)
    assert store.put(oid, obj) is True
    assert bytes(store.get(oid)) == obj
    assert store.corrupt_found == 1
    assert store.stats().objects == 1


def test_list_pages_in_oid_order(store: ObjectStore) -> None:
    objects = {new_object_id(): obj_of(os.urandom(n)) for n in range(1, 26)}
    for oid, obj in objects.items():
        store.put(oid, obj)
    seen: list[tuple[str, int]] = []
    after, more = "", True
    while more:
        page, more = store.list(after, 7)
        assert len(page) <= 7
        seen.extend(page)
        after = page[-1][0] if page else after
    assert seen == sorted((oid, len(obj)) for oid, obj in objects.items())


def test_list_after_skips_whole_fanout_folders(store: ObjectStore) -> None:
    oids = [ObjectId(prefix * 16) for prefix in ("00", "0f", "a0", "ab", "ff")]
    for oid in oids:
        store.put(oid, obj_of(oid.encode()))
    assert [o for o, _ in store.list("a", 10)[0]] == oids[2:]
    assert [o for o, _ in store.list(oids[2], 10)[0]] == oids[3:]
    assert store.list(oids[-1], 10) == ([], False)
    assert store.list("", 5)[1] is False
    assert store.list("", 4)[1] is True


def test_stats_are_kept_and_rebuilt_at_open(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    sizes = []
    for n in (10, 2000, 30000):
        obj = obj_of(os.urandom(n))
        store.put(new_object_id(), obj)
        sizes.append(len(obj))
    stats = store.stats()
    assert (stats.objects, stats.used) == (3, sum(sizes))
    assert stats.capacity >= stats.free > 0
    (tmp_path / "tmp" / "leftover-upload").write_bytes(b"partial")
    reopened = ObjectStore(tmp_path)
    assert (reopened.stats().objects, reopened.stats().used) == (3, sum(sizes))
    assert list((tmp_path / "tmp").iterdir()) == []


def test_below_reserve_refuses_new_objects(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path, reserve_bytes=2 ** 62)
    with pytest.raises(StoreFull):
        store.put(new_object_id(), obj_of(b"x"))
    assert store.stats().objects == 0


def test_node_id_is_created_once_and_checked(tmp_path: Path) -> None:
    first = load_node_id(tmp_path, None)
    assert load_node_id(tmp_path, None) == first
    assert load_node_id(tmp_path, first) == first
    with pytest.raises(NodeIdMismatch):
        load_node_id(tmp_path, "another-node")
    assert load_node_id(tmp_path / "b", "data-1") == "data-1"
    with pytest.raises(ValueError):
        load_node_id(tmp_path / "c", "../bad id")


def test_shard_ids_are_stored_listed_and_quarantined(tmp_path: Path) -> None:
    """Erasure-coded shards live under ``<oid>.<i>``: same fan-out folder as
    their block id, listed in id order, quarantined and reported lost under
    their own id (also after a restart)."""
    store = ObjectStore(tmp_path / "state")
    oid = new_object_id()
    shards = {shard_id(oid, i): obj_of(os.urandom(100 + i)) for i in (0, 1, 10, 23)}
    for sid, obj in shards.items():
        assert store.put(sid, obj) is True
        assert stored_path(store.root, sid).parent == stored_path(store.root, oid).parent
        assert bytes(store.get(sid)) == obj
    assert [o for o, _ in store.list("", 10)[0]] == sorted(shards)
    assert [o for o, _ in store.list(shard_id(oid, 1), 10)[0]] == sorted(shards)[2:]
    victim = shard_id(oid, 10)
    flip_byte(stored_path(store.root, victim), 80)
    with pytest.raises(QuarantinedObject):
        store.get(victim)
    assert store.delete(shard_id(oid, 0)) is True
    assert victim in ObjectStore(tmp_path / "state").lost.pending(10)
    for bad in (f"{oid}.123", f"{oid}./", f"{oid}.1.2"):
        with pytest.raises(ValueError):
            store.put(ObjectId(bad), obj_of(b"x"))
