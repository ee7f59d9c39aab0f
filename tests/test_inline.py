"""Inline data of small files: block 0 of a file of at most INLINE_MAX bytes
lives in the block map, not in objects on the data nodes."""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from storagenode import metaschema
from storagenode.metastate import INLINE_MAX, BadRequest, MetaState, fsck

from .cluster import Cluster
from .test_metastate import FS, OID, ROOT, fs  # noqa: F401  (the fixture)

# ---------------------------------------------------------------- metadata state


def blocks(fs: FS, ino: int) -> Any:
    return fs.q("get_blocks", vol=fs.vol, ino=ino, first=0, last=10)


def test_commit_inline_and_read_back(fs: FS) -> None:
    f = fs.create(ROOT, b"f")
    got = fs.commit(f["ino"], 100, [[0, None, 5, [], b"hello"]])
    assert got["size"] == 100 and got["blocks"] == 1
    assert blocks(fs, f["ino"]) == [[0, None, 5, [], b"hello"]]
    assert fs.q("scan_blocks", after=[0, 0, -1], limit=10) == []     # no object to look after
    assert fs.q("pending_deletes", limit=10) == []


def test_replace_object_by_inline_and_back(fs: FS) -> None:
    f = fs.create(ROOT, b"f")
    fs.commit(f["ino"], 4096, [[0, OID[0], 4096, ["n1"]]])
    fs.commit(f["ino"], 10, [[0, None, 10, [], b"x" * 10]])
    assert fs.q("pending_deletes", limit=10) == [[OID[0], ["n1"]]]
    assert blocks(fs, f["ino"]) == [[0, None, 10, [], b"x" * 10]]
    fs.commit(f["ino"], 8192, [[0, OID[1], 4096, ["n2"]]])
    assert fs.q("pending_deletes", limit=10) == [[OID[0], ["n1"]]]   # inline drops nothing
    assert blocks(fs, f["ino"]) == [[0, OID[1], 4096, ["n2"]]]
    assert fs.attrs(f["ino"])["blocks"] == 8


def test_inline_replaced_by_hole_and_freed(fs: FS) -> None:
    f = fs.create(ROOT, b"f")
    fs.commit(f["ino"], 3, [[0, None, 3, [], b"abc"]])
    fs.commit(f["ino"], 3, [[0, None, 0, []]])
    assert blocks(fs, f["ino"]) == [] and fs.attrs(f["ino"])["blocks"] == 0
    fs.commit(f["ino"], 3, [[0, None, 3, [], b"abc"]])
    fs.op("unlink", vol=fs.vol, parent=ROOT, name=b"f")
    assert fs.q("pending_deletes", limit=10) == []


def test_truncate_clips_inline_bytes(fs: FS) -> None:
    f = fs.create(ROOT, b"f")
    fs.commit(f["ino"], 100, [[0, None, 100, [], bytes(range(100))]])
    cut = fs.op("setattr", vol=fs.vol, ino=f["ino"], size=7)
    assert cut["size"] == 7
    assert blocks(fs, f["ino"]) == [[0, None, 7, [], bytes(range(7))]]
    fs.op("setattr", vol=fs.vol, ino=f["ino"], size=1 << 20)       # grows: the row stays
    assert blocks(fs, f["ino"]) == [[0, None, 7, [], bytes(range(7))]]
    fs.op("setattr", vol=fs.vol, ino=f["ino"], size=0)
    assert blocks(fs, f["ino"]) == []


@pytest.mark.parametrize("entry", [
    [0, None, 3, [], b"ab"],                       # length is not len(data)
    [0, None, 0, [], b""],                         # empty
    [0, None, INLINE_MAX + 1, [], b"x" * (INLINE_MAX + 1)],   # too long
    [0, OID[0], 3, [], b"abc"],                    # both an object and data
    [0, None, 3, ["n1"], b"abc"],                  # holders
    [0, None, 3, [], "abc"],                       # not bytes
    [0, None, 3, [], b"abc", 1],                   # six elements
])
def test_inline_entry_malformed(fs: FS, entry: list[Any]) -> None:
    f = fs.create(ROOT, b"f")
    with pytest.raises(BadRequest):
        fs.commit(f["ino"], 100, [entry])


@pytest.mark.parametrize("entry,size", [
    ([1, None, 3, [], b"abc"], 8192),              # not block 0
    ([0, None, 3, [], b"abc"], INLINE_MAX + 1),    # the file is not small
    ([0, None, 3, [], b"abc"], 2),                 # ends past the size
])
def test_inline_entry_refused(fs: FS, entry: list[Any], size: int) -> None:
    f = fs.create(ROOT, b"f")
    fs.fails(errno.EINVAL, "commit_blocks", vol=fs.vol, ino=f["ino"], size=size,
             blocks=[entry])


def test_fsck_finds_bad_inline_rows(fs: FS) -> None:
    f = fs.create(ROOT, b"f")
    fs.commit(f["ino"], 100, [[0, None, 5, [], b"hello"]])
    assert fsck(fs.conn) == []
    fs.conn.execute("UPDATE blocks SET data = x'00' WHERE ino = ?", (f["ino"],))
    assert any("inline data of 1 bytes" in p for p in fsck(fs.conn))
    fs.conn.execute("UPDATE blocks SET data = x'68656c6c6f' WHERE ino = ?", (f["ino"],))
    assert fsck(fs.conn) == []
    with pytest.raises(sqlite3.IntegrityError):       # an object and data, never both
        fs.conn.execute("UPDATE blocks SET oid = ? WHERE ino = ?", (OID[0], f["ino"]))


def test_schema_upgrade_from_2_adds_inline_data(tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    conn = metaschema.open_db(path)
    fs = FS(conn)
    f = fs.create(ROOT, b"f")
    fs.commit(f["ino"], 4096, [[0, OID[0], 4096, ["n1"]]])
    conn.executescript("""
        BEGIN;
        CREATE TABLE old (vol INTEGER NOT NULL, ino INTEGER NOT NULL, idx INTEGER NOT NULL,
            oid TEXT NOT NULL, length INTEGER NOT NULL, nodes TEXT NOT NULL,
            PRIMARY KEY (vol, ino, idx)) STRICT, WITHOUT ROWID;
        INSERT INTO old SELECT vol, ino, idx, oid, length, nodes FROM blocks;
        DROP TABLE blocks;
        ALTER TABLE old RENAME TO blocks;
        CREATE INDEX blocks_by_oid ON blocks (oid);
        DROP TABLE requests;
        UPDATE meta SET value = 2 WHERE key = 'schema_version';
        COMMIT;""")
    conn.close()
    conn = metaschema.open_db(path)
    assert metaschema.schema_version(conn) == 4       # through 3 -> 4 (requests) too
    assert "data" in [r[1] for r in conn.execute("PRAGMA table_info(blocks)")]
    assert "outcome" in [r[1] for r in conn.execute("PRAGMA table_info(requests)")]
    st = MetaState(conn)
    key = {"vol": fs.vol, "ino": f["ino"], "first": 0, "last": 0}
    assert st.query("get_blocks", key) == [[0, OID[0], 4096, ["n1"]]]
    st.append({"method": "commit_blocks", "time_ns": fs.now + 1000, "args": {
        "vol": fs.vol, "ino": f["ino"], "size": 5, "blocks": [[0, None, 5, [], b"small"]]}})
    assert st.query("get_blocks", key) == [[0, None, 5, [], b"small"]]
    assert fsck(conn) == []
    conn.close()


# ---------------------------------------------------------------- through a mount

def stored_objects(cluster: Cluster) -> int:
    return sum(1 for node in cluster.data
               for p in (node.state / "objects").rglob("*") if p.is_file())


def objects_settle_at(cluster: Cluster, count: int, timeout: float = 10.0) -> int:
    """The data nodes' object count once it is ``count`` (a closed file's
    data may be stored just after its close returned), or as it is after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (n := stored_objects(cluster)) != count and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


SMALL = {"empty": b"", "one": b"x", "hundred": os.urandom(100), "max": os.urandom(INLINE_MAX)}


def test_small_files_are_inline(mnt: Path, cluster: Cluster) -> None:
    for name, data in SMALL.items():
        (mnt / name).write_bytes(data)
    assert stored_objects(cluster) == 0
    cluster.umount(mnt)
    cluster.mount(mnt)
    for name, data in SMALL.items():
        assert (mnt / name).read_bytes() == data
    assert stored_objects(cluster) == 0


def test_larger_files_are_objects(mnt: Path, cluster: Cluster) -> None:
    over = os.urandom(INLINE_MAX + 1)
    (mnt / "over").write_bytes(over)
    assert objects_settle_at(cluster, 3) == 3           # one block, three copies
    grown = mnt / "grown"
    start = os.urandom(100)
    grown.write_bytes(start)
    time.sleep(0.5)                                     # its commit is done
    assert stored_objects(cluster) == 3
    rest = os.urandom((1 << 20) - 100)
    with open(grown, "ab") as f:
        f.write(rest)
    assert objects_settle_at(cluster, 6) == 6
    cluster.umount(mnt)
    cluster.mount(mnt)
    assert (mnt / "over").read_bytes() == over
    assert grown.read_bytes() == start + rest


def test_overwrite_small_file_in_place(mnt: Path, cluster: Cluster) -> None:
    p = mnt / "f"
    p.write_bytes(b"a" * 1000)
    fd = os.open(p, os.O_RDWR)
    os.pwrite(fd, b"BBB", 10)
    os.fsync(fd)
    os.pwrite(fd, b"end", 1000)
    os.close(fd)
    os.truncate(p, 500)
    expected = b"a" * 10 + b"BBB" + b"a" * 487
    assert p.read_bytes() == expected
    cluster.umount(mnt)
    cluster.mount(mnt)
    assert p.read_bytes() == expected
    assert stored_objects(cluster) == 0


def test_small_files_with_blocks_of_inline_max(cluster: Cluster, tmp_path: Path) -> None:
    """Block 0 ends exactly at INLINE_MAX: no background upload of it."""
    cluster.create_volume("small", block_size=INLINE_MAX)
    mnt = tmp_path / "m4k"
    cluster.mount(mnt, volume="small")
    data = os.urandom(INLINE_MAX)
    (mnt / "f").write_bytes(data)
    assert stored_objects(cluster) == 0
    two = os.urandom(3 * INLINE_MAX + 5)
    (mnt / "g").write_bytes(two)
    assert objects_settle_at(cluster, 12) == 12     # g's 4 blocks; f is inline
    cluster.umount(mnt)
    cluster.mount(mnt, volume="small")
    assert (mnt / "f").read_bytes() == data and (mnt / "g").read_bytes() == two


def test_a_small_file_over_several_small_blocks(cluster: Cluster, tmp_path: Path) -> None:
    """With blocks smaller than INLINE_MAX, a small file keeps block 0
    inline and stores the others as objects."""
    cluster.create_volume("tiny", block_size=4096)
    mnt = tmp_path / "tiny"
    cluster.mount(mnt, volume="tiny")
    data = os.urandom(2 * 4096 + 5)
    (mnt / "f").write_bytes(data)
    assert objects_settle_at(cluster, 2 * 3) == 2 * 3     # blocks 1 and 2, 3 copies each
    cluster.umount(mnt)
    cluster.mount(mnt, volume="tiny")
    assert (mnt / "f").read_bytes() == data
