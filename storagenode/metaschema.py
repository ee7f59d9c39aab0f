"""The SQLite schema of the metadata node, versioned.

One database holds everything the metadata node knows: volumes, the
namespace of each volume, block maps, objects waiting to be deleted, the
cluster map and the operation log.  The meaning of every table and column is
written beside its ``CREATE TABLE``.  ``open_db`` creates a new database or
checks the version of an existing one; a database written by a newer objfs is
refused rather than misread.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

SCHEMA_VERSION = 4


class SchemaError(Exception):
    """The database cannot be used by this version of objfs."""


# The block map: block `idx` of file (vol, ino) is stored in object `oid`,
# or, for the only block of a small file, inline in `data`; a row has one
# of the two, never both.  Absent rows are holes (read as zeros).
#   vol, ino: the file
#   idx:      block number; the block covers bytes from idx * block_size
#   oid:      the object holding the block (32 hex digits); NULL for an
#             inline block
#   length:   bytes of file data in the block (1..block_size); past it,
#             up to the block's end, the file reads as zeros
#   nodes:    data nodes holding copies, a JSON list of node ids; on an
#             erasure-coded volume positional: nodes[i] holds shard i
#             (object <oid>.<i>), "" where a shard is known missing;
#             [] for an inline block
#   data:     inline data of a small file's only block (idx 0, length
#             bytes, at most metastate.INLINE_MAX); NULL for blocks stored
#             as objects
_BLOCKS_TABLE = """CREATE TABLE {name} (
        vol    INTEGER NOT NULL,
        ino    INTEGER NOT NULL,
        idx    INTEGER NOT NULL,
        oid    TEXT,
        length INTEGER NOT NULL,
        nodes  TEXT NOT NULL,
        data   BLOB,
        PRIMARY KEY (vol, ino, idx),
        CHECK ((oid IS NULL) != (data IS NULL))
    ) STRICT, WITHOUT ROWID"""
_BLOCKS_INDEX = "CREATE INDEX blocks_by_oid ON blocks (oid)"

# Ops a client named, applied already, with their outcomes: an op sent again
# because its answer was lost (a metadata node killed between commit and
# answer) gets the first outcome instead of being applied twice or refused
# under a lease the restart forgot.  Trimmed with the log.
#   req:     the client's name for the op ("<mount id>:<n>");
#   idx:     the oplog index of its first application;
#   outcome: msgpack {"result"} or {"errno", "error"}
_REQUESTS_TABLE = """CREATE TABLE requests (
    req     TEXT PRIMARY KEY,
    idx     INTEGER NOT NULL,
    outcome BLOB NOT NULL
) STRICT, WITHOUT ROWID"""
_REQUESTS_INDEX = "CREATE INDEX requests_by_idx ON requests (idx)"

TABLES = [
    # Key/value settings of the database itself.
    #   key:   'schema_version' (int, the layout of this file);
    #          'cluster_epoch' (int, bumped whenever the cluster map changes)
    #   value: the setting's value
    """CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value ANY NOT NULL
    ) STRICT""",

    # One row per volume (an independent filesystem tree).
    #   vol:        volume id, never reused (AUTOINCREMENT)
    #   name:       unique volume name (ids.is_volume_name)
    #   block_size: bytes per block of file data (power of 2, 4 KiB..64 MiB)
    #   replicas:   copies kept of every block object (replicated volumes)
    #   ec_k, ec_m: erasure coding: every block is split into ec_k data shards
    #               plus ec_m parity shards, each on its own node; 0, 0 for a
    #               replicated volume
    #   created_ns: time of the create_volume op
    #   next_ino:   the next inode number to hand out; inode numbers are never
    #               reused within a volume, so (vol, ino) names one file forever
    """CREATE TABLE volumes (
        vol        INTEGER PRIMARY KEY AUTOINCREMENT,
        name       TEXT NOT NULL UNIQUE,
        block_size INTEGER NOT NULL,
        replicas   INTEGER NOT NULL,
        ec_k       INTEGER NOT NULL DEFAULT 0,
        ec_m       INTEGER NOT NULL DEFAULT 0,
        created_ns INTEGER NOT NULL,
        next_ino   INTEGER NOT NULL
    ) STRICT""",

    # One row per inode (file, directory, symlink, device, fifo, socket).
    #   vol, ino:   the volume and the inode number (root directory is 1)
    #   mode:       st_mode, type bits included
    #   uid, gid:   owner and group
    #   nlink:      hard links; a directory has 2 + its subdirectories; 0 only
    #               for orphans (unlinked, still open, listed in `orphans`)
    #   size:       st_size in bytes (symlink: length of the target)
    #   stored:     sum of the lengths of the file's blocks; st_blocks is this
    #               in 512-byte units, rounded up (sparse files count less)
    #   atime_ns, mtime_ns, ctime_ns: timestamps in ns since the epoch
    #   rdev:       device number of character and block devices, else 0
    #   generation: st_generation; always 0 because inode numbers are never
    #               reused within a volume
    #   target:     the target of a symlink (bytes), NULL for other types
    """CREATE TABLE inodes (
        vol        INTEGER NOT NULL REFERENCES volumes(vol),
        ino        INTEGER NOT NULL,
        mode       INTEGER NOT NULL,
        uid        INTEGER NOT NULL,
        gid        INTEGER NOT NULL,
        nlink      INTEGER NOT NULL,
        size       INTEGER NOT NULL,
        stored     INTEGER NOT NULL,
        atime_ns   INTEGER NOT NULL,
        mtime_ns   INTEGER NOT NULL,
        ctime_ns   INTEGER NOT NULL,
        rdev       INTEGER NOT NULL,
        generation INTEGER NOT NULL,
        target     BLOB,
        PRIMARY KEY (vol, ino)
    ) STRICT, WITHOUT ROWID""",

    # Directory entries: the name `name` in directory `parent` refers to `ino`.
    # "." and ".." are not stored (the parent of a directory is the `parent`
    # of its one entry).
    #   cursor: position of the entry for readdir, unique and never reused
    #           (AUTOINCREMENT), so listing in cursor order with "cursor > last
    #           seen" skips no entry that exists for the whole listing.  A
    #           rename that replaces an entry keeps the replaced entry's cursor;
    #           a rename to a new name gets a fresh one.
    #   vol, parent: the directory holding the entry
    #   name:   the entry's name, bytes (1..255, no "/" or NUL, not "." "..")
    #   ino:    the inode it refers to
    """CREATE TABLE dentries (
        cursor INTEGER PRIMARY KEY AUTOINCREMENT,
        vol    INTEGER NOT NULL,
        parent INTEGER NOT NULL,
        name   BLOB NOT NULL,
        ino    INTEGER NOT NULL,
        UNIQUE (vol, parent, name)
    ) STRICT""",
    "CREATE INDEX dentries_by_parent ON dentries (vol, parent, cursor)",
    "CREATE INDEX dentries_by_ino ON dentries (vol, ino)",

    # Extended attributes.
    #   vol, ino: the inode
    #   name:     attribute name, bytes (1..255)
    #   value:    attribute value, bytes (at most 64 KiB)
    """CREATE TABLE xattrs (
        vol   INTEGER NOT NULL,
        ino   INTEGER NOT NULL,
        name  BLOB NOT NULL,
        value BLOB NOT NULL,
        PRIMARY KEY (vol, ino, name)
    ) STRICT, WITHOUT ROWID""",

    # The block map: see _BLOCKS_TABLE.
    _BLOCKS_TABLE.format(name="blocks"),
    _BLOCKS_INDEX,

    # Objects no longer referenced by any block map, to be deleted from the
    # data nodes by the collector, which then calls forget_deleted.
    #   oid:       the object; for an erasure-coded block one row per shard,
    #              named by the shard's object id <oid>.<i>
    #   nodes:     data nodes that hold copies, a JSON list of node ids (one
    #              node for a shard)
    #   queued_ns: time of the op that dropped the last reference
    """CREATE TABLE pending_deletes (
        oid       TEXT PRIMARY KEY,
        nodes     TEXT NOT NULL,
        queued_ns INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID""",
    "CREATE INDEX pending_deletes_by_time ON pending_deletes (queued_ns, oid)",

    # Inodes whose last link is gone while a client still has them open
    # (nlink = 0).  They are freed by the purge op when the last handle closes.
    #   vol, ino: the orphan inode
    """CREATE TABLE orphans (
        vol INTEGER NOT NULL,
        ino INTEGER NOT NULL,
        PRIMARY KEY (vol, ino)
    ) STRICT, WITHOUT ROWID""",

    # The cluster map: the data nodes that exist.  Liveness (heartbeats,
    # capacity, free space) is soft state kept in the node's memory only.
    #   node_id: the node's stable id (ids.parse_node_id)
    #   address: "host:port" at which clients reach the node
    #   domain:  failure domain (rack, host); "" if none
    #   weight:  placement weight (> 0)
    #   admin:   what the operator wants of the node: 'active' (holds data),
    #            'draining' (its objects move away; it gets no new ones),
    #            'removed' (drained and taken out; kept so the id is not reused
    #            by accident)
    """CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        domain  TEXT NOT NULL,
        weight  REAL NOT NULL,
        admin   TEXT NOT NULL DEFAULT 'active'
    ) STRICT, WITHOUT ROWID""",

    # The operation log: every op the node accepted, in order, including ops
    # that failed (replay gives the same error).  Older entries are trimmed.
    #   idx: log index, 1, 2, 3, ...
    #   op:  msgpack map {"method", "args", "time_ns"}
    """CREATE TABLE oplog (
        idx INTEGER PRIMARY KEY,
        op  BLOB NOT NULL
    ) STRICT""",
    _REQUESTS_TABLE,
    _REQUESTS_INDEX,
]


def connect(path: Path | str, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, fsync on commit."""
    conn = sqlite3.connect(str(path), isolation_level=None,
                           check_same_thread=check_same_thread)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def schema_version(conn: sqlite3.Connection) -> int | None:
    """The version of the database, or None when it holds no objfs schema yet."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
    if exists is None:
        return None
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        raise SchemaError("database has a meta table but no schema_version")
    return int(row[0])


def create_schema(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in TABLES:
            conn.execute(statement)
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        conn.execute("INSERT INTO meta VALUES ('cluster_epoch', 0)")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


UPGRADES = {
    # 1 -> 2: erasure-coded volumes, the operator's state of a node
    1: ["ALTER TABLE volumes ADD COLUMN ec_k INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE volumes ADD COLUMN ec_m INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE nodes ADD COLUMN admin TEXT NOT NULL DEFAULT 'active'"],
    # 2 -> 3: inline data of small files.  SQLite cannot drop the NOT NULL of
    # blocks.oid, so the table is rebuilt with the new column and its check.
    2: [_BLOCKS_TABLE.format(name="blocks_v3"),
        "INSERT INTO blocks_v3 (vol, ino, idx, oid, length, nodes) "
        "SELECT vol, ino, idx, oid, length, nodes FROM blocks",
        "DROP TABLE blocks",
        "ALTER TABLE blocks_v3 RENAME TO blocks",
        _BLOCKS_INDEX],
    # 3 -> 4: outcomes of ops by the client's name for them
    3: [_REQUESTS_TABLE, _REQUESTS_INDEX],
}


def upgrade(conn: sqlite3.Connection, version: int) -> None:
    """Bring a database written by an older objfs up to SCHEMA_VERSION, in one
    transaction per step (a crash leaves it at a version, never between)."""
    while version < SCHEMA_VERSION:
        if version not in UPGRADES:
            raise SchemaError(f"schema version {version} has no upgrade path")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in UPGRADES[version]:
                conn.execute(statement)
            version += 1
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def open_db(path: Path | str, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """Open (creating if new) the metadata database at ``path``."""
    conn = connect(path, check_same_thread=check_same_thread)
    try:
        version = schema_version(conn)
        if version is None:
            create_schema(conn)
        elif version > SCHEMA_VERSION:
            raise SchemaError(
                f"{path}: schema version {version} is newer than this objfs "
                f"understands ({SCHEMA_VERSION}); upgrade objfs")
        elif version < SCHEMA_VERSION:
            upgrade(conn, version)
    except BaseException:
        conn.close()
        raise
    return conn
