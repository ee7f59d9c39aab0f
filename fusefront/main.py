"""``objfs``: mount an objfs volume.

Order of work: parse the command line; check the mount point and reach the
metadata node and the volume (each failure is one line on stderr and exit
status 1, before anything is mounted); ``pyfuse3.init`` mounts; unless
``-f``, fork so that ``mount`` returns while the child serves requests;
SIGTERM/SIGINT end the session cleanly (``pyfuse3.terminate``), after which
buffered data is flushed and the mount is closed.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from storagenode import gctune
from storagenode.auth import SecretError, load_secret
from storagenode.dataclient import DataClient
from storagenode.metaclient import BadRequest, MetaClient, MetaError, MetaUnavailable

from .blockcache import BlockCache
from .datapath import BlockStore, ClusterView, DataUnavailable
from .filedata import Volume
from .fs import COMMIT_RETRY_DELAY, Operations, first_cause
from .metacache import CacheFile
from .options import MountConfig, UsageError, parse_args

log = logging.getLogger("objfs")
M_ARENA_MAX = -8          # mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 2 << 20  # buffers this big are mapped on their own
TRIM_THRESHOLD = 32 << 20
KERNEL_READAHEAD_KB = 1024
UNMOUNT_RETRY_FOR = 60.0  # seconds an unmount retries flushes that met no node


class MountError(Exception):
    """Why the volume cannot be mounted, in one line."""


def check_mountpoint(cfg: MountConfig) -> None:
    mp = cfg.mountpoint
    if not mp.exists():
        raise MountError(f"mount point {mp} does not exist")
    if not mp.is_dir():
        raise MountError(f"mount point {mp} is not a directory")
    try:
        busy = any(os.scandir(mp))
    except OSError as exc:
        raise MountError(f"cannot read mount point {mp}: {exc.strerror}") from None
    if busy and not cfg.nonempty:
        raise MountError(f"mount point {mp} is not empty (use -o nonempty to mount over it)")


async def find_volume(cfg: MountConfig, secret: str) -> dict[str, Any]:
    meta = MetaClient(cfg.meta, secret, timeout=min(cfg.timeout, 5.0))
    try:
        volume: dict[str, Any] = await meta.call("volume", name=cfg.volume)
        return volume
    except MetaUnavailable:
        raise MountError(f"metadata node {cfg.meta} is not reachable") from None
    except BadRequest:
        raise MountError(f"metadata node {cfg.meta} refused us: wrong secret?") from None
    except MetaError as exc:
        if exc.errno == errno.ENOENT:
            raise MountError(f"volume {cfg.volume!r} does not exist on {cfg.meta}") from None
        raise MountError(f"metadata node refused the volume: {exc}") from None
    finally:
        await meta.aclose()


def setup_logging(cfg: MountConfig, cache: Path) -> None:
    level = logging.DEBUG if cfg.debug else logging.INFO
    fmt = "%(asctime)s %(name)s %(levelname)s %(message)s"
    if cfg.log == "-" or (cfg.foreground and cfg.log is None):
        logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    else:
        logging.basicConfig(level=level, format=fmt, filename=cfg.log or str(cache / "objfs.log"))
    for chatty in ("httpx", "httpcore"):      # one line per request: only with -o debug
        logging.getLogger(chatty).setLevel(level if cfg.debug else logging.WARNING)


def limit_malloc_arenas() -> None:
    """glibc gives every worker thread its own heap arena and keeps freed
    4 MiB blocks in each; two arenas keep the mount's resident size near
    what it really holds.  A fixed mmap threshold stops glibc from raising
    it after the first freed block buffer (up to 32 MiB), which would put
    every later block buffer on those heaps, where freeing rarely gives
    memory back: blocks are mapped and unmapped whole instead.  It is 2 MiB,
    not 1: the 1 MiB buffers of FUSE reads and writes were mapped fresh
    each time too, and faulting their pages in cost more system CPU than
    copying them (a cold read of four files: the mount's 0.43 s -> 0.25 s);
    up to ``TRIM_THRESHOLD`` freed at a heap's top is kept for the next."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_ARENA_MAX, 2)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):
        pass


def daemonize() -> None:
    """Detach: the parent (what mount waits for) exits 0, the child serves."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    os.chdir("/")


def build(cfg: MountConfig, secret: str, volume: dict[str, Any]) -> Operations:
    """The mount's operations and everything they use (no I/O yet)."""
    meta = MetaClient(cfg.meta, secret, timeout=cfg.timeout)
    data = DataClient(secret, timeout=cfg.timeout)
    limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))
    store = BlockStore(ClusterView(meta), data, volume["replicas"], limiter,
                       ec=(volume.get("ec_k", 0), volume.get("ec_m", 0)))
    vol = Volume(volume["vol"], volume["block_size"], meta, store,
                 BlockCache(cfg.cache_size), readahead=cfg.readahead,
                 dirty_limit=cfg.dirty_limit)
    ops = Operations(vol, attr_timeout=cfg.attr_timeout,
                     entry_timeout=cfg.entry_timeout, replicas=volume["replicas"],
                     relatime="noatime" not in cfg.fuse_options, leases=not cfg.noleases,
                     max_leases=cfg.max_leases)
    if ops.leases is not None:
        vol.lost_session = ops.leases.lost_session
    return ops


def raise_kernel_readahead(mountpoint: str) -> None:
    """Let the kernel read ahead ``KERNEL_READAHEAD_KB`` of a sequential
    reader (its default, 128 KiB, makes eight read requests of each MiB).
    The FUSE init handshake caps it to what the kernel offered, so this runs
    after it: the stat waits for it.  Best effort (root only)."""
    try:
        dev = os.stat(mountpoint).st_dev
        if os.major(dev) != 0:      # not a FUSE connection's device: leave it be
            log.info("kernel read-ahead left at its default: %s is on device %d:%d",
                     mountpoint, os.major(dev), os.minor(dev))
            return
        Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").write_text(
            f"{KERNEL_READAHEAD_KB}\n")
    except OSError as exc:
        log.info("kernel read-ahead left at its default: %s", exc)


async def serve(ops: Operations, mountpoint: str = "") -> None:
    """Answer kernel requests until unmounted or signalled; then flush."""
    try:
        async with trio.open_nursery() as nursery:
            ops.nursery = nursery
            nursery.start_soon(_stop_on_signal)
            if mountpoint:
                nursery.start_soon(functools.partial(
                    trio.to_thread.run_sync, raise_kernel_readahead, mountpoint,
                    abandon_on_cancel=True))
            if ops.leases is not None:
                await ops.leases.open()
                nursery.start_soon(ops.leases.run)
                await ops.restore_cache()
            await pyfuse3.main()
            with trio.move_on_after(10):        # read accesses still on their way
                for _, sent in list(ops.atime_pending.values()):
                    await sent.wait()
            nursery.cancel_scope.cancel()
        await _flush_all(ops)
        ops.save_cache()        # while the leases still hold
        if ops.leases is not None:
            await ops.leases.close()
    finally:
        await ops.meta.aclose()
        await ops.v.store.data.aclose()


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            log.info("signal received: unmounting")
            pyfuse3.terminate()
            return


async def _flush_all(ops: Operations) -> None:
    try:
        await ops.queue.drain()
    except Exception:
        log.exception("could not send %d queued namespace ops at unmount", len(ops.queue))
    # Files closed here may still be unstored (Operations.close_behind): a
    # metadata or data node out of reach for a moment does not lose them.
    left = list(ops.files.values())
    deadline = trio.current_time() + UNMOUNT_RETRY_FOR
    while left:
        again = []
        for f in left:
            try:
                await f.flush()
            except Exception as exc:
                if isinstance(first_cause(exc), (MetaUnavailable, DataUnavailable)) \
                        and trio.current_time() < deadline:
                    log.warning("flush of inode %d at unmount waits: %s", f.ino, first_cause(exc))
                    again.append(f)
                else:
                    log.exception("could not flush inode %d at unmount", f.ino)
        left = again
        if left:
            await trio.sleep(COMMIT_RETRY_DELAY)


def mount(cfg: MountConfig) -> None:
    try:
        secret = load_secret(cfg.secret_file)
    except SecretError as exc:
        raise MountError(str(exc)) from None
    check_mountpoint(cfg)
    volume = trio.run(find_volume, cfg, secret)
    cache = cfg.cache_path()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MountError(f"cannot create cache folder {cache}: {exc.strerror}") from None
    # No default_permissions: the mount checks permissions itself (perms.py),
    # one request fewer per change in a directory.
    options = set(cfg.fuse_options) | {f"fsname={cfg.source}", "subtype=objfs"}
    if os.getuid() == 0:
        # A volume root mounts is for every user, like any other filesystem.
        options.add("allow_other")
    options.discard("rw")
    ops = build(cfg, secret, volume)
    try:
        pyfuse3.init(ops, cfg.mountpoint.as_posix(), options)
    except RuntimeError as exc:
        raise MountError(f"cannot mount on {cfg.mountpoint}: {exc}") from None
    mountpoint = os.path.abspath(cfg.mountpoint)     # daemonize() changes to /
    if not cfg.foreground:
        daemonize()
    setup_logging(cfg, cache)
    limit_malloc_arenas()
    gctune.tune()
    if not cfg.noleases:     # opened after the fork: SQLite connections do not survive one
        ops.cache_file = CacheFile.open(cache / "metadata.sqlite",
                                        f"{cfg.meta}/{cfg.volume}#{volume['vol']}")
    log.info("mounted %s on %s", cfg.source, cfg.mountpoint)
    try:
        trio.run(serve, ops, mountpoint)
    finally:
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", cfg.mountpoint)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        mount(cfg)
    except (UsageError, MountError) as exc:
        print(f"objfs: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
