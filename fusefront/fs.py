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
are buffered.  ``flush`` (every close) and ``fsync`` commit buffered data,
which gives close-to-open consistency.

An unlinked file that is still open here stays on the metadata node as an
orphan (the unlink names the open inodes); the last ``release`` purges it.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import pyfuse3
import trio

from storagenode.dataclient import NodeError

from storagenode.metaclient import MetaClient, MetaError, MetaUnavailable
from storagenode.metastate import MAX_FILE_SIZE

from .datapath import DataUnavailable, NoSpace
from .leaseclient import Leases
from .filedata import FileData, Volume, atime_due

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

NAME_MAX = 255
XATTR_CREATE, XATTR_REPLACE = 1, 2


def fuse_op(fn: F) -> F:
    """Translate every failure below into a FUSEError, once, here."""

    @functools.wraps(fn)
    async def handler(*args: Any) -> Any:
        try:
            return await fn(*args)
        except Exception as exc:
            raise to_fuse_error(fn.__name__, exc) from None

    return handler  # type: ignore[return-value]


def to_fuse_error(operation: str, exc: Exception) -> pyfuse3.FUSEError:
    """The errno a failure means to the caller (nurseries wrap failures in
    groups: the first one decides)."""
    while isinstance(exc, ExceptionGroup):
        exc = exc.exceptions[0]
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


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, volume: Volume, *, attr_timeout: float, entry_timeout: float,
                 replicas: int, relatime: bool = True, leases: bool = True) -> None:
        super().__init__()
        self.leases: Leases | None = Leases(
            volume.meta, flush=self.flush_inode, invalidate=self.kernel_forget,
            vol=volume.vol) if leases else None
        self.v = volume
        self.meta: MetaClient = volume.meta
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self.replicas = replicas
        self.relatime = relatime
        self.files: dict[int, FileData] = {}
        self.handles: dict[int, FileData] = {}
        self.dirs: dict[int, int] = {}
        self.xattr_names: dict[int, tuple[float, frozenset[bytes]]] = {}
        self.next_fh = 1
        self.nursery: trio.Nursery | None = None

    # ----- helpers
    async def call(self, method: str, **args: Any) -> Any:
        return await self.v.call(method, **args)

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
            pyfuse3.invalidate_inode(ino, False)
        except OSError:
            pass

    def entry(self, a: dict[str, Any], parent: int | None = None) -> pyfuse3.EntryAttributes:
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
        e.attr_timeout = self.attr_time(a["ino"])
        e.entry_timeout = self.entry_time(parent)
        return e

    def merged(self, a: dict[str, Any], parent: int | None = None) -> pyfuse3.EntryAttributes:
        """Attributes with this mount's unflushed size, times and blocks applied
        (a write changes mtime and ctime together, as on a local filesystem)."""
        f = self.files.get(a["ino"])
        if f is not None and f.changed:
            a = dict(a, size=f.size, mtime_ns=f.mtime_ns,
                     ctime_ns=max(a["ctime_ns"], f.mtime_ns),
                     blocks=max(0, a["blocks"] + f.unstored_bytes() // 512))
        if f is not None and f.atime_ns > a["atime_ns"]:
            a = dict(a, atime_ns=f.atime_ns)      # a read access still on its way
        return self.entry(a, parent)

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
        f = self.files.get(ino)
        if f is not None:
            await f.flush()

    # ----- namespace
    @fuse_op
    async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        self.check_name(name)
        a = await self.leased("lookup", parent, parent=parent, name=name)
        if self.leases is not None:
            self.leases.note_name(parent, name)
        if a is not None:
            return self.merged(a, parent)
        negative = pyfuse3.EntryAttributes()     # st_ino 0: the kernel caches the absence
        negative.st_ino = 0
        negative.entry_timeout = self.entry_time(parent)
        return negative

    async def change(self, method: str, **args: Any) -> Any:
        """An op answered with the inode's new attributes, which the kernel
        may cache under the lease that comes with them."""
        if self.leases is None:
            return await self.call(method, **args)
        result, grants = await self.v.call_leased(method, **args)
        self.leases.note(result["ino"], grants[0] if grants else None)
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
        result, grants = await self.v.call_leased(method, **args)
        if method == "readdir":
            inos = [key] + [row[2]["ino"] for row in result]
        elif method == "lookup":
            inos = [key, result["ino"] if result else 0]
        else:
            inos = [key]
        for leased_ino, grant in zip(inos, grants):
            self.leases.note(leased_ino, grant)
        return result

    @fuse_op
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None

    @fuse_op
    async def getattr(self, ino: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self.merged(await self.leased("getattr", ino, ino=ino))

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
        if fields.update_size and attr.st_size > MAX_FILE_SIZE:
            raise pyfuse3.FUSEError(errno.EFBIG)
        await self.flush_inode(ino)
        if fields.update_size:
            return self.merged(await self.truncate(ino, attr.st_size, changes))
        return self.merged(await self.change("setattr", ino=ino, **changes))

    async def truncate(self, ino: int, size: int, changes: dict[str, Any]) -> dict[str, Any]:
        async def commit() -> dict[str, Any]:
            attrs: dict[str, Any] = await self.call("setattr", ino=ino, size=size, **changes)
            return attrs
        f = self.files.get(ino)
        if f is None:
            return await commit()
        return await f.truncate(size, commit)

    @fuse_op
    async def readlink(self, ino: int, ctx: Any) -> bytes:
        target: bytes = await self.call("readlink", ino=ino)
        return target

    @fuse_op
    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        self.check_name(name)
        return self.entry(await self.change("mknod", parent=parent, name=name,
                                          mode=mode & ~ctx.umask, rdev=rdev,
                                          uid=ctx.uid, gid=ctx.gid), parent)

    @fuse_op
    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        self.check_name(name)
        return self.entry(await self.change("mkdir", parent=parent, name=name,
                                          mode=mode & ~ctx.umask, uid=ctx.uid, gid=ctx.gid),
                          parent)

    @fuse_op
    async def symlink(self, parent: int, name: bytes, target: bytes,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        self.check_name(name)
        return self.entry(await self.change("symlink", parent=parent, name=name, target=target,
                                          uid=ctx.uid, gid=ctx.gid), parent)

    @fuse_op
    async def link(self, ino: int, new_parent: int, new_name: bytes,
                   ctx: Any) -> pyfuse3.EntryAttributes:
        self.check_name(new_name)
        return self.merged(await self.change("link", ino=ino, parent=new_parent, name=new_name),
                           new_parent)

    @fuse_op
    async def unlink(self, parent: int, name: bytes, ctx: Any) -> None:
        self.check_name(name)
        result = await self.call("unlink", parent=parent, name=name, open_inos=self.open_inos())
        self.note_maybe_orphan(result["ino"])

    def note_maybe_orphan(self, ino: int) -> None:
        """An open inode lost a name: its last release checks whether to purge it."""
        f = self.files.get(ino)
        if f is not None:
            f.maybe_orphan = True

    @fuse_op
    async def rmdir(self, parent: int, name: bytes, ctx: Any) -> None:
        self.check_name(name)
        await self.call("rmdir", parent=parent, name=name)

    @fuse_op
    async def rename(self, parent_old: int, name_old: bytes, parent_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        self.check_name(name_old)
        self.check_name(name_new)
        result = await self.call("rename", parent=parent_old, name=name_old,
                                 new_parent=parent_new, new_name=name_new, flags=flags,
                                 open_inos=self.open_inos())
        if result.get("replaced"):
            self.note_maybe_orphan(result["replaced"])

    # ----- extended attributes
    @staticmethod
    def check_not_acl(name: bytes) -> None:
        """No POSIX ACLs (like ext4 mounted noacl): tools fall back to chmod."""
        if name.startswith(b"system.posix_acl_"):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    @fuse_op
    async def setxattr(self, ino: int, name: bytes, value: bytes, ctx: Any) -> None:
        self.check_not_acl(name)
        self.xattr_names.pop(ino, None)
        await self.call("setxattr", ino=ino, name=name, value=value, flags=0)

    @fuse_op
    async def getxattr(self, ino: int, name: bytes, ctx: Any) -> bytes:
        # The kernel asks for security.capability before every write; answer
        # "none" from a short-lived copy of the inode's xattr names.
        if name not in await self.names_of(ino):
            raise pyfuse3.FUSEError(errno.ENODATA)
        value: bytes = await self.call("getxattr", ino=ino, name=name)
        return value

    async def names_of(self, ino: int) -> frozenset[bytes]:
        now = trio.current_time()
        cached = self.xattr_names.get(ino)
        if cached is not None and cached[0] > now:
            return cached[1]
        names = frozenset(await self.call("listxattr", ino=ino))
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
        self.xattr_names.pop(ino, None)
        await self.call("removexattr", ino=ino, name=name)

    # ----- directories
    @fuse_op
    async def opendir(self, ino: int, ctx: Any) -> int:
        a = await self.call("getattr", ino=ino)
        if not stat.S_ISDIR(a["mode"]):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self.next_fh
        self.next_fh += 1
        self.dirs[fh] = ino
        return fh

    @fuse_op
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        ino = self.dirs[fh]
        if start_id == 0:
            a = await self.call("getattr", ino=ino)
            if self.relatime and atime_due(a, time.time_ns()):
                # a listing is a read access (relatime); the kernel drops the
                # cached atime after readdir
                a = await self.call("touch_atime", ino=ino, atime_ns=time.time_ns())
            me = self.entry(a)
            if not pyfuse3.readdir_reply(token, b".", me, 1):
                return
            start_id = 1
        if start_id == 1:
            parent = self.entry(await self.call("parent", ino=ino))
            if not pyfuse3.readdir_reply(token, b"..", parent, 2):
                return
            start_id = 2
        after = start_id - 2
        while True:
            rows = await self.leased("readdir", ino, ino=ino, after=after, limit=256)
            for cursor, name, attrs in rows:
                if self.leases is not None:
                    self.leases.note_name(ino, name)
                if not pyfuse3.readdir_reply(token, name, self.merged(attrs, ino), cursor + 2):
                    return
                after = cursor
            if len(rows) < 256:
                return

    @fuse_op
    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    @fuse_op
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None    # every namespace operation is durable when acknowledged

    # ----- files
    def file(self, a: dict[str, Any]) -> FileData:
        f = self.files.get(a["ino"])
        if f is None:
            f = self.files[a["ino"]] = FileData(self.v, a)
        elif f.opens == 0 and not f.pending():
            f.refresh(a)      # close-to-open
        return f

    def new_handle(self, f: FileData) -> pyfuse3.FileInfo:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = f
        f.opens += 1
        return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=False)

    @fuse_op
    async def open(self, ino: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY
        if self.leases is not None:
            # a READ lease makes a writer elsewhere flush first (close-to-open
            # and better); a WRITE lease lets this mount buffer writes
            await self.leases.acquire(ino, "write" if writing else "read")
        a = await self.leased("getattr", ino, ino=ino)
        if stat.S_ISDIR(a["mode"]):
            raise pyfuse3.FUSEError(errno.EISDIR)
        f = self.file(a)
        info = self.new_handle(f)
        if flags & os.O_TRUNC and (flags & os.O_ACCMODE) != os.O_RDONLY:
            try:
                await self.truncate(ino, 0, {})
            except BaseException:
                await self._drop_handle(info.fh)
                raise
        return info

    @fuse_op
    async def create(self, parent: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self.check_name(name)
        args = dict(parent=parent, name=name, mode=(mode & ~ctx.umask & 0o7777) | stat.S_IFREG,
                    rdev=0, uid=ctx.uid, gid=ctx.gid)
        a = await self.change("mknod", **args)     # with the new file's WRITE lease
        if self.leases is not None and self.leases.write_epoch(a["ino"]) is not None:
            # a new file has no xattrs, and nobody can add one without recalling us
            self.xattr_names[a["ino"]] = (trio.current_time() + self.attr_time(a["ino"]),
                                          frozenset())
        return self.new_handle(self.file(a)), self.entry(a, parent)

    @fuse_op
    async def read(self, fh: int, offset: int, size: int) -> bytes:
        f = self.handles[fh]
        data = await f.read(offset, size, self.spawn)
        now = time.time_ns()
        if self.relatime and f.atime_due(now):
            f.atime_ns = now
            f.atime_sent = trio.Event()
            self.spawn(functools.partial(self.touch_atime, f.ino, now, f.atime_sent))
        return data

    async def touch_atime(self, ino: int, now: int, sent: trio.Event) -> None:
        """Record a read access, then let the kernel drop its cached
        attributes; ``close`` waits for this (see flush)."""
        try:
            await self.call("touch_atime", ino=ino, atime_ns=now)
            await self.invalidate_attrs(ino)
        finally:
            sent.set()

    @staticmethod
    async def invalidate_attrs(ino: int) -> None:
        # attr_only never waits for page locks (see FACTS: invalidation traps)
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, True)
        except OSError:
            pass          # the kernel forgot the inode already

    @fuse_op
    async def write(self, fh: int, offset: int, data: bytes) -> int:
        """Like a local filesystem at its largest file size: a write that
        starts there fails (EFBIG), one that crosses it is cut short."""
        if offset >= MAX_FILE_SIZE:
            raise pyfuse3.FUSEError(errno.EFBIG)
        data = data[:MAX_FILE_SIZE - offset]
        f = self.handles[fh]
        if self.leases is not None:
            # buffer only under a WRITE lease; its epoch fences the commit
            if self.leases.write_epoch(f.ino) is None:
                await self.leases.acquire(f.ino, "write")
            f.fence = self.leases.write_epoch(f.ino)
        await f.write(offset, data, self.spawn)
        return len(data)

    @fuse_op
    async def flush(self, fh: int) -> None:
        f = self.handles[fh]
        await f.flush()
        await f.atime_sent.wait()     # a stat after close shows the read

    @fuse_op
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.handles[fh].flush()

    @fuse_op
    async def release(self, fh: int) -> None:
        await self._drop_handle(fh)

    async def _drop_handle(self, fh: int) -> None:
        f = self.handles.pop(fh)
        f.opens -= 1
        if f.opens > 0:
            return
        try:
            await f.flush()
        except Exception as exc:
            # close() already reported this failure: keep nothing to commit later
            if f.opens == 0:
                log.warning("dropping unwritten data of inode %d: %s", f.ino, exc)
                await f.discard()
            raise
        finally:
            if f.opens == 0 and not f.pending():
                del self.files[f.ino]
                if f.maybe_orphan:
                    await self._purge_if_orphan(f.ino)

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
        s = await self.call("statfs")
        out = pyfuse3.StatvfsData()
        frsize = 4096
        k, m = s.get("ec_k", 0), s.get("ec_m", 0)

        def usable(raw: int) -> int:       # raw bytes -> data: / copies, or * k / (k + m)
            return raw * k // (k + m) if k else raw // max(1, s["replicas"])
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
