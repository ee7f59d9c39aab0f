"""The data node's local-disk store of immutable block objects.

How this works
--------------
Layout under the state folder (see docs/DESIGN.md, "Data node HTTP API")::

    objects/ab/cd/<oid>   stored objects, fanned out by the first 2 + 2 hex digits
    tmp/                  uploads in progress; emptied when the store opens
    quarantine/           objects found corrupt, kept for inspection
    node_id               the node's stable id (see ``load_node_id``)

A put is durable before it returns: the object is written to ``tmp/``,
fsynced, renamed to its final name, and the directory is fsynced (new
fan-out directories are fsynced into their parents too).  An object is
written once and never changed: re-putting identical bytes is a no-op,
different bytes under the same id are refused (``ObjectExists``).  Every
read is verified with ``blockformat.verify``; an object that fails is moved
to ``quarantine/`` and ``CorruptedObject`` is raised, so corrupt bytes are
never served.  ``verify`` does the same full check for the data node's
background scrub.

Every object id quarantined (by any read, a put's check or the scrub) is
added to ``lost``, a bounded ``LostCopies`` set: copies this node no longer
has, to be reported to the metadata node.  The data node removes ids once a
heartbeat carrying them succeeded; a put that re-stores an object removes
its id too (repair put a good copy back).  At open the set is seeded from
``quarantine/`` (files named ``{oid}.{time_ns}``), skipping ids whose object
is stored again, so a restarted node still reports what it lost.

The object count and bytes used are counted once at open (one walk) and
then kept up to date by put, delete and quarantine under one lock; the lock
also makes "check for an existing object, then rename" atomic between
threads.  All methods are plain blocking code: the server calls them via
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import errno
import itertools
import logging
import mmap
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from . import blockformat, buffers
from .buffers import Bytes
from .blockformat import CorruptedObject
from .ids import NodeId, ObjectId, is_object_id, parse_node_id

__all__ = ["ObjectStore", "StoreStats", "LostCopies", "StoreError", "NoSuchObject",
           "ObjectExists", "StoreFull", "BadFraming", "CorruptedObject", "QuarantinedObject",
           "NodeIdMismatch", "load_node_id"]

log = logging.getLogger(__name__)

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
LOST_MAX = 10_000           # most lost ids remembered until they are reported
DIRECT_ALIGN = 4096         # O_DIRECT: offsets, lengths and addresses in whole pages
DIRECT_MIN = 256 * 1024     # smaller objects are written through the page cache


class StoreError(Exception):
    """Base of the store's own errors (``CorruptedObject`` comes from blockformat)."""


class NoSuchObject(StoreError):
    """No object is stored under that id."""


class NoSuchPieces(StoreError):
    """The object has fewer pieces than the first one asked for."""


class ObjectExists(StoreError):
    """A different object is already stored under that id."""


class StoreFull(StoreError):
    """The disk is full or free space is below the reserve."""


class BadFraming(CorruptedObject):
    """The bytes do not even parse as an object header (a client error)."""


class QuarantinedObject(CorruptedObject):
    """A stored object failed verification and was moved to quarantine/."""


class NodeIdMismatch(StoreError):
    """The node id asked for differs from the one kept in the state folder."""


@dataclass(frozen=True)
class StoreStats:
    capacity: int   # bytes of the file system holding the store
    free: int       # bytes available to us on that file system
    used: int       # bytes of stored objects
    objects: int    # number of stored objects


class LostCopies:
    """Ids of objects this node lost (quarantined), oldest first, at most ``cap``.

    Thread-safe.  When full, further ids are not remembered (a warning says
    so); their files stay in ``quarantine/``, so the next start reports them.
    """

    def __init__(self, cap: int = LOST_MAX) -> None:
        self.cap = cap
        self._ids: dict[ObjectId, None] = {}     # insertion ordered
        self._lock = threading.Lock()
        self._warned = False

    def add(self, oid: ObjectId) -> None:
        with self._lock:
            if oid in self._ids or len(self._ids) < self.cap:
                self._ids[oid] = None
                return
            warn, self._warned = not self._warned, True
        if warn:
            log.warning("more than %d lost objects unreported; %s and later ones "
                        "are reported after the next restart", self.cap, oid)

    def discard(self, oid: ObjectId) -> None:
        with self._lock:
            self._ids.pop(oid, None)

    def forget(self, oids: Iterable[ObjectId]) -> None:
        """Drop ids the metadata node has been told about."""
        with self._lock:
            for oid in oids:
                self._ids.pop(oid, None)
            if not self._ids:
                self._warned = False

    def pending(self, limit: int) -> list[ObjectId]:
        """Up to ``limit`` ids, oldest first."""
        with self._lock:
            return list(itertools.islice(self._ids, limit))

    def __len__(self) -> int:
        return len(self._ids)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdir_durable(path: Path) -> None:
    """Create ``path`` (one level) if missing and make the new entry durable."""
    try:
        os.mkdir(path)
    except FileExistsError:
        return
    _fsync_dir(path.parent)


def _write_durable(path: Path, data: Bytes) -> None:
    """Create ``path`` (must not exist) holding ``data``, fsynced.  Of a
    page-aligned buffer (an ``mmap``: what the data node receives a PUT's
    body into) the whole pages are written with O_DIRECT where the
    filesystem allows it: the kernel writes them to disk straight from the
    buffer.  Through the page cache each byte was copied once more, and
    that copy (allocating, accounting and writing back the cache's pages)
    cost a data node 0.8-2 ms of CPU per MiB, against 0.1 with O_DIRECT:
    with three copies of every block on one machine it was the largest
    single cost of a sequential write."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with memoryview(data) as view:
            done = _write_direct(path, view) if isinstance(data, mmap.mmap) else 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], done)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_direct(path: Path, view: memoryview) -> int:
    """Read the whole pages at the start of the file ``path`` into ``view``
    (page-aligned, as long as the file) with O_DIRECT; how many bytes were
    read (see ``_direct``)."""
    return _direct(path, view, os.O_RDONLY,
                   lambda fd, part, at: os.preadv(fd, [part], at))


def _write_direct(path: Path, view: memoryview) -> int:
    """Write the whole pages at the start of ``view`` (page-aligned) into
    the empty file ``path`` with O_DIRECT; how many bytes were written (see
    ``_direct``)."""
    return _direct(path, view, os.O_WRONLY, os.pwrite)


def _direct(path: Path, view: memoryview, mode: int,
            transfer: Callable[[int, memoryview, int], int]) -> int:
    """Move the whole pages at the start of ``view`` to or from ``path``
    with O_DIRECT, ``transfer(fd, part, offset)`` at a time; the bytes
    moved: 0 if the filesystem refuses O_DIRECT (tmpfs and others) or the
    span is short, fewer if it stopped at an unaligned point.  The caller
    moves the rest through the page cache."""
    length = len(view) // DIRECT_ALIGN * DIRECT_ALIGN
    if length < DIRECT_MIN or not hasattr(os, "O_DIRECT"):
        return 0
    try:
        fd = os.open(path, mode | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return 0
        raise
    done = 0
    try:
        while done < length and done % DIRECT_ALIGN == 0:
            try:
                n = transfer(fd, view[done:length], done)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    break
                raise
            if n == 0:
                break
            done += n
    finally:
        os.close(fd)
    return done


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``; CorruptedObject if the file ends first."""
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise CorruptedObject(f"object file ends at {offset + len(data)}")
        data += more
    return data


def _sorted_entries(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []               # vanished meanwhile, or a stray file in the fan-out


def load_node_id(state: Path, wanted: str | None) -> NodeId:
    """The node id kept in ``state/node_id``, created at first start.

    The first start stores ``wanted`` (or a random id); later starts refuse
    a ``wanted`` id that differs from the stored one.
    """
    path = state / "node_id"
    if path.exists():
        stored = parse_node_id(path.read_text().strip())
        if wanted is not None and wanted != stored:
            raise NodeIdMismatch(
                f"--node-id {wanted} differs from {stored} stored in {path}")
        return stored
    node_id = parse_node_id(wanted if wanted is not None else secrets.token_hex(8))
    state.mkdir(parents=True, exist_ok=True)
    tmp = state / f"node_id.{secrets.token_hex(4)}.tmp"
    _write_durable(tmp, f"{node_id}\n".encode())
    os.rename(tmp, path)
    _fsync_dir(state)
    return node_id


class ObjectStore:
    """Immutable objects in a folder; see the module docstring."""

    def __init__(self, root: Path, *, reserve_bytes: int = 0) -> None:
        self.root = root
        self.reserve_bytes = reserve_bytes
        self._objects = root / "objects"
        self._tmp = root / "tmp"
        self._quarantine = root / "quarantine"
        self._lock = threading.RLock()   # quarantine may run inside put's section
        for folder in (root, self._objects, self._tmp, self._quarantine):
            folder.mkdir(parents=True, exist_ok=True)
        self._empty_tmp()
        self._count, self._used = self._scan()
        self._corrupt_found = 0
        self.lost = LostCopies()
        self._seed_lost()

    # -- opening ---------------------------------------------------------

    def _empty_tmp(self) -> None:
        for entry in _sorted_entries(self._tmp):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)

    def _scan(self) -> tuple[int, int]:
        count = used = 0
        for entry in self._walk(""):
            count += 1
            used += entry.stat().st_size
        return count, used

    def _seed_lost(self) -> None:
        """Ids quarantined earlier whose object is not stored again."""
        for entry in _sorted_entries(self._quarantine):
            oid = entry.name.rsplit(".", 1)[0]     # a shard id has a dot too
            if is_object_id(oid) and not self._path(ObjectId(oid)).exists():
                self.lost.add(ObjectId(oid))

    # -- naming ----------------------------------------------------------

    def _path(self, oid: ObjectId) -> Path:
        if not is_object_id(oid):
            raise ValueError(f"malformed object id {oid[:80]!r}")
        return self._objects / oid[:2] / oid[2:4] / oid

    def _walk(self, after: str) -> Iterator[os.DirEntry[str]]:
        """Stored objects with id > ``after``, in id order, one folder at a time."""
        for top in _sorted_entries(self._objects):
            if top.name < after[:2]:
                continue
            for mid in _sorted_entries(Path(top.path)):
                if top.name + mid.name < after[:4]:
                    continue
                for entry in _sorted_entries(Path(mid.path)):
                    if entry.name > after and is_object_id(entry.name):
                        yield entry

    # -- writing ---------------------------------------------------------

    def put(self, oid: ObjectId, obj: Bytes, header: blockformat.Header | None = None) -> bool:
        """Store ``obj`` durably; True if created, False if already identical.
        ``header``: what ``check_object(obj)`` gave, if the caller checked it."""
        path = self._path(oid)
        if header is None:
            header = check_object(obj)
        if self._holds_same(oid, path, header):
            return False
        self._ensure_space(len(obj))
        tmp = self._tmp / f"{oid}.{secrets.token_hex(4)}"
        try:
            self._write_tmp(tmp, obj)
            self._make_fanout(path.parent)
            with self._lock:
                if self._holds_same(oid, path, header):
                    return False
                os.rename(tmp, path)
                self._count += 1
                self._used += len(obj)
                self.lost.discard(oid)      # a good copy is back
            _fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _holds_same(self, oid: ObjectId, path: Path, header: blockformat.Header) -> bool:
        """Is this very object stored already?  ObjectExists if another one is.

        A stored copy that fails verification is quarantined, so a re-put
        repairs it.
        """
        try:
            _, stored = self._load(oid, path)
        except (NoSuchObject, CorruptedObject):
            return False
        if stored.checksum != header.checksum or stored.stored_length != header.stored_length:
            raise ObjectExists(f"a different object {oid} is already stored")
        return True

    def _ensure_space(self, size: int) -> None:
        st = os.statvfs(self.root)
        if st.f_bavail * st.f_frsize - size < self.reserve_bytes:
            raise StoreFull("free disk space is below the reserve")

    def _write_tmp(self, tmp: Path, obj: Bytes) -> None:
        try:
            _write_durable(tmp, obj)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise StoreFull(f"disk full: {exc.strerror}") from exc
            raise

    def _make_fanout(self, leaf: Path) -> None:
        try:
            _mkdir_durable(leaf.parent)
            _mkdir_durable(leaf)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise StoreFull(f"disk full: {exc.strerror}") from exc
            raise

    def delete(self, oid: ObjectId) -> bool:
        """Remove the object; False if there was none.  Not made durable
        (no fsync of its folder): an object a crash brings back is one no
        block map names any more (object ids are never used twice), which
        the orphan scan deletes again; the fsync cost the data nodes a
        third of their time while a removed tree's objects were collected
        during an untar."""
        path = self._path(oid)
        with self._lock:
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                return False
            self._count -= 1
            self._used -= size
        return True

    # -- reading ---------------------------------------------------------

    def get(self, oid: ObjectId) -> Bytes:
        """The whole object, verified; NoSuchObject or CorruptedObject."""
        obj, _ = self._load(oid, self._path(oid))
        return obj

    def get_unverified(self, oid: ObjectId) -> Bytes:
        """The whole object as stored, not checked (for a reader that checks
        it, see datanode._get); NoSuchObject."""
        return self._read(self._path(oid))

    def get_pieces(self, oid: ObjectId, first: int, last: int) -> Bytes:
        """Header, piece table and the stored bytes of pieces ``first`` ..
        ``last`` (or the last there is) of a format 2 object, the pieces
        not checked: the reader checks them (``blockformat.decode_range``).
        A format 1 object comes whole, not checked either.  A header or
        table that fails its check is checked the full way (``get``), which
        puts a bad object aside.  NoSuchObject, NoSuchPieces."""
        path = self._path(oid)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise NoSuchObject(oid) from None
        try:
            head = os.pread(fd, blockformat.HEAD_BYTES, 0)
            try:
                header = blockformat.parse_header(head)
                if header.version != blockformat.VERSION_PIECES:
                    return self._read(path)
                if os.fstat(fd).st_size != header.stored_length:
                    raise CorruptedObject("object file length differs from its header")
                head += _pread_all(fd, header.payload_offset - len(head), len(head))
                table = blockformat.read_table(header, head)
            except CorruptedObject:
                return self.get(oid)
            if not 0 <= first < header.pieces:
                raise NoSuchPieces(f"{oid} has {header.pieces} pieces, not {first}")
            start, end = blockformat.piece_span(header, table, first,
                                                min(last, header.pieces - 1))
            return head[:header.payload_offset] + _pread_all(fd, end - start, start)
        finally:
            os.close(fd)

    def verify(self, oid: ObjectId) -> None:
        """Read and verify the whole object (the scrub): as ``get``, without the bytes."""
        self._load(oid, self._path(oid))

    def _load(self, oid: ObjectId, path: Path) -> tuple[Bytes, blockformat.Header]:
        """The object at ``path`` and its header; quarantined if it fails verification."""
        obj = self._read(path)
        try:
            return obj, blockformat.verify(memoryview(obj))
        except CorruptedObject as exc:
            raise self._quarantine_file(oid, path, exc) from exc

    def _read(self, path: Path) -> Bytes:
        """The whole file, read into a buffer (``buffers.scratch``, overwritten whole):
        its whole pages with O_DIRECT where the filesystem allows (objects
        are written so too: through the page cache a cold read cost a data
        node as much CPU per MiB as a write did), the rest through the page
        cache."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise NoSuchObject(path.name) from None
        try:
            size = os.fstat(fd).st_size
            buf = buffers.scratch(size)
            with memoryview(buf) as view:
                done = _read_direct(path, view) if isinstance(buf, mmap.mmap) else 0
                while done < size:
                    n = os.preadv(fd, [view[done:]], done)
                    if n == 0:
                        raise CorruptedObject(f"object file shrank to {done} bytes while read")
                    done += n
            return buf
        finally:
            os.close(fd)

    def head(self, oid: ObjectId) -> tuple[int, bytes]:
        """(stored size, checksum) from the header alone, without reading the payload."""
        path = self._path(oid)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(blockformat.HEAD_BYTES)
        except FileNotFoundError:
            raise NoSuchObject(oid) from None
        try:
            header = blockformat.parse_header(head)
        except CorruptedObject as exc:
            raise self._quarantine_file(oid, path, exc) from exc
        return size, header.checksum

    def list(self, after: str = "", limit: int = 1000) -> tuple[list[tuple[ObjectId, int]], bool]:
        """Up to ``limit`` (oid, size) with oid > ``after`` in oid order, and whether more follow."""
        found: list[tuple[ObjectId, int]] = []
        for entry in self._walk(after):
            if len(found) == limit:
                return found, True
            try:
                found.append((ObjectId(entry.name), entry.stat().st_size))
            except FileNotFoundError:
                continue            # deleted while we walked
        return found, False

    def stats(self) -> StoreStats:
        st = os.statvfs(self.root)
        with self._lock:
            return StoreStats(capacity=st.f_blocks * st.f_frsize,
                              free=st.f_bavail * st.f_frsize,
                              used=self._used, objects=self._count)

    @property
    def object_count(self) -> int:
        return self._count

    @property
    def corrupt_found(self) -> int:
        """Objects found corrupt (and quarantined) since the store was opened."""
        return self._corrupt_found

    # -- quarantine ------------------------------------------------------

    def _quarantine_file(self, oid: ObjectId, path: Path,
                         cause: CorruptedObject) -> QuarantinedObject:
        """Move a corrupt object out of the store (kept for inspection); the error to raise."""
        target = self._quarantine / f"{oid}.{time.time_ns()}"
        with self._lock:
            try:
                size = path.stat().st_size
                os.rename(path, target)
            except FileNotFoundError:
                return QuarantinedObject(f"{oid}: {cause}")   # moved or deleted meanwhile
            self._count -= 1
            self._used -= size
            self._corrupt_found += 1
            self.lost.add(oid)
        log.error("object %s is corrupt (%s); moved to %s", oid, cause, target)
        _fsync_dir(path.parent)
        return QuarantinedObject(f"{oid}: {cause}")


def check_object(obj: Bytes) -> blockformat.Header:
    """Header of a whole object; BadFraming if it does not parse,
    CorruptedObject if its length or checksum does not match."""
    try:
        blockformat.parse_header(memoryview(obj))
    except CorruptedObject as exc:
        raise BadFraming(str(exc)) from exc
    return blockformat.verify(memoryview(obj))
