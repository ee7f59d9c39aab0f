"""The FUSE operations of an objfs mount.

How this works
--------------
Every handler is an ``@fuse_op``: the one boundary where the errors of the
layers below (``MetaError`` with an errno, node and data failures, bugs)
become ``FUSEError``; pyfuse3 ends the mount on any other exception.

Namespace operations go to the metadata node, one atomic operation each.
File data goes through ``FileData`` (buffered writes, committed block maps,
shared clean cache).  ``files`` holds the FileData of every inode open in
this mount; it is kept while any handle is open or data is unflushed, and
its size and mtime override the metadata node's in ``getattr`` while writes
are buffered.  ``fsync`` commits buffered data; a close commits it just
after it returns (``close_behind``: others see it from the close on, through
the recall of the WRITE lease), which gives close-to-open consistency.

An unlinked file that is still open here stays on the metadata node as an
orphan (the unlink names the open inodes); the last ``release`` purges it.
"""

from __future__ import annotations

import bisect
import collections
import errno
import functools
import itertools
import logging
import os
import stat
import time
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import pyfuse3
import trio

from storagenode.dataclient import NodeError

from storagenode.metaclient import BadRequest, MetaClient, MetaError, MetaUnavailable
from storagenode.metastate import (ATIME_BATCH_MAX, INLINE_MAX, LINK_MAX, MAX_FILE_SIZE,
                                   RENAME_EXCHANGE, RENAME_NOREPLACE, REVALIDATE_MAX,
                                   SMALL_MAPS_MAX, check_op, check_target,
                                   version_of)

from .datapath import DataUnavailable, NoSpace
from .leaseclient import TRIM_AT, Leases
from .metacache import CacheFile, MetaCache
from .nsqueue import NamespaceQueue, QueuedOp
from .blockcache import Block
from .filedata import BlockRef, FileData, Volume, atime_due, spans_bytes, view_of
from .pagepush import PagePush
from . import perms
from .perms import R, W, X

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

NAME_MAX = 255
SPARE_INOS = 1024       # inode numbers reserved at a time for creates made here
# Creates are made here only while this mount holds fewer leases than this:
# each one brings a WRITE lease, and past the node's limit per session
# (LeaseConfig.max_leases_per_session, 100,000) a create's lease could not
# fence the commit riding with it.
HELD_MAX_HERE = 50_000
XATTR_CREATE, XATTR_REPLACE = 1, 2
# A file closed here under its WRITE lease is committed this long after the
# close returned (with every other file closed meanwhile, in one batch), or
# sooner: a recall of the lease, fsync, unmount (``close_behind``).
COMMIT_DELAY = 0.01
SMALL_MAPS_AHEAD = min(64, SMALL_MAPS_MAX)   # inode numbers looked at by small_map
ATIME_DELAY = 0.02          # a read access waits this long for others to share its op
COMMIT_RETRY_DELAY = 1.0    # when the metadata or data nodes could not be reached
# A close leaves storing its data to the commit only while the volume has
# this much free (``room_behind``), as seen at most SPACE_STALE seconds ago;
# the free space is asked again when SPACE_EVERY old.
ROOM_BEHIND = 4 << 30
SPACE_EVERY, SPACE_STALE = 2.0, 10.0


# Requests the kernel sends while it holds a directory's lock, and where
# that directory is among their arguments (readdir: through its handle).
# Invalidating an entry of that directory waits for the lock (FACTS.md 6),
# so a recall must not wait for that invalidation (``Operations.busy``).
# Likewise a write (through its handle: the file): dropping the file's
# pages waits for it, and it may wait for a WRITE lease behind the recall.
DIR_LOCKING = {"lookup": (0,), "create": (0,), "mknod": (0,), "mkdir": (0,),
               "symlink": (0,), "link": (1,), "unlink": (0,), "rmdir": (0,),
               "rename": (0, 2), "readdir": (0,), "write": (0,)}


CAPABILITY = b"security.capability"     # file capabilities, dropped by writes
TOLD_MAX = 100_000          # without leases: directory modes, names told the kernel


def fuse_op(fn: F) -> F:
    """Translate every failure below into a FUSEError, once, here; count the
    requests in flight per directory whose lock the kernel holds for them."""
    dirs = DIR_LOCKING.get(fn.__name__, ())

    @functools.wraps(fn)
    async def handler(self: Any, *args: Any) -> Any:
        locked = self.enter(fn.__name__, [args[i] for i in dirs]) if dirs else ()
        try:
            return await fn(self, *args)
        except Exception as exc:
            raise to_fuse_error(fn.__name__, exc) from None
        finally:
            if locked:
                self.leave(locked)

    return handler  # type: ignore[return-value]


def first_cause(exc: Exception) -> Exception:
    """What failed (nurseries wrap failures in groups: the first one decides)."""
    while isinstance(exc, ExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def to_fuse_error(operation: str, exc: Exception) -> pyfuse3.FUSEError:
    """The errno a failure means to the caller."""
    exc = first_cause(exc)
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    if isinstance(exc, MetaError):
        return pyfuse3.FUSEError(exc.errno)
    if isinstance(exc, NoSpace):
        return pyfuse3.FUSEError(errno.ENOSPC)
    if isinstance(exc, (MetaUnavailable, DataUnavailable, NodeError)):
        log.error("%s failed: %s: %s", operation, type(exc).__name__, exc)
        return pyfuse3.FUSEError(errno.EIO)
    if isinstance(exc, OSError):
        log.error("%s failed: %s", operation, exc)
        return pyfuse3.FUSEError(exc.errno or errno.EIO)
    log.error("bug in %s", operation, exc_info=exc)
    return pyfuse3.FUSEError(errno.EIO)


WRITE_LEASE_TRIES = 100         # a write retried under a new WRITE lease after a recall
DIR_BATCH = 512                 # directory entries one readdir round trip fetches
# After LEARN_AFTER names made here in one directory whose listing is not
# known whole, it is read whole when it has at most LEARN_MAX entries; a
# bigger one is tried again after LEARN_AGAIN more (``learn_listing``).
LEARN_AFTER, LEARN_MAX, LEARN_AGAIN = 8, 8 * DIR_BATCH, 1000


class DirHandle:
    """An open directory: the entries fetched so far, in cursor order.  The
    kernel reads a listing in many small pieces; each piece is served from
    here, and the node is asked for the next batch only when these run out
    (POSIX leaves it open whether entries added after opendir show)."""

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.rows: list[tuple[int, bytes, dict[str, Any]]] = []
        self.cursors: list[int] = []
        self.complete = False
        self.whole = True           # rows start at the first entry, no gaps
        self.since = 0              # cache clock when the first rows were asked for
        self.epoch: int | None = None   # the directory's lease held when they came

    def rewind(self) -> None:
        self.rows, self.cursors, self.complete, self.whole = [], [], False, True

    def last(self) -> int:
        return self.cursors[-1] if self.cursors else 0

    def rows_after(self, after: int) -> list[tuple[int, bytes, dict[str, Any]]]:
        return self.rows[bisect.bisect_right(self.cursors, after):]

    def add(self, rows: list[Any], *, complete: bool) -> None:
        for cursor, name, attrs in rows:
            if cursor > self.last():
                self.rows.append((cursor, name, attrs))
                self.cursors.append(cursor)
        self.complete = complete


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, volume: Volume, *, attr_timeout: float, entry_timeout: float,
                 replicas: int, relatime: bool = True, leases: bool = True,
                 max_leases: int = TRIM_AT) -> None:
        super().__init__()
        # what this mount holds leases for, answered without a round trip
        self.cache = MetaCache(self.lease_held)
        self.leases: Leases | None = Leases(
            volume.meta, flush=self.flush_inode, invalidate=self.kernel_forget,
            vol=volume.vol, drop=self.cache_drop, busy=self.busy,
            began=self.cache.began, invalidate_attrs=self.kernel_forget_attrs,
            idle=self.lease_idle, trim_at=max_leases) if leases else None
        if self.leases is not None:
            self.cache.valid = self.leases.serves
        self.in_flight: collections.Counter[int] = collections.Counter()  # see DIR_LOCKING
        self.cache_file: CacheFile | None = None       # kept across mounts
        volume.touched = self.cache_touched
        volume.stamp = self.cache.stamp
        volume.keeper = self.keeper
        self.v = volume
        self.meta: MetaClient = volume.meta
        self.attr_timeout = attr_timeout
        # without leases only: directory -> its mode, and the names in it the
        # kernel was told it may cache (Leases.names has them with leases)
        self.dir_modes: dict[int, int] = {}
        self.told_names: dict[int, set[bytes]] = {}
        self.told_count = 0
        self.entry_timeout = entry_timeout
        self.replicas = replicas
        self.relatime = relatime
        self.files: dict[int, FileData] = {}
        self.handles: dict[int, FileData] = {}
        self.writing: set[int] = set()          # handles open for writing
        self.pages = PagePush(self.spawn)
        volume.offer_pages = self.offer_pages
        volume.small_map = self.small_map
        if leases is not None:
            volume.retake = self.retake
        self.dirs: dict[int, DirHandle] = {}
        self.xattr_names: dict[int, tuple[float, frozenset[bytes]]] = {}
        # directory -> names made in it while its listing was not whole (learn_listing)
        self.made_unlisted: dict[int, int] = {}
        # read accesses on their way to the metadata node: inode -> (atime, sent)
        self.atime_pending: dict[int, tuple[int, trio.Event]] = {}
        self.atime_unsent: set[int] = set()        # of those, not sent yet
        self.atime_sending = False                 # send_atimes runs
        self.next_fh = 1
        self.nursery: trio.Nursery | None = None
        # namespace ops answered here, on their way to the node (see
        # remove_here, make_here, rename_here)
        self.queue = NamespaceQueue(volume, answered=self.queued_op_answered, spawn=self.spawn,
                                    open_inos=self.open_inos, fence_of=self.queue_fence_of,
                                    ctime_of=self.cached_ctime)
        volume.before_rpc = self.queue.drain
        volume.ride = self.queue.ride
        volume.fence_of = self.queue_fence_of
        # inode numbers reserved for this mount's creates (see make_here),
        # and the lease session they were reserved under
        self.spare: collections.deque[int] = collections.deque()
        self.spare_session: str | None = None
        self.queue_failed = False       # reported by the next fsyncdir
        # files closed here whose commit follows (close_behind), and the
        # errors of those that failed after close returned, for the next
        # fsync or close of the file to report
        self.due: dict[int, FileData] = {}
        self.committing = False
        self.commit_failed: dict[int, int] = {}
        # the volume's free data bytes when last asked (room_behind)
        self.space_free, self.space_at, self.space_asking = 0, -1e9, False

    # ----- helpers
    async def call(self, method: str, **args: Any) -> Any:
        return await self.v.call(method, **args)

    def lease_held(self, ino: int) -> bool:
        return self.leases is not None and self.leases.serves(ino)

    def queue_fence_of(self, ino: int, epoch: int) -> int:
        return self.leases.fence_of(ino, epoch) if self.leases is not None else epoch

    def cache_drop(self, ino: int | None) -> None:
        if ino is None:
            self.cache.clear()
            self.spare.clear()
        else:
            self.cache.forget(ino)

    def with_grant(self, inos: Sequence[int], grants: Sequence[Any]) -> set[int]:
        """The inodes whose lease held now came with these grants (an answer
        that came with its lease may be kept, see MetaCache.fresh)."""
        assert self.leases is not None
        return {ino for ino, grant in zip(inos, grants) if self.leases.holds(ino, grant)}

    def cache_touched(self, method: str, inos: list[int] | None,
                      attrs: list[dict[str, Any]], since: int) -> None:
        if inos is None:
            self.cache.clear()
        else:       # a read access changes no directory's entries, no block map
            atime = method in ("touch_atime", "touch_atimes")
            self.cache.touched(inos, attrs, since, entries=not atime, blocks=not atime)

    def keeper(self, ino: int) -> Callable[[dict[str, Any]], None]:
        """Take before an op of this mount on ``ino``; call with its answer."""
        since, drops = self.cache.stamp(), self.cache.drops(ino)
        return lambda attrs: self.cache.put_own(ino, attrs, since, drops)

    async def restore_cache(self) -> None:
        """Take back what the last mount cached, as far as the node says it
        is unchanged (and grants leases on it)."""
        if self.cache_file is None or self.leases is None:
            return
        saved = self.cache_file.read()
        kept = 0
        try:
            for part in saved.chunks(REVALIDATE_MAX):
                since = self.cache.stamp()
                answers, grants = await self.v.call_leased(
                    "revalidate", inos=[ino for ino, _ in part.attrs],
                    versions=[version_of(a) for _, a in part.attrs])
                inos = [ino for ino, _ in part.attrs]
                for ino, grant in zip(inos, grants):
                    self.leases.note(ino, grant)
                self.cache.load(part, answers, since, self.with_grant(inos, grants).__contains__)
                kept += answers.count(1)
        except (MetaError, MetaUnavailable, KeyError, TypeError) as exc:
            log.warning("revalidating the metadata cache failed: %s", exc)
        log.info("metadata cache: %d of %d inodes still current", kept, len(saved.attrs))

    def save_cache(self) -> None:
        if self.cache_file is not None:
            count = self.cache.save(self.cache_file)
            self.cache_file.close()
            self.cache_file = None
            log.info("metadata cache: %d inodes saved", count)

    async def attrs_of(self, ino: int) -> dict[str, Any]:
        """An inode's attributes: from the cache while leased, else asked for."""
        a = self.cache.attr(ino)
        if a is None:
            a = await self.leased("getattr", ino, ino=ino)
        return a

    def attr_time(self, ino: int) -> float:
        """How long the kernel may cache what it learns of ``ino``: while a
        lease covers it (capped by the attr_timeout option); a fixed time
        when leases are off."""
        if self.leases is None:
            return self.attr_timeout
        return min(self.attr_timeout, self.leases.cache_time(ino))

    def entry_time(self, parent: int | None) -> float:
        if self.leases is None:
            return self.entry_timeout
        return 0.0 if parent is None else min(self.entry_timeout,
                                              self.leases.cache_time(parent))

    def enter(self, op: str, dirs: list[int]) -> list[int]:
        """A request that holds these directories' locks in the kernel starts."""
        if op == "readdir":
            handle = self.dirs.get(dirs[0])
            dirs = [handle.ino] if handle is not None else []
        elif op == "write":
            f = self.handles.get(dirs[0])
            dirs = [f.ino] if f is not None else []
        self.in_flight.update(dirs)
        return dirs

    def leave(self, dirs: list[int]) -> None:
        self.in_flight.subtract(dirs)
        for ino in dirs:
            if self.in_flight[ino] <= 0:
                del self.in_flight[ino]

    def cached_ctime(self, ino: int) -> int | None:
        a = self.cache.attr(ino)
        return None if a is None else int(a["ctime_ns"])

    def lease_idle(self, ino: int) -> bool:
        """May the lease on ``ino`` be given back unasked: nothing here has
        the file open or buffered, no request on it is in flight, no queued
        op names it?"""
        return ino not in self.files and not self.busy(ino) and not self.queue.names(ino)

    def busy(self, ino: int) -> bool:
        """Is a request holding ``ino``'s lock in the kernel in flight here?"""
        return self.in_flight[ino] > 0 if ino in self.in_flight else False

    async def small_map(self, ino: int, view: tuple[int, int, int]) -> list[Any] | None:
        """The block map rows of small file ``ino`` if it is as ``view``
        says, fetched together with those of the small files numbered after
        it that this mount holds leases and attributes of but no maps (kept
        for when they are opened): files made together have neighbouring
        numbers and are read together (an unpacked tree, a build's
        sources), one round trip per ``SMALL_MAPS_AHEAD`` files instead of
        one each.  None: ask for this file alone."""
        if self.leases is None:
            return None
        inos = [ino] + [n for n in range(ino + 1, ino + SMALL_MAPS_AHEAD)
                        if self.small_without_map(n)]
        if len(inos) == 1:
            return None
        try:
            found = await self.call("small_maps", inos=inos)
        except (MetaError, BadRequest) as exc:        # an older metadata node
            log.debug("small_maps: %s", exc)
            return None
        mine = None
        for n, node_view, rows in found:
            node_view = tuple(node_view)
            if n == ino:
                mine = rows if node_view == view else None
            elif n not in self.files:
                spans = {0: {row[0]: BlockRef.from_row(row) for row in rows}}
                self.cache.put_map(n, node_view, spans, spans_bytes(spans))
        return mine

    def small_without_map(self, ino: int) -> bool:
        a = self.cache.attrs.get(ino)
        return a is not None and stat.S_ISREG(a["mode"]) and 0 < a["size"] <= INLINE_MAX \
            and ino not in self.files and ino not in self.cache.maps and self.cache.valid(ino)

    def offer_pages(self, ino: int, offset: int, data: Block) -> None:
        """A piece fetched for a random read, for the kernel's page cache:
        pushed if a lease here covers the file (a writer elsewhere recalls
        it first, which drops the pages; see pagepush)."""
        if self.leases is not None and self.leases.serves(ino):
            self.pages.push(ino, offset, data)

    @staticmethod
    def kernel_forget_attrs(ino: int) -> None:
        """Drop the kernel's cached attributes of ``ino`` (a recalled lease):
        attr_only never waits for a request in flight (FACTS.md 6), so this
        runs in the event loop, before the lease is released."""
        try:
            pyfuse3.invalidate_inode(ino, True)
        except OSError:
            pass                    # the kernel forgot the inode already

    def kernel_forget(self, ino: int, names: list[bytes]) -> None:
        """Drop what the kernel caches of ``ino`` (a recalled lease); runs in a
        worker thread, may block behind a request in flight (FACTS.md 6)."""
        self.xattr_names.pop(ino, None)
        for name in names:
            try:
                pyfuse3.invalidate_entry(ino, name)
            except OSError:
                pass                # the kernel did not cache it
        try:
            with self.pages.fenced(ino):      # no piece pushed before lands after
                pyfuse3.invalidate_inode(ino, False)
        except OSError:
            pass

    def covered(self, a: dict[str, Any]) -> bool:
        """May the kernel cache the attributes ``a`` (an answer, not a copy)?
        Only if they are what this mount's cache holds under its lease: an
        answer the cache refused (read before the lease held now began, or
        overtaken by a change) must not be cached by the kernel either."""
        return self.leases is None or self.cache.holds_attr(a["ino"], a)

    def name_covered(self, parent: int, name: bytes | None, ino: int) -> bool:
        """May the kernel cache that ``name`` in ``parent`` is ``ino`` (0: absent)?"""
        return self.leases is None or (name is not None and self.cache.entry(parent, name) == ino)

    def entry(self, a: dict[str, Any], parent: int | None = None, name: bytes | None = None,
              covered: bool | None = None) -> pyfuse3.EntryAttributes:
        """The kernel's view of ``a`` (and of ``name`` in ``parent``), with the
        times it may cache them: while a lease covers what it is told."""
        if covered is None:
            covered = self.covered(a)
        e = pyfuse3.EntryAttributes()
        e.st_ino = a["ino"]
        e.generation = a["generation"]
        e.st_mode = a["mode"]
        e.st_nlink = a["nlink"]
        e.st_uid = a["uid"]
        e.st_gid = a["gid"]
        e.st_rdev = a["rdev"]
        e.st_size = a["size"]
        e.st_blocks = a["blocks"]
        e.st_blksize = 128 * 1024
        e.st_atime_ns = a["atime_ns"]
        e.st_mtime_ns = a["mtime_ns"]
        e.st_ctime_ns = a["ctime_ns"]
        e.attr_timeout = self.attr_time(a["ino"]) if covered else 0.0
        if self.leases is None and stat.S_ISDIR(a["mode"]):
            # no cache without leases: the modes ``searchable`` looks at
            if len(self.dir_modes) > TOLD_MAX:
                self.dir_modes.clear()
            self.dir_modes[a["ino"]] = a["mode"]
        e.entry_timeout = self.entry_time(parent) if parent is not None \
            and self.name_covered(parent, name, a["ino"]) and self.searchable(parent) else 0.0
        if e.entry_timeout and parent is not None and name:
            # a recall of the directory's lease makes the kernel forget it
            # (its name may go, or the directory's mode change meanwhile)
            if self.leases is not None:
                self.leases.note_name(parent, name)
            else:
                self.tell_name(parent, name)
        return e

    def tell_name(self, parent: int, name: bytes) -> None:
        """Without leases: note a name the kernel may cache for the fixed
        entry time, for ``forget_names_under``.  At most ``TOLD_MAX`` are
        kept; past that the oldest are dropped (a chmod then reaches those
        within the entry time, 1 s by default)."""
        if self.told_count > TOLD_MAX:
            self.told_names.clear()
            self.told_count = 0
        self.told_names.setdefault(parent, set()).add(name)
        self.told_count += 1

    def searchable(self, parent: int) -> bool:
        """May the kernel cache names in directory ``parent``?  Only if
        everyone may search it: the kernel walks through cached names
        without asking (no ``default_permissions``), so a name under a
        directory some may not search is looked up, and checked, each time."""
        if self.leases is None:
            mode = self.dir_modes.get(parent)
            return mode is not None and perms.all_search(mode)
        a = self.cache.attr(parent)
        return a is not None and perms.all_search(a["mode"])

    # ----- permissions (perms.py)
    async def perm_attrs(self, ino: int) -> dict[str, Any]:
        """``ino``'s attributes as a permission check sees them: with a
        change of mode or owner still buffered here."""
        a = await self.attrs_of(ino)
        f = self.files.get(ino)
        return f.overlay(a) if f is not None else a

    async def allow(self, ctx: Any, ino: int, want: int, *, directory: bool = False) -> None:
        """EACCES unless the caller may ``want`` (R|W|X) on ``ino``.  Root
        reads and writes anything, and searches any ``directory``, without
        a look at its attributes."""
        if ctx is None or not want or (ctx.uid == 0 and (directory or not want & X)):
            return
        perms.check(ctx, await self.perm_attrs(ino), want)

    async def allow_removal(self, ctx: Any, parent: int, name: bytes) -> None:
        """EACCES/EPERM unless the caller may remove ``name`` from ``parent``
        (write and search on it, the sticky rule)."""
        if ctx is None or ctx.uid == 0:
            return
        d = await self.perm_attrs(parent)
        perms.check(ctx, d, W | X)
        if d["mode"] & stat.S_ISVTX and ctx.uid != d["uid"]:
            perms.check_sticky(ctx, d, await self.child_attrs(parent, name))

    async def child_attrs(self, parent: int, name: bytes) -> dict[str, Any]:
        a = await self.maybe_child(parent, name)
        if a is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return a

    async def maybe_child(self, parent: int, name: bytes) -> dict[str, Any] | None:
        known = self.cache.entry(parent, name)
        a = self.cache.attr(known) if known else None
        if a is None and known != 0:
            a = await self.leased("lookup", parent, parent=parent, name=name)
        return None if a is None else await self.perm_attrs(a["ino"])

    async def allow_rename(self, ctx: Any, parent_old: int, name_old: bytes, parent_new: int,
                           name_new: bytes, flags: int) -> None:
        """EACCES/EPERM unless the caller may rename: write and search on
        both directories, the sticky rule for the name moved and the one
        replaced, and write on a directory moved to another parent."""
        if ctx is None or ctx.uid == 0:
            return
        d_old = await self.perm_attrs(parent_old)
        perms.check(ctx, d_old, W | X)
        d_new = d_old if parent_new == parent_old else await self.perm_attrs(parent_new)
        perms.check(ctx, d_new, W | X)
        moved = await self.child_attrs(parent_old, name_old)
        perms.check_sticky(ctx, d_old, moved)
        target = await self.maybe_child(parent_new, name_new)
        if target is not None:
            perms.check_sticky(ctx, d_new, target)
        if parent_new != parent_old:
            if stat.S_ISDIR(moved["mode"]):
                perms.check(ctx, moved, W)          # its ".." changes
            if flags & RENAME_EXCHANGE and target is not None and stat.S_ISDIR(target["mode"]):
                perms.check(ctx, target, W)

    def forget_names_under(self, ino: int) -> None:
        """Directory ``ino`` may no longer be searched by everyone: have the
        kernel forget the names in it it caches (in a thread, as a recall
        does: FACTS.md 6), so that the next walk through them is checked."""
        names = set(self.cache.entries.get(ino, {})) | self.told_names.pop(ino, set())
        if self.leases is not None:
            names.update(self.leases.names.get(ino, ()))
        if names:
            self.spawn(functools.partial(trio.to_thread.run_sync, self.kernel_forget, ino,
                                         sorted(names)))

    @fuse_op
    async def access(self, ino: int, mode: int, ctx: Any) -> bool:
        return perms.permits(ctx, await self.perm_attrs(ino), mode & (R | W | X))

    def merged(self, a: dict[str, Any], parent: int | None = None,
               name: bytes | None = None) -> pyfuse3.EntryAttributes:
        """Attributes with this mount's unflushed size, times and blocks applied
        (a write changes mtime and ctime together, as on a local filesystem)."""
        covered = self.covered(a)
        f = self.files.get(a["ino"])
        if f is not None:
            if f.behind(a):
                # reads answer by what the kernel is told: a read stopping at
                # an older end would cut the kernel's size of the file back
                # to it (a short read does), and a handle opened before
                # another mount's change (tail -f) would never see its bytes
                f.refresh(a)
            a = f.overlay(a)
        return self.entry(self.with_pending_atime(a), parent, name, covered)

    def with_pending_atime(self, a: dict[str, Any]) -> dict[str, Any]:
        """A read access still on its way, its file closed since."""
        pending = self.atime_pending.get(a["ino"])
        if pending is not None and pending[0] > a["atime_ns"]:
            return dict(a, atime_ns=pending[0])
        return a

    def open_inos(self) -> list[int]:
        return sorted(ino for ino, f in self.files.items() if f.opens > 0)

    @staticmethod
    def check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)

    def spawn(self, job: Callable[[], Awaitable[Any]]) -> None:
        """Run background work (read-ahead); its failures are only logged."""
        async def run() -> None:
            try:
                await job()
            except Exception as exc:
                log.debug("background job failed: %s", exc)
        if self.nursery is not None:
            self.nursery.start_soon(run)

    async def flush_inode(self, ino: int) -> None:
        """Commit what this mount buffers under its WRITE lease on ``ino``:
        a file's writes, a directory's queued changes (all of them, in
        order: nothing queued may land after what follows)."""
        await self.queue.drain()
        f = self.files.get(ino)
        if f is not None:
            await f.flush()

    # ----- namespace
    @fuse_op
    async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        self.check_name(name)
        await self.allow(ctx, parent, X, directory=True)
        known = self.cache.entry(parent, name)
        if known is None and self.leases is not None and self.listing_worth_learning(parent):
            try:
                await self.learn_listing(parent)
            except MetaError as exc:        # the lookup below answers for itself
                log.debug("listing of directory %d not learned: %s", parent, exc)
            known = self.cache.entry(parent, name)
        a = self.cache.attr(known) if known else None
        if known is None or (known and a is None):
            a = await self.leased("lookup", parent, parent=parent, name=name)
        if a is not None:
            return self.merged(a, parent, name)
        if self.leases is not None:
            self.leases.note_name(parent, name)
        negative = pyfuse3.EntryAttributes()     # st_ino 0: the kernel caches the absence
        negative.st_ino = 0
        negative.entry_timeout = self.entry_time(parent) \
            if self.name_covered(parent, name, 0) and self.searchable(parent) else 0.0
        return negative

    def listing_worth_learning(self, parent: int) -> bool:
        """Has this mount made names in ``parent`` often enough
        (``LEARN_AFTER``) while its listing was not known whole (each such
        name cost a lookup that asked the node) that the listing is worth
        learning?  (Not for lookups alone: a
        listing brings leases on every entry, and a mount that only looks
        would then hold up another that removes them.)"""
        return self.made_unlisted.get(parent, 0) >= LEARN_AFTER

    def made_in(self, parent: int) -> None:
        """A name made in ``parent`` here; counted while its listing is not whole."""
        if not self.cache.knows_all(parent):
            self.made_unlisted[parent] = self.made_unlisted.get(parent, 0) + 1

    async def learn_listing(self, parent: int) -> None:
        """Read the whole of directory ``parent``, up to ``LEARN_MAX``
        entries, so that this cache knows every name in it (``MetaCache.whole``)
        while the lease that comes with it holds: a tar, cp or mkdir of many
        new names into a directory made before this mount then asks the node
        once, not once a name (each lookup of an absent name was a round trip:
        514 mkdirs a second against 4,500 in a directory made here).  A
        bigger directory is left to per-name lookups, and tried again only
        after ``LEARN_AGAIN`` more names made."""
        assert self.leases is not None
        if len(self.made_unlisted) > 10_000:
            self.made_unlisted.clear()
        self.made_unlisted[parent] = LEARN_AFTER - LEARN_AGAIN
        since, epoch = self.cache.stamp(), None
        rows: list[Any] = []
        while len(rows) < LEARN_MAX:
            page = await self.leased("readdir", parent, ino=parent,
                                     after=rows[-1][0] if rows else 0, limit=DIR_BATCH)
            if not rows:
                epoch = self.leases.epoch(parent)       # the one the first page came under
            rows.extend(page)
            if len(page) < DIR_BATCH:
                # known whole if every page was read under that same lease
                self.cache.put_listing(parent, [(c, n, a["ino"]) for c, n, a in rows], since,
                                       epoch is not None and epoch == self.leases.epoch(parent))
                if self.cache.knows_all(parent):
                    self.made_unlisted.pop(parent, None)
                return

    async def change(self, method: str, **args: Any) -> Any:
        """An op answered with the inode's new attributes, which the kernel
        may cache under the lease that comes with them."""
        if self.leases is None:
            return await self.call(method, **args)
        since = self.cache.stamp()
        drops = self.cache.drops(args["ino"]) if "ino" in args else 0
        try:
            result, grants = await self.v.call_leased(method, **args)
        except MetaError as exc:
            if exc.errno == errno.EEXIST and "name" in args:    # it is there: learn it again
                self.cache.drop_entry(args["parent"], args["name"])
            raise
        grant = grants[0] if grants else None
        self.leases.note(result["ino"], grant)
        if "ino" in args:       # link, setattr: an inode that may be in flight elsewhere
            self.cache.put_own(result["ino"], result, since, drops,
                               self.leases.holds(result["ino"], grant))
        else:                   # a new inode: nothing else knows it yet
            self.cache.put_attr(result["ino"], result, self.cache.stamp())
        if method in ("mknod", "mkdir", "symlink", "link"):
            self.cache.put_entry(args["parent"], args["name"], result["ino"], self.cache.stamp())
        return result

    async def leased(self, method: str, key: int, /, **args: Any) -> Any:
        """A query whose answer may be cached under the READ leases that come
        with it (lookup: parent, child; getattr: inode; readdir: directory,
        entries).  A lookup of a missing name answers None."""
        if self.leases is None:
            try:
                return await self.call(method, **args)
            except MetaError as exc:
                if method == "lookup" and exc.errno == errno.ENOENT:
                    return None
                raise
        since = self.cache.stamp()
        result, grants = await self.v.call_leased(method, **args)
        if method == "readdir":
            inos = [key] + [row[2]["ino"] for row in result]
        elif method == "lookup":
            inos = [key, result["ino"] if result else 0]
        else:
            inos = [key]
        for leased_ino, grant in zip(inos, grants):
            self.leases.note(leased_ino, grant)
        came = self.with_grant(inos, grants)
        if method == "readdir":
            for _, name, attrs in result:
                child = attrs["ino"]
                self.cache.put_entry(key, name, child, since, key in came)
                self.cache.put_attr(child, attrs, since, child in came)
                if stat.S_ISDIR(attrs["mode"]):
                    self.cache.put_parent(child, key, since, child in came)
        elif method == "lookup":
            self.cache.put_entry(key, args["name"], result["ino"] if result else 0, since,
                                 key in came)
            if result:
                child = result["ino"]
                self.cache.put_attr(child, result, since, child in came)
                if stat.S_ISDIR(result["mode"]):
                    self.cache.put_parent(child, key, since, child in came)
        else:
            self.cache.put_attr(key, result, since, key in came)
        return result

    @fuse_op
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None

    @fuse_op
    async def getattr(self, ino: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self.merged(await self.attrs_of(ino))

    @fuse_op
    async def setattr(self, ino: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        changes: dict[str, Any] = {}
        if fields.update_mode:
            changes["mode"] = attr.st_mode
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        if fields.update_size:
            changes["size"] = attr.st_size
        if ctx is not None and ctx.uid != 0:
            changes = perms.checked_setattr(ctx, await self.perm_attrs(ino), changes, fh,
                                            time.time_ns())
        e = await self.set_attrs(ino, changes, fh)
        if "mode" in changes and stat.S_ISDIR(e.st_mode) and not perms.all_search(e.st_mode):
            self.forget_names_under(ino)
        return e

    async def set_attrs(self, ino: int, wanted: dict[str, Any],
                        fh: int | None) -> pyfuse3.EntryAttributes:
        """setattr's work, the caller's right to ``wanted`` checked."""
        changes = {k: v for k, v in wanted.items() if k != "size"}
        update_size = "size" in wanted
        if update_size and wanted["size"] > MAX_FILE_SIZE:
            raise pyfuse3.FUSEError(errno.EFBIG)
        pending = self.atime_pending.get(ino)
        if pending is not None and "atime_ns" in changes:
            await pending[1].wait()        # an explicit atime lands after the read's
        f = self.files.get(ino)
        a = None
        if changes and not update_size and f is not None and f.opens > 0 \
                and self.leases is not None \
                and await f.buffer_attrs(changes, functools.partial(self.leases.write_epoch, ino)):
            return self.merged(await self.attrs_of(ino))   # under our lease: known here
        if changes and not update_size and f is None:
            a = self.setattr_here(ino, changes)
            if a is not None:
                return self.merged(a)
        if changes and not update_size and f is not None:
            a = await f.flush_with(changes)
        if a is None:
            await self.flush_inode(ino)
            if update_size:
                a = await self.truncate(ino, wanted["size"], changes)
            else:
                a = await self.change("setattr", ino=ino, **changes)
        if f is not None and "atime_ns" in changes:
            f.atime_ns = a["atime_ns"]        # an explicit atime, even an older one
        return self.merged(a)

    def setattr_here(self, ino: int, changes: dict[str, Any]) -> dict[str, Any] | None:
        """Apply a change of mode, owner or times of ``ino`` to this mount's
        cache and queue it for the node, like ``remove_here``, when this
        mount holds a WRITE cache lease on it and knows its attributes (a
        directory made here: tar sets each one's owner, mode and times after
        filling it, three round trips each).  Not for a file with a
        FileData here (its own path orders it with its data).  The
        attributes as the node will make them; None: do it the usual way."""
        leases = self.leases
        if leases is None or self.queue.stalled or ino in self.files:
            return None
        epoch, a = leases.write_epoch(ino), self.cache.attr(ino)
        if not epoch or a is None:
            return None
        args = dict(dict.fromkeys(("mode", "uid", "gid", "atime_ns", "mtime_ns", "size")),
                    ino=ino, **changes)
        try:
            check_op("setattr", dict(args, vol=self.v.vol))
        except BadRequest:
            return None             # the node's own answer says what is wrong
        now = time.time_ns()
        since = self.cache.stamp()
        self.queue.add(QueuedOp("setattr", args, [[ino, epoch]], at_ns=now))
        # what the node's answer would bring (metastate._op_setattr)
        new = dict(a, ctime_ns=now, **{k: v for k, v in changes.items() if k != "mode"})
        if "mode" in changes:
            new["mode"] = stat.S_IFMT(a["mode"]) | (changes["mode"] & 0o7777)
        self.cache.touched([ino], [new], since, entries=False, blocks=False)
        return new

    async def truncate(self, ino: int, size: int, changes: dict[str, Any]) -> dict[str, Any]:
        self.pages.stop(ino)            # a piece read before would undo it in the kernel
        try:
            await self.pages.fence(ino)
            return await self._truncate(ino, size, changes)
        finally:
            self.pages.resume(ino)

    async def _truncate(self, ino: int, size: int, changes: dict[str, Any]) -> dict[str, Any]:
        async def commit() -> dict[str, Any]:
            attrs: dict[str, Any] = await self.call("setattr", ino=ino, size=size, **changes)
            return attrs
        f = self.files.get(ino)
        if f is None:
            return await commit()
        leases = self.leases
        if leases is None:
            return await f.truncate(size, commit)
        for _ in range(WRITE_LEASE_TRIES):
            if leases.write_epoch(ino) is None:
                await leases.acquire(ino, "write")
            a = await f.truncate_under(size, changes, functools.partial(leases.write_epoch, ino))
            if a is not None:
                return a
        log.warning("truncate of inode %d: its WRITE lease was recalled %d times in a row",
                    ino, WRITE_LEASE_TRIES)
        raise pyfuse3.FUSEError(errno.EIO)

    @fuse_op
    async def readlink(self, ino: int, ctx: Any) -> bytes:
        target: bytes = await self.call("readlink", ino=ino)
        return target

    @fuse_op
    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        self.check_name(name)
        await self.allow(ctx, parent, W | X, directory=True)
        return self.entry(await self.change("mknod", parent=parent, name=name,
                                          mode=mode & ~ctx.umask, rdev=rdev,
                                          uid=ctx.uid, gid=ctx.gid), parent, name)

    @fuse_op
    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        self.check_name(name)
        await self.allow(ctx, parent, W | X, directory=True)
        args = dict(parent=parent, name=name, mode=mode & ~ctx.umask, uid=ctx.uid, gid=ctx.gid)
        made = await self.make_here("mkdir", args)
        if made is not None:
            return self.entry(made, parent, name)
        a = await self.change("mkdir", **args)
        self.cache.put_new_directory(a["ino"])      # every name in it is known: none
        self.cache.put_parent(a["ino"], parent, self.cache.stamp())
        return self.entry(a, parent, name)

    @fuse_op
    async def symlink(self, parent: int, name: bytes, target: bytes,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        self.check_name(name)
        check_target(target)        # here: a queued symlink's refusal would come too late
        await self.allow(ctx, parent, W | X, directory=True)
        args = dict(parent=parent, name=name, target=target, uid=ctx.uid, gid=ctx.gid)
        made = await self.make_here("symlink", args)
        if made is not None:
            return self.entry(made, parent, name)
        return self.entry(await self.change("symlink", **args), parent, name)

    @fuse_op
    async def link(self, ino: int, new_parent: int, new_name: bytes,
                   ctx: Any) -> pyfuse3.EntryAttributes:
        self.check_name(new_name)
        await self.allow(ctx, new_parent, W | X, directory=True)
        await self.commit_first(ino)
        return self.merged(await self.change("link", ino=ino, parent=new_parent, name=new_name),
                           new_parent, new_name)

    @fuse_op
    async def unlink(self, parent: int, name: bytes, ctx: Any) -> None:
        self.check_name(name)
        await self.allow_removal(ctx, parent, name)
        await self.commit_first(self.cache.entry(parent, name) or 0)
        if await self.remove_here("unlink", parent, name):
            return
        removed = self.cache.removing(parent, name)
        result = await self.call("unlink", parent=parent, name=name, open_inos=self.open_inos())
        removed()
        self.note_maybe_orphan(result["ino"])
        self.lease_ended_with(result, result["ino"])

    async def remove_here(self, method: str, parent: int, name: bytes) -> bool:
        """Apply an unlink or rmdir of ``name`` to this mount's cache and
        queue it for the node (nsqueue), when its outcome is surely known
        here (``removable_here``) and this mount holds a WRITE cache lease on
        the directory too (``directory_leased``).  False: do it the usual way."""
        leases = self.leases
        if leases is None or self.queue.stalled:
            return False
        child = self.removable_here(method, parent, name)
        if not child:
            return False
        dir_epoch = leases.write_epoch(parent)
        if dir_epoch is None:
            dir_epoch = await self.directory_leased(parent)
            child = self.removable_here(method, parent, name)      # again, after the wait
        child_epoch = leases.write_epoch(child)
        d, a = self.cache.attr(parent), self.cache.attr(child)
        if not child or dir_epoch is None or child_epoch is None or d is None or a is None:
            return False
        since = self.cache.stamp()
        removed = self.cache.removing(parent, name)
        now_ns = time.time_ns()
        self.queue.add(QueuedOp(method, {"parent": parent, "name": name},
                                [[parent, dir_epoch], [child, child_epoch]],
                                parent=parent, name=name, child=child, at_ns=now_ns))
        # what the node's answer would bring (the node takes this time for it):
        if method == "rmdir":
            changed = [dict(d, nlink=d["nlink"] - 1, mtime_ns=now_ns, ctime_ns=now_ns)]
        else:
            changed = [dict(d, mtime_ns=now_ns, ctime_ns=now_ns)]
            if a["nlink"] > 1:
                changed.append(dict(a, nlink=a["nlink"] - 1, ctime_ns=now_ns))
        self.cache.touched([parent, child], changed, since)
        if method == "rmdir":
            self.cache.forget(child)
        removed()
        return True

    async def directory_leased(self, parent: int) -> int | None:
        """The epoch of this mount's WRITE cache lease on directory ``parent``,
        taken now if not held (one round trip, as the op asking for it would
        take; the next ones in the directory take none); None if not granted.
        Under it nobody else sees or changes the directory before the queue
        has landed.  What the caller checked before must be checked again:
        the wait may have let anything happen."""
        assert self.leases is not None
        if self.leases.write_epoch(parent) is None:
            await self.leases.acquire(parent, "write")
        return self.leases.write_epoch(parent)

    async def make_here(self, method: str, args: dict[str, Any]) -> dict[str, Any] | None:
        """Apply a mkdir, a symlink, or a create of a regular file, to this
        mount's cache and queue it for the node (nsqueue), when this mount holds a WRITE
        cache lease on the directory (``directory_leased``) and knows the
        name is absent: the new inode's
        attributes, as the node will make them (with this mount's clock,
        which the node takes for the op), under an inode number reserved for
        this mount and a provisional WRITE lease on it.  None: do it the
        usual way."""
        leases = self.leases
        parent, name = args["parent"], args["name"]
        if leases is None or self.queue.stalled or len(leases.held) >= HELD_MAX_HERE \
                or self.cache.entry(parent, name) != 0 \
                or self.cache.attr(parent) is None:
            return None
        await self.directory_leased(parent)
        ino = await self.spare_ino()
        dir_epoch, d = leases.write_epoch(parent), self.cache.attr(parent)
        if ino is None or dir_epoch is None or d is None \
                or self.cache.entry(parent, name) != 0 \
                or (method == "mkdir" and d["nlink"] >= LINK_MAX):
            if ino is not None:
                self.spare.appendleft(ino)      # still the lowest: handed out in order
            return None
        now = time.time_ns()
        size = 0
        if method == "mkdir":
            mode = stat.S_IFDIR | (args["mode"] & 0o1777) | (d["mode"] & stat.S_ISGID)
            changed = dict(d, nlink=d["nlink"] + 1, mtime_ns=now, ctime_ns=now)
        elif method == "symlink":
            mode, size = stat.S_IFLNK | 0o777, len(args["target"])
            changed = dict(d, mtime_ns=now, ctime_ns=now)
        else:
            mode = stat.S_IFREG | (args["mode"] & 0o7777)
            changed = dict(d, mtime_ns=now, ctime_ns=now)
        a = {"ino": ino, "mode": mode, "nlink": 2 if method == "mkdir" else 1,
             "uid": args["uid"], "gid": d["gid"] if d["mode"] & stat.S_ISGID else args["gid"],
             "rdev": 0, "size": size, "blocks": 0, "atime_ns": now, "mtime_ns": now,
             "ctime_ns": now, "generation": 0}
        since = self.cache.stamp()
        self.queue.add(QueuedOp(method, dict(args, ino=ino), [[parent, dir_epoch]],
                                parent=parent, name=name, made=ino, at_ns=now))
        leases.provisional(ino)
        rows, grand = self.cache.listings.get(parent), self.cache.parents.get(parent)
        self.cache.touched([parent], [changed], since)
        stamp = self.cache.stamp()
        self.cache.put_attr(ino, a, stamp, True)
        self.made_in(parent)
        self.cache.put_entry(parent, name, ino, stamp)
        # what a create leaves as it was (rm -rf lists the directory, "..")
        self.cache.grow_listing(parent, rows, name, ino)
        if grand is not None:
            self.cache.put_parent(parent, grand, stamp)
        if method == "mkdir":
            self.cache.put_new_directory(ino)
            self.cache.put_parent(ino, parent, stamp)
        return a

    async def spare_ino(self) -> int | None:
        """An inode number reserved for this mount's session (a batch of
        ``SPARE_INOS`` is reserved when none is left); None if the node
        would not reserve any."""
        session = self.meta.session
        if session != self.spare_session:
            self.spare.clear()
        if not self.spare:
            try:
                got = await self.call("reserve_inodes", count=SPARE_INOS)
            except MetaError as exc:
                log.warning("reserving inode numbers failed: %s", exc)
                return None
            if self.meta.session != session:
                return None         # the session changed meanwhile: they are not ours
            self.spare_session = session
            self.spare.extend(range(got["first"], got["first"] + got["count"]))
        return self.spare.popleft() if self.spare else None

    def removable_here(self, method: str, parent: int, name: bytes) -> int:
        """The inode ``name`` in ``parent`` is, if this mount can tell alone
        what removing it does (else 0): it knows the name and both inodes'
        attributes and holds a WRITE lease on the child, which is a file not
        open here (unlink) or a directory known to be empty (rmdir: one this
        mount made, see metanode.leased_op)."""
        assert self.leases is not None
        child = self.cache.entry(parent, name)
        if not child or self.leases.write_epoch(child) is None \
                or self.cache.attr(parent) is None:
            return 0
        a = self.cache.attr(child)
        if a is None or stat.S_ISDIR(a["mode"]) != (method == "rmdir"):
            return 0
        if method == "rmdir":
            return child if self.cache.known_empty(child) else 0
        return child if child not in self.files else 0

    def queued_op_answered(self, op: QueuedOp, answer: dict[str, Any]) -> None:
        """The node's answer to an op answered here already: a create's
        lease is confirmed; an unlink or rmdir of a name already gone is done
        (sent again after the answer was lost); other refusals are failures."""
        code = answer.get("errno")
        if op.made and self.leases is not None:
            self.leases.confirm(op.made, answer.get("lease") if code is None else None)
            f = self.files.get(op.made)
            epoch = self.leases.write_epoch(op.made)
            if f is not None and f.fence == -op.made and epoch is not None and epoch > 0:
                f.fence = epoch         # the same lease: what is buffered stays so
            if code is not None:
                self.cache.forget(op.made)
            elif type(answer.get("cursor")) is int:
                self.cache.place_entry(op.parent, op.name, op.made, answer["cursor"])
        if code is None:
            self.lease_ended_with(answer, op.child)
        if code is None or (code == errno.ENOENT and not op.made):
            return
        self.queued_op_failed(op, str(answer.get("error", code)))

    def queued_op_failed(self, op: QueuedOp, why: str) -> None:
        """An op answered here already was refused by the node: the name is
        back.  Said in the log and at the next fsyncdir; this mount's and
        the kernel's views of the directory are dropped."""
        log.error("%s of %r in directory %d, answered here already, failed at the metadata "
                  "node: %s", op.method, op.name, op.parent, why)
        self.queue_failed = True
        self.cache.forget(op.parent)
        self.spawn(functools.partial(trio.to_thread.run_sync, self.kernel_forget, op.parent,
                                     [op.name], abandon_on_cancel=True))

    def note_maybe_orphan(self, ino: int) -> None:
        """An open inode lost a name: its last release checks whether to purge it."""
        f = self.files.get(ino)
        if f is not None:
            f.maybe_orphan = True

    @fuse_op
    async def rmdir(self, parent: int, name: bytes, ctx: Any) -> None:
        self.check_name(name)
        await self.allow_removal(ctx, parent, name)
        if await self.remove_here("rmdir", parent, name):
            return
        removed = self.cache.removing(parent, name)
        result = await self.call("rmdir", parent=parent, name=name)
        self.lease_ended_with(result, result.get("ino"))
        removed()

    @fuse_op
    async def rename(self, parent_old: int, name_old: bytes, parent_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        self.check_name(name_old)
        self.check_name(name_new)
        await self.allow_rename(ctx, parent_old, name_old, parent_new, name_new, flags)
        await self.commit_first(self.cache.entry(parent_old, name_old) or 0,
                                self.cache.entry(parent_new, name_new) or 0)
        if parent_old == parent_new and await self.rename_here(parent_old, name_old, name_new,
                                                               flags):
            return
        moved = self.cache.entry(parent_old, name_old)
        removed = self.cache.removing(parent_old, name_old)
        self.cache.drop_entry(parent_new, name_new)
        result = await self.call("rename", parent=parent_old, name=name_old,
                                 new_parent=parent_new, new_name=name_new, flags=flags,
                                 open_inos=self.open_inos())
        if not flags & RENAME_EXCHANGE:
            if moved or parent_new != parent_old:    # else the new name is not known
                removed()
            if moved:
                self.cache.put_entry(parent_new, name_new, moved, self.cache.stamp())
        if result.get("replaced"):
            self.note_maybe_orphan(result["replaced"])
            self.lease_ended_with(result, result["replaced"])

    def lease_ended_with(self, answer: dict[str, Any], ino: Any) -> None:
        """If ``answer`` says so, the node freed ``ino`` and ended this
        mount's lease on it with it (metanode._leases_of_freed): forget
        that lease."""
        if answer.get("released") is True and type(ino) is int and ino > 0 \
                and self.leases is not None:
            self.leases.ended(ino)

    async def rename_here(self, parent: int, name: bytes, new_name: bytes, flags: int) -> bool:
        """Apply a rename within one directory to this mount's cache and
        queue it for the node, like ``remove_here``, when its outcome is
        surely known here (``renamable_here``); False: do it the usual way."""
        leases = self.leases
        if leases is None or self.queue.stalled \
                or not self.renamable_here(parent, name, new_name, flags):
            return False
        dir_epoch = await self.directory_leased(parent)
        found = self.renamable_here(parent, name, new_name, flags)     # again, after the wait
        d = self.cache.attr(parent)
        if found is None or dir_epoch is None or d is None:
            return False
        moved, target = found
        a, t = self.cache.attr(moved), self.cache.attr(target) if target else None
        fences = [[parent, dir_epoch]] + [[ino, leases.write_epoch(ino) or 0]
                                          for ino in (moved, target) if ino]
        if a is None or (target and t is None) or any(not epoch for _, epoch in fences):
            return False
        since = self.cache.stamp()
        now_ns = time.time_ns()
        self.queue.add(QueuedOp("rename", {"parent": parent, "name": name, "new_parent": parent,
                                           "new_name": new_name, "flags": flags},
                                fences, parent=parent, name=name, child=target, at_ns=now_ns))
        removed = self.cache.removing(parent, name)
        self.cache.touched([parent], [dict(d, mtime_ns=now_ns, ctime_ns=now_ns)], since)
        changed = [dict(a, ctime_ns=now_ns)]
        if t is not None and t["nlink"] > 1:
            changed.append(dict(t, nlink=t["nlink"] - 1, ctime_ns=now_ns))
        self.cache.touched([moved, target] if target else [moved], changed, since,
                           entries=False, blocks=False)
        removed()
        self.cache.put_entry(parent, new_name, moved, self.cache.stamp())
        return True

    def renamable_here(self, parent: int, name: bytes, new_name: bytes,
                       flags: int) -> tuple[int, int] | None:
        """(moved inode, replaced inode or 0) if this mount can tell alone
        what renaming ``name`` to ``new_name`` in ``parent`` does (else None):
        it knows both names and holds WRITE leases on what moves and on what
        is replaced, which is a file not open here replaced by a file (no
        directory is replaced here, nothing is exchanged)."""
        assert self.leases is not None
        write = self.leases.write_epoch
        moved = self.cache.entry(parent, name)
        if not moved or name == new_name or flags & RENAME_EXCHANGE \
                or write(moved) is None or self.cache.attr(parent) is None:
            return None
        a, target = self.cache.attr(moved), self.cache.entry(parent, new_name)
        if a is None or target is None:
            return None
        if target == 0:
            return moved, 0
        t = self.cache.attr(target)
        if flags & RENAME_NOREPLACE or target == moved or t is None or write(target) is None \
                or stat.S_ISDIR(a["mode"]) or stat.S_ISDIR(t["mode"]) or target in self.files:
            return None
        return moved, target

    # ----- extended attributes
    @staticmethod
    def check_not_acl(name: bytes) -> None:
        """No POSIX ACLs (like ext4 mounted noacl): tools fall back to chmod,
        and `ls -l` stops asking after the first file."""
        if name.startswith(b"system.posix_acl_"):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    @fuse_op
    async def setxattr(self, ino: int, name: bytes, value: bytes, ctx: Any) -> None:
        self.check_not_acl(name)
        await self.allow(ctx, ino, W if perms.xattr_wants(name) else 0)
        self.xattr_names.pop(ino, None)
        await self.call("setxattr", ino=ino, name=name, value=value, flags=0)
        self.xattr_names.pop(ino, None)     # a listing stored meanwhile is older

    @fuse_op
    async def getxattr(self, ino: int, name: bytes, ctx: Any) -> bytes:
        # No ACLs at all, so reading one is "not supported" too: `ls -l` then
        # stops asking for the rest of the mount (it remembers a device
        # without ACLs) instead of costing one request per file.
        self.check_not_acl(name)
        await self.allow(ctx, ino, R if perms.xattr_wants(name) else 0)
        # The kernel asks for security.capability before every write; answer
        # "none" from a short-lived copy of the inode's xattr names.
        if name not in await self.names_of(ino):
            raise pyfuse3.FUSEError(errno.ENODATA)
        value: bytes = await self.call("getxattr", ino=ino, name=name)
        return value

    async def names_of(self, ino: int) -> frozenset[bytes]:
        a = self.cache.attr(ino)
        if a is not None and a.get("xattrs") == 0:
            return frozenset()
        now = trio.current_time()
        cached = self.xattr_names.get(ino)
        if cached is not None and cached[0] > now:
            return cached[1]
        since = self.cache.stamp()
        names = frozenset(await self.call("listxattr", ino=ino))
        if self.leases is not None and not (self.lease_held(ino) and self.cache.fresh(ino, since)):
            return names        # not known to hold under the lease held now (MetaCache.fresh)
        if len(self.xattr_names) > 100_000:
            self.xattr_names.clear()
        self.xattr_names[ino] = (now + self.attr_time(ino), names)
        return names

    @fuse_op
    async def listxattr(self, ino: int, ctx: Any) -> list[bytes]:
        names: list[bytes] = await self.call("listxattr", ino=ino)
        return names

    @fuse_op
    async def removexattr(self, ino: int, name: bytes, ctx: Any) -> None:
        self.check_not_acl(name)
        await self.allow(ctx, ino, W if perms.xattr_wants(name) else 0)
        self.xattr_names.pop(ino, None)
        await self.call("removexattr", ino=ino, name=name)
        self.xattr_names.pop(ino, None)     # a listing stored meanwhile is older

    # ----- directories
    @fuse_op
    async def opendir(self, ino: int, ctx: Any) -> int:
        a = await self.attrs_of(ino)
        if not stat.S_ISDIR(a["mode"]):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        await self.allow(ctx, ino, R)
        fh = self.next_fh
        self.next_fh += 1
        self.dirs[fh] = DirHandle(ino)
        return fh

    @fuse_op
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self.dirs[fh]
        if start_id == 0:
            d.rewind()                  # rewinddir: see what was added since
            # (the kernel takes no attributes from "." and ".." entries)
            a = self.with_pending_atime(await self.attrs_of(d.ino))
            now = time.time_ns()
            if self.relatime and atime_due(a, now):
                # a listing is a read access (relatime), recorded in the
                # background like a file's; the kernel drops the cached atime
                self.note_read_access(d.ino, now)
                a = dict(a, atime_ns=now)
            me = self.entry(a, covered=False)
            if not pyfuse3.readdir_reply(token, b".", me, 1):
                return
            start_id = 1
        if start_id == 1:
            parent = self.entry(await self.parent_attrs(d.ino), covered=False)
            if not pyfuse3.readdir_reply(token, b"..", parent, 2):
                return
            start_id = 2
        after = start_id - 2
        if not d.rows and not d.complete:
            self.listing_from_cache(d)
        while True:
            for cursor, name, attrs in d.rows_after(after):
                if not pyfuse3.readdir_reply(token, name, self.merged(attrs, d.ino, name),
                                             cursor + 2):
                    return
                after = cursor
            if d.complete:
                return
            if after > d.last():
                d.whole = False         # seekdir past what was fetched
            first = not d.rows
            if first:
                d.since = self.cache.stamp()
            rows = await self.leased("readdir", d.ino, ino=d.ino,
                                     after=max(after, d.last()), limit=DIR_BATCH)
            epoch = self.leases.epoch(d.ino) if self.leases is not None else None
            if first:
                d.epoch = epoch
            d.add(rows, complete=len(rows) < DIR_BATCH)
            if d.complete and d.whole:
                # every batch was read with (or under) the lease held now
                self.cache.put_listing(d.ino, [(c, n, a["ino"]) for c, n, a in d.rows], d.since,
                                       epoch is not None and epoch == d.epoch)

    async def parent_attrs(self, ino: int) -> dict[str, Any]:
        """The attrs of directory ``ino``'s parent (for ".."), from the cache
        while leases cover both."""
        parent = self.cache.parent_of(ino)
        if parent is not None:
            return await self.attrs_of(parent)
        since = self.cache.stamp()
        a: dict[str, Any] = await self.call("parent", ino=ino)
        self.cache.put_parent(ino, a["ino"], since)
        return a

    def listing_from_cache(self, d: "DirHandle") -> None:
        """A listing this mount holds leases on, with every entry's attrs."""
        rows = self.cache.listing(d.ino)
        if rows is None:
            return
        full = []
        for cursor, name, child in rows:
            a = self.cache.attr(child)
            if a is None:
                return
            full.append((cursor, name, a))
        d.add(full, complete=True)

    @fuse_op
    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    @fuse_op
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Every namespace op is durable once the node answered it; those
        answered here first (nsqueue) once sent: send them.  Files closed
        here are committed too (``close_behind``): a new file's name is of
        little use without its data."""
        await self.queue.drain()
        await self.commit_first(*[ino for ino, f in self.files.items() if f.due])
        if self.queue_failed:
            self.queue_failed = False
            raise pyfuse3.FUSEError(errno.EIO)

    # ----- files
    def file(self, a: dict[str, Any]) -> FileData:
        f = self.files.get(a["ino"])
        a = self.with_pending_atime(a)
        if f is None:
            f = self.files[a["ino"]] = FileData(self.v, a)
            spans = self.cache.take_map(f.ino, f.view)
            if spans is not None:
                f.spans = spans         # as it was at the last close here
        elif not f.pending() and (f.opens == 0 or f.outdated(a)):
            # close-to-open, also while older handles are open here: they
            # share the kernel's pages, so a read through one of them after
            # this open must not put the old bytes back into them
            f.refresh(a)
        return f

    def new_handle(self, f: FileData, *, direct: bool = False,
                   writing: bool = True) -> pyfuse3.FileInfo:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = f
        f.opens += 1
        if writing:
            self.writing.add(fh)
            self.pages.stop(f.ino)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=direct)

    @fuse_op
    async def open(self, ino: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        await self.allow(ctx, ino, perms.open_wants(flags))
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY
        if self.leases is not None:
            # a READ lease makes a writer elsewhere flush first (close-to-open
            # and better); a WRITE lease lets this mount buffer writes
            await self.leases.acquire(ino, "write" if writing else "read")
        a = await self.attrs_of(ino)
        if stat.S_ISDIR(a["mode"]):
            raise pyfuse3.FUSEError(errno.EISDIR)
        direct = self.direct_writes(a, flags)
        if direct:
            direct = CAPABILITY not in await self.names_of(ino)
            a = await self.attrs_of(ino)        # as of now, after that wait
        # No wait from here to the handle: a file with no handle open here is
        # forgotten by any commit that ends meanwhile (``settle``), and a
        # handle on a forgotten FileData writes where nobody else looks.
        info = self.new_handle(self.file(a), direct=direct, writing=writing)
        try:
            await self.pages.fence(ino)     # no piece read before lands after this open
            if flags & os.O_TRUNC and writing:
                await self.truncate(ino, 0, {})
        except BaseException:
            await self._drop_handle(info.fh)
            raise
        return info

    @fuse_op
    async def create(self, parent: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self.check_name(name)
        await self.allow(ctx, parent, W | X, directory=True)
        args = dict(parent=parent, name=name, mode=(mode & ~ctx.umask & 0o7777) | stat.S_IFREG,
                    rdev=0, uid=ctx.uid, gid=ctx.gid)
        a = await self.make_here("mknod", args) or \
            await self.change("mknod", **args)     # with the new file's WRITE lease
        if self.leases is not None and self.leases.write_epoch(a["ino"]) is not None:
            # a new file has no xattrs, and nobody can add one without recalling us
            self.xattr_names[a["ino"]] = (trio.current_time() + self.attr_time(a["ino"]),
                                          frozenset())
        return (self.new_handle(self.file(a), direct=self.direct_writes(a, flags),
                                writing=(flags & os.O_ACCMODE) != os.O_RDONLY),
                self.entry(a, parent, name))

    @staticmethod
    def direct_writes(a: dict[str, Any], flags: int) -> bool:
        """Should a handle opened with ``flags`` skip the page cache?  A file
        opened write-only (tar, cp, a compiler's output, a shell's ">") does:
        each write(2) then comes as one request, where through the cache a
        write not ending on a page boundary ends its request there and costs
        a getxattr of security.capability besides.  Nothing is lost: such a
        handle can neither read nor be mapped, and the kernel drops other
        handles' cached pages of what it writes.  Not a file whose writes
        must drop privileges (setuid, setgid, a capability): only the cached
        path makes the kernel do that."""
        return (flags & os.O_ACCMODE) == os.O_WRONLY and stat.S_ISREG(a["mode"]) \
            and not a["mode"] & (stat.S_ISUID | stat.S_ISGID)

    @fuse_op
    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        f = self.handles[fh]
        data = await f.read(offset, size, self.spawn)
        now = time.time_ns()
        if self.relatime and f.atime_due(now) and self.nursery is not None:
            f.atime_ns = now
            self.note_read_access(f.ino, now)
        return data

    def note_read_access(self, ino: int, now: int) -> None:
        """Record a read access in the background (nobody waits for it: until
        it lands, this mount shows it in every answer, see ``merged``).  The
        kernel drops its cached atime after a read or a listing by itself."""
        self.atime_pending[ino] = (now, trio.Event())
        self.atime_unsent.add(ino)
        if not self.atime_sending and self.nursery is not None:
            self.atime_sending = True
            self.nursery.start_soon(self.send_atimes)

    async def send_atimes(self) -> None:
        """Send the read accesses noted so far, many in one op, ``ATIME_DELAY``
        after the first; those noted while it is on its way go in the next
        (so a burst of reads, a grep or a build, costs a few round trips,
        not one per file: reading 10,000 small files one after the other
        sent 6,267, each a metadata commit)."""
        try:
            while self.atime_unsent:
                await trio.sleep(ATIME_DELAY)
                inos = list(itertools.islice(self.atime_unsent, ATIME_BATCH_MAX))
                self.atime_unsent.difference_update(inos)
                pending = [self.atime_pending[ino] for ino in inos]
                since = self.cache.stamp()
                drops = [self.cache.drops(ino) for ino in inos]
                try:
                    found = await self.call("touch_atimes",
                                            touches=[[ino, at] for ino, (at, _) in
                                                     zip(inos, pending)])
                    for ino, a, dropped in zip(inos, found, drops):
                        if a is not None:
                            self.cache.put_own(ino, a, since, dropped)
                except Exception as exc:
                    log.debug("read accesses of %d inodes not recorded: %s", len(inos), exc)
                finally:
                    for ino, p in zip(inos, pending):
                        if self.atime_pending.get(ino) is p:
                            del self.atime_pending[ino]
                        p[1].set()
        finally:
            self.atime_sending = False

    @fuse_op
    async def write(self, fh: int, offset: int, data: bytes) -> int:
        """Like a local filesystem at its largest file size: a write that
        starts there fails (EFBIG), one that crosses it is cut short."""
        if offset >= MAX_FILE_SIZE:
            raise pyfuse3.FUSEError(errno.EFBIG)
        data = data[:MAX_FILE_SIZE - offset]
        f = self.handles[fh]
        leases = self.leases
        if leases is None:
            await f.write(offset, data, self.spawn)
            return len(data)
        # buffer only under a WRITE lease; its epoch fences the commit
        for _ in range(WRITE_LEASE_TRIES):
            if leases.write_epoch(f.ino) is None:
                await leases.acquire(f.ino, "write")
            if await f.write(offset, data, self.spawn,
                             lease=functools.partial(leases.write_epoch, f.ino)):
                return len(data)
        log.warning("write to inode %d: its WRITE lease was recalled %d times in a row",
                    f.ino, WRITE_LEASE_TRIES)
        raise pyfuse3.FUSEError(errno.EIO)

    @fuse_op
    async def flush(self, fh: int) -> None:
        f = self.handles[fh]
        await self.close_behind(f)
        self.report_commit_failure(f.ino)

    @fuse_op
    async def fsync(self, fh: int, datasync: bool) -> None:
        f = self.handles[fh]
        await f.flush()
        await self.queue.drain()        # its create too, if still queued
        self.report_commit_failure(f.ino)

    def report_commit_failure(self, ino: int) -> None:
        """A commit that failed after the close of ``ino`` had returned
        (``commit_behind``) fails the next close or fsync of it, once."""
        code = self.commit_failed.pop(ino, None)
        if code is not None:
            raise pyfuse3.FUSEError(code)

    def may_close_behind(self, f: FileData) -> bool:
        """May ``f``'s commit follow its close?  When what is buffered goes
        under the WRITE lease held now: nobody else sees the file before a
        recall of that lease has committed it, and it is known to be live
        (renewed within the lease time: a mount cut off from the node for
        longer closes as before, with the node's refusal).  Not a file that
        lost a name while open (its last release may purge it).  Not while
        the metadata node is out of reach (``NamespaceQueue.stalled``): a
        restarted node refuses what was sent under leases it forgot, so
        closes wait for the node then, as every other op does."""
        return self.leases is not None and self.nursery is not None \
            and f.fence is not None and f.fence == self.leases.write_epoch(f.ino) \
            and self.lease_held(f.ino) and not f.maybe_orphan and not self.queue.stalled

    async def close_behind(self, f: FileData) -> None:
        """What ``close`` does with ``f``'s buffered writes: commits them to
        the metadata node after it returned, when it may
        (``may_close_behind``; a tar or cp then waits for no commit), else
        before.  Storing them on the data nodes follows the close too while
        the volume has room to spare and the mount's buffers are under
        their limit (``room_behind``), or when an earlier close left the
        file's commit behind; else the close stores them, and reports what
        failed.  So a close promises what it promises on a local
        filesystem: others see the data from now on; it is durable after
        fsync.  A crash of this mount loses at most what was closed in the
        last ``COMMIT_DELAY`` (and the time to store it)."""
        if not f.pending():
            return
        if f.due:
            # An earlier close left the file to its commit, which takes
            # whatever is buffered by then (writes wait for a commit in
            # progress): this close adds nothing, must not fail and drop what
            # that one promised, and must not wait for the file's lock, which
            # that commit holds while the metadata node is out of reach (a
            # forked child closing an inherited descriptor would hang, and
            # with it the parent's fork).
            self.commit_soon(f)
            return
        # A small file's "store" is its bytes made inline: no data node, and
        # its block leaves the dirty ones (which count whole blocks against
        # the mount's limit).
        if self.may_close_behind(f) and await f.store_behind(
                store=f.stores_inline() or not self.room_behind()):
            self.commit_soon(f)
            return
        await f.flush()

    def commit_soon(self, f: FileData) -> None:
        """Have ``commit_due`` commit ``f`` at its next turn."""
        self.due[f.ino] = f
        if not self.committing and self.nursery is not None:
            self.committing = True
            self.nursery.start_soon(self.commit_due)

    async def commit_due(self) -> None:
        """Commit every file closed here since the last turn, together."""
        try:
            delay = COMMIT_DELAY
            while self.due:
                await trio.sleep(delay)
                due, self.due = self.due, {}
                again: dict[int, FileData] = {}
                async with trio.open_nursery() as nursery:
                    for f in due.values():
                        nursery.start_soon(self.commit_behind, f, again)
                for ino, f in again.items():
                    self.due.setdefault(ino, f)
                delay = COMMIT_RETRY_DELAY if again else COMMIT_DELAY
        finally:
            self.committing = False

    async def commit_behind(self, f: FileData, again: dict[int, FileData]) -> None:
        """Commit ``f``, closed here; a failure is logged and reported by
        the next fsync or close of it.  (A lease lost meanwhile, the
        metadata node restarted, is taken again if nobody changed the file
        since: ``FileData._retake``.)"""
        try:
            await f.flush()
        except Exception as exc:
            cause = first_cause(exc)
            if isinstance(cause, (MetaUnavailable, DataUnavailable)):
                log.warning("commit of inode %d, closed here, waits for the %s: %s", f.ino,
                            "metadata node" if isinstance(cause, MetaUnavailable)
                            else "data nodes", cause)
                again[f.ino] = f
            else:
                log.error("data of inode %d, closed here, could not be committed and is "
                          "dropped: %s", f.ino, exc)
                self.commit_failed[f.ino] = to_fuse_error("commit", exc).errno
                await f.discard()
        finally:
            try:
                await self.settle(f)
            except Exception as exc:      # nothing here may end the mount
                log.warning("after the commit of inode %d: %s", f.ino, exc)

    def room_behind(self) -> bool:
        """May a close leave the storing of its data to the commit after
        it?  Only while the mount's buffered data is under its limit and
        the volume's free space, as last seen (``statfs``, at most
        ``SPACE_EVERY`` old, refreshed in the background), is at least
        ``ROOM_BEHIND``: a full volume's ``ENOSPC`` is reported by the close
        that met it, not dropped after it."""
        now = trio.current_time()
        if now - self.space_at > SPACE_EVERY and not self.space_asking \
                and self.nursery is not None:
            self.space_asking = True
            self.nursery.start_soon(self.ask_space)
        return not self.v.over_dirty_limit() and now - self.space_at <= SPACE_STALE \
            and self.space_free >= ROOM_BEHIND

    async def ask_space(self) -> None:
        try:
            await self.statfs_data()
        except Exception as exc:        # nothing here may end the mount
            log.info("free space of the volume: %s", first_cause(exc))
        finally:
            self.space_asking = False

    async def commit_first(self, *inos: int) -> None:
        """Commit these inodes first if their commits follow a close here:
        a rename or unlink of a file written just before lands after its
        data (a crash of this mount between must not leave a file renamed
        over another one without its data)."""
        for ino in inos:
            f = self.files.get(ino) if ino else None
            if f is not None and f.due:
                try:
                    await f.flush()
                except Exception as exc:        # commit_behind reports it
                    log.info("commit of inode %d before a change of its names: %s", ino, exc)

    async def retake(self, ino: int, fence: int) -> tuple[int, tuple[int, int, int]] | None:
        """The node refused a commit to ``ino`` fenced by ``fence``: take a
        new WRITE lease on it; its epoch and the node's view of the file
        (None: no lease to be had, or the file is gone).  The caller holds
        the file's lock: a recall of the new lease waits for the commit."""
        assert self.leases is not None
        self.leases.lost(ino, self.leases.fence_of(ino, fence))   # the node said so
        self.leases.lost(ino, fence)
        if not await self.leases.acquire(ino, "write"):
            return None
        epoch = self.leases.write_epoch(ino)
        if epoch is None or epoch <= 0:
            return None
        try:
            a = await self.call("getattr", ino=ino)
        except MetaError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return epoch, view_of(a)

    @fuse_op
    async def release(self, fh: int) -> None:
        await self._drop_handle(fh)

    async def _drop_handle(self, fh: int) -> None:
        f = self.handles.pop(fh)
        f.opens -= 1
        if fh in self.writing:
            self.writing.discard(fh)
            self.pages.resume(f.ino)
        if f.opens > 0:
            return
        try:
            await self.close_behind(f)
        except Exception as exc:
            # close() already reported this failure: keep nothing to commit later
            if f.opens == 0:
                log.warning("dropping unwritten data of inode %d: %s", f.ino, exc)
                await f.discard()
            raise
        finally:
            await self.settle(f)

    async def settle(self, f: FileData) -> None:
        """Forget ``f`` once it is neither open here nor has anything to commit."""
        if f.opens == 0 and not f.pending() and self.files.get(f.ino) is f:
            del self.files[f.ino]
            if f.maybe_orphan:
                await self._purge_if_orphan(f.ino)
            else:
                self.cache.put_map(f.ino, f.view, f.spans, f.map_bytes())

    async def _purge_if_orphan(self, ino: int) -> None:
        try:
            a = await self.call("getattr", ino=ino)
        except MetaError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise
        if a["nlink"] == 0:
            await self.call("purge", ino=ino)

    # ----- the file system
    @fuse_op
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        return await self.statfs_data()

    async def statfs_data(self) -> pyfuse3.StatvfsData:
        """The volume's sizes as ``statfs`` reports them (noted for ``room_behind``)."""
        s = await self.call("statfs")
        out = pyfuse3.StatvfsData()
        frsize = 4096
        k, m = s.get("ec_k", 0), s.get("ec_m", 0)

        def usable(raw: int) -> int:       # raw bytes -> data: / copies, or * k / (k + m)
            return raw * k // (k + m) if k else raw // max(1, s["replicas"])
        self.space_free, self.space_at = usable(s["free"]), trio.current_time()
        out.f_bsize = 128 * 1024
        out.f_frsize = frsize
        out.f_blocks = usable(s["capacity"]) // frsize
        out.f_bfree = usable(s["free"]) // frsize
        out.f_bavail = out.f_bfree
        out.f_files = s["inodes"] + out.f_bfree
        out.f_ffree = out.f_bfree
        out.f_favail = out.f_bfree
        out.f_namemax = NAME_MAX
        return out
