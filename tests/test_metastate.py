"""The metadata state machine, called directly on SQLite databases: no network, no clock."""

from __future__ import annotations

import errno
import random
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storagenode import metaschema, metastate
from storagenode.metastate import BadRequest, Liveness, MetaError, MetaState, fsck

T0 = 1_700_000_000_000_000_000
ROOT = 1
OID = [f"{i:020x}{T0 // 1_000_000:012x}" for i in range(1, 200)]   # created at T0


class FS:
    """A MetaState with one volume, its own op clock, and short helpers."""

    def __init__(self, conn: sqlite3.Connection, block_size: int = 4096) -> None:
        self.st = MetaState(conn)
        self.conn = conn
        self.now = T0
        self.vol = self.op("create_volume", name="v", block_size=block_size,
                           replicas=2)["vol"]

    def op(self, method: str, **args: Any) -> Any:
        self.now += 1000
        outcome = self.st.append({"method": method, "args": args, "time_ns": self.now})
        if outcome.error is not None:
            raise outcome.error
        return outcome.result

    def q(self, method: str, **args: Any) -> Any:
        return self.st.query(method, args)

    def fails(self, code: int, method: str, **args: Any) -> None:
        with pytest.raises(MetaError) as info:
            if method in metastate.QUERIES:
                self.q(method, **args)
            else:
                self.op(method, **args)
        assert info.value.errno == code, info.value

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755, gid: int = 0) -> Any:
        return self.op("mkdir", vol=self.vol, parent=parent, name=name, mode=mode,
                       uid=0, gid=gid)

    def create(self, parent: int, name: bytes, mode: int = stat.S_IFREG | 0o644,
               gid: int = 0) -> Any:
        return self.op("mknod", vol=self.vol, parent=parent, name=name, mode=mode,
                       rdev=0, uid=1000, gid=gid)

    def attrs(self, ino: int) -> Any:
        return self.q("getattr", vol=self.vol, ino=ino)

    def lookup(self, parent: int, name: bytes) -> Any:
        return self.q("lookup", vol=self.vol, parent=parent, name=name)

    def names(self, ino: int) -> list[bytes]:
        return [e[1] for e in self.q("readdir", vol=self.vol, ino=ino, after=0, limit=10000)]

    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0, open_inos: list[int] | None = None) -> Any:
        return self.op("rename", vol=self.vol, parent=parent, name=name,
                       new_parent=new_parent, new_name=new_name, flags=flags,
                       open_inos=open_inos or [])

    def commit(self, ino: int, size: int, blocks: list[Any]) -> Any:
        return self.op("commit_blocks", vol=self.vol, ino=ino, size=size, blocks=blocks)


@pytest.fixture
def fs() -> Any:
    conn = metaschema.open_db(":memory:")
    fs = FS(conn)
    yield fs
    assert fsck(conn) == []
    conn.close()


def dump(conn: sqlite3.Connection, skip: tuple[str, ...] = ()) -> dict[str, list[Any]]:
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name") if r[0] not in skip]
    return {t: sorted(map(repr, conn.execute(f"SELECT * FROM {t}"))) for t in tables}


# ---------------------------------------------------------------- schema

def test_schema_refuses_newer_version(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    metaschema.open_db(path).execute(
        "UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    with pytest.raises(metaschema.SchemaError, match="newer"):
        metaschema.open_db(path)


def test_schema_reopens_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    FS(metaschema.open_db(path)).conn.close()
    conn = metaschema.open_db(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert MetaState(conn).query("volume", {"name": "v"})["block_size"] == 4096


def test_state_needs_autocommit_connection() -> None:
    with pytest.raises(ValueError):
        MetaState(sqlite3.connect(":memory:"))


# ---------------------------------------------------------------- volumes

def test_create_volume_and_queries(fs: FS) -> None:
    volume = fs.q("volume", name="v")
    assert volume == {"vol": fs.vol, "name": "v", "block_size": 4096, "replicas": 2,
                      "ec_k": 0, "ec_m": 0, "created_ns": T0 + 1000}
    assert fs.q("volumes") == [volume]
    root = fs.attrs(ROOT)
    assert stat.S_ISDIR(root["mode"]) and root["nlink"] == 2 and root["mode"] & 0o777 == 0o755
    fs.fails(errno.EEXIST, "create_volume", name="v", block_size=4096, replicas=1)
    fs.fails(errno.ENOENT, "volume", name="nope")


@pytest.mark.parametrize("bad", [
    {"block_size": 3000}, {"block_size": 2048}, {"block_size": 128 << 20},
    {"replicas": 0}, {"replicas": 17}, {"name": "no/slash"}, {"root_mode": 0o40755}])
def test_create_volume_rejects(fs: FS, bad: dict[str, Any]) -> None:
    args = {"name": "w", "block_size": 65536, "replicas": 3, **bad}
    fs.fails(errno.EINVAL, "create_volume", **args)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("method,args", [
    ("nosuch", {}),
    ("mkdir", {"vol": 1, "parent": 1, "name": b"x", "mode": 0o755, "uid": 0}),
    ("mkdir", {"vol": 1, "parent": 1, "name": "x", "mode": 0o755, "uid": 0, "gid": 0}),
    ("mkdir", {"vol": 1, "parent": True, "name": b"x", "mode": 0o755, "uid": 0, "gid": 0}),
    ("mkdir", {"vol": 1, "parent": 1, "name": b"x", "mode": 0o755, "uid": -1, "gid": 0}),
    ("unlink", {"vol": 1, "parent": 1, "name": b"x", "extra": 1}),
    ("forget_deleted", {"oids": ["../../etc/passwd"]}),
    ("commit_blocks", {"vol": 1, "ino": 2, "size": 1, "blocks": [[0, OID[0], 1]]}),
    ("touch_atimes", {"vol": 1, "touches": [[1]]}),
    ("touch_atimes", {"vol": 1, "touches": [[0, 5]]}),
    ("touch_atimes", {"vol": 1, "touches": [[1, 5]] * (metastate.ATIME_BATCH_MAX + 1)}),
])
def test_bad_requests(fs: FS, method: str, args: dict[str, Any]) -> None:
    before = dump(fs.conn)
    with pytest.raises(BadRequest):
        fs.op(method, **args)
    assert dump(fs.conn) == before


def test_bad_query(fs: FS) -> None:
    with pytest.raises(BadRequest):
        fs.q("mkdir")
    with pytest.raises(BadRequest):
        fs.q("readdir", vol=1, ino=1, after=0, limit=0)


def test_failing_op_changes_nothing_but_is_logged(fs: FS) -> None:
    fs.create(ROOT, b"f")
    before = dump(fs.conn)
    outcome = fs.st.append({"method": "mkdir", "time_ns": T0 * 2, "args": dict(
        vol=fs.vol, parent=ROOT, name=b"f", mode=0o755, uid=0, gid=0)})
    assert outcome.error is not None and outcome.error.errno == errno.EEXIST
    after = dump(fs.conn)
    assert after.pop("oplog") != before.pop("oplog")
    assert after == before


# ---------------------------------------------------------------- creating

def test_mknod_and_lookup(fs: FS) -> None:
    f = fs.create(ROOT, b"f")
    assert f["nlink"] == 1 and stat.S_ISREG(f["mode"]) and f["uid"] == 1000
    assert f["ctime_ns"] == f["mtime_ns"] == f["atime_ns"] == fs.now
    assert fs.lookup(ROOT, b"f") == dict(f, xattrs=0)
    root = fs.attrs(ROOT)
    assert root["mtime_ns"] == root["ctime_ns"] == fs.now
    plain = fs.create(ROOT, b"plain", mode=0o600)
    assert stat.S_ISREG(plain["mode"])
    dev = fs.op("mknod", vol=fs.vol, parent=ROOT, name=b"dev", mode=stat.S_IFCHR | 0o600,
                rdev=0x0501, uid=0, gid=0)
    assert stat.S_ISCHR(dev["mode"]) and dev["rdev"] == 0x0501
    fifo = fs.create(ROOT, b"fifo", mode=stat.S_IFIFO | 0o600)
    assert stat.S_ISFIFO(fifo["mode"]) and fifo["rdev"] == 0


def test_create_errors(fs: FS) -> None:
    f = fs.create(ROOT, b"f")
    fs.fails(errno.EEXIST, "mknod", vol=fs.vol, parent=ROOT, name=b"f", mode=0o644,
             rdev=0, uid=0, gid=0)
    fs.fails(errno.EEXIST, "mkdir", vol=fs.vol, parent=ROOT, name=b"f", mode=0o755,
             uid=0, gid=0)
    fs.fails(errno.ENOTDIR, "mkdir", vol=fs.vol, parent=f["ino"], name=b"x", mode=0o755,
             uid=0, gid=0)
    fs.fails(errno.ENOENT, "mkdir", vol=fs.vol, parent=999, name=b"x", mode=0o755,
             uid=0, gid=0)
    fs.fails(errno.ENOENT, "mkdir", vol=99, parent=ROOT, name=b"x", mode=0o755, uid=0, gid=0)
    fs.fails(errno.EINVAL, "mknod", vol=fs.vol, parent=ROOT, name=b"d",
             mode=stat.S_IFDIR | 0o755, rdev=0, uid=0, gid=0)
    fs.mkdir(ROOT, b"x" * 255)
    fs.fails(errno.ENAMETOOLONG, "mkdir", vol=fs.vol, parent=ROOT, name=b"x" * 256,
             mode=0o755, uid=0, gid=0)
    for bad in (b"", b".", b"..", b"a/b", b"a\0b"):
        fs.fails(errno.EINVAL, "mkdir", vol=fs.vol, parent=ROOT, name=bad, mode=0o755,
                 uid=0, gid=0)


def test_names_are_bytes(fs: FS) -> None:
    name = b"\xff\xfe not utf-8"
    fs.create(ROOT, name)
    assert fs.names(ROOT) == [name]


def test_mkdir_counts_links(fs: FS) -> None:
    d = fs.mkdir(ROOT, b"d", mode=0o4777)
    assert d["nlink"] == 2 and d["mode"] == stat.S_IFDIR | 0o777
    fs.mkdir(d["ino"], b"e")
    fs.create(d["ino"], b"f")
    assert fs.attrs(ROOT)["nlink"] == 3
    assert fs.attrs(d["ino"])["nlink"] == 3


def test_setgid_directory_passes_group(fs: FS) -> None:
    d = fs.mkdir(ROOT, b"d", mode=0o2775, gid=50)
    assert not d["mode"] & stat.S_ISGID         # mkdir(2) ignores S_ISGID in mode
    d = fs.op("setattr", vol=fs.vol, ino=d["ino"], mode=0o2775)
    sub = fs.mkdir(d["ino"], b"sub", mode=0o755, gid=7)
    assert sub["gid"] == 50 and sub["mode"] & stat.S_ISGID
    f = fs.create(d["ino"], b"f", gid=7)
    assert f["gid"] == 50 and not f["mode"] & stat.S_ISGID
    plain = fs.mkdir(ROOT, b"plain", gid=7)
    assert plain["gid"] == 7 and not plain["mode"] & stat.S_ISGID


def test_mkdir_emlink(fs: FS, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metastate, "LINK_MAX", 4)
    fs.mkdir(ROOT, b"a")
    fs.mkdir(ROOT, b"b")
    fs.fails(errno.EMLINK, "mkdir", vol=fs.vol, parent=ROOT, name=b"c", mode=0o755,
             uid=0, gid=0)
    fs.fails(errno.EEXIST, "mkdir", vol=fs.vol, parent=ROOT, name=b"a", mode=0o755,
             uid=0, gid=0)


def test_symlink_and_readlink(fs: FS) -> None:
    link = fs.op("symlink", vol=fs.vol, parent=ROOT, name=b"l", target=b"../x\xff",
                 uid=1, gid=2)
    assert stat.S_ISLNK(link["mode"]) and link["size"] == 5 and link["nlink"] == 1
    assert fs.q("readlink", vol=fs.vol, ino=link["ino"]) == b"../x\xff"
    f = fs.create(ROOT, b"f")
    fs.fails(errno.EINVAL, "readlink", vol=fs.vol, ino=f["ino"])
    fs.fails(errno.ENOENT, "symlink", vol=fs.vol, parent=ROOT, name=b"e", target=b"",
             uid=0, gid=0)
    fs.fails(errno.ENAMETOOLONG, "symlink", vol=fs.vol, parent=ROOT, name=b"e",
             target=b"x" * 4096, uid=0, gid=0)
    fs.fails(errno.EEXIST, "symlink", vol=fs.vol, parent=ROOT, name=b"l", target=b"x",
             uid=0, gid=0)


# ---------------------------------------------------------------- links

def test_link(fs: FS) -> None:
    f = fs.create(ROOT, b"f")
    d = fs.mkdir(ROOT, b"d")
    linked = fs.op("link", vol=fs.vol, ino=f["ino"], parent=d["ino"], name=b"g")
    assert linked["nlink"] == 2 and linked["ctime_ns"] == fs.now
    assert fs.lookup(d["ino"], b"g")["ino"] == f["ino"]
    assert fs.attrs(d["ino"])["mtime_ns"] == fs.now
    fs.fails(errno.EPERM, "link", vol=fs.vol, ino=d["ino"], parent=ROOT, name=b"dd")
    fs.fails(errno.EEXIST, "link", vol=fs.vol, ino=f["ino"], parent=ROOT, name=b"d")
    fs.fails(errno.ENOENT, "link", vol=fs.vol, ino=999, parent=ROOT, name=b"z")


def test_link_emlink(fs: FS, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metastate, "LINK_MAX", 3)
    f = fs.create(ROOT, b"f")
    for name in (b"g", b"h"):
        fs.op("link", vol=fs.vol, ino=f["ino"], parent=ROOT, name=name)
    fs.fails(errno.EMLINK, "link", vol=fs.vol, ino=f["ino"], parent=ROOT, name=b"i")


def test_unlink_frees_and_queues_objects(fs: FS) -> None:
    f = fs.create(ROOT, b"f")
    fs.commit(f["ino"], 5000, [[0, OID[0], 4096, ["n1"]], [1, OID[1], 904, ["n2"]]])
    fs.op("link", vol=fs.vol, ino=f["ino"], parent=ROOT, name=b"g")
    assert fs.op("unlink", vol=fs.vol, parent=ROOT, name=b"f") == {"ino": f["ino"], "nlink": 1}
    assert fs.q("pending_deletes", limit=10) == []
    assert fs.op("unlink", vol=fs.vol, parent=ROOT, name=b"g") == {"ino": f["ino"], "nlink": 0}
    fs.fails(errno.ENOENT, "getattr", vol=fs.vol, ino=f["ino"])
    assert fs.q("pending_deletes", limit=10) == [[OID[0], ["n1"]], [OID[1], ["n2"]]]
    fs.op("forget_deleted", oids=[OID[0], OID[1]])
    assert fs.q("pending_deletes", limit=10) == []


def test_unlink_errors(fs: FS) -> None:
    fs.mkdir(ROOT, b"d")
    fs.fails(errno.EISDIR, "unlink", vol=fs.vol, parent=ROOT, name=b"d")
    fs.fails(errno.ENOENT, "unlink", vol=fs.vol, parent=ROOT, name=b"nope")


def test_unlink_open_file_makes_orphan_until_purge(fs: FS) -> None:
    f = fs.create(ROOT, b"f")
    fs.commit(f["ino"], 10, [[0, OID[0], 10, ["n1"]]])
    fs.op("unlink", vol=fs.vol, parent=ROOT, name=b"f", open_inos=[f["ino"]])
    orphan = fs.attrs(f["ino"])
    assert orphan["nlink"] == 0 and orphan["size"] == 10
    assert fsck(fs.conn) == []
    fs.op("setattr", vol=fs.vol, ino=f["ino"], size=0)
    fs.fails(errno.ENOENT, "link", vol=fs.vol, ino=f["ino"], parent=ROOT, name=b"back")
    fs.op("purge", vol=fs.vol, ino=f["ino"])
    fs.fails(errno.ENOENT, "getattr", vol=fs.vol, ino=f["ino"])
    fs.fails(errno.ENOENT, "purge", vol=fs.vol, ino=f["ino"])
    assert fs.q("pending_deletes", limit=10) == [[OID[0], ["n1"]]]


def test_purge_of_linked_inode_is_a_no_op(fs: FS) -> None:
    f = fs.create(ROOT, b"f")
    assert fs.op("purge", vol=fs.vol, ino=f["ino"]) == {}
    assert fs.attrs(f["ino"])["nlink"] == 1


def test_rmdir(fs: FS) -> None:
    d = fs.mkdir(ROOT, b"d")
    fs.create(d["ino"], b"f")
    fs.fails(errno.ENOTEMPTY, "rmdir", vol=fs.vol, parent=ROOT, name=b"d")
    fs.fails(errno.ENOTDIR, "rmdir", vol=fs.vol, parent=d["ino"], name=b"f")
    fs.fails(errno.ENOENT, "rmdir", vol=fs.vol, parent=ROOT, name=b"nope")
    fs.fails(errno.EINVAL, "rmdir", vol=fs.vol, parent=ROOT, name=b".")
    fs.op("unlink", vol=fs.vol, parent=d["ino"], name=b"f")
    assert fs.op("rmdir", vol=fs.vol, parent=ROOT, name=b"d") == {"ino": d["ino"]}
    root = fs.attrs(ROOT)
    assert root["nlink"] == 2 and root["mtime_ns"] == fs.now
    fs.fails(errno.ENOENT, "getattr", vol=fs.vol, ino=d["ino"])
    fs.fails(errno.ENOENT, "readdir", vol=fs.vol, ino=d["ino"], after=0, limit=10)


# ---------------------------------------------------------------- rename

def test_rename_moves_and_stamps(fs: FS) -> None:
    a = fs.mkdir(ROOT, b"a")
    b = fs.mkdir(ROOT, b"b")
    sub = fs.mkdir(a["ino"], b"sub")
    assert fs.rename(a["ino"], b"sub", b["ino"], b"moved") == {"replaced": 0}
    assert fs.names(a["ino"]) == [] and fs.names(b["ino"]) == [b"moved"]
    assert fs.attrs(a["ino"])["nlink"] == 2 and fs.attrs(b["ino"])["nlink"] == 3
    for ino in (a["ino"], b["ino"]):
        assert fs.attrs(ino)["mtime_ns"] == fs.now
    assert fs.attrs(sub["ino"])["ctime_ns"] == fs.now
    fs.fails(errno.ENOENT, "rename", vol=fs.vol, parent=a["ino"], name=b"sub",
             new_parent=ROOT, new_name=b"x")


def test_rename_over_file_frees_or_orphans_it(fs: FS) -> None:
    f = fs.create(ROOT, b"f")
    g = fs.create(ROOT, b"g")
    h = fs.create(ROOT, b"h")
    fs.commit(g["ino"], 1, [[0, OID[5], 1, []]])
    assert fs.rename(ROOT, b"f", ROOT, b"g") == {"replaced": g["ino"]}
    fs.fails(errno.ENOENT, "getattr", vol=fs.vol, ino=g["ino"])
    assert fs.q("pending_deletes", limit=5) == [[OID[5], []]]
    assert fs.lookup(ROOT, b"g")["ino"] == f["ino"]
    fs.rename(ROOT, b"h", ROOT, b"g", open_inos=[f["ino"]])
    assert fs.attrs(f["ino"])["nlink"] == 0 and fs.lookup(ROOT, b"g")["ino"] == h["ino"]


def test_rename_directories(fs: FS) -> None:
    a = fs.mkdir(ROOT, b"a")
    fs.mkdir(ROOT, b"empty")
    full = fs.mkdir(ROOT, b"full")
    fs.create(full["ino"], b"x")
    f = fs.create(ROOT, b"f")
    fs.fails(errno.ENOTEMPTY, "rename", vol=fs.vol, parent=ROOT, name=b"a",
             new_parent=ROOT, new_name=b"full")
    fs.fails(errno.ENOTDIR, "rename", vol=fs.vol, parent=ROOT, name=b"a",
             new_parent=ROOT, new_name=b"f")
    fs.fails(errno.EISDIR, "rename", vol=fs.vol, parent=ROOT, name=b"f",
             new_parent=ROOT, new_name=b"a")
    fs.fails(errno.ENOTDIR, "rename", vol=fs.vol, parent=ROOT, name=b"a",
             new_parent=f["ino"], new_name=b"x")
    nlink = fs.attrs(ROOT)["nlink"]
    assert fs.rename(ROOT, b"a", ROOT, b"empty")["replaced"] != 0
    assert fs.attrs(ROOT)["nlink"] == nlink - 1
    assert fs.lookup(ROOT, b"empty")["ino"] == a["ino"]
    fs.rename(ROOT, b"empty", full["ino"], b"x2")
    assert fs.attrs(full["ino"])["nlink"] == 3


def test_rename_into_own_subtree(fs: FS) -> None:
    a = fs.mkdir(ROOT, b"a")
    b = fs.mkdir(a["ino"], b"b")
    c = fs.mkdir(b["ino"], b"c")
    for target in (a["ino"], b["ino"], c["ino"]):
        fs.fails(errno.EINVAL, "rename", vol=fs.vol, parent=ROOT, name=b"a",
                 new_parent=target, new_name=b"z")
    fs.fails(errno.EINVAL, "rename", vol=fs.vol, parent=a["ino"], name=b"b",
             new_parent=c["ino"], new_name=b"b")
    # the target is an ancestor of the source: ENOTEMPTY (EINVAL when exchanging)
    fs.fails(errno.ENOTEMPTY, "rename", vol=fs.vol, parent=b["ino"], name=b"c",
             new_parent=ROOT, new_name=b"a")
    fs.fails(errno.EINVAL, "rename", vol=fs.vol, parent=b["ino"], name=b"c",
             new_parent=ROOT, new_name=b"a", flags=2)
    assert fs.rename(ROOT, b"a", ROOT, b"a") == {"replaced": 0}
    assert fs.rename(b["ino"], b"c", ROOT, b"c") == {"replaced": 0}


def test_rename_between_links_of_one_inode_is_a_no_op(fs: FS) -> None:
    f = fs.create(ROOT, b"f")
    fs.op("link", vol=fs.vol, ino=f["ino"], parent=ROOT, name=b"g")
    before = dump(fs.conn, skip=("oplog",))
    assert fs.rename(ROOT, b"f", ROOT, b"g") == {"replaced": 0}
    assert dump(fs.conn, skip=("oplog",)) == before
    assert sorted(fs.names(ROOT)) == [b"f", b"g"]
    fs.fails(errno.EEXIST, "rename", vol=fs.vol, parent=ROOT, name=b"f", new_parent=ROOT,
             new_name=b"g", flags=1)


def test_rename_noreplace_and_flags(fs: FS) -> None:
    fs.create(ROOT, b"f")
    fs.create(ROOT, b"g")
    fs.fails(errno.EEXIST, "rename", vol=fs.vol, parent=ROOT, name=b"f", new_parent=ROOT,
             new_name=b"g", flags=1)
    fs.fails(errno.EINVAL, "rename", vol=fs.vol, parent=ROOT, name=b"f", new_parent=ROOT,
             new_name=b"g", flags=3)
    fs.fails(errno.EINVAL, "rename", vol=fs.vol, parent=ROOT, name=b"f", new_parent=ROOT,
             new_name=b"g", flags=4)
    assert fs.rename(ROOT, b"f", ROOT, b"h", flags=1) == {"replaced": 0}


def test_rename_exchange(fs: FS) -> None:
    d = fs.mkdir(ROOT, b"d")
    other = fs.mkdir(ROOT, b"other")
    f = fs.create(other["ino"], b"f")
    assert fs.rename(ROOT, b"d", other["ino"], b"f", flags=2) == {"replaced": 0}
    assert fs.lookup(ROOT, b"d")["ino"] == f["ino"]
    assert fs.lookup(other["ino"], b"f")["ino"] == d["ino"]
    assert fs.attrs(ROOT)["nlink"] == 3 and fs.attrs(other["ino"])["nlink"] == 3
    assert fs.attrs(f["ino"])["ctime_ns"] == fs.now == fs.attrs(d["ino"])["ctime_ns"]
    fs.fails(errno.ENOENT, "rename", vol=fs.vol, parent=ROOT, name=b"d", new_parent=ROOT,
             new_name=b"none", flags=2)


def test_rename_emlink(fs: FS, monkeypatch: pytest.MonkeyPatch) -> None:
    full = fs.mkdir(ROOT, b"full")
    fs.mkdir(full["ino"], b"a")
    fs.mkdir(ROOT, b"b")
    monkeypatch.setattr(metastate, "LINK_MAX", 3)
    fs.fails(errno.EMLINK, "rename", vol=fs.vol, parent=ROOT, name=b"b",
             new_parent=full["ino"], new_name=b"b")
    fs.rename(ROOT, b"b", full["ino"], b"a")       # replacing keeps the count


def test_rename_keeps_cursor_of_replaced_entry(fs: FS) -> None:
    fs.create(ROOT, b"a")
    fs.create(ROOT, b"b")
    cursors = {e[1]: e[0] for e in fs.q("readdir", vol=fs.vol, ino=ROOT, after=0, limit=9)}
    fs.rename(ROOT, b"b", ROOT, b"a")
    assert [(e[0], e[1]) for e in fs.q("readdir", vol=fs.vol, ino=ROOT, after=0,
                                      limit=9)] == [(cursors[b"a"], b"a")]


# ---------------------------------------------------------------- attributes and blocks

def test_setattr(fs: FS) -> None:
    f = fs.create(ROOT, b"f", mode=stat.S_IFREG | 0o644)
    got = fs.op("setattr", vol=fs.vol, ino=f["ino"], mode=0o4700, uid=5, gid=6,
                atime_ns=11, mtime_ns=22)
    assert got["mode"] == stat.S_IFREG | 0o4700 and (got["uid"], got["gid"]) == (5, 6)
    assert (got["atime_ns"], got["mtime_ns"], got["ctime_ns"]) == (11, 22, fs.now)
    same = fs.op("setattr", vol=fs.vol, ino=f["ino"], size=0)     # as ext4: times move
    assert same["mtime_ns"] == same["ctime_ns"] == fs.now
    kept = fs.op("setattr", vol=fs.vol, ino=f["ino"], size=0, mtime_ns=33)
    assert kept["mtime_ns"] == 33
    grown = fs.op("setattr", vol=fs.vol, ino=f["ino"], size=1 << 40)
    assert grown["size"] == 1 << 40 and grown["mtime_ns"] == fs.now and grown["blocks"] == 0
    d = fs.mkdir(ROOT, b"d")
    fs.fails(errno.EISDIR, "setattr", vol=fs.vol, ino=d["ino"], size=0)
    link = fs.op("symlink", vol=fs.vol, parent=ROOT, name=b"l", target=b"t", uid=0, gid=0)
    fs.fails(errno.EINVAL, "setattr", vol=fs.vol, ino=link["ino"], size=0)
    fs.fails(errno.ENOENT, "setattr", vol=fs.vol, ino=999, mode=0o600)


def test_touch_atimes_records_reads_of_many_inodes(fs: FS) -> None:
    a, b = fs.create(ROOT, b"a"), fs.create(ROOT, b"b")
    fs.op("setattr", vol=fs.vol, ino=b["ino"], atime_ns=T0 * 2)
    read = fs.now + 5
    got = fs.op("touch_atimes", vol=fs.vol,
                touches=[[a["ino"], read], [999, read], [b["ino"], read]])
    assert got[1] is None                           # gone: skipped, the rest recorded
    assert got[0]["atime_ns"] == read and got[0]["ctime_ns"] == a["ctime_ns"]
    assert got[2]["atime_ns"] == T0 * 2             # never moves back
    assert fs.q("getattr", vol=fs.vol, ino=a["ino"])["atime_ns"] == read


def test_file_size_limit(fs: FS) -> None:
    f = fs.create(ROOT, b"f")
    top = metastate.MAX_FILE_SIZE
    assert fs.op("setattr", vol=fs.vol, ino=f["ino"], size=top)["size"] == top
    fs.fails(errno.EFBIG, "setattr", vol=fs.vol, ino=f["ino"], size=top + 1)
    fs.fails(errno.EFBIG, "commit_blocks", vol=fs.vol, ino=f["ino"], size=top + 1, blocks=[])
    assert fs.q("getattr", vol=fs.vol, ino=f["ino"])["size"] == top


def test_truncate_drops_and_clips_blocks(fs: FS) -> None:
    f = fs.create(ROOT, b"f")
    blocks = [[i, OID[i], 4096, ["n1"]] for i in range(4)]
    got = fs.commit(f["ino"], 4 * 4096, blocks)
    assert got["blocks"] == 32 and got["size"] == 16384
    cut = fs.op("setattr", vol=fs.vol, ino=f["ino"], size=4096 + 100)
    assert cut["size"] == 4196 and cut["blocks"] == (4096 + 100 + 511) // 512
    assert cut["mtime_ns"] == fs.now
    assert fs.q("get_blocks", vol=fs.vol, ino=f["ino"], first=0, last=10) == [
        [0, OID[0], 4096, ["n1"]], [1, OID[1], 100, ["n1"]]]
    assert [p[0] for p in fs.q("pending_deletes", limit=10)] == [OID[2], OID[3]]
    fs.op("setattr", vol=fs.vol, ino=f["ino"], size=4096)
    assert fs.attrs(f["ino"])["blocks"] == 8


def test_commit_blocks(fs: FS) -> None:
    f = fs.create(ROOT, b"f")
    fs.commit(f["ino"], 3 * 4096, [[0, OID[0], 4096, ["a"]], [2, OID[2], 4096, ["b"]]])
    got = fs.op("commit_blocks", vol=fs.vol, ino=f["ino"], size=3 * 4096, mtime_ns=77,
                blocks=[[0, OID[10], 4096, ["c"]], [2, None, 0, []], [1, OID[0], 10, []]])
    assert got["mtime_ns"] == 77 and got["ctime_ns"] == fs.now and got["blocks"] == 9
    assert fs.q("get_blocks", vol=fs.vol, ino=f["ino"], first=0, last=5) == [
        [0, OID[10], 4096, ["c"]], [1, OID[0], 10, []]]
    assert fs.q("get_blocks", vol=fs.vol, ino=f["ino"], first=1, last=1) == [[1, OID[0], 10, []]]
    assert fs.q("pending_deletes", limit=10) == [[OID[2], ["b"]]]   # OID[0] is still used


def test_commit_blocks_carries_a_setattr(fs: FS) -> None:
    """A futimens/fchown/fchmod after buffered writes commits with them:
    the file type stays, the owner and times are set, ctime is the op's."""
    f = fs.create(ROOT, b"f")
    got = fs.op("commit_blocks", vol=fs.vol, ino=f["ino"], size=5, mtime_ns=55,
                blocks=[[0, None, 5, [], b"hello"]], mode=0o4750 | stat.S_IFDIR,
                uid=7, gid=8, atime_ns=44)
    assert got["mode"] == stat.S_IFREG | 0o4750
    assert (got["uid"], got["gid"], got["atime_ns"], got["mtime_ns"]) == (7, 8, 44, 55)
    assert got["ctime_ns"] == fs.now and got["size"] == 5
    assert fs.attrs(f["ino"]) == got | {"xattrs": 0}
    fs.commit(f["ino"], 5, [])                      # without them nothing changes
    assert (fs.attrs(f["ino"])["mode"], fs.attrs(f["ino"])["uid"]) == (stat.S_IFREG | 0o4750, 7)
    with pytest.raises(metastate.BadRequest):
        fs.op("commit_blocks", vol=fs.vol, ino=f["ino"], size=5, blocks=[], uid=-1)


@pytest.mark.parametrize("blocks,size", [
    ([[0, OID[0], 4097, []]], 8192), ([[0, OID[0], 0, []]], 10), ([[1, OID[0], 10, []]], 4100),
    ([[0, OID[0], 10, []], [0, OID[1], 10, []]], 10)])
def test_commit_blocks_rejects(fs: FS, blocks: list[Any], size: int) -> None:
    f = fs.create(ROOT, b"f")
    fs.fails(errno.EINVAL, "commit_blocks", vol=fs.vol, ino=f["ino"], size=size,
             blocks=blocks)


def test_commit_blocks_needs_regular_file(fs: FS) -> None:
    d = fs.mkdir(ROOT, b"d")
    fs.fails(errno.EISDIR, "commit_blocks", vol=fs.vol, ino=d["ino"], size=0, blocks=[])
    fs.fails(errno.ENOENT, "commit_blocks", vol=fs.vol, ino=999, size=0, blocks=[])
    fs.fails(errno.EINVAL, "get_blocks", vol=fs.vol, ino=d["ino"], first=0, last=1 << 40)


def test_xattrs(fs: FS) -> None:
    f = fs.create(ROOT, b"f")
    x = dict(vol=fs.vol, ino=f["ino"])
    assert fs.op("setxattr", **x, name=b"user.a", value=b"1") == {}
    assert fs.attrs(f["ino"])["ctime_ns"] == fs.now
    fs.op("setxattr", **x, name=b"user.b", value=b"", flags=1)
    fs.op("setxattr", **x, name=b"user.a", value=b"2", flags=2)
    assert fs.q("getxattr", **x, name=b"user.a") == b"2"
    assert fs.q("listxattr", **x) == [b"user.a", b"user.b"]
    fs.fails(errno.EEXIST, "setxattr", **x, name=b"user.a", value=b"3", flags=1)
    fs.fails(errno.ENODATA, "setxattr", **x, name=b"user.c", value=b"3", flags=2)
    fs.fails(errno.ERANGE, "setxattr", **x, name=b"u" * 256, value=b"3")
    fs.fails(errno.E2BIG, "setxattr", **x, name=b"user.big", value=b"v" * (65537))
    fs.fails(errno.ENODATA, "getxattr", **x, name=b"user.c")
    fs.op("removexattr", **x, name=b"user.a")
    fs.fails(errno.ENODATA, "removexattr", **x, name=b"user.a")
    assert fs.q("listxattr", **x) == [b"user.b"]
    fs.op("unlink", vol=fs.vol, parent=ROOT, name=b"f")
    assert fs.conn.execute("SELECT COUNT(*) FROM xattrs").fetchone()[0] == 0


def test_xattrs_of_one_inode_stay_listable(fs: FS) -> None:
    """ENOSPC before the names outgrow listxattr's 64 KiB, or names and
    values together 1 MiB; a value replaced in place still fits."""
    x = dict(vol=fs.vol, ino=fs.create(ROOT, b"f")["ino"])
    names = [b"user." + b"%03d" % i + b"n" * 247 for i in range(256)]     # 256 bytes listed each
    for name in names:
        fs.op("setxattr", **x, name=name, value=b"v")
    fs.fails(errno.ENOSPC, "setxattr", **x, name=b"user.more", value=b"v")
    assert sum(len(n) + 1 for n in fs.q("listxattr", **x)) == 65536
    fs.op("setxattr", **x, name=names[0], value=b"w" * 65536)     # replaced: same name
    fs.op("removexattr", **x, name=names[1])
    fs.op("setxattr", **x, name=b"user.more", value=b"v")
    y = dict(vol=fs.vol, ino=fs.create(ROOT, b"g")["ino"])
    for i in range(15):
        fs.op("setxattr", **y, name=b"user.%d" % i, value=b"v" * 65536)
    fs.fails(errno.ENOSPC, "setxattr", **y, name=b"user.16", value=b"v" * 65536)
    fs.op("setxattr", **y, name=b"user.16", value=b"v" * 1000)


def test_the_log_is_trimmed_to_what_is_kept_in_steps(fs: FS) -> None:
    def entries() -> int:
        return fs.conn.execute("SELECT COUNT(*) FROM oplog").fetchone()[0]
    seen = set()
    for i in range(300):
        fs.create(ROOT, b"f%d" % i)
        fs.st.trim_log(100)
        seen.add(entries())
    assert min(seen - set(range(100))) == 100 and max(seen) == 110      # in steps of 10


def test_lookup_and_readdir_errors(fs: FS) -> None:
    f = fs.create(ROOT, b"f")
    fs.fails(errno.ENOENT, "lookup", vol=fs.vol, parent=ROOT, name=b"g")
    fs.fails(errno.ENOTDIR, "lookup", vol=fs.vol, parent=f["ino"], name=b"g")
    fs.fails(errno.ENOTDIR, "readdir", vol=fs.vol, ino=f["ino"], after=0, limit=5)
    fs.fails(errno.ENOENT, "getattr", vol=fs.vol, ino=12345)


def test_readdir_pages_in_cursor_order(fs: FS) -> None:
    names = [f"n{i}".encode() for i in range(10)]
    for name in names:
        fs.create(ROOT, name)
    seen: list[bytes] = []
    after = 0
    while page := fs.q("readdir", vol=fs.vol, ino=ROOT, after=after, limit=3):
        assert [e[0] for e in page] == sorted(e[0] for e in page) and page[0][0] > after
        assert all(e[2] == fs.lookup(ROOT, e[1]) for e in page)
        seen += [e[1] for e in page]
        after = page[-1][0]
    assert seen == names


# ---------------------------------------------------------------- cluster map

def test_register_node_cluster_map_and_statfs(fs: FS) -> None:
    assert fs.st.epoch() == 0
    fs.op("register_node", node_id="n1", address="127.0.0.1:1", domain="r1", weight=1.0)
    fs.op("register_node", node_id="n2", address="127.0.0.1:2", domain="r2", weight=2)
    assert fs.st.epoch() == 2 and fs.st.has_node("n1") and not fs.st.has_node("n3")
    fs.op("register_node", node_id="n1", address="127.0.0.1:1", domain="r1", weight=1.0)
    assert fs.st.epoch() == 2
    fs.op("register_node", node_id="n1", address="127.0.0.1:9", domain="r1", weight=1.0)
    live = {"n1": Liveness("up", 100, 40, 1.0), "n2": Liveness("down", 1000, 1000, 30.0)}
    cmap = fs.st.query("cluster_map", {}, live)
    assert cmap == {"epoch": 3, "nodes": [
        {"node_id": "n1", "address": "127.0.0.1:9", "domain": "r1", "weight": 1.0,
         "state": "up", "admin": "active", "silent": 1.0, "capacity": 100, "free": 40},
        {"node_id": "n2", "address": "127.0.0.1:2", "domain": "r2", "weight": 2.0,
         "state": "down", "admin": "active", "silent": 30.0, "capacity": 1000,
         "free": 1000}]}
    fs.create(ROOT, b"f")
    assert fs.st.query("statfs", {"vol": fs.vol}, live) == {
        "capacity": 100, "free": 40, "replicas": 2, "ec_k": 0, "ec_m": 0, "inodes": 2,
        "block_size": 4096}
    # draining keeps the node in the map; removing needs it to hold nothing
    fs.op("set_node_admin", node_id="n2", admin="draining")
    assert [n["admin"] for n in fs.st.query("cluster_map", {}, live)["nodes"]] == \
        ["active", "draining"]
    assert fs.st.epoch() == 4
    fs.op("register_node", node_id="n2", address="127.0.0.1:2", domain="r2", weight=3.0)
    assert [n["admin"] for n in fs.st.query("cluster_map", {}, live)["nodes"]] == \
        ["active", "draining"], "re-registering must not undo a drain"
    fs.op("set_node_admin", node_id="n2", admin="removed")
    assert [n["node_id"] for n in fs.st.query("cluster_map", {}, live)["nodes"]] == ["n1"]
    with pytest.raises(BadRequest):
        fs.op("register_node", node_id="bad id", address="x:1", domain="", weight=1.0)


# ---------------------------------------------------------------- fsck as an oracle

def test_fsck_finds_damage(fs: FS) -> None:
    d = fs.mkdir(ROOT, b"d")
    f = fs.create(d["ino"], b"f")
    fs.commit(f["ino"], 10, [[0, OID[0], 10, []]])
    assert fsck(fs.conn) == []
    fs.conn.execute("UPDATE inodes SET nlink = 5 WHERE ino = ?", (f["ino"],))
    fs.conn.execute("UPDATE inodes SET stored = 0 WHERE ino = ?", (f["ino"],))
    fs.conn.execute("INSERT INTO dentries (vol, parent, name, ino) VALUES (1, 1, X'78', 999)")
    fs.conn.execute("INSERT INTO pending_deletes VALUES (?, '[]', 0)", (OID[0],))
    problems = fsck(fs.conn)
    assert len(problems) == 4, problems
    fs.conn.execute("DELETE FROM dentries WHERE ino = 999")
    fs.conn.execute("DELETE FROM pending_deletes")
    fs.conn.execute("UPDATE inodes SET nlink = 1, stored = 10 WHERE ino = ?", (f["ino"],))
    fs.conn.execute("UPDATE dentries SET parent = ino WHERE ino = ?", (d["ino"],))
    assert any("cycle" in p for p in fsck(fs.conn))
    fs.conn.execute("UPDATE dentries SET parent = 1 WHERE ino = ?", (d["ino"],))


# ---------------------------------------------------------------- stable readdir

def test_readdir_20000_entries_while_deleting() -> None:
    fs = FS(metaschema.open_db(":memory:"))
    rng = random.Random(7)
    names = [f"entry-{i:05d}".encode() for i in range(20000)]
    fs.conn.execute("BEGIN")
    for name in names:
        fs.create(ROOT, name)
    fs.conn.execute("COMMIT")
    (last_original,) = fs.conn.execute("SELECT MAX(cursor) FROM dentries").fetchone()
    deleted: set[bytes] = set()
    seen: list[bytes] = []
    after = 0
    while True:
        page = fs.q("readdir", vol=fs.vol, ino=ROOT, after=after, limit=rng.randint(1, 64))
        if not page:
            break
        seen += [e[1] for e in page]
        after = page[-1][0]
        for victim in rng.sample(names, 3):
            if victim not in deleted:
                fs.op("unlink", vol=fs.vol, parent=ROOT, name=victim)
                deleted.add(victim)
        if after < last_original:            # entries created meanwhile may or may not show
            fs.create(ROOT, f"new-{after}".encode())
    assert len(seen) == len(set(seen))
    assert set(names) - deleted <= set(seen)
    assert len(deleted) > 1000
    assert fsck(fs.conn) == []


# ---------------------------------------------------------------- properties

NAMES = st.sampled_from([b"a", b"b", b"c"])
INOS = st.sampled_from([1, 1, 2, 3, 4, 5, 6, 7])
MANY_NAMES = st.sampled_from([b"a", b"b", b"c", b"d", b"e", b"f"])


def _op_strategy() -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    v = st.just(1)
    mkdir = st.tuples(st.just("mkdir"), st.fixed_dictionaries(
        {"vol": v, "parent": INOS, "name": MANY_NAMES, "mode": st.sampled_from([0o755, 0o2775]),
         "uid": st.just(0), "gid": st.integers(0, 3)}))
    mknod = st.tuples(st.just("mknod"), st.fixed_dictionaries(
        {"vol": v, "parent": INOS, "name": MANY_NAMES, "mode": st.just(0o100644),
         "rdev": st.just(0), "uid": st.just(0), "gid": st.just(0)}))
    return st.one_of(
        mkdir, mkdir, mknod, mknod, mknod,
        st.tuples(st.just("symlink"), st.fixed_dictionaries(
            {"vol": v, "parent": INOS, "name": MANY_NAMES, "target": st.binary(max_size=5),
             "uid": st.just(0), "gid": st.just(0)})),
        st.tuples(st.just("link"), st.fixed_dictionaries(
            {"vol": v, "ino": INOS, "parent": INOS, "name": MANY_NAMES})),
        st.tuples(st.just("unlink"), st.fixed_dictionaries(
            {"vol": v, "parent": INOS, "name": MANY_NAMES, "open_inos": st.lists(INOS, max_size=3)})),
        st.tuples(st.just("rmdir"), st.fixed_dictionaries(
            {"vol": v, "parent": INOS, "name": MANY_NAMES})),
        st.tuples(st.just("rename"), st.fixed_dictionaries(
            {"vol": v, "parent": INOS, "name": MANY_NAMES, "new_parent": INOS, "new_name": MANY_NAMES,
             "flags": st.sampled_from([0, 0, 1, 2, 3]),
             "open_inos": st.lists(INOS, max_size=3)})),
        st.tuples(st.just("commit_blocks"), st.fixed_dictionaries(
            {"vol": v, "ino": INOS, "size": st.integers(16384, 20000),
             "blocks": st.lists(st.tuples(st.integers(0, 4), st.sampled_from(OID[:6] + [None]),
                                          st.integers(1, 4096)).map(
                 lambda b: [b[0], b[1], b[2], ["n"]]), max_size=3)})),
        st.tuples(st.just("setattr"), st.fixed_dictionaries(
            {"vol": v, "ino": INOS, "size": st.integers(0, 20000)})),
        st.tuples(st.just("setxattr"), st.fixed_dictionaries(
            {"vol": v, "ino": INOS, "name": MANY_NAMES, "value": st.binary(max_size=4),
             "flags": st.integers(0, 2)})),
        st.tuples(st.just("purge"), st.fixed_dictionaries({"vol": v, "ino": INOS})),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_op_strategy(), max_size=60))
def test_replaying_the_log_gives_the_same_state(ops: list[tuple[str, dict[str, Any]]]) -> None:
    first = FS(metaschema.open_db(":memory:"))
    for method, args in ops:
        first.now += 7
        first.st.append({"method": method, "args": args, "time_ns": first.now})
    assert fsck(first.conn) == []
    second = MetaState(metaschema.open_db(":memory:"))
    for (blob,) in first.conn.execute("SELECT op FROM oplog ORDER BY idx").fetchall():
        second.append(metastate.decode_op(blob))
    assert dump(second.conn) == dump(first.conn)


class Model:
    """The namespace as Python dicts: directory ino -> {name: ino}, ino -> kind."""

    def __init__(self) -> None:
        self.dirs: dict[int, dict[bytes, int]] = {ROOT: {}}
        self.kind: dict[int, str] = {ROOT: "d"}

    def parent(self, ino: int) -> int | None:
        return next((d for d, ents in self.dirs.items() if ino in ents.values()), None)

    def ancestor_or_self(self, anc: int, ino: int | None) -> bool:
        while ino is not None:
            if ino == anc:
                return True
            ino = self.parent(ino)
        return False

    def nlink(self, ino: int) -> int:
        if self.kind[ino] == "d":
            return 2 + sum(self.kind[c] == "d" for c in self.dirs[ino].values())
        return sum(list(ents.values()).count(ino) for ents in self.dirs.values())

    def remove(self, parent: int, name: bytes) -> None:
        ino = self.dirs[parent].pop(name)
        if self.nlink(ino) == 0 or self.kind[ino] == "d":
            del self.kind[ino]
            self.dirs.pop(ino, None)

    def rename(self, p: int, n: bytes, p2: int, n2: bytes, flags: int) -> int:
        """The errno the rename must fail with, or 0 after doing it."""
        if flags == 3:
            return errno.EINVAL
        if n not in self.dirs[p]:
            return errno.ENOENT
        src, dst = self.dirs[p][n], self.dirs[p2].get(n2)
        if flags == 1 and dst is not None:
            return errno.EEXIST
        if flags == 2 and dst is None:
            return errno.ENOENT
        if self.kind[src] == "d" and self.ancestor_or_self(src, p2):
            return errno.EINVAL
        if dst not in (None, src) and self.kind[dst] == "d" and self.ancestor_or_self(dst, p):
            return errno.EINVAL if flags == 2 else errno.ENOTEMPTY
        if dst == src:
            return 0
        if flags == 2:
            self.dirs[p][n], self.dirs[p2][n2] = dst, src   # type: ignore[assignment]
            return 0
        if dst is not None:
            if (self.kind[src] == "d") != (self.kind[dst] == "d"):
                return errno.ENOTDIR if self.kind[src] == "d" else errno.EISDIR
            if self.kind[dst] == "d" and self.dirs[dst]:
                return errno.ENOTEMPTY
            del self.dirs[p][n]
            self.dirs[p2][n2] = src
            if self.kind[dst] == "d" or self.nlink(dst) == 0:
                del self.kind[dst]
                self.dirs.pop(dst, None)
            return 0
        del self.dirs[p][n]
        self.dirs[p2][n2] = src
        return 0


def _expect(model: Model, method: str, a: dict[str, Any]) -> int:
    """The errno the model predicts for a non-rename op, or 0 when it should succeed."""
    p, n = a["parent"], a["name"]
    if p not in model.kind:
        return errno.ENOENT
    if model.kind[p] != "d":
        return errno.ENOTDIR
    if method in ("mkdir", "mknod", "symlink"):
        return errno.EEXIST if n in model.dirs[p] else 0
    if method == "link":
        if a["ino"] not in model.kind:
            return errno.ENOENT
        if n in model.dirs[p]:
            return errno.EEXIST
        return errno.EPERM if model.kind[a["ino"]] == "d" else 0
    if n not in model.dirs[p]:
        return errno.ENOENT
    child = model.dirs[p][n]
    if method == "unlink":
        return errno.EISDIR if model.kind[child] == "d" else 0
    if model.kind[child] != "d":
        return errno.ENOTDIR
    return errno.ENOTEMPTY if model.dirs[child] else 0


def _apply_model(model: Model, method: str, a: dict[str, Any], result: Any) -> None:
    if method in ("mkdir", "mknod", "symlink"):
        ino = result["ino"]
        model.kind[ino] = {"mkdir": "d", "mknod": "f", "symlink": "l"}[method]
        if method == "mkdir":
            model.dirs[ino] = {}
        model.dirs[a["parent"]][a["name"]] = ino
    elif method == "link":
        model.dirs[a["parent"]][a["name"]] = a["ino"]
    else:
        model.remove(a["parent"], a["name"])


def _tree(fs: FS, ino: int = ROOT, path: bytes = b"") -> dict[bytes, tuple[str, int]]:
    out: dict[bytes, tuple[str, int]] = {}
    for _cursor, name, attrs in fs.q("readdir", vol=fs.vol, ino=ino, after=0, limit=10000):
        kind = "d" if stat.S_ISDIR(attrs["mode"]) else "l" if stat.S_ISLNK(attrs["mode"]) else "f"
        out[path + b"/" + name] = (kind, attrs["nlink"])
        if kind == "d":
            out.update(_tree(fs, attrs["ino"], path + b"/" + name))
    return out


def _model_tree(model: Model, ino: int = ROOT, path: bytes = b"") -> dict[bytes, tuple[str, int]]:
    out: dict[bytes, tuple[str, int]] = {}
    for name, child in model.dirs[ino].items():
        out[path + b"/" + name] = (model.kind[child], model.nlink(child))
        if model.kind[child] == "d":
            out.update(_model_tree(model, child, path + b"/" + name))
    return out


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_namespace_ops_match_a_model(data: st.DataObject) -> None:
    fs = FS(metaschema.open_db(":memory:"))
    model = Model()
    for _ in range(data.draw(st.integers(1, 50))):
        dirs = sorted(i for i, k in model.kind.items() if k == "d") + [99]
        nondirs = sorted(i for i, k in model.kind.items() if k != "d") or [99]
        pick = st.sampled_from(dirs)
        method = data.draw(st.sampled_from(
            ["mkdir", "mknod", "symlink", "link", "unlink", "rmdir", "rename", "rename"]))
        a: dict[str, Any] = {"vol": fs.vol, "parent": data.draw(pick), "name": data.draw(NAMES)}
        if method == "rename":
            a.update(new_parent=data.draw(pick), new_name=data.draw(NAMES),
                     flags=data.draw(st.sampled_from([0, 0, 0, 1, 2, 3])), open_inos=[])
        elif method == "link":
            a["ino"] = data.draw(st.sampled_from(nondirs + dirs[:1]))
        elif method in ("mkdir", "mknod", "symlink"):
            extra: Any = {"mkdir": {"mode": 0o755}, "symlink": {"target": b"t"},
                                     "mknod": {"mode": 0o644, "rdev": 0}}[method]
            a.update(uid=0, gid=0, **extra)
        _step(fs, model, method, a)
    assert fsck(fs.conn) == []
    assert _tree(fs) == _model_tree(model)


def _step(fs: FS, model: Model, method: str, a: dict[str, Any]) -> None:
    if method == "rename" and a["flags"] == 3:
        expected = errno.EINVAL            # flags are checked before any lookup
    elif method == "rename" and (a["parent"] not in model.kind or a["new_parent"] not in model.kind):
        expected = errno.ENOENT
    elif method == "rename":
        expected = -1                      # the model decides while applying
    else:
        expected = _expect(model, method, a)
    try:
        result = fs.op(method, **a)
        got = 0
    except MetaError as exc:
        result, got = None, exc.errno
    if expected == -1:
        expected = model.rename(a["parent"], a["name"], a["new_parent"], a["new_name"],
                                a["flags"])
    elif expected == 0:
        _apply_model(model, method, a, result)
    assert got == expected, (method, a, errno.errorcode.get(got), errno.errorcode.get(expected))


# ---------------------------------------------------------------- repair ops

def test_repair_ops_drop_copies_set_holders_and_commit_age(fs: FS) -> None:
    f = fs.create(ROOT, b"f")
    fs.commit(f["ino"], 4096, [[0, OID[0], 4096, ["n1", "n2"]]])
    fs.op("drop_copies", node_id="n1", oids=[OID[0], OID[1]])
    assert fs.q("get_blocks", vol=fs.vol, ino=f["ino"], first=0, last=0)[0][3] == ["n2"]
    # compare and set: a stale view of the holders changes nothing
    assert fs.op("set_holders", oid=OID[0], old=["n1", "n2"], new=["n3"]) is False
    assert fs.op("set_holders", oid=OID[0], old=["n2"], new=["n2", "n3"]) is True
    assert fs.q("object_refs", oids=[OID[0], OID[5]]) == {OID[0]: {"nodes": ["n2", "n3"]},
                                                          OID[5]: None}
    # an object older than the commit limit is refused, a fresh one is not
    fs.op("configure", commit_max_age_ns=10**9)
    fs.now = T0 + 5 * 10**9
    fs.fails(errno.ESTALE, "commit_blocks", vol=fs.vol, ino=f["ino"], size=4096,
             blocks=[[0, OID[1], 4096, ["n1"]]])
    fresh = f"{7:020x}{fs.now // 1_000_000:012x}"
    fs.commit(f["ino"], 4096, [[0, fresh, 4096, ["n1"]]])
    assert fs.q("object_refs", oids=[OID[0]])[OID[0]] == {"pending": True}


def test_drop_copies_blanks_only_the_lost_shard(fs: FS) -> None:
    vol = fs.op("create_volume", name="ec", block_size=4096, replicas=1, ec_k=2, ec_m=1)["vol"]
    f = fs.op("mknod", vol=vol, parent=ROOT, name=b"e", mode=stat.S_IFREG | 0o644, rdev=0,
              uid=0, gid=0)
    fs.op("commit_blocks", vol=vol, ino=f["ino"], size=4096,
          blocks=[[0, OID[0], 4096, ["n1", "n2", "n3"]]])
    fs.op("drop_copies", node_id="n2", oids=[f"{OID[0]}.1"])
    fs.op("drop_copies", node_id="n3", oids=[f"{OID[0]}.0"])     # n3 holds shard 2, not 0
    assert fs.q("scan_blocks", after=[0, 0, -1], limit=10) == [
        [vol, f["ino"], 0, OID[0], ["n1", "", "n3"]]]


def test_revalidate_tells_unchanged_changed_and_gone(fs: FS) -> None:
    from storagenode.metastate import version_of
    f = fs.create(ROOT, b"f")
    g = fs.create(ROOT, b"g")
    h = fs.create(ROOT, b"h")
    root = fs.attrs(ROOT)
    saved = [f, g, h, root]
    fs.op("setxattr", vol=fs.vol, ino=g["ino"], name=b"user.k", value=b"v", flags=0)
    fs.op("unlink", vol=fs.vol, parent=ROOT, name=b"h")
    answers = fs.q("revalidate", vol=fs.vol, inos=[a["ino"] for a in saved],
                   versions=[version_of(a) for a in saved])
    assert answers[0] == 1                            # untouched
    assert answers[1]["xattrs"] == 1 and answers[1]["ctime_ns"] >= g["ctime_ns"]
    assert answers[2] == 0                            # gone
    assert isinstance(answers[3], dict)               # the root lost an entry
    assert fs.attrs(g["ino"])["xattrs"] == 1 and fs.attrs(f["ino"])["xattrs"] == 0


def test_a_reserved_inode_number_names_one_inode_only(fs: FS) -> None:
    """A mount names what it makes with numbers it reserved; a number used
    already, or never handed out, is refused and changes nothing."""
    first = fs.op("reserve_inodes", vol=fs.vol, count=2)["first"]
    made = fs.op("mkdir", vol=fs.vol, parent=ROOT, name=b"a", mode=0o755, uid=0, gid=0,
                 ino=first)
    assert made["ino"] == first
    fs.fails(errno.EEXIST, "mknod", vol=fs.vol, parent=ROOT, name=b"b",
             mode=stat.S_IFREG | 0o644, rdev=0, uid=0, gid=0, ino=first)
    fs.fails(errno.EINVAL, "mknod", vol=fs.vol, parent=ROOT, name=b"c",
             mode=stat.S_IFREG | 0o644, rdev=0, uid=0, gid=0, ino=first + 1000)
    assert fs.names(ROOT) == [b"a"]
    assert fs.attrs(first)["mode"] == stat.S_IFDIR | 0o755
