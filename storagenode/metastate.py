"""The metadata state machine: every namespace change, as plain synchronous code.

How this works
--------------
The state is the SQLite database of ``metaschema`` (volumes, inodes,
directory entries, xattrs, block maps, pending deletes, orphans, the cluster
map).  It changes only through ``MetaState.apply(op)``, where an op is a map
``{"method", "args", "time_ns"}``.  The function of an op is fixed by the op
and the state alone: no clock (the node stamps ``time_ns`` into the op before
it is logged), no randomness, no I/O but the one sqlite3 connection, and new
identifiers come from counters stored in the database (``volumes.next_ino``,
AUTOINCREMENT for volume ids and readdir cursors).  So replaying the same log
into an empty database gives the same database, which is what lets replicas
follow a log and lets tests run without a network or a clock.

Each op runs inside a SAVEPOINT: it either applies completely or, when it
raises ``MetaError`` (a filesystem error with a Linux errno), changes
nothing.  ``append`` applies an op and writes it to ``oplog`` in the
caller's transaction, whether it succeeded or failed, so a replay meets the
same error.  Malformed input (wrong types, unknown method or argument) raises
``BadRequest`` before anything is touched and is never logged.

Invariants (``fsck`` checks all of them):
- every entry's parent is a live directory and its inode exists;
- a directory has exactly one entry naming it (the root none) and
  nlink = 2 + its subdirectories; following parents from any directory
  reaches the root (no cycles);
- any other inode has nlink = the number of entries naming it; nlink = 0
  exactly for orphans (unlinked while open, listed in ``orphans``);
- a block of a file lies inside the file (idx * block_size + length <= size),
  its length is 1..block_size, and ``stored`` is the sum of the lengths;
- a block is stored either in an object or inline (``data``: block 0 only,
  length == len(data) <= INLINE_MAX, no holders), never both;
- an object is in ``pending_deletes`` only when no block refers to it.

Semantics follow a local Linux filesystem (ext4): errno and the order in
which errors are checked mirror the kernel's ``do_renameat2``, ``vfs_link``
and friends.  Directories are never orphans: rmdir and rename over a
directory free it at once.  Access permissions are checked by the mount
(``fusefront/perms.py``), not here: a mount holding the volume's secret is
trusted.  atime is changed only by setattr.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import stat
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import msgpack

from .ids import (ROOT_INODE, is_block_id, is_object_id, is_volume_name, object_age_ns,
                  split_shard_id,
                  parse_node_id, shard_id)

LINK_MAX = 65000            # most hard links to one inode (and subdirectories + 2)
MAX_FILE_SIZE = 2**44 - 4096   # largest file size in bytes: ext4's with 4 KiB blocks
NAME_MAX = 255              # bytes in one name
SYMLINK_MAX = 4095          # bytes in a symlink target (PATH_MAX - 1)
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 64 * 1024
# One inode's xattrs: their names as listxattr returns them ("name\0" each)
# fit the kernel's 64 KiB list buffer (XATTR_LIST_MAX), else no tool could
# list or copy them; names and values together stay under 1 MiB (every one
# is read with the inode).  Past either, setxattr says ENOSPC, as ext4 does
# when an inode's xattr space is full.
XATTR_LIST_MAX = 64 * 1024
XATTR_TOTAL_MAX = 1 << 20
COMMIT_MAX_AGE_NS = 1800 * 10**9   # default: objects older than 30 min are not committed
TRIM_SLACK = 2000           # log entries gathered past the kept ones before a trim
LIST_MAX = 10000            # most rows one readdir / pending_deletes answers
REVALIDATE_MAX = 4096       # most inodes one revalidate checks
BLOCK_SPAN_MAX = 65536      # most blocks one get_blocks or commit_blocks covers
INLINE_MAX = 16384          # most bytes of a small file kept inline in its block map
SMALL_MAPS_MAX = 256        # most inodes one small_maps asks about
OPEN_INOS_MAX = 65536
ATIME_BATCH_MAX = 1024       # most read accesses one touch_atimes records
INT64_MAX = 2**63 - 1
UINT32_MAX = 2**32 - 1

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2


class MetaError(Exception):
    """A filesystem error: a Linux errno and a message for people."""

    def __init__(self, errno_: int, message: str) -> None:
        super().__init__(errno_, message)
        self.errno = errno_
        self.message = message

    def __str__(self) -> str:
        return f"[{errno.errorcode.get(self.errno, self.errno)}] {self.message}"


class BadRequest(Exception):
    """The request is malformed (unknown method, missing or mistyped argument)."""


# ---------------------------------------------------------------- arguments

Args = dict[str, Any]
Validator = Callable[[Any], Any]
REQUIRED: Any = object()
Spec = Mapping[str, tuple[Validator, Any]]


def _int(lo: int = -INT64_MAX - 1, hi: int = INT64_MAX) -> Validator:
    def check(v: Any) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise BadRequest(f"expected an integer in {lo}..{hi}, got {v!r:.80}")
        return v
    return check


def _typed(kind: type[str] | type[bytes], max_len: int) -> Validator:
    def check(v: Any) -> Any:
        if type(v) is not kind or len(v) > max_len:
            raise BadRequest(f"expected {kind.__name__} of at most {max_len}, got {v!r:.80}")
        return v
    return check


def _float(v: Any) -> float:
    if type(v) not in (int, float) or not 0 < v <= 1e9:
        raise BadRequest(f"expected a number in (0, 1e9], got {v!r:.80}")
    return float(v)


def _optional(inner: Validator) -> Validator:
    return lambda v: None if v is None else inner(v)


def _list(item: Validator, max_len: int) -> Validator:
    def check(v: Any) -> list[Any]:
        if type(v) is not list or len(v) > max_len:
            raise BadRequest(f"expected a list of at most {max_len} items")
        return [item(x) for x in v]
    return check


def _oid(v: Any) -> str:
    """A stored object's id: a block's, or a shard's (``<oid>.<i>``)."""
    if type(v) is not str or not is_object_id(v):
        raise BadRequest(f"malformed object id {v!r:.80}")
    return v


def _block_oid(v: Any) -> str:
    """A block's object id as block maps hold it (never a shard's)."""
    if type(v) is not str or not is_block_id(v):
        raise BadRequest(f"malformed block object id {v!r:.80}")
    return v


def _node_id(v: Any) -> str:
    try:
        return parse_node_id(v if type(v) is str else "")
    except ValueError:
        raise BadRequest(f"malformed node id {v!r:.80}") from None


def _holder(v: Any) -> str:
    """A node id, or "" for a missing shard of an erasure-coded block."""
    return "" if v == "" else _node_id(v)


BlockEntry = tuple[int, str | None, int, list[str], bytes | None]


def _block_entry(v: Any) -> BlockEntry:
    """[idx, oid or None, length, [node_ids]] (an object, or a hole when oid
    is None), or [idx, None, length, [], data] (inline data)."""
    if type(v) is not list or len(v) not in (4, 5):
        raise BadRequest("a block is [idx, oid or None, length, [node_ids]] "
                         "or [idx, None, length, [], data]")
    entry = (_int(0)(v[0]), _optional(_block_oid)(v[1]), _int(0)(v[2]),
             _list(_node_id, 64)(v[3]), None if len(v) == 4 else _typed(bytes, INLINE_MAX)(v[4]))
    data = entry[4]
    if data is not None and (entry[1] is not None or entry[3] or not data
                             or entry[2] != len(data)):
        raise BadRequest("an inline block is [idx, None, len(data), [], data], "
                         f"data 1..{INLINE_MAX} bytes")
    return entry


def validate(spec: Spec, args: Any) -> Args:
    """The arguments ``args`` checked against ``spec``, defaults filled in."""
    if not isinstance(args, dict):
        raise BadRequest("args must be a map")
    unknown = set(args) - set(spec)
    if unknown:
        raise BadRequest(f"unknown arguments {sorted(map(str, unknown))}")
    out: Args = {}
    for key, (check, default) in spec.items():
        if key in args:
            out[key] = check(args[key])
        elif default is REQUIRED:
            raise BadRequest(f"missing argument {key!r}")
        else:
            out[key] = default
    return out


VOL = (_int(1), REQUIRED)
INO = (_int(1), REQUIRED)
NAME = (_typed(bytes, 4096), REQUIRED)
ID32 = (_int(0, UINT32_MAX), REQUIRED)
MODE = (_int(0, 0o177777), REQUIRED)
TIME = (_optional(_int()), None)
OPEN_INOS: tuple[Validator, Any] = (_list(_int(1), OPEN_INOS_MAX), [])
LIMIT = (_int(1, LIST_MAX), REQUIRED)
RESERVED = (_optional(_int(1)), None)     # an inode number from reserve_inodes
RESERVE_MAX = 65536

HEARTBEAT_SPEC: Spec = {
    "node_id": (_node_id, REQUIRED), "capacity": (_int(0), REQUIRED),
    "free": (_int(0), REQUIRED), "objects": (_int(0), REQUIRED),
    "lost": (_list(_oid, LIST_MAX), [])}


# ---------------------------------------------------------------- rows

@dataclass
class Inode:
    vol: int
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    stored: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int
    generation: int
    target: bytes | None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def row(self) -> tuple[Any, ...]:
        """The columns in table order (dataclasses.astuple deep-copies: slow)."""
        return (self.vol, self.ino, self.mode, self.uid, self.gid, self.nlink, self.size,
                self.stored, self.atime_ns, self.mtime_ns, self.ctime_ns, self.rdev,
                self.generation, self.target)

    def attrs(self) -> dict[str, int]:
        return {"ino": self.ino, "mode": self.mode, "nlink": self.nlink, "uid": self.uid,
                "gid": self.gid, "rdev": self.rdev, "size": self.size,
                "blocks": -(-self.stored // 512), "atime_ns": self.atime_ns,
                "mtime_ns": self.mtime_ns, "ctime_ns": self.ctime_ns,
                "generation": self.generation}


INODE_COLS = ", ".join(f.name for f in fields(Inode))
INODE_SET = ", ".join(f"{f.name} = ?" for f in fields(Inode)[2:])
INODE_MARKS = ", ".join("?" * len(fields(Inode)))


class Entry(NamedTuple):
    cursor: int
    ino: int


class Volume(NamedTuple):
    vol: int
    name: str
    block_size: int
    replicas: int
    ec_k: int
    ec_m: int
    created_ns: int

    def as_map(self) -> dict[str, Any]:
        return self._asdict()

    @property
    def pieces(self) -> int:
        """How many objects make up one block: copies, or data + parity shards."""
        return self.ec_k + self.ec_m if self.ec_k else self.replicas


NODE_STATES = ("up", "suspect", "down")
NODE_ADMIN = ("active", "draining", "removed")


class Liveness(NamedTuple):
    """What the node last heard from a data node (soft state, not logged).

    state: 'up' (heard within the heartbeat deadline), 'suspect' (missed a
    few heartbeats), 'down' (silent longer); silent: seconds since it was last
    heard (or since this metadata node started, if never)."""
    state: str
    capacity: int
    free: int
    silent: float = 0.0

    @property
    def up(self) -> bool:
        return self.state == "up"


@dataclass
class Outcome:
    """An op written to the log: its index and its result or its error."""
    index: int
    result: Any = None
    error: MetaError | None = None


REQUEST_MAX = 80            # longest name a client gives an op (see MetaState.request)


def check_request(req: Any) -> None:
    if type(req) is not str or not 0 < len(req) <= REQUEST_MAX:
        raise BadRequest(f"an op's request name is a string of 1..{REQUEST_MAX} characters")


def encode_op(op: Mapping[str, Any]) -> bytes:
    return msgpack.packb(dict(op), use_bin_type=True)


def decode_op(blob: bytes) -> dict[str, Any]:
    op = msgpack.unpackb(blob, raw=False)
    assert isinstance(op, dict)
    return op


# ---------------------------------------------------------------- the state

class MetaState:
    """The state machine over one sqlite3 connection in autocommit mode."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        if conn.isolation_level is not None:
            raise ValueError("MetaState needs a connection with isolation_level=None")
        self.conn = conn

    # ---- entry points

    def check(self, method: str, args: Any) -> Args:
        """Validate an op's arguments (BadRequest) without applying it."""
        return check_op(method, args)

    def apply(self, op: Mapping[str, Any]) -> Any:
        """Execute one op; MetaError (and no change) when it fails."""
        now = op.get("time_ns")
        if type(now) is not int or not 0 <= now <= INT64_MAX:
            raise BadRequest("op needs time_ns")
        args = self.check(op.get("method"), op.get("args", {}))  # type: ignore[arg-type]
        with self._savepoint("op"):
            return OPS[op["method"]].fn(self, args, now)

    def append(self, op: Mapping[str, Any]) -> Outcome:
        """Apply ``op`` and write it to the log, in the caller's transaction.
        An op its client named (``req``, see ``request``) that was applied
        already is not applied again: its first outcome is the answer."""
        req = op.get("req")
        if req is not None:
            check_request(req)
            done = self.request(req)
            if done is not None:
                return done
        outcome = Outcome(0)
        try:
            outcome.result = self.apply(op)
        except MetaError as exc:
            outcome.error = exc
        cur = self.conn.execute("INSERT INTO oplog (op) VALUES (?)", (encode_op(op),))
        outcome.index = int(cur.lastrowid or 0)
        if req is not None:
            told = {"result": outcome.result} if outcome.error is None else \
                {"errno": outcome.error.errno, "error": outcome.error.message}
            self.conn.execute("INSERT INTO requests VALUES (?, ?, ?)",
                              (req, outcome.index, msgpack.packb(told, use_bin_type=True)))
        return outcome

    def request(self, req: str) -> Outcome | None:
        """The outcome of the op its client named ``req``, if applied (and
        not trimmed with the log yet)."""
        row = self._one("SELECT idx, outcome FROM requests WHERE req = ?", req)
        if row is None:
            return None
        told = msgpack.unpackb(row[1], raw=False)
        if "errno" in told:
            return Outcome(row[0], error=MetaError(told["errno"], told["error"]))
        return Outcome(row[0], result=told["result"])

    def query(self, method: str, args: Any,
              live: Mapping[str, Liveness] | None = None) -> Any:
        """Answer a query from one consistent snapshot of committed state."""
        entry = QUERIES.get(method) if isinstance(method, str) else None
        if entry is None:
            raise BadRequest(f"unknown query {method!r:.80}")
        checked = validate(entry.spec, args)
        with self._savepoint("query"):
            return entry.fn(self, checked, live or {})

    def trim_log(self, keep: int) -> None:
        """Drop all but the newest ``keep`` log entries, once ``TRIM_SLACK``
        (or a tenth of ``keep``, if less) more have gathered: a trim at
        every group commit was a fifth of the node's time in a run of
        mkdirs.  (Two subqueries, each one step down the index: a MIN and a
        MAX in one query scan the whole log.)"""
        first, last = self.conn.execute(
            "SELECT (SELECT MIN(idx) FROM oplog), (SELECT MAX(idx) FROM oplog)").fetchone()
        if first is None or last - first < keep + min(TRIM_SLACK, keep // 10):
            return
        self.conn.execute("DELETE FROM oplog WHERE idx <= ?", (last - keep,))
        self.conn.execute("DELETE FROM requests WHERE idx <= ?", (last - keep,))

    def has_node(self, node_id: str) -> bool:
        return self._one("SELECT 1 FROM nodes WHERE node_id = ?", node_id) is not None

    def node_ids(self) -> list[str]:
        return [n for (n,) in self._exec("SELECT node_id FROM nodes WHERE admin != 'removed'")]

    def setting(self, key: str, default: int) -> int:
        row = self._one("SELECT value FROM meta WHERE key = ?", key)
        return default if row is None else int(row[0])

    def bump_epoch(self) -> None:
        self._exec("UPDATE meta SET value = value + 1 WHERE key = 'cluster_epoch'")

    def epoch(self) -> int:
        return int(self._one("SELECT value FROM meta WHERE key = 'cluster_epoch'")[0])

    @contextmanager
    def _savepoint(self, name: str) -> Iterator[None]:
        self.conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self.conn.execute(f"ROLLBACK TO {name}")
            self.conn.execute(f"RELEASE {name}")
            raise
        self.conn.execute(f"RELEASE {name}")

    # ---- small helpers shared by the ops

    def _one(self, sql: str, *params: Any) -> Any:
        return self.conn.execute(sql, params).fetchone()

    def _exec(self, sql: str, *params: Any) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def volume(self, vol: int) -> Volume:
        row = self._one("SELECT vol, name, block_size, replicas, ec_k, ec_m, created_ns "
                        "FROM volumes WHERE vol = ?", vol)
        if row is None:
            raise MetaError(errno.ENOENT, f"no volume {vol}")
        return Volume(*row)

    def inode(self, vol: int, ino: int) -> Inode:
        row = self._one(f"SELECT {INODE_COLS} FROM inodes WHERE vol = ? AND ino = ?", vol, ino)
        if row is None:
            raise MetaError(errno.ENOENT, f"no inode {ino} in volume {vol}")
        return Inode(*row)

    def directory(self, vol: int, ino: int, *, live: bool = False) -> Inode:
        """The directory ``ino``; with ``live``, one that may get new entries."""
        inode = self.inode(vol, ino)
        if not inode.is_dir:
            raise MetaError(errno.ENOTDIR, f"inode {ino} is not a directory")
        if live and inode.nlink == 0:
            raise MetaError(errno.ENOENT, f"directory {ino} was removed")
        return inode

    def entry(self, vol: int, parent: int, name: bytes) -> Entry | None:
        row = self._one("SELECT cursor, ino FROM dentries "
                        "WHERE vol = ? AND parent = ? AND name = ?", vol, parent, name)
        return None if row is None else Entry(*row)

    def existing(self, vol: int, parent: int, name: bytes) -> Entry:
        found = self.entry(vol, parent, name)
        if found is None:
            raise MetaError(errno.ENOENT, f"no entry {name!r:.300} in directory {parent}")
        return found

    def has_entries(self, vol: int, ino: int) -> bool:
        return self._one("SELECT 1 FROM dentries WHERE vol = ? AND parent = ? LIMIT 1",
                         vol, ino) is not None

    def save(self, inode: Inode) -> None:
        values = inode.row()
        self._exec(f"UPDATE inodes SET {INODE_SET} WHERE vol = ? AND ino = ?",
                   *values[2:], inode.vol, inode.ino)

    def touch_dir(self, directory: Inode, now: int) -> None:
        directory.mtime_ns = directory.ctime_ns = now
        self.save(directory)

    def new_inode(self, vol: int, now: int, reserved: int | None = None,
                  **values: Any) -> Inode:
        """A new inode: the next number, or ``reserved`` (one handed out
        earlier by ``reserve_inodes``, so below ``next_ino``, and not used yet)."""
        (ino,) = self._one("SELECT next_ino FROM volumes WHERE vol = ?", vol)
        if reserved is None:
            self._exec("UPDATE volumes SET next_ino = next_ino + 1 WHERE vol = ?", vol)
        elif reserved >= ino:
            raise MetaError(errno.EINVAL, f"inode number {reserved} was never reserved")
        else:
            ino = reserved
        try:                   # a reserved number already used fails here: no look first
            return self.insert_inode(Inode(**{
                "vol": vol, "ino": ino, "size": 0, "stored": 0, "atime_ns": now,
                "mtime_ns": now, "ctime_ns": now, "rdev": 0, "generation": 0,
                "target": None, **values}))
        except sqlite3.IntegrityError as exc:
            if reserved is None or exc.sqlite_errorname != "SQLITE_CONSTRAINT_PRIMARYKEY":
                raise                          # any other broken constraint is a bug
            raise MetaError(errno.EEXIST, f"inode number {ino} is taken") from None

    def take_inodes(self, vol: int, count: int) -> int:
        """The first of ``count`` inode numbers taken from the volume's counter."""
        (first,) = self._one("SELECT next_ino FROM volumes WHERE vol = ?", vol)
        self._exec("UPDATE volumes SET next_ino = next_ino + ? WHERE vol = ?", count, vol)
        return int(first)

    def insert_inode(self, inode: Inode) -> Inode:
        self._exec(f"INSERT INTO inodes ({INODE_COLS}) VALUES ({INODE_MARKS})", *inode.row())
        return inode

    def add_entry(self, vol: int, parent: int, name: bytes, ino: int) -> None:
        self._exec("INSERT INTO dentries (vol, parent, name, ino) VALUES (?, ?, ?, ?)",
                   vol, parent, name, ino)

    def remove_entry(self, entry: Entry) -> None:
        self._exec("DELETE FROM dentries WHERE cursor = ?", entry.cursor)

    def point_entry(self, entry: Entry, ino: int) -> None:
        self._exec("UPDATE dentries SET ino = ? WHERE cursor = ?", ino, entry.cursor)

    def parent_of(self, vol: int, ino: int) -> int | None:
        row = self._one("SELECT parent FROM dentries WHERE vol = ? AND ino = ?", vol, ino)
        return None if row is None else int(row[0])

    def is_ancestor_or_self(self, vol: int, ancestor: int, ino: int | None) -> bool:
        """Is directory ``ancestor`` on the path from ``ino`` up to the root?"""
        while ino is not None:
            if ino == ancestor:
                return True
            ino = self.parent_of(vol, ino)
        return False

    def drop_link(self, inode: Inode, now: int, open_inos: list[int]) -> None:
        """One name of a non-directory is gone: orphan or free it at nlink 0."""
        inode.nlink -= 1
        inode.ctime_ns = now
        if inode.nlink > 0 or inode.ino in open_inos:
            self.save(inode)
            if inode.nlink == 0:
                self._exec("INSERT INTO orphans VALUES (?, ?)", inode.vol, inode.ino)
        else:
            self.free(inode, now, orphan=False)     # (its row goes: no update first)

    def free(self, inode: Inode, now: int, *, orphan: bool = True) -> None:
        """Delete an inode with its xattrs and blocks (objects go to pending
        deletes); ``orphan``: it may be in the orphans (not when it just
        lost its last name, nor a directory, which is never one)."""
        key = (inode.vol, inode.ino)
        dropped = self._exec("DELETE FROM blocks WHERE vol = ? AND ino = ? RETURNING oid, nodes",
                             *key).fetchall()
        for oid, nodes in dropped:
            if oid is not None:         # inline data went with the row
                self.queue_delete(inode.vol, oid, nodes, now)
        for table in ("xattrs", "orphans", "inodes") if orphan else ("xattrs", "inodes"):
            self._exec(f"DELETE FROM {table} WHERE vol = ? AND ino = ?", *key)

    def queue_delete(self, vol: int, oid: str, nodes: str, now: int) -> None:
        """Queue the objects of block ``oid`` (of volume ``vol``) for deletion
        unless a block still refers to it: the object on each of ``nodes``
        (JSON), or on an erasure-coded volume each shard ``<oid>.<i>`` on its
        own node ``nodes[i]`` (a blank position has nothing to delete)."""
        if self._one("SELECT 1 FROM blocks WHERE oid = ? LIMIT 1", oid) is not None:
            return
        if self.volume(vol).ec_k == 0:
            rows = [(oid, nodes, now)]
        else:
            rows = [(shard_id(oid, i), json.dumps([node]), now)
                    for i, node in enumerate(json.loads(nodes)) if node]
        self.conn.executemany("INSERT OR IGNORE INTO pending_deletes VALUES (?, ?, ?)", rows)

    def unqueue_delete(self, oid: str) -> None:
        """Block ``oid`` is referenced again: keep its objects (or shards)."""
        self._exec("DELETE FROM pending_deletes WHERE oid = ? OR (oid > ? AND oid < ?)",
                   oid, oid + ".", oid + "/")      # "/" sorts right after "."

    def set_block(self, inode: Inode, idx: int, oid: str | None, length: int,
                  nodes: list[str], now: int, data: bytes | None = None) -> None:
        """Point block ``idx`` at ``oid``, or hold ``data`` inline (neither: a
        hole), keeping ``stored`` right; a replaced object goes to pending
        deletes, replaced inline data just goes."""
        key = (inode.vol, inode.ino, idx)
        old = self._one("SELECT oid, length, nodes FROM blocks "
                        "WHERE vol = ? AND ino = ? AND idx = ?", *key)
        if old is not None:
            self._exec("DELETE FROM blocks WHERE vol = ? AND ino = ? AND idx = ?", *key)
            inode.stored -= old[1]
        if oid is not None or data is not None:
            self._exec("INSERT INTO blocks (vol, ino, idx, oid, length, nodes, data) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", *key, oid, length, json.dumps(nodes), data)
            if oid is not None:
                self.unqueue_delete(oid)
            inode.stored += length
        if old is not None and old[0] is not None:
            self.queue_delete(inode.vol, old[0], old[2], now)

    def truncate(self, inode: Inode, size: int, now: int) -> None:
        """Drop blocks at or past ``size`` and clip the last partial one."""
        bs = self.volume(inode.vol).block_size
        keep = -(-size // bs)
        past = self._exec("SELECT idx FROM blocks WHERE vol = ? AND ino = ? AND idx >= ?",
                          inode.vol, inode.ino, keep).fetchall()
        for (idx,) in past:
            self.set_block(inode, idx, None, 0, [], now)
        if size % bs:
            self._clip(inode, size // bs, size % bs)
        inode.size = size

    def _clip(self, inode: Inode, idx: int, limit: int) -> None:
        row = self._one("SELECT length FROM blocks WHERE vol = ? AND ino = ? AND idx = ?",
                        inode.vol, inode.ino, idx)
        if row is not None and row[0] > limit:      # inline data is clipped too
            self._exec("UPDATE blocks SET length = ?, data = substr(data, 1, ?) "
                       "WHERE vol = ? AND ino = ? AND idx = ?",
                       limit, limit, inode.vol, inode.ino, idx)
            inode.stored -= row[0] - limit


# ---------------------------------------------------------------- checks

def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise MetaError(errno.ENAMETOOLONG, f"name longer than {NAME_MAX} bytes")
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise MetaError(errno.EINVAL, f"invalid name {name!r:.300}")


def _invalid(condition: bool, message: str) -> None:
    if condition:
        raise MetaError(errno.EINVAL, message)


def _new_entry_parent(st: MetaState, a: Args) -> Inode:
    """The directory that gets the new entry ``a["name"]``; EEXIST if taken."""
    parent = st.directory(a["vol"], a["parent"], live=True)
    check_name(a["name"])
    if st.entry(a["vol"], parent.ino, a["name"]) is not None:
        raise MetaError(errno.EEXIST, f"{a['name']!r:.300} exists")
    return parent


def _make(st: MetaState, a: Args, parent: Inode, now: int, mode: int,
          **values: Any) -> Inode:
    """A new inode named ``a["name"]`` in ``parent`` (setgid dirs pass their group)."""
    gid = parent.gid if parent.mode & stat.S_ISGID else a["gid"]
    inode = st.new_inode(a["vol"], now, a.get("ino"), mode=mode, uid=a["uid"], gid=gid,
                         **values)
    st.add_entry(a["vol"], parent.ino, a["name"], inode.ino)
    st.touch_dir(parent, now)
    return inode


def _create(st: MetaState, a: Args, now: int, mode: int, **values: Any) -> Inode:
    return _make(st, a, _new_entry_parent(st, a), now, mode, **values)


# ---------------------------------------------------------------- ops

def _op_create_volume(st: MetaState, a: Args, now: int) -> Any:
    _invalid(not is_volume_name(a["name"]), f"invalid volume name {a['name']!r:.80}")
    bs = a["block_size"]
    _invalid(not (4096 <= bs <= 64 << 20 and bs & (bs - 1) == 0),
             "block_size must be a power of 2 in 4 KiB..64 MiB")
    _invalid(not 1 <= a["replicas"] <= 16, "replicas must be in 1..16")
    k, m = a["ec_k"], a["ec_m"]
    _invalid((k == 0) != (m == 0) or not (k == 0 or (1 <= k <= 16 and 1 <= m <= 8)),
             "erasure coding needs ec_k in 1..16 and ec_m in 1..8 (or both 0)")
    _invalid(a["root_mode"] & ~0o7777 != 0, "root_mode holds only permission bits")
    if st._one("SELECT 1 FROM volumes WHERE name = ?", a["name"]) is not None:
        raise MetaError(errno.EEXIST, f"volume {a['name']} exists")
    cur = st._exec("INSERT INTO volumes (name, block_size, replicas, ec_k, ec_m, created_ns, "
                   "next_ino) VALUES (?, ?, ?, ?, ?, ?, ?)", a["name"], bs,
                   1 if k else a["replicas"], k, m, now, ROOT_INODE + 1)
    vol = int(cur.lastrowid or 0)
    st.insert_inode(Inode(vol, ROOT_INODE, stat.S_IFDIR | a["root_mode"], a["root_uid"],
                          a["root_gid"], 2, 0, 0, now, now, now, 0, 0, None))
    return st.volume(vol).as_map()


def _op_register_node(st: MetaState, a: Args, now: int) -> Any:
    new = (a["address"], a["domain"], a["weight"])
    old = st._one("SELECT address, domain, weight FROM nodes WHERE node_id = ?", a["node_id"])
    if old != new:
        st._exec("INSERT INTO nodes (node_id, address, domain, weight) VALUES (?, ?, ?, ?) "
                 "ON CONFLICT (node_id) DO UPDATE SET address = excluded.address, "
                 "domain = excluded.domain, weight = excluded.weight", a["node_id"], *new)
        st.bump_epoch()
    return {}


def _op_set_node_admin(st: MetaState, a: Args, now: int) -> Any:
    """The operator drains a node, brings it back, or removes a drained one."""
    _invalid(a["admin"] not in NODE_ADMIN, f"admin state must be one of {NODE_ADMIN}")
    row = st._one("SELECT admin FROM nodes WHERE node_id = ?", a["node_id"])
    if row is None:
        raise MetaError(errno.ENOENT, f"no node {a['node_id']}")
    if a["admin"] == "removed":
        (held,) = st._one("SELECT COUNT(*) FROM blocks, json_each(blocks.nodes) "
                          "WHERE json_each.value = ?", a["node_id"])
        if held:
            raise MetaError(errno.EBUSY, f"node {a['node_id']} still holds {held} objects; "
                                         "drain it first")
    if row[0] != a["admin"]:
        st._exec("UPDATE nodes SET admin = ? WHERE node_id = ?", a["admin"], a["node_id"])
        st.bump_epoch()
    return {}


def _op_mknod(st: MetaState, a: Args, now: int) -> Any:
    kind = stat.S_IFMT(a["mode"]) or stat.S_IFREG
    _invalid(kind not in (stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO,
                          stat.S_IFSOCK), "mknod makes files, devices, fifos and sockets")
    rdev = a["rdev"] if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
    return _create(st, a, now, kind | (a["mode"] & 0o7777), nlink=1, rdev=rdev).attrs()


def _op_mkdir(st: MetaState, a: Args, now: int) -> Any:
    parent = _new_entry_parent(st, a)
    if parent.nlink >= LINK_MAX:
        raise MetaError(errno.EMLINK, f"directory {parent.ino} has too many subdirectories")
    parent.nlink += 1
    mode = stat.S_IFDIR | (a["mode"] & 0o1777) | (parent.mode & stat.S_ISGID)
    return _make(st, a, parent, now, mode, nlink=2).attrs()


def check_target(target: bytes) -> None:
    """A symlink target as a local filesystem takes one (MetaError if not)."""
    if not target:
        raise MetaError(errno.ENOENT, "empty symlink target")
    if len(target) > SYMLINK_MAX:
        raise MetaError(errno.ENAMETOOLONG, f"symlink target over {SYMLINK_MAX} bytes")


def _op_symlink(st: MetaState, a: Args, now: int) -> Any:
    target = a["target"]
    check_target(target)
    return _create(st, a, now, stat.S_IFLNK | 0o777, nlink=1, size=len(target),
                   target=target).attrs()


def _op_link(st: MetaState, a: Args, now: int) -> Any:
    inode = st.inode(a["vol"], a["ino"])
    parent = _new_entry_parent(st, a)
    if inode.is_dir:
        raise MetaError(errno.EPERM, "cannot hard-link a directory")
    if inode.nlink == 0:
        raise MetaError(errno.ENOENT, f"inode {inode.ino} was unlinked")
    if inode.nlink >= LINK_MAX:
        raise MetaError(errno.EMLINK, f"inode {inode.ino} has {LINK_MAX} links")
    st.add_entry(a["vol"], parent.ino, a["name"], inode.ino)
    st.touch_dir(parent, now)
    inode.nlink += 1
    inode.ctime_ns = now
    st.save(inode)
    return inode.attrs()


def _op_unlink(st: MetaState, a: Args, now: int) -> Any:
    parent = st.directory(a["vol"], a["parent"])
    check_name(a["name"])
    entry = st.existing(a["vol"], parent.ino, a["name"])
    inode = st.inode(a["vol"], entry.ino)
    if inode.is_dir:
        raise MetaError(errno.EISDIR, f"{a['name']!r:.300} is a directory")
    st.remove_entry(entry)
    st.touch_dir(parent, now)
    st.drop_link(inode, now, a["open_inos"])
    return {"ino": inode.ino, "nlink": inode.nlink}


def _op_rmdir(st: MetaState, a: Args, now: int) -> Any:
    parent = st.directory(a["vol"], a["parent"])
    check_name(a["name"])
    entry = st.existing(a["vol"], parent.ino, a["name"])
    inode = st.inode(a["vol"], entry.ino)
    if not inode.is_dir:
        raise MetaError(errno.ENOTDIR, f"{a['name']!r:.300} is not a directory")
    if st.has_entries(a["vol"], inode.ino):
        raise MetaError(errno.ENOTEMPTY, f"directory {a['name']!r:.300} is not empty")
    st.remove_entry(entry)
    parent.nlink -= 1
    st.touch_dir(parent, now)
    st.free(inode, now, orphan=False)
    return {"ino": inode.ino}


@dataclass
class _Rename:
    """The parties of one rename, each inode loaded once."""
    src_dir: Inode
    dst_dir: Inode
    src_entry: Entry
    src: Inode
    dst_entry: Entry | None
    dst: Inode | None


def _load_rename(st: MetaState, a: Args) -> _Rename:
    vol = a["vol"]
    src_dir = st.directory(vol, a["parent"])
    dst_dir = (src_dir if a["new_parent"] == a["parent"]
               else st.directory(vol, a["new_parent"], live=True))
    check_name(a["name"])
    check_name(a["new_name"])
    src_entry = st.existing(vol, src_dir.ino, a["name"])
    dst_entry = st.entry(vol, dst_dir.ino, a["new_name"])
    src = st.inode(vol, src_entry.ino)
    dst = None if dst_entry is None or dst_entry.ino == src.ino else st.inode(vol, dst_entry.ino)
    return _Rename(src_dir, dst_dir, src_entry, src, dst_entry, dst)


def _check_rename_traps(st: MetaState, r: _Rename, exchange: bool) -> None:
    """A directory cannot move below itself (EINVAL) nor replace an ancestor
    of its source.  Within one directory neither can happen (a name in a
    directory is never that directory or one above it), and the walk up
    the tree is not made."""
    if r.src_dir is r.dst_dir:
        return
    vol = r.src.vol
    if r.src.is_dir and st.is_ancestor_or_self(vol, r.src.ino, r.dst_dir.ino):
        raise MetaError(errno.EINVAL, "cannot move a directory into its own subtree")
    if r.dst is not None and r.dst.is_dir and st.is_ancestor_or_self(vol, r.dst.ino, r.src_dir.ino):
        raise MetaError(errno.EINVAL if exchange else errno.ENOTEMPTY,
                        "the target is an ancestor of the source")


def _op_rename(st: MetaState, a: Args, now: int) -> Any:
    flags = a["flags"]
    _invalid(flags & ~3 != 0 or flags == 3, f"invalid rename flags {flags}")
    r = _load_rename(st, a)
    if flags & RENAME_NOREPLACE and r.dst_entry is not None:
        raise MetaError(errno.EEXIST, f"{a['new_name']!r:.300} exists")
    if flags & RENAME_EXCHANGE and r.dst_entry is None:
        raise MetaError(errno.ENOENT, f"no entry {a['new_name']!r:.300} to exchange with")
    _check_rename_traps(st, r, bool(flags & RENAME_EXCHANGE))
    if r.dst_entry is not None and r.dst is None:
        return {"replaced": 0}          # two names of one inode: nothing to do
    if flags & RENAME_EXCHANGE:
        return _exchange(st, r, now)
    if r.dst is None:
        return _move(st, r, a["new_name"], now)
    return _replace(st, r, now, a["open_inos"])


def _move_subdirs(r: _Rename, src_delta: int, dst_delta: int) -> None:
    """Adjust the parents' nlink for subdirectories that change parent."""
    if r.dst_dir.nlink + dst_delta > LINK_MAX or r.src_dir.nlink + src_delta > LINK_MAX:
        raise MetaError(errno.EMLINK, "target directory has too many subdirectories")
    r.src_dir.nlink += src_delta
    r.dst_dir.nlink += dst_delta


def _finish_rename(st: MetaState, r: _Rename, now: int) -> None:
    r.src.ctime_ns = now
    st.save(r.src)
    st.touch_dir(r.src_dir, now)
    if r.dst_dir is not r.src_dir:
        st.touch_dir(r.dst_dir, now)


def _move(st: MetaState, r: _Rename, new_name: bytes, now: int) -> Any:
    if r.src.is_dir and r.src_dir is not r.dst_dir:
        _move_subdirs(r, -1, +1)
    st.remove_entry(r.src_entry)
    st.add_entry(r.src.vol, r.dst_dir.ino, new_name, r.src.ino)
    _finish_rename(st, r, now)
    return {"replaced": 0}


def _replace(st: MetaState, r: _Rename, now: int, open_inos: list[int]) -> Any:
    dst = r.dst
    assert dst is not None and r.dst_entry is not None
    if r.src.is_dir and not dst.is_dir:
        raise MetaError(errno.ENOTDIR, "cannot replace a non-directory with a directory")
    if not r.src.is_dir and dst.is_dir:
        raise MetaError(errno.EISDIR, "cannot replace a directory with a non-directory")
    if dst.is_dir and st.has_entries(dst.vol, dst.ino):
        raise MetaError(errno.ENOTEMPTY, "target directory is not empty")
    st.point_entry(r.dst_entry, r.src.ino)
    st.remove_entry(r.src_entry)
    if dst.is_dir:
        r.src_dir.nlink -= 1        # dst_dir swaps one subdirectory for another
        st.free(dst, now)
    else:
        st.drop_link(dst, now, open_inos)
    _finish_rename(st, r, now)
    return {"replaced": dst.ino}


def _exchange(st: MetaState, r: _Rename, now: int) -> Any:
    dst = r.dst
    assert dst is not None and r.dst_entry is not None
    delta = int(r.src.is_dir) - int(dst.is_dir)
    if r.src_dir is not r.dst_dir and delta:
        _move_subdirs(r, -delta, delta)
    st.point_entry(r.src_entry, dst.ino)
    st.point_entry(r.dst_entry, r.src.ino)
    dst.ctime_ns = now
    st.save(dst)
    _finish_rename(st, r, now)
    return {"replaced": 0}


def _op_setattr(st: MetaState, a: Args, now: int) -> Any:
    """Change attributes; a size, even the current one, sets mtime (as ext4
    does for truncate and O_TRUNC) unless mtime is given."""
    inode = st.inode(a["vol"], a["ino"])
    if a["size"] is not None:
        _check_regular(inode)
        _check_file_size(a["size"])
        if a["size"] != inode.size:
            st.truncate(inode, a["size"], now)
        inode.mtime_ns = now
    _set_owner_mode_atime(inode, a)
    if a["mtime_ns"] is not None:
        inode.mtime_ns = a["mtime_ns"]
    inode.ctime_ns = now
    st.save(inode)
    return _flagged(st, a["vol"], inode.attrs())


def _set_owner_mode_atime(inode: Inode, a: Args) -> None:
    if a["mode"] is not None:
        inode.mode = stat.S_IFMT(inode.mode) | (a["mode"] & 0o7777)
    for key in ("uid", "gid", "atime_ns"):
        if a[key] is not None:
            setattr(inode, key, a[key])


def _op_touch_atime(st: MetaState, a: Args, now: int) -> Any:
    """Record a read access (relatime): atime only, ctime unchanged, as on
    a local filesystem; never moves atime backwards."""
    inode = st.inode(a["vol"], a["ino"])
    _read_at(st, inode, a["atime_ns"])
    return _flagged(st, a["vol"], inode.attrs())


def _read_at(st: MetaState, inode: Inode, atime_ns: int) -> None:
    """A read access at ``atime_ns``: atime moves, never backwards."""
    if atime_ns > inode.atime_ns:
        inode.atime_ns = atime_ns
        st.save(inode)


def _atime_touch(v: Any) -> tuple[int, int]:
    """[ino, atime_ns]: one read access of ``touch_atimes``."""
    if type(v) is not list or len(v) != 2:
        raise BadRequest("a read access is [ino, atime_ns]")
    return _int(1)(v[0]), _int(0)(v[1])


def _op_touch_atimes(st: MetaState, a: Args, now: int) -> Any:
    """Record many read accesses at once (each as ``touch_atime`` does): the
    new attributes of each inode, or None for one removed since."""
    found: list[dict[str, int]] = []
    answer: list[dict[str, int] | None] = []
    for ino, atime_ns in a["touches"]:
        try:
            inode = st.inode(a["vol"], ino)
        except MetaError:
            answer.append(None)
            continue
        _read_at(st, inode, atime_ns)
        attrs = inode.attrs()
        found.append(attrs)
        answer.append(attrs)
    _with_xattr_flags(st, a["vol"], found)
    return answer


def _check_regular(inode: Inode) -> None:
    if inode.is_dir:
        raise MetaError(errno.EISDIR, f"inode {inode.ino} is a directory")
    _invalid(not stat.S_ISREG(inode.mode), f"inode {inode.ino} is not a regular file")


def _check_file_size(size: int) -> None:
    if size > MAX_FILE_SIZE:
        raise MetaError(errno.EFBIG, f"size {size} is over the largest file size {MAX_FILE_SIZE}")


def _check_blocks(blocks: list[BlockEntry], size: int, bs: int) -> None:
    _invalid(len({b[0] for b in blocks}) != len(blocks), "a block index appears twice")
    for idx, oid, length, _nodes, data in blocks:
        if data is not None:
            _invalid(idx != 0, f"block {idx}: only block 0 can be inline")
            _invalid(size > INLINE_MAX,
                     f"inline data in a file of {size} bytes (most {INLINE_MAX})")
        elif oid is None:
            continue
        _invalid(not 0 < length <= bs, f"block {idx}: length {length} not in 1..{bs}")
        _invalid(idx * bs + length > size, f"block {idx} ends past size {size}")


def _check_fresh(st: MetaState, blocks: list[BlockEntry], now: int) -> None:
    """Refuse objects older than the commit age limit: the orphan scan may
    collect an uncommitted object once it is older than twice that, so an
    object committed in time is never one the scan could have taken."""
    limit = st.setting("commit_max_age_ns", COMMIT_MAX_AGE_NS)
    for idx, oid, _length, _nodes, _data in blocks:
        if oid is not None and object_age_ns(oid, now) > limit:
            raise MetaError(errno.ESTALE, f"block {idx}: object {oid} is too old to commit; "
                                          "store it again")


def _op_configure(st: MetaState, a: Args, now: int) -> Any:
    """Settings that ops depend on (logged, so replay gives the same result)."""
    _invalid(a["commit_max_age_ns"] < 1_000_000_000, "commit_max_age_ns must be >= 1 s")
    st._exec("INSERT OR REPLACE INTO meta VALUES ('commit_max_age_ns', ?)",
             a["commit_max_age_ns"])
    return {}


def _op_commit_blocks(st: MetaState, a: Args, now: int) -> Any:
    inode = st.inode(a["vol"], a["ino"])
    _check_regular(inode)
    _check_file_size(a["size"])
    _check_blocks(a["blocks"], a["size"], st.volume(inode.vol).block_size)
    _check_fresh(st, a["blocks"], now)
    if a["size"] < inode.size:
        st.truncate(inode, a["size"], now)
    inode.size = a["size"]
    for idx, oid, length, nodes, data in a["blocks"]:
        st.set_block(inode, idx, oid, length, nodes, now, data)
    inode.mtime_ns = now if a["mtime_ns"] is None else a["mtime_ns"]
    _set_owner_mode_atime(inode, a)     # a setattr that came after the buffered writes
    # A mount committing a file after its close sends the ctime it showed
    # then (the time stays the node's for everything else: freshness above).
    # Never backwards: a change of the inode the mount sent meanwhile (a
    # rename) may have landed first.
    inode.ctime_ns = max(inode.ctime_ns, now if a["ctime_ns"] is None else a["ctime_ns"])
    st.save(inode)
    return _flagged(st, a["vol"], inode.attrs())


def _xattr_value(st: MetaState, a: Args) -> bytes | None:
    row = st._one("SELECT value FROM xattrs WHERE vol = ? AND ino = ? AND name = ?",
                  a["vol"], a["ino"], a["name"])
    return None if row is None else bytes(row[0])


def _check_xattr_name(name: bytes) -> None:
    if not name or len(name) > XATTR_NAME_MAX:
        raise MetaError(errno.ERANGE, f"xattr name must be 1..{XATTR_NAME_MAX} bytes")


def _op_setxattr(st: MetaState, a: Args, now: int) -> Any:
    inode = st.inode(a["vol"], a["ino"])
    _invalid(a["flags"] & ~3 != 0 or a["flags"] == 3, f"invalid setxattr flags {a['flags']}")
    _check_xattr_name(a["name"])
    if len(a["value"]) > XATTR_VALUE_MAX:
        raise MetaError(errno.E2BIG, f"xattr value over {XATTR_VALUE_MAX} bytes")
    exists = _xattr_value(st, a) is not None
    if exists and a["flags"] & XATTR_CREATE:
        raise MetaError(errno.EEXIST, f"xattr {a['name']!r:.300} exists")
    if not exists and a["flags"] & XATTR_REPLACE:
        raise MetaError(errno.ENODATA, f"no xattr {a['name']!r:.300}")
    names, total = st._one(
        "SELECT COALESCE(SUM(LENGTH(name) + 1), 0), COALESCE(SUM(LENGTH(name) + LENGTH(value)), 0) "
        "FROM xattrs WHERE vol = ? AND ino = ? AND name != ?", a["vol"], a["ino"], a["name"])
    if names + len(a["name"]) + 1 > XATTR_LIST_MAX \
            or total + len(a["name"]) + len(a["value"]) > XATTR_TOTAL_MAX:
        raise MetaError(errno.ENOSPC, f"no room for another xattr on inode {a['ino']} "
                        f"(names {XATTR_LIST_MAX} bytes, all {XATTR_TOTAL_MAX} at most)")
    st._exec("INSERT OR REPLACE INTO xattrs VALUES (?, ?, ?, ?)",
             a["vol"], a["ino"], a["name"], a["value"])
    inode.ctime_ns = now
    st.save(inode)
    return {}


def _op_removexattr(st: MetaState, a: Args, now: int) -> Any:
    inode = st.inode(a["vol"], a["ino"])
    _check_xattr_name(a["name"])
    if _xattr_value(st, a) is None:
        raise MetaError(errno.ENODATA, f"no xattr {a['name']!r:.300}")
    st._exec("DELETE FROM xattrs WHERE vol = ? AND ino = ? AND name = ?",
             a["vol"], a["ino"], a["name"])
    inode.ctime_ns = now
    st.save(inode)
    return {}


def _op_drop_copies(st: MetaState, a: Args, now: int) -> Any:
    """Node ``node_id`` no longer holds a good copy of ``oids`` (it found them
    corrupt, or lost them): take it out of their holders so repair restores
    the redundancy.  An erasure-coded block keeps the shard's place, empty;
    a shard id (``<oid>.<i>``) blanks only position i."""
    node = a["node_id"]
    for name in a["oids"]:
        oid, shard = split_shard_id(name)
        for vol, ino, idx, nodes in st._exec(
                "SELECT vol, ino, idx, nodes FROM blocks WHERE oid = ?", oid).fetchall():
            holders = json.loads(nodes)
            if node not in holders:
                continue
            ec = st.volume(vol).ec_k > 0
            holders = [("" if h == node and shard in (None, i) else h)
                       for i, h in enumerate(holders)] if ec else \
                [h for h in holders if h != node]
            st._exec("UPDATE blocks SET nodes = ? WHERE vol = ? AND ino = ? AND idx = ?",
                     json.dumps(holders), vol, ino, idx)
    return {}


def _op_set_holders(st: MetaState, a: Args, now: int) -> Any:
    """Repair moved copies of ``oid``: replace its holder list ``old`` by
    ``new``, only if the block map still says ``old`` (compare and set; a
    block overwritten or freed meanwhile is left alone and False returned, and
    the caller must delete what it copied)."""
    rows = st._exec("SELECT vol, ino, idx, nodes FROM blocks WHERE oid = ?",
                    a["oid"]).fetchall()
    if not rows or any(json.loads(nodes) != a["old"] for *_, nodes in rows):
        return False
    for vol, ino, idx, _ in rows:
        st._exec("UPDATE blocks SET nodes = ? WHERE vol = ? AND ino = ? AND idx = ?",
                 json.dumps(a["new"]), vol, ino, idx)
    return True


def _op_reserve_inodes(st: MetaState, a: Args, now: int) -> Any:
    """Inode numbers for one mount to name the files it makes before the
    node has seen them (its ``batch``ed creates): ``count`` numbers from
    ``first``, never handed out again."""
    st.volume(a["vol"])
    return {"first": st.take_inodes(a["vol"], a["count"]), "count": a["count"]}


def _op_purge(st: MetaState, a: Args, now: int) -> Any:
    inode = st.inode(a["vol"], a["ino"])
    if inode.nlink == 0:
        st.free(inode, now)
    return {}


def _op_forget_deleted(st: MetaState, a: Args, now: int) -> Any:
    st.conn.executemany("DELETE FROM pending_deletes WHERE oid = ?",
                        [(oid,) for oid in a["oids"]])
    return {}


# ---------------------------------------------------------------- queries

Live = Mapping[str, Liveness]


def _q_volume(st: MetaState, a: Args, live: Live) -> Any:
    row = st._one("SELECT vol FROM volumes WHERE name = ?", a["name"])
    if row is None:
        raise MetaError(errno.ENOENT, f"no volume {a['name']!r:.80}")
    return st.volume(row[0]).as_map()


def _q_volumes(st: MetaState, a: Args, live: Live) -> Any:
    return [st.volume(vol).as_map()
            for (vol,) in st._exec("SELECT vol FROM volumes ORDER BY vol").fetchall()]


def _q_cluster_map(st: MetaState, a: Args, live: Live) -> Any:
    nodes = []
    for node_id, address, domain, weight, admin in st._exec(
            "SELECT node_id, address, domain, weight, admin FROM nodes "
            "WHERE admin != 'removed' ORDER BY node_id"):
        heard = live.get(node_id, Liveness("down", 0, 0))
        nodes.append({"node_id": node_id, "address": address, "domain": domain,
                      "weight": weight, "state": heard.state, "admin": admin,
                      "silent": round(heard.silent, 1),
                      "capacity": heard.capacity, "free": heard.free})
    return {"epoch": st.epoch(), "nodes": nodes}


def _q_statfs(st: MetaState, a: Args, live: Live) -> Any:
    volume = st.volume(a["vol"])
    up = [live[n] for (n,) in st._exec("SELECT node_id FROM nodes")
          if n in live and live[n].up]
    (count,) = st._one("SELECT COUNT(*) FROM inodes WHERE vol = ?", volume.vol)
    return {"capacity": sum(h.capacity for h in up), "free": sum(h.free for h in up),
            "replicas": volume.replicas, "ec_k": volume.ec_k, "ec_m": volume.ec_m,
            "inodes": count, "block_size": volume.block_size}


def _with_xattr_flags(st: MetaState, vol: int, attrs: list[dict[str, int]]) -> None:
    """Mark each inode's attrs with whether it has extended attributes
    ("xattrs": 0/1), so that a client caching them under a lease answers
    "no such xattr" (asked by ``ls -l`` and before every write) without a
    round trip."""
    if not attrs:
        return
    inos = [a["ino"] for a in attrs]
    marks = ",".join("?" * len(inos))
    having = {ino for (ino,) in st._exec(
        f"SELECT DISTINCT ino FROM xattrs WHERE vol = ? AND ino IN ({marks})", vol, *inos)}
    for a in attrs:
        a["xattrs"] = int(a["ino"] in having)


def _flagged(st: MetaState, vol: int, attrs: dict[str, int]) -> dict[str, int]:
    _with_xattr_flags(st, vol, [attrs])
    return attrs


def check_op(method: str, args: Any) -> Args:
    """Validate an op's arguments (BadRequest) without applying it (a
    mount checks an op it queues so, which the node would otherwise refuse
    with the whole batch it rides in)."""
    entry = OPS.get(method) if isinstance(method, str) else None
    if entry is None:
        raise BadRequest(f"unknown op {method!r:.80}")
    return validate(entry.spec, args)


def _q_lookup(st: MetaState, a: Args, live: Live) -> Any:
    parent = st.directory(a["vol"], a["parent"])
    check_name(a["name"])
    attrs = st.inode(a["vol"], st.existing(a["vol"], parent.ino, a["name"]).ino).attrs()
    _with_xattr_flags(st, a["vol"], [attrs])
    return attrs


def _q_getattr(st: MetaState, a: Args, live: Live) -> Any:
    attrs = st.inode(a["vol"], a["ino"]).attrs()
    _with_xattr_flags(st, a["vol"], [attrs])
    return attrs


def _q_getattrs(st: MetaState, a: Args, live: Live) -> Any:
    """Several inodes' attrs at once, None for one that is gone."""
    out: list[Any] = []
    for ino in a["inos"]:
        try:
            out.append(st.inode(a["vol"], ino).attrs())
        except MetaError:
            out.append(None)
    _with_xattr_flags(st, a["vol"], [attrs for attrs in out if attrs is not None])
    return out


def _q_parent(st: MetaState, a: Args, live: Live) -> Any:
    """The attrs of a directory's parent (the root is its own parent)."""
    inode = st.inode(a["vol"], a["ino"])
    if not inode.is_dir:
        raise MetaError(errno.ENOTDIR, f"inode {inode.ino} is not a directory")
    row = st._exec("SELECT parent FROM dentries WHERE vol = ? AND ino = ?",
                   a["vol"], a["ino"]).fetchone()
    attrs = st.inode(a["vol"], row[0] if row else a["ino"]).attrs()
    _with_xattr_flags(st, a["vol"], [attrs])
    return attrs


def _q_readdir(st: MetaState, a: Args, live: Live) -> Any:
    st.directory(a["vol"], a["ino"])
    rows = st._exec(
        f"SELECT d.cursor, d.name, {', '.join('i.' + f.name for f in fields(Inode))} "
        "FROM dentries d JOIN inodes i ON i.vol = d.vol AND i.ino = d.ino "
        "WHERE d.vol = ? AND d.parent = ? AND d.cursor > ? ORDER BY d.cursor LIMIT ?",
        a["vol"], a["ino"], a["after"], a["limit"]).fetchall()
    out = [[row[0], bytes(row[1]), Inode(*row[2:]).attrs()] for row in rows]
    _with_xattr_flags(st, a["vol"], [entry[2] for entry in out])
    return out


VERSION_KEYS = ("ctime_ns", "mtime_ns", "size", "nlink", "mode")


def version_of(attrs: Mapping[str, Any]) -> list[int]:
    """What a client compares to tell whether its cached attrs (and, for a
    directory, entries: every entry change sets the directory's ctime) are
    still current."""
    return [attrs[k] for k in VERSION_KEYS]


def _q_revalidate(st: MetaState, a: Args, live: Live) -> Any:
    """For each inode a client cached before (its version, see version_of):
    1 when unchanged, its current attrs when changed, 0 when it is gone."""
    out: list[Any] = []
    changed = []
    for ino, version in zip(a["inos"], a["versions"]):
        try:
            attrs = st.inode(a["vol"], ino).attrs()
        except MetaError:
            out.append(0)
            continue
        if version_of(attrs) == version:
            out.append(1)
        else:
            out.append(attrs)
            changed.append(attrs)
    _with_xattr_flags(st, a["vol"], changed)
    return out


def _q_readlink(st: MetaState, a: Args, live: Live) -> Any:
    inode = st.inode(a["vol"], a["ino"])
    _invalid(inode.target is None, f"inode {inode.ino} is not a symlink")
    return bytes(inode.target or b"")


def _q_getxattr(st: MetaState, a: Args, live: Live) -> Any:
    st.inode(a["vol"], a["ino"])
    value = _xattr_value(st, a)
    if value is None:
        raise MetaError(errno.ENODATA, f"no xattr {a['name']!r:.300}")
    return value


def _q_listxattr(st: MetaState, a: Args, live: Live) -> Any:
    st.inode(a["vol"], a["ino"])
    return [bytes(name) for (name,) in st._exec(
        "SELECT name FROM xattrs WHERE vol = ? AND ino = ? ORDER BY name",
        a["vol"], a["ino"])]


def _q_get_blocks(st: MetaState, a: Args, live: Live) -> Any:
    st.inode(a["vol"], a["ino"])
    _invalid(a["last"] - a["first"] >= BLOCK_SPAN_MAX,
             f"get_blocks covers at most {BLOCK_SPAN_MAX} blocks")
    rows = st._exec("SELECT idx, oid, length, nodes, data FROM blocks WHERE vol = ? "
                    "AND ino = ? AND idx BETWEEN ? AND ? ORDER BY idx",
                    a["vol"], a["ino"], a["first"], a["last"])
    return [_block_row(*row) for row in rows]


def _q_small_maps(st: MetaState, a: Args, live: Live) -> Any:
    """The block maps of those of ``inos`` that are regular files of at most
    ``INLINE_MAX`` bytes, each with its view (size, mtime, ctime, read in
    the same transaction): [[ino, view, rows], ...] (get_blocks' rows).  A
    mount reading many small files one after the other asks for a few
    dozen at a time instead of one round trip each."""
    inos = sorted(set(a["inos"]))
    marks = ", ".join("?" * len(inos))
    found: dict[int, list[Any]] = {
        ino: [ino, [size, mtime, ctime], []] for ino, size, mtime, ctime in st._exec(
            f"SELECT ino, size, mtime_ns, ctime_ns FROM inodes WHERE vol = ? AND ino IN "
            f"({marks}) AND (mode & ?) = ? AND size <= ?",
            a["vol"], *inos, _IFMT, stat.S_IFREG, INLINE_MAX)}
    if found:
        for ino, *row in st._exec(
                f"SELECT ino, idx, oid, length, nodes, data FROM blocks WHERE vol = ? AND "
                f"ino IN ({', '.join('?' * len(found))}) ORDER BY ino, idx",
                a["vol"], *found):
            found[ino][2].append(_block_row(*row))
    return list(found.values())


def _block_row(idx: int, oid: str | None, length: int, nodes: str,
               data: bytes | None) -> list[Any]:
    """A block as get_blocks answers: [idx, oid, length, holders] for an
    object, [idx, None, length, [], data] for inline data."""
    row = [idx, oid, length, json.loads(nodes)]
    return row if data is None else row + [bytes(data)]


def _q_scan_blocks(st: MetaState, a: Args, live: Live) -> Any:
    """Blocks stored as objects after the key [vol, ino, idx], in key order:
    [vol, ino, idx, oid, nodes] (inline blocks have no objects to look after)."""
    _invalid(len(a["after"]) != 3, "after is [vol, ino, idx]")
    rows = st._exec("SELECT vol, ino, idx, oid, nodes FROM blocks WHERE (vol, ino, idx) > "
                    "(?, ?, ?) AND oid IS NOT NULL ORDER BY vol, ino, idx LIMIT ?",
                    *a["after"], a["limit"])
    return [[vol, ino, idx, oid, json.loads(nodes)] for vol, ino, idx, oid, nodes in rows]


def _q_object_refs(st: MetaState, a: Args, live: Live) -> Any:
    """For each object id: {"nodes": holders} if a block map uses it,
    {"pending": True} if it waits in pending_deletes, else None."""
    refs: dict[str, Any] = {}
    for oid in a["oids"]:
        row = st._one("SELECT nodes FROM blocks WHERE oid = ?", oid)
        if row is not None:
            refs[oid] = {"nodes": json.loads(row[0])}
        elif st._one("SELECT 1 FROM pending_deletes WHERE oid = ?", oid) is not None:
            refs[oid] = {"pending": True}
        else:
            refs[oid] = None
    return refs


def _q_pending_deletes(st: MetaState, a: Args, live: Live) -> Any:
    rows = st._exec("SELECT oid, nodes FROM pending_deletes WHERE queued_ns <= ? "
                    "ORDER BY queued_ns, oid LIMIT ?", a["before_ns"], a["limit"])
    return [[oid, json.loads(nodes)] for oid, nodes in rows]


# ---------------------------------------------------------------- dispatch

class Method(NamedTuple):
    fn: Callable[..., Any]
    spec: Spec


_NEW = {"vol": VOL, "parent": INO, "name": NAME, "uid": ID32, "gid": ID32}
_RENAME = {"vol": VOL, "parent": INO, "name": NAME, "new_parent": INO, "new_name": NAME,
           "flags": (_int(0), 0), "open_inos": OPEN_INOS}
_SETATTR = {"vol": VOL, "ino": INO, "mode": (_optional(_int(0, 0o177777)), None),
            "uid": (_optional(_int(0, UINT32_MAX)), None),
            "gid": (_optional(_int(0, UINT32_MAX)), None),
            "size": (_optional(_int(0)), None), "atime_ns": TIME, "mtime_ns": TIME}
_BLOCKS = (_list(_block_entry, BLOCK_SPAN_MAX), REQUIRED)
_XATTR = {"vol": VOL, "ino": INO, "name": (_typed(bytes, 4096), REQUIRED)}

OPS: dict[str, Method] = {
    "create_volume": Method(_op_create_volume, {
        "name": (_typed(str, 256), REQUIRED), "block_size": (_int(), REQUIRED),
        "replicas": (_int(), REQUIRED), "ec_k": (_int(0), 0), "ec_m": (_int(0), 0),
        "root_uid": (ID32[0], 0), "root_gid": (ID32[0], 0),
        "root_mode": (_int(), 0o755)}),
    "register_node": Method(_op_register_node, {
        "node_id": (_node_id, REQUIRED), "address": (_typed(str, 255), REQUIRED),
        "domain": (_typed(str, 64), ""), "weight": (_float, 1.0)}),
    "configure": Method(_op_configure, {"commit_max_age_ns": (_int(0), REQUIRED)}),
    "set_node_admin": Method(_op_set_node_admin, {
        "node_id": (_node_id, REQUIRED), "admin": (_typed(str, 16), REQUIRED)}),
    "mknod": Method(_op_mknod, {**_NEW, "mode": MODE, "rdev": (_int(0), 0), "ino": RESERVED}),
    "mkdir": Method(_op_mkdir, {**_NEW, "mode": MODE, "ino": RESERVED}),
    "reserve_inodes": Method(_op_reserve_inodes, {"vol": VOL,
                                                  "count": (_int(1, RESERVE_MAX), REQUIRED)}),
    "symlink": Method(_op_symlink, {**_NEW, "target": (_typed(bytes, 65536), REQUIRED),
                                    "ino": RESERVED}),
    "link": Method(_op_link, {"vol": VOL, "ino": INO, "parent": INO, "name": NAME}),
    "unlink": Method(_op_unlink, {"vol": VOL, "parent": INO, "name": NAME,
                                  "open_inos": OPEN_INOS}),
    "rmdir": Method(_op_rmdir, {"vol": VOL, "parent": INO, "name": NAME}),
    "rename": Method(_op_rename, _RENAME),
    "setattr": Method(_op_setattr, _SETATTR),
    "touch_atime": Method(_op_touch_atime, {"vol": VOL, "ino": INO,
                                            "atime_ns": (_int(0), REQUIRED)}),
    "touch_atimes": Method(_op_touch_atimes, {
        "vol": VOL, "touches": (_list(_atime_touch, ATIME_BATCH_MAX), REQUIRED)}),
    "commit_blocks": Method(_op_commit_blocks, {
        "vol": VOL, "ino": INO, "size": (_int(0), REQUIRED), "blocks": _BLOCKS,
        "mtime_ns": TIME, "fence": (_optional(_int(0)), None), "mode": _SETATTR["mode"],
        "uid": _SETATTR["uid"], "gid": _SETATTR["gid"], "atime_ns": TIME, "ctime_ns": TIME}),
    "setxattr": Method(_op_setxattr, {**_XATTR, "value": (_typed(bytes, 1 << 20), REQUIRED),
                                      "flags": (_int(0), 0)}),
    "removexattr": Method(_op_removexattr, _XATTR),
    "purge": Method(_op_purge, {"vol": VOL, "ino": INO}),
    "drop_copies": Method(_op_drop_copies, {"node_id": (_node_id, REQUIRED),
                                            "oids": (_list(_oid, LIST_MAX), REQUIRED)}),
    "set_holders": Method(_op_set_holders, {
        "oid": (_oid, REQUIRED), "old": (_list(_holder, 64), REQUIRED),
        "new": (_list(_holder, 64), REQUIRED)}),
    "forget_deleted": Method(_op_forget_deleted, {"oids": (_list(_oid, LIST_MAX), REQUIRED)}),
}

# The queries that report the data nodes' liveness: only these are handed
# it (computing it reads the node table, a third of a getattr's cost).
LIVENESS_QUERIES = frozenset({"cluster_map", "statfs"})

QUERIES: dict[str, Method] = {
    "volume": Method(_q_volume, {"name": (_typed(str, 256), REQUIRED)}),
    "volumes": Method(_q_volumes, {}),
    "cluster_map": Method(_q_cluster_map, {}),
    "statfs": Method(_q_statfs, {"vol": VOL}),
    "lookup": Method(_q_lookup, {"vol": VOL, "parent": INO, "name": NAME}),
    "getattr": Method(_q_getattr, {"vol": VOL, "ino": INO}),
    "getattrs": Method(_q_getattrs, {"vol": VOL, "inos": (_list(_int(1), 8), REQUIRED)}),
    "parent": Method(_q_parent, {"vol": VOL, "ino": INO}),
    "readdir": Method(_q_readdir, {"vol": VOL, "ino": INO, "after": (_int(0), 0),
                                   "limit": LIMIT}),
    "readlink": Method(_q_readlink, {"vol": VOL, "ino": INO}),
    "revalidate": Method(_q_revalidate, {
        "vol": VOL, "inos": (_list(_int(1), REVALIDATE_MAX), REQUIRED),
        "versions": (_list(_list(_int(), len(VERSION_KEYS)), REVALIDATE_MAX), REQUIRED)}),
    "getxattr": Method(_q_getxattr, _XATTR),
    "listxattr": Method(_q_listxattr, {"vol": VOL, "ino": INO}),
    "get_blocks": Method(_q_get_blocks, {"vol": VOL, "ino": INO, "first": (_int(0), REQUIRED),
                                         "last": (_int(0), REQUIRED)}),
    "small_maps": Method(_q_small_maps, {"vol": VOL, "inos": (_list(_int(1), SMALL_MAPS_MAX),
                                                                REQUIRED)}),
    "scan_blocks": Method(_q_scan_blocks, {"after": (_list(_int(-1), 3), REQUIRED),
                                           "limit": LIMIT}),
    "object_refs": Method(_q_object_refs, {"oids": (_list(_oid, LIST_MAX), REQUIRED)}),
    "pending_deletes": Method(_q_pending_deletes, {"limit": LIMIT,
                                                   "before_ns": (_int(), INT64_MAX)}),
}


LEASE_SPECS: dict[str, Spec] = {
    "open_session": {}, "renew": {}, "close_session": {},
    "events": {"wait": (_float, 20.0)},
    "acquire": {"vol": VOL, "ino": INO, "mode": (_typed(str, 8), "read"),
                "wait": (_int(0, 1), 1)},
    "release": {"epochs": (_list(_int(0), LIST_MAX), REQUIRED)},
}


def op_keys(st: MetaState, method: str, args: Mapping[str, Any]) -> list[tuple[int, int]]:
    """The inodes (vol, ino) whose cached views an op invalidates: a
    directory gaining or losing an entry, an inode whose attributes change.
    Children are looked up in the current state (``args`` are validated)."""
    vol = args.get("vol", 0)

    def child(parent: str, name: str) -> list[tuple[int, int]]:
        try:
            entry = st.entry(vol, args[parent], args[name])
        except (MetaError, KeyError, TypeError, sqlite3.Error):
            return []
        return [] if entry is None else [(vol, entry.ino)]
    if method in ("mknod", "mkdir", "symlink"):
        return [(vol, args["parent"])]
    if method == "link":
        return [(vol, args["parent"]), (vol, args["ino"])]
    if method in ("unlink", "rmdir"):
        return [(vol, args["parent"])] + child("parent", "name")
    if method == "rename":
        return [(vol, args["parent"]), (vol, args["new_parent"])] + \
            child("parent", "name") + child("new_parent", "new_name")
    if method in ("setattr", "commit_blocks", "setxattr", "removexattr", "purge"):
        return [(vol, args["ino"])]
    return []


# ---------------------------------------------------------------- fsck

_IFMT = 0o170000
_IFDIR = stat.S_IFDIR


def fsck(conn: sqlite3.Connection) -> list[str]:
    """Every metadata invariant violation found in the database (empty: clean)."""
    problems: list[str] = []
    for check in (_fsck_entries, _fsck_links, _fsck_tree, _fsck_blocks, _fsck_misc):
        problems.extend(check(conn))
    return problems


def _fsck_entries(conn: sqlite3.Connection) -> Iterator[str]:
    for cursor, vol, parent, name in conn.execute(
            "SELECT d.cursor, d.vol, d.parent, d.name FROM dentries d LEFT JOIN inodes p "
            "ON p.vol = d.vol AND p.ino = d.parent "
            f"WHERE p.ino IS NULL OR (p.mode & {_IFMT}) != {_IFDIR} OR p.nlink = 0"):
        yield f"entry {cursor} {bytes(name)!r} in {vol}/{parent}: parent is not a live directory"
    for cursor, vol, ino in conn.execute(
            "SELECT d.cursor, d.vol, d.ino FROM dentries d LEFT JOIN inodes i "
            "ON i.vol = d.vol AND i.ino = d.ino WHERE i.ino IS NULL"):
        yield f"entry {cursor} names missing inode {vol}/{ino}"
    for cursor, name in conn.execute("SELECT cursor, name FROM dentries"):
        try:
            check_name(bytes(name))
        except MetaError:
            yield f"entry {cursor} has invalid name {bytes(name)!r:.80}"


def _fsck_links(conn: sqlite3.Connection) -> Iterator[str]:
    rows = conn.execute(
        "SELECT i.vol, i.ino, i.mode, i.nlink, "
        " (SELECT COUNT(*) FROM dentries d WHERE d.vol = i.vol AND d.ino = i.ino), "
        " (SELECT COUNT(*) FROM dentries d JOIN inodes c ON c.vol = d.vol AND c.ino = d.ino "
        f"  WHERE d.vol = i.vol AND d.parent = i.ino AND (c.mode & {_IFMT}) = {_IFDIR}), "
        " EXISTS (SELECT 1 FROM orphans o WHERE o.vol = i.vol AND o.ino = i.ino) "
        "FROM inodes i")
    for vol, ino, mode, nlink, names, subdirs, orphan in rows:
        yield from _fsck_inode_links(vol, ino, mode, nlink, names, subdirs, bool(orphan))
    for vol, ino in conn.execute(
            "SELECT o.vol, o.ino FROM orphans o LEFT JOIN inodes i "
            "ON i.vol = o.vol AND i.ino = o.ino WHERE i.ino IS NULL"):
        yield f"orphan {vol}/{ino} has no inode"


def _fsck_inode_links(vol: int, ino: int, mode: int, nlink: int, names: int,
                      subdirs: int, orphan: bool) -> Iterator[str]:
    where = f"inode {vol}/{ino}"
    if stat.S_ISDIR(mode):
        expected_names = 0 if ino == ROOT_INODE else 1
        if names != expected_names:
            yield f"{where}: directory with {names} entries naming it"
        if nlink != 2 + subdirs:
            yield f"{where}: directory nlink {nlink}, expected {2 + subdirs}"
    elif nlink != names:
        yield f"{where}: nlink {nlink} but {names} entries"
    if (nlink == 0) != orphan:
        yield f"{where}: nlink {nlink} but {'' if orphan else 'not '}in orphans"


def _fsck_tree(conn: sqlite3.Connection) -> Iterator[str]:
    parents = {(vol, ino): parent for vol, ino, parent in conn.execute(
        "SELECT d.vol, d.ino, d.parent FROM dentries d JOIN inodes i "
        f"ON i.vol = d.vol AND i.ino = d.ino WHERE (i.mode & {_IFMT}) = {_IFDIR}")}
    for (vol, ino) in parents:
        seen = {ino}
        at: int | None = parents[(vol, ino)]
        while at is not None and at != ROOT_INODE:
            if at in seen:
                yield f"directory {vol}/{ino} is in a cycle"
                break
            seen.add(at)
            at = parents.get((vol, at))
        if at is None:
            yield f"directory {vol}/{ino} does not reach the root"
    for (vol,) in conn.execute(
            "SELECT v.vol FROM volumes v LEFT JOIN inodes i ON i.vol = v.vol AND i.ino = 1 "
            f"WHERE i.ino IS NULL OR (i.mode & {_IFMT}) != {_IFDIR}"):
        yield f"volume {vol} has no root directory"


def _fsck_blocks(conn: sqlite3.Connection) -> Iterator[str]:
    for vol, ino, idx, length, size, mode, bs, nodes, data in conn.execute(
            "SELECT b.vol, b.ino, b.idx, b.length, i.size, i.mode, v.block_size, b.nodes, "
            "b.data FROM blocks b LEFT JOIN inodes i ON i.vol = b.vol AND i.ino = b.ino "
            "LEFT JOIN volumes v ON v.vol = b.vol"):
        where = f"block {vol}/{ino}/{idx}"
        if size is None or not stat.S_ISREG(mode):
            yield f"{where}: not a block of an existing regular file"
        elif not 0 < length <= bs or idx * bs + length > size:
            yield f"{where}: length {length} does not fit (size {size}, block size {bs})"
        if data is not None:
            yield from _fsck_inline(where, idx, length, nodes, data)
    for vol, ino, stored, total in conn.execute(
            "SELECT i.vol, i.ino, i.stored, (SELECT IFNULL(SUM(length), 0) FROM blocks b "
            "WHERE b.vol = i.vol AND b.ino = i.ino) FROM inodes i"):
        if stored != total:
            yield f"inode {vol}/{ino}: stored {stored}, blocks hold {total}"
    for (oid,) in conn.execute(
            "SELECT oid FROM pending_deletes WHERE substr(oid, 1, 32) IN "
            "(SELECT oid FROM blocks WHERE oid IS NOT NULL)"):   # shards too
        yield f"object {oid} is pending delete but still referenced"


def _fsck_inline(where: str, idx: int, length: int, nodes: str, data: bytes
                 ) -> Iterator[str]:
    if idx != 0 or len(data) != length or length > INLINE_MAX or json.loads(nodes):
        yield (f"{where}: inline data of {len(data)} bytes does not fit "
               f"(index {idx}, length {length}, holders {nodes})")


def _fsck_misc(conn: sqlite3.Connection) -> Iterator[str]:
    for vol, ino, mode, target, size in conn.execute(
            "SELECT vol, ino, mode, target, size FROM inodes"):
        if stat.S_ISLNK(mode) != (target is not None):
            yield f"inode {vol}/{ino}: symlink target present iff symlink violated"
        elif target is not None and size != len(target):
            yield f"inode {vol}/{ino}: symlink size {size} != target length {len(target)}"
    for vol, ino in conn.execute(
            "SELECT x.vol, x.ino FROM xattrs x LEFT JOIN inodes i "
            "ON i.vol = x.vol AND i.ino = x.ino WHERE i.ino IS NULL"):
        yield f"xattr of missing inode {vol}/{ino}"
    for vol, next_ino, top in conn.execute(
            "SELECT v.vol, v.next_ino, (SELECT MAX(ino) FROM inodes i WHERE i.vol = v.vol) "
            "FROM volumes v"):
        if top is not None and next_ino <= top:
            yield f"volume {vol}: next_ino {next_ino} not above inode {top}"
