"""The mount's own metadata cache: attributes and names it holds leases for.

The kernel caches attributes and dentries for as long as we tell it (the
lease time left), but it asks again after every write, on every ``stat``
once that time is up, and it never caches extended attributes.  This cache
answers those requests without a round trip to the metadata node, and only
while the lease that covers the answer is held (docs/LEASES.md):

* ``attr(ino)``: the inode's attributes, under a lease on the inode;
* ``entry(parent, name)``: the inode a name points to (0: no such name),
  under a lease on the directory;
* ``listing(dir)``: a directory's whole listing, under a lease on it;
* ``parent_of(dir)``: a directory's parent, under a lease on the directory
  (only a rename of it changes that, and the rename recalls the lease);
* ``take_map(ino, view)``: the block map (inline data of a small file
  among it) a closed file had when its last handle here closed, under a
  lease on the file: reading it again after the kernel dropped its pages
  needs no round trip.  Bounded by ``max_map_bytes``.

A directory whose every name is known (a whole listing was read, or this
mount made it) answers a lookup of any other name with "absent" at once:
`tar -x` and `cp -r` look up every name before creating it.  This mount's
own ops keep it whole (the caller records each name it adds or removes); a
name the caller cannot record (``drop_entry``), another client's change
(the lease is recalled first) or an unknown outcome ends it.

It is filled from answers that came with leases (lookup, getattr, readdir
and the ops that return attributes) and emptied of an inode when its lease
is recalled or lost, when an op of this mount changed it (the node names
the inodes each op touched), and when an op's outcome is unknown.  Another
client's change always recalls the lease first, so nothing here outlives
the truth.  It is bounded: the least recently stored inodes go first.

Answers overtake each other: a getattr sent before this mount's own
truncate may be answered after it.  So every drop of an inode is stamped
with a clock, and an answer is stored only if nothing of what it covers was
dropped after it was sent (``since``, from ``stamp()`` at sending).  An op's
own answer is stored only if its own drop is the only one since it was
sent (``put_own``).  Drops only happen under a lease, so an answer is also
refused if the lease on its inode began after it was sent (``began``): it
may have been read at the node before another client's change that this
mount, holding no lease then, was never told of (a read access recorded
without a lease, answered after a new open took one).  An answer that came
with the very lease now held (``leased=True``) was read together with its
grant and is stored whenever it began.

Across mounts: at unmount the cache is written to a SQLite file in the
mount's cache folder (``save``); the next mount reads it back (``load``) and
asks the metadata node, a few thousand inodes per round trip, which of them
are unchanged (``revalidate``, granting READ leases on them).  What is
unchanged is served at once; a directory whose version (ctime among it) is
unchanged has unchanged entries, so its listing is kept too.  A file lock
keeps two mounts sharing a cache folder from using one file at once.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import sqlite3
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import msgpack

log = logging.getLogger(__name__)

MAX_INODES = 200_000
MAX_NAMES = 400_000
MAX_MARKS = 100_000
MAX_MAP_BYTES = 16 << 20        # block maps kept of closed files (inline data among them)
SCHEMA = 1

Row = tuple[int, bytes, int]            # (cursor, name, ino) of one directory entry


class MetaCache:
    def __init__(self, valid: Callable[[int], bool], *, max_inodes: int = MAX_INODES,
                 max_names: int = MAX_NAMES, max_map_bytes: int = MAX_MAP_BYTES) -> None:
        self.valid = valid              # does this mount hold a lease on the inode now?
        self.max_inodes = max_inodes
        self.max_names = max_names
        self.max_map_bytes = max_map_bytes
        # closed file -> (its size, its block map, the map's bytes)
        self.maps: OrderedDict[int, tuple[Any, Any, int]] = OrderedDict()
        self.map_bytes = 0
        self.attrs: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self.entries: dict[int, dict[bytes, int]] = {}
        self.listings: dict[int, list[Row]] = {}
        self.placed: dict[int, int] = {}    # listing -> its first row without a cursor
        self.whole: set[int] = set()    # directories whose every name is in entries
        self.parents: dict[int, int] = {}   # directory -> its parent (for "..")
        self.names = 0
        self.hits = 0
        self.misses = 0
        self.clock = 0                                  # counts drops
        # ino -> (last drop, drops so far, when the lease held now began)
        self.marks: OrderedDict[int, tuple[int, int, int]] = OrderedDict()
        self.floor = 0          # answers sent before this are never stored

    # ---- which answers may be stored
    def stamp(self) -> int:
        """Take before sending a request whose answer may be stored."""
        return self.clock

    def drops(self, ino: int) -> int:
        return self.marks.get(ino, (0, 0, 0))[1]

    def fresh(self, ino: int, since: int, leased: bool = False) -> bool:
        """May an answer about ``ino`` sent at ``since`` be stored?  (With
        ``leased``: it came with the lease held now.)"""
        last, _, began = self.marks.get(ino, (0, 0, 0))
        return since >= self.floor and last <= since and (leased or began <= since)

    def lease_began(self, ino: int) -> int:
        return self.marks.get(ino, (0, 0, 0))[2]

    def began(self, ino: int) -> None:
        """A new lease on ``ino`` is held from now (see ``fresh``)."""
        last, count, _ = self.marks.get(ino, (0, 0, 0))
        self._set_mark(ino, (last, count, self.clock + 1))

    def _mark(self, ino: int) -> None:
        _, count, began = self.marks.get(ino, (0, 0, 0))
        self._set_mark(ino, (self.clock + 1, count + 1, began))

    def _set_mark(self, ino: int, mark: tuple[int, int, int]) -> None:
        self.clock += 1
        self.marks[ino] = mark
        self.marks.move_to_end(ino)
        while len(self.marks) > MAX_MARKS:
            _, (last, _, began) = self.marks.popitem(last=False)
            self.floor = max(self.floor, last, began)

    # ---- reading
    def attr(self, ino: int) -> dict[str, Any] | None:
        a = self.attrs.get(ino)
        if a is None or not self.valid(ino):
            self.misses += 1
            return None
        self.hits += 1
        return a

    def holds_attr(self, ino: int, a: dict[str, Any]) -> bool:
        """Is ``a`` (this very answer) what is kept for ``ino``, and served?"""
        return self.attrs.get(ino) is a and self.valid(ino)

    def entry(self, parent: int, name: bytes) -> int | None:
        """The inode ``name`` in ``parent`` points to, 0 if it is known to be
        absent, None when this cache cannot say."""
        if not self.valid(parent):
            return None
        names = self.entries.get(parent)
        found = None if names is None else names.get(name)
        if found is None and parent in self.whole:
            return 0
        return found

    def knows_all(self, ino: int) -> bool:
        """Is every name in directory ``ino`` known (absent ones too)?"""
        return self.valid(ino) and ino in self.whole

    def known_empty(self, ino: int) -> bool:
        """Is directory ``ino`` known to have no entries (every name known)?"""
        return self.valid(ino) and ino in self.whole \
            and not any(self.entries.get(ino, {}).values())

    def parent_of(self, ino: int) -> int | None:
        """The parent of directory ``ino``, if known (it changes only by a
        rename of ``ino``, which recalls the lease on it)."""
        return self.parents.get(ino) if self.valid(ino) else None

    def listing(self, ino: int) -> list[Row] | None:
        """Every entry of directory ``ino`` in cursor order, if known."""
        rows = self.listings.get(ino)
        if rows is None or not self.valid(ino) or any(c == 0 for c, _, _ in rows):
            return None
        return rows

    def grow_listing(self, parent: int, rows: list[Row] | None, name: bytes, ino: int) -> None:
        """This mount added ``name`` (``ino``) to ``parent``, whose listing was
        ``rows`` (None: not known) before: the listing stays known, the new
        entry's cursor unknown (0: not served) until the node's answer
        brings it (``place_entry``).  Only under the lease on ``parent``."""
        if rows is not None and self.valid(parent) and len(rows) < self.max_names // 4:
            if not rows or rows[-1][0]:
                self.placed[parent] = len(rows)         # the first without a cursor
            rows.append((0, name, ino))           # (no one else holds the list)
            self.listings[parent] = rows

    def place_entry(self, parent: int, name: bytes, ino: int, cursor: int) -> None:
        """The node gave ``name`` in ``parent`` this ``cursor``.  Answers come
        in the order the creates were queued, so it is the first entry still
        without one (looked for from there on otherwise: a listing of
        thousands of entries made here was quadratic)."""
        rows = self.listings.get(parent)
        if rows is None:
            return
        first = min(self.placed.get(parent, 0), len(rows))
        for i in itertools.chain(range(first, len(rows)), range(first)):
            c, n, child = rows[i]
            if c == 0 and n == name and child == ino:
                rows[i] = (cursor, name, ino)
                if i and rows[i - 1][0] > cursor:
                    rows.sort(key=lambda row: row[0] if row[0] else 1 << 62)
                if i == first:
                    self.placed[parent] = first + 1
                return

    def take_map(self, ino: int, view: Any) -> Any | None:
        """The block map kept for file ``ino`` if it still holds (the lease
        on it held since, and the file still as ``view`` says: its size and
        times on the metadata node); it is handed over, no longer kept here."""
        kept = self._drop_map(ino)
        if kept is None or kept[0] != view or not self.valid(ino):
            return None
        return kept[1]

    # ---- filling (call after the lease that came with the answer was noted)
    def put_map(self, ino: int, view: Any, spans: Any, nbytes: int) -> None:
        """Keep the block map of file ``ino`` as it stands committed (when
        the file was as ``view`` says) now that no handle of this mount has
        it open."""
        self._drop_map(ino)
        if not self.valid(ino) or nbytes > self.max_map_bytes:
            return
        self.maps[ino] = (view, spans, nbytes)
        self.map_bytes += nbytes
        while self.map_bytes > self.max_map_bytes:
            _, (_, _, dropped) = self.maps.popitem(last=False)
            self.map_bytes -= dropped

    def _drop_map(self, ino: int) -> tuple[Any, Any, int] | None:
        kept = self.maps.pop(ino, None)
        if kept is not None:
            self.map_bytes -= kept[2]
        return kept

    def put_attr(self, ino: int, a: dict[str, Any], since: int, leased: bool = False) -> None:
        if not self.fresh(ino, since, leased) or not self.valid(ino):
            return
        self._store(ino, a)

    def put_own(self, ino: int, a: dict[str, Any], since: int, drops_before: int,
                leased: bool = False) -> None:
        """An op's answer about the inode it changed: stored when the op's own
        drop (see ``touched``) is the only one since it was sent (and the
        lease began before, unless the answer came with it)."""
        if since < self.floor or self.drops(ino) != drops_before + 1 or not self.valid(ino):
            return
        if not leased and self.lease_began(ino) > since:
            return
        self._store(ino, a)

    def _store(self, ino: int, a: dict[str, Any]) -> None:
        self.attrs[ino] = a
        self.attrs.move_to_end(ino)
        while len(self.attrs) > self.max_inodes:
            self.attrs.popitem(last=False)

    def put_entry(self, parent: int, name: bytes, ino: int, since: int,
                  leased: bool = False) -> None:
        if not self.fresh(parent, since, leased) or not self.valid(parent):
            return
        names = self.entries.setdefault(parent, {})
        if name not in names:
            self.names += 1
        names[name] = ino
        if self.names > self.max_names:
            self.entries.clear()
            self.whole.clear()
            self.names = 0

    def put_parent(self, ino: int, parent: int, since: int, leased: bool = False) -> None:
        if not self.fresh(ino, since, leased) or not self.valid(ino):
            return
        if len(self.parents) >= self.max_inodes:
            self.parents.clear()
        self.parents[ino] = parent

    def put_listing(self, ino: int, rows: list[Row], since: int, leased: bool = False) -> None:
        if not self.fresh(ino, since, leased) or not self.valid(ino) \
                or len(rows) > self.max_names // 4:
            return
        self.listings[ino] = rows
        for _, name, child in rows:
            self.put_entry(ino, name, child, since, leased)
        names = self.entries.get(ino, {})
        if all(name in names for _, name, _ in rows):    # none dropped over the bound
            self.whole.add(ino)

    def put_new_directory(self, ino: int) -> None:
        """A directory this mount just made (and holds a lease on): empty."""
        self.put_listing(ino, [], self.stamp())

    def drop_entry(self, parent: int, name: bytes) -> None:
        self.listings.pop(parent, None)
        self.whole.discard(parent)
        names = self.entries.get(parent)
        if names is not None and names.pop(name, None) is not None:
            self.names -= 1

    def removing(self, parent: int, name: bytes) -> Callable[[], None]:
        """Before an op of this mount that takes ``name`` out of ``parent``
        (unlink, rmdir, rename): the name is unknown until the op is
        answered.  Call what this returns once it succeeded: the name is
        then known absent, and a directory that was whole is whole again if
        the op's own change (``touched``) is all that happened to it."""
        since, drops = self.stamp(), self.drops(parent)
        was_whole = parent in self.whole
        self.drop_entry(parent, name)

        def removed() -> None:
            self.put_entry(parent, name, 0, self.stamp())
            if (was_whole and since >= self.floor and self.drops(parent) == drops + 1
                    and self.lease_began(parent) <= since
                    and parent in self.entries and self.valid(parent)):
                self.whole.add(parent)
        return removed

    # ---- emptying
    def touched(self, inos: list[int], attrs: Sequence[dict[str, Any]] = (),
                since: int = -1, *, entries: bool = True, blocks: bool = True) -> None:
        """An op of this mount, sent at ``since``, changed these inodes'
        attributes (and, if ``entries``, a directory's entries, which the
        caller then updates: it knows the op; if ``blocks``, maybe a file's
        block map).  ``attrs``: the new
        attributes of some of them, read after the op; each is kept if
        nothing else dropped its inode since the op was sent (then no other
        change crossed the answer)."""
        keep = [a for a in attrs if a["ino"] in inos and self.fresh(a["ino"], since)]
        for ino in dict.fromkeys(inos):
            self._mark(ino)
            self.attrs.pop(ino, None)
            if blocks:
                self._drop_map(ino)
            if entries:
                self.listings.pop(ino, None)
                self.parents.pop(ino, None)
        for a in keep:
            if self.valid(a["ino"]):
                self._store(a["ino"], a)

    def forget(self, ino: int) -> None:
        """The lease on ``ino`` is gone: its attributes and its entries."""
        self._mark(ino)
        self.attrs.pop(ino, None)
        self._drop_map(ino)
        self.listings.pop(ino, None)
        self.parents.pop(ino, None)
        self.whole.discard(ino)
        names = self.entries.pop(ino, None)
        if names is not None:
            self.names -= len(names)

    def clear(self) -> None:
        self.clock += 1
        self.floor = self.clock
        self.marks.clear()
        self.attrs.clear()
        self.maps.clear()
        self.map_bytes = 0
        self.entries.clear()
        self.listings.clear()
        self.parents.clear()
        self.whole.clear()
        self.names = 0

    # ---- across mounts
    def save(self, store: "CacheFile") -> int:
        """Write what is valid now; the number of inodes written."""
        attrs = [(ino, a) for ino, a in self.attrs.items() if self.valid(ino)]
        listings = [(ino, rows) for ino, rows in self.listings.items()
                    if self.valid(ino) and all(c for c, _, _ in rows)]
        store.write(attrs, listings)
        return len(attrs)

    def load(self, saved: "Saved", answers: list[Any], since: int,
             leased: Callable[[int], bool] = lambda ino: False) -> None:
        """Take back what the node said is unchanged (1) or sent fresh (a
        map); the leases that came with the answers must be noted first
        (``leased(ino)``: the one held now came with its answer)."""
        for (ino, a), answer in zip(saved.attrs, answers):
            if answer == 1:
                self.put_attr(ino, a, since, leased(ino))
            elif isinstance(answer, dict):
                self.put_attr(ino, answer, since, leased(ino))
            if answer == 1 and ino in saved.listings:
                self.put_listing(ino, saved.listings[ino], since, leased(ino))


class Saved:
    """What an earlier mount left: attrs by inode and directory listings."""

    def __init__(self, attrs: list[tuple[int, dict[str, Any]]],
                 listings: dict[int, list[Row]]) -> None:
        self.attrs = attrs
        self.listings = listings

    def chunks(self, size: int) -> Iterator["Saved"]:
        for i in range(0, len(self.attrs), size):
            yield Saved(self.attrs[i:i + size], self.listings)


class CacheFile:
    """The SQLite file one mount keeps its metadata cache in between mounts.
    ``open`` returns None when another mount holds it (or it is unusable)."""

    def __init__(self, conn: sqlite3.Connection, lock_fd: int) -> None:
        self.conn = conn
        self.lock_fd = lock_fd

    @classmethod
    def open(cls, path: Path, identity: str) -> "CacheFile | None":
        try:
            lock_fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            log.warning("metadata cache %s unusable: %s", path, exc)
            return None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            log.info("metadata cache %s in use by another mount; not kept", path)
            return None
        try:
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("PRAGMA journal_mode=DELETE")
            cls._prepare(conn, identity)
        except sqlite3.Error as exc:       # corrupt: start afresh
            log.warning("metadata cache %s unreadable (%s); starting afresh", path, exc)
            path.unlink(missing_ok=True)
            try:
                conn = sqlite3.connect(path, isolation_level=None)
                cls._prepare(conn, identity)
            except sqlite3.Error as exc2:
                log.warning("metadata cache %s unusable: %s", path, exc2)
                os.close(lock_fd)
                return None
        return cls(conn, lock_fd)

    @staticmethod
    def _prepare(conn: sqlite3.Connection, identity: str) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)")
        conn.execute("CREATE TABLE IF NOT EXISTS attrs (ino INTEGER PRIMARY KEY, a BLOB)")
        conn.execute("CREATE TABLE IF NOT EXISTS listings (ino INTEGER PRIMARY KEY, rows BLOB)")
        found = dict(conn.execute("SELECT key, value FROM meta"))
        if found != {"schema": SCHEMA, "identity": identity}:
            # another volume, cluster or format: what is there means nothing
            conn.execute("BEGIN")
            conn.execute("DELETE FROM attrs")
            conn.execute("DELETE FROM listings")
            conn.execute("DELETE FROM meta")
            conn.executemany("INSERT INTO meta VALUES (?, ?)",
                             [("schema", SCHEMA), ("identity", identity)])
            conn.execute("COMMIT")

    def read(self) -> Saved:
        try:
            attrs = [(ino, msgpack.unpackb(blob, raw=False))
                     for ino, blob in self.conn.execute("SELECT ino, a FROM attrs")]
            listings = {ino: [(c, bytes(n), i) for c, n, i in msgpack.unpackb(blob, raw=False)]
                        for ino, blob in self.conn.execute("SELECT ino, rows FROM listings")}
        except (sqlite3.Error, ValueError, TypeError) as exc:
            log.warning("metadata cache unreadable (%s); starting afresh", exc)
            return Saved([], {})
        return Saved([(ino, a) for ino, a in attrs if isinstance(a, dict)], listings)

    def write(self, attrs: list[tuple[int, dict[str, Any]]],
              listings: list[tuple[int, list[Row]]]) -> None:
        try:
            self.conn.execute("BEGIN")
            self.conn.execute("DELETE FROM attrs")
            self.conn.execute("DELETE FROM listings")
            self.conn.executemany("INSERT INTO attrs VALUES (?, ?)",
                                  [(ino, msgpack.packb(a)) for ino, a in attrs])
            self.conn.executemany("INSERT INTO listings VALUES (?, ?)",
                                  [(ino, msgpack.packb(rows, use_bin_type=True))
                                   for ino, rows in listings])
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.warning("could not save the metadata cache: %s", exc)
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")

    def close(self) -> None:
        self.conn.close()
        os.close(self.lock_fd)
