"""A filesystem benchmark in the spirit of ``juicefs bench``: the same
workloads on several directories in one run, one table, ratios against the
first directory.

    python -m tools.bench DIR [DIR ...] [--objfs] [--moosefs] [--local DIR]
                          [--scale 0.05] [--json FILE]

``--objfs`` starts a local objfs cluster (1 metadata node, 3 data nodes,
replicas 3) under a temporary folder on free ports and mounts it;
``--moosefs`` starts MooseFS with the peer scripts (goal 3, the same number
of copies); ``--local DIR`` adds a plain directory on the same disk as the
physical ceiling.  Whatever was started is stopped and unmounted at the end,
also on errors and Ctrl-C.  Directories are measured in this order: the
positional ones, then objfs, MooseFS, local; ratios are value / value on the
first.

How it works: the workloads run one after another; each runs on every
directory in turn before the next starts (so slow drift of the machine
spreads over all of them), after an ``os.sync()`` that flushes what the
previous directory left dirty and once the CPUs and disks are quiet again
(``settle``: background work of one filesystem, MooseFS deleting chunks
lazily, objfs collecting objects, is not timed as the next one's).  Timing is ``time.perf_counter()`` around the
real system calls (``os.write``/``os.read``/``os.pread``/``os.stat``/...,
``tar``/``du``/``find``/``rm`` as subprocesses).  "Caches dropped" means
``sync; echo 3 > /proc/sys/vm/drop_caches`` (root only; noted if it fails).
Every request loop stops at its count or at ``--phase-limit`` seconds,
whichever comes first; a phase cut short is reported in the notes, and its
rate is over the operations that completed.  Written data is random (no
compression or deduplication can shortcut it).  Full sizes at ``--scale 1``:
a 1 GiB sequential file (x1, and x4 by 4 threads; 1 MiB os.write/os.read,
fsync at the end of each write); a 256 MiB file for random 4 KiB reads by 4
readers (POSIX_FADV_RANDOM: no readahead; the page cache may still hit); 10,000
files of 4 KiB in 100 directories (open, write, close; no fsync); 5,000
directories for mkdir/rename/rmdir; a ~10,000-entry tree of real source and
documentation (tarball built once, cached in /tmp).
Memory is the peak resident size (VmHWM) of each process behind a directory,
read at the end of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from .localcluster import ClusterError, LocalCluster, stop_pid

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
POOL = os.urandom(16 * MiB)           # random data; 16 MiB apart before it repeats
PEERS = Path("/work/shared/peers")
TAR_CACHE = Path("/tmp/objfs-bench-cache")
MFS_PORTS = (9419, 9420, 9421, 9422, 9432, 9442)
REPLICAS = 3

Metrics = dict[str, float]
T = TypeVar("T")


class BenchError(Exception):
    pass


# --------------------------------------------------------------- sizes, targets
@dataclass(frozen=True)
class Sizes:
    seq_bytes: int
    rand_bytes: int
    rand_reads: int          # per reader
    rand_seconds: float
    small_files: int
    small_dirs: int
    dir_entries: int
    tree_entries: int
    limit: float             # seconds, per timed phase

    @classmethod
    def scaled(cls, scale: float, limit: float) -> Sizes:
        def mib(n: int) -> int:
            return max(MiB, round(n * scale / MiB) * MiB)
        small = max(100, round(10_000 * scale))
        return cls(seq_bytes=mib(GiB), rand_bytes=mib(256 * MiB),
                   rand_reads=max(1000, round(25_000 * scale)),
                   rand_seconds=max(2.0, 20 * scale), small_files=small,
                   small_dirs=min(100, small), dir_entries=max(50, round(5000 * scale)),
                   tree_entries=max(100, round(10_000 * scale)), limit=limit)


@dataclass
class Target:
    name: str
    path: Path
    roles: Callable[[], dict[str, int]]     # role -> PID, for the memory figures

    @property
    def work(self) -> Path:
        return self.path / f"objfs-bench-{os.getpid()}"


@dataclass
class Run:
    """What one run measured: metric -> value per target, and notes."""
    targets: list[Target]
    results: dict[str, Metrics] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def note(self, text: str) -> None:
        self.notes.append(text)
        progress(f"NOTE {text}")


CURRENT: Run | None = None
T0 = time.monotonic()


def progress(text: str) -> None:
    elapsed = time.monotonic() - T0
    print(f"[bench {elapsed:7.1f}s] {text}", file=sys.stderr, flush=True)


def note(text: str) -> None:
    if CURRENT:
        CURRENT.note(text)


# --------------------------------------------------------------- primitives
def drop_caches() -> None:
    """sync; echo 3 > /proc/sys/vm/drop_caches (noted once if not allowed)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        if CURRENT and not any(n.startswith("drop_caches") for n in CURRENT.notes):
            note(f"drop_caches failed ({exc}); reads are not cold")


def write_all(fd: int, view: memoryview) -> int:
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])
    return done


def write_file(path: Path, size: int, tag: int, limit: float) -> tuple[int, float]:
    """Write size bytes of random data in 1 MiB writes, fsync; (bytes, seconds)."""
    buf = bytearray(POOL)
    view = memoryview(buf)
    start = time.perf_counter()
    deadline = start + limit
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < size and time.perf_counter() < deadline:
            at = (done // MiB) % (len(buf) // MiB) * MiB
            buf[at:at + 16] = tag.to_bytes(8, "little") + done.to_bytes(8, "little")
            done += write_all(fd, view[at:at + min(MiB, size - done)])
        os.fsync(fd)
    finally:
        os.close(fd)
    return done, time.perf_counter() - start


def read_file(path: Path, limit: float) -> tuple[int, float]:
    """Read a whole file in 1 MiB reads; (bytes, seconds)."""
    buf = bytearray(MiB)
    start = time.perf_counter()
    deadline = start + limit
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while time.perf_counter() < deadline:
            n = os.readv(fd, [buf])
            if n == 0:
                break
            done += n
    finally:
        os.close(fd)
    return done, time.perf_counter() - start


def timed_loop(items: Sequence[T], op: Callable[[T], Any], limit: float) -> tuple[list[T], float]:
    """Apply op to items until done or limit seconds; (items done, seconds)."""
    start = time.perf_counter()
    deadline = start + limit
    done: list[T] = []
    for item in items:
        op(item)
        done.append(item)
        if time.perf_counter() > deadline:
            break
    return done, time.perf_counter() - start


def rate(m: Metrics, metric: str, items: Sequence[T], op: Callable[[T], Any],
         limit: float) -> list[T]:
    done, seconds = timed_loop(items, op, limit)
    m[metric] = len(done) / seconds
    if len(done) < len(items):
        note(f"{metric}: stopped after {len(done)} of {len(items)} ({limit:.0f} s limit)")
    return done


def run_timed(argv: list[str], limit: float) -> float:
    start = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=limit)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise BenchError(f"{shlex.join(argv)} failed ({r.returncode}): {r.stderr.strip()[:300]}")
    return seconds


def mib_s(nbytes: int, seconds: float) -> float:
    return nbytes / MiB / seconds


def checked(nbytes: int, want: int, what: str) -> int:
    if nbytes != want:
        note(f"{what}: {nbytes} bytes of {want} (time limit or short file)")
    return nbytes


# --------------------------------------------------------------- workloads
def seq_1x(d: Path, s: Sizes) -> Metrics:
    path = d / "seq-0"
    w, w_s = write_file(path, s.seq_bytes, 0, s.limit)
    checked(w, s.seq_bytes, "seq_write_1x")
    drop_caches()
    r, r_s = read_file(path, s.limit)
    checked(r, w, "seq_read_1x")
    return {"seq_write_1x MiB/s": mib_s(w, w_s), "seq_read_1x MiB/s": mib_s(r, r_s)}


def parallel(jobs: Sequence[Callable[[], tuple[int, float]]]) -> tuple[int, float]:
    """Run jobs in threads at once; (total bytes, wall seconds)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as ex:
        results = list(ex.map(lambda job: job(), jobs))
    return sum(n for n, _ in results), time.perf_counter() - start


def seq_4x(d: Path, s: Sizes) -> Metrics:
    paths = [d / f"seq-{i}" for i in range(4)]
    w, w_s = parallel([partial(write_file, p, s.seq_bytes, i, s.limit)
                       for i, p in enumerate(paths)])
    checked(w, 4 * s.seq_bytes, "seq_write_4x")
    drop_caches()
    r, r_s = parallel([partial(read_file, p, s.limit) for p in paths])
    checked(r, w, "seq_read_4x")
    return {"seq_write_4x MiB/s": mib_s(w, w_s), "seq_read_4x MiB/s": mib_s(r, r_s)}


def rand_reader(path: Path, offsets: list[int], deadline: float) -> int:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)     # no readahead: 4 KiB is 4 KiB
    try:
        done = 0
        for off in offsets:
            if len(os.pread(fd, 4 * KiB, off)) != 4 * KiB:
                raise BenchError(f"short read at {off}")
            done += 1
            if time.perf_counter() > deadline:
                break
        return done
    finally:
        os.close(fd)


def rand_read(d: Path, s: Sizes) -> Metrics:
    path = d / "rand"
    n, _ = write_file(path, s.rand_bytes, 99, s.limit)
    blocks = checked(n, s.rand_bytes, "rand_read setup") // (4 * KiB)
    rngs = [random.Random(i) for i in range(4)]
    offsets = [[r.randrange(blocks) * 4 * KiB for _ in range(s.rand_reads)] for r in rngs]
    drop_caches()
    start = time.perf_counter()
    deadline = start + min(s.rand_seconds, s.limit)
    with ThreadPoolExecutor(4) as ex:
        counts = list(ex.map(lambda o: rand_reader(path, o, deadline), offsets))
    return {"rand_read_4k IOPS": sum(counts) / (time.perf_counter() - start)}


def create_small(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        stamp = hash(path).to_bytes(8, "little", signed=True)
        write_all(fd, memoryview(stamp + POOL[8:4 * KiB]))
    finally:
        os.close(fd)


def read_small(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if len(os.read(fd, 8 * KiB)) != 4 * KiB:
            raise BenchError(f"{path}: not 4 KiB")
    finally:
        os.close(fd)


def small_files(d: Path, s: Sizes) -> Metrics:
    per_dir = -(-s.small_files // s.small_dirs)
    files = [d / f"d{i // per_dir:03}" / f"f{i:05}" for i in range(s.small_files)]
    for parent in sorted({f.parent for f in files}):
        parent.mkdir()
    m: Metrics = {}
    made = rate(m, "small_create ops/s", files, create_small, s.limit)
    drop_caches()
    rate(m, "small_stat ops/s", made, os.stat, s.limit)
    rate(m, "small_read ops/s", made, read_small, s.limit)
    rate(m, "small_delete ops/s", made, os.unlink, s.limit)
    return m


def dir_ops(d: Path, s: Sizes) -> Metrics:
    m: Metrics = {}
    names = [d / f"a{i:05}" for i in range(s.dir_entries)]
    made = rate(m, "dir_mkdir ops/s", names, os.mkdir, s.limit)
    pairs = [(p, p.with_name("b" + p.name[1:])) for p in made]
    moved = rate(m, "dir_rename ops/s", pairs, lambda pair: os.rename(*pair), s.limit)
    rate(m, "dir_rmdir ops/s", [new for _, new in moved], os.rmdir, s.limit)
    return m


def find_count(root: Path, want: int, limit: float) -> float:
    """`find ROOT | wc -l`, timed; notes a count other than want."""
    start = time.perf_counter()
    r = subprocess.run(["sh", "-c", f"find {shlex.quote(str(root))} | wc -l"],
                       capture_output=True, text=True, timeout=limit, check=True)
    seconds = time.perf_counter() - start
    if int(r.stdout.strip()) != want:
        note(f"tree_find: {r.stdout.strip()} entries under {root}, expected {want}")
    return seconds


def tree(d: Path, s: Sizes) -> Metrics:
    tarball = source_tarball(s.tree_entries)
    dest = d / "tree"
    dest.mkdir()
    m: Metrics = {"tree_untar s": run_timed(["tar", "-xf", str(tarball), "-C", str(dest)], s.limit)}
    m["tree_du s"] = run_timed(["du", "-s", str(dest)], s.limit)
    m["tree_find s"] = find_count(dest, s.tree_entries + 1, s.limit)
    m["tree_rm s"] = run_timed(["rm", "-rf", str(dest)], s.limit)
    return m


WORKLOADS: list[tuple[str, Callable[[Path, Sizes], Metrics]]] = [
    ("seq_1x", seq_1x), ("seq_4x", seq_4x), ("rand_read", rand_read),
    ("small_files", small_files), ("dir_ops", dir_ops), ("tree", tree)]


# --------------------------------------------------------------- the source tarball
def source_roots() -> list[tuple[Path, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib, "stdlib"), (Path("/usr/lib/python3"), "python3"),
            (Path("/usr/share/doc"), "doc"), (Path("/usr/include"), "include")]


def walk_entries(root: Path) -> Iterator[Path]:
    """Every entry under root, parents first, sorted; no site-packages, no
    caches, no build output (the stdlib's config-3.x holds a 50 MB libpython.a)."""
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "__pycache__")
                         and not x.startswith("config-"))
        for name in dirs + sorted(files):
            yield Path(here) / name


def tree_paths(entries: int) -> Iterable[tuple[Path, str]]:
    count = 0
    for root, arc in source_roots():
        if not root.is_dir():
            continue
        yield root, arc
        count += 1
        for p in walk_entries(root):
            if count >= entries:
                return
            yield p, f"{arc}/{p.relative_to(root)}"
            count += 1


def source_tarball(entries: int) -> Path:
    """A tarball of `entries` real files, directories and links; built once."""
    path = TAR_CACHE / f"source-{entries}.tar"
    if path.exists():
        return path
    TAR_CACHE.mkdir(exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with tarfile.open(tmp, "w") as tar:
        for p, arc in tree_paths(entries):
            tar.add(p, arcname=arc, recursive=False)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------- processes and memory
def proc_argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def find_pids(match: Callable[[list[str]], bool]) -> list[int]:
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    return [pid for pid in pids if pid != os.getpid() and match(proc_argv(pid))]


def serves(argv: list[str], mountpoint: Path) -> bool:
    """Is this the FUSE daemon of mountpoint? objfs keeps its arguments;
    mfsmount rewrites its title to "mfsmount (mounted on: MNT)"."""
    if any(Path(a).name == "objfs" for a in argv[:2]):
        return str(mountpoint) in argv
    return argv[0].startswith("mfsmount") and f"mounted on: {mountpoint})" in " ".join(argv)


def client_pid(mountpoint: Path) -> int | None:
    """The FUSE daemon serving mountpoint (the biggest, if several; stopped ones skipped)."""
    alive = [p for p in find_pids(lambda argv: serves(argv, mountpoint))
             if proc_state(p) not in ("T", "t", "Z")]
    return max(alive, key=vm_hwm_kib) if alive else None


def proc_state(pid: int) -> str:
    return status_field(pid, "State").split(" ")[0] if status_field(pid, "State") else ""


def status_field(pid: int, name: str) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def vm_hwm_kib(pid: int) -> int:
    value = status_field(pid, "VmHWM")
    return int(value.split()[0]) if value else 0


def memory(target: Target) -> Metrics:
    return {f"mem_{role} MiB": vm_hwm_kib(pid) / KiB for role, pid in target.roles().items()
            if vm_hwm_kib(pid)}


def mount_roles(mountpoint: Path) -> Callable[[], dict[str, int]]:
    def roles() -> dict[str, int]:
        pid = client_pid(mountpoint)
        return {"client": pid} if pid else {}
    return roles


# --------------------------------------------------------------- clusters we start
def port_free(port: int) -> bool:
    """Nobody listens on port (TIME_WAIT leftovers do not count, as for a server)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_run(n: int) -> int:
    """A port p such that p .. p+n-1 are all free on loopback now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65536 and all(port_free(base + i) for i in range(n)):
            return base
    raise BenchError("no run of free ports")


def make_objfs(tmp: Path) -> LocalCluster:
    return LocalCluster(state=tmp / "objfs-state", mountpoint=tmp / "objfs-mnt",
                        base_port=free_port_run(4), volume="bench", replicas=REPLICAS)


def objfs_target(cluster: LocalCluster) -> Target:
    def roles() -> dict[str, int]:
        out = mount_roles(cluster.mountpoint)()
        for name, _, _ in cluster.roles():
            pid = cluster._pid(name)
            if pid:
                out[name] = pid
        return out
    return Target("objfs", cluster.mountpoint, roles)


def reaped(pid: int) -> bool:
    """True once our child pid has exited and been reaped (a zombie still
    answers kill(pid, 0), which would make stop_pid wait its whole grace)."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True


def stop_children(pids: list[int], grace: float = 10.0) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while not all(reaped(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def stop_objfs(cluster: LocalCluster) -> None:
    """Unmount, stop the nodes (our children), then let down() clean up the rest."""
    if cluster.mounted():
        subprocess.run(["umount", str(cluster.mountpoint)], capture_output=True)
    if not cluster.mounted():
        stop_children([pid for name, _, _ in cluster.roles() if (pid := cluster._pid(name))])
    cluster.down()


@dataclass
class MooseFS:
    """The peer, started and stopped by the shared scripts, everything under root."""
    root: Path

    @property
    def mountpoint(self) -> Path:
        return self.root / "mfs-mnt"

    def env(self) -> dict[str, str]:
        return dict(os.environ, PEER_ROOT=str(self.root / "mfs-peer"), MFS_GOAL=str(REPLICAS),
                    MFS_MNT=str(self.mountpoint))

    def up(self) -> Target:
        busy = [p for p in MFS_PORTS if not port_free(p)]
        if busy:
            raise BenchError(f"MooseFS ports {busy} are in use (another MooseFS running?)")
        progress(f"starting MooseFS (goal {REPLICAS}, under {self.root})")
        r = subprocess.run([str(PEERS / "moosefs-up.sh")], env=self.env(), capture_output=True,
                           text=True, timeout=900)
        if r.returncode != 0:
            tail = (r.stdout + r.stderr).strip().splitlines()[-5:]
            raise BenchError(f"moosefs-up.sh failed ({r.returncode}): " + " | ".join(tail))
        return Target("moosefs", self.mountpoint, self.roles)

    def down(self) -> None:
        """moosefs-down.sh, then end mfsmount: unmounted, it can hang on a
        futex for ever once its master is gone."""
        mount = client_pid(self.mountpoint)
        r = subprocess.run([str(PEERS / "moosefs-down.sh"), "--purge"], env=self.env(),
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            progress(f"moosefs-down.sh failed ({r.returncode}): {r.stdout} {r.stderr}")
        if mount and client_pid(self.mountpoint) == mount:
            stop_pid(mount, grace=3.0)

    def roles(self) -> dict[str, int]:
        etc = str(self.root / "mfs-peer" / "mfs" / "etc")
        out = mount_roles(self.mountpoint)()
        for pid in find_pids(lambda argv: any(a.startswith(etc) for a in argv)):
            cfg = Path(next(a for a in proc_argv(pid) if a.startswith(etc))).stem
            out[cfg.replace("mfschunkserver", "data").replace("mfsmaster", "meta")] = pid
        return out


# --------------------------------------------------------------- running
SETTLE_IDLE = 0.85          # a phase starts once the CPUs are this idle ...
SETTLE_DISK = 0.05          # ... and no disk busier than this over ...
SETTLE_WINDOW = 0.5         # ... one window of this many seconds
SETTLE_MAX = 30.0           # or after this long anyway (noted)


def quiet(window: float) -> bool:
    """Over ``window`` seconds, were the CPUs at least ``SETTLE_IDLE`` idle
    (idle + iowait) and every disk at most ``SETTLE_DISK`` busy?"""
    def cpu() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)

    def disks() -> dict[str, int]:           # milliseconds spent doing I/O, per disk
        whole = {p.name for p in Path("/sys/block").iterdir()
                 if not p.name.startswith(("loop", "ram"))}
        return {f[2]: int(f[12]) for f in (line.split() for line in
                                           Path("/proc/diskstats").read_text().splitlines())
                if len(f) > 12 and f[2] in whole}
    (idle0, total0), io0 = cpu(), disks()
    time.sleep(window)
    (idle1, total1), io1 = cpu(), disks()
    busiest = max((io1[d] - io0.get(d, io1[d]) for d in io1), default=0) / (window * 1000)
    return (idle1 - idle0) / max(1, total1 - total0) >= SETTLE_IDLE and busiest <= SETTLE_DISK


def settle() -> None:
    """Wait until the machine is quiet: what one filesystem still does in
    the background after its phase (MooseFS deletes chunks lazily, objfs's
    collector and repair do too) must not be timed as the next one's.
    (With MooseFS in the run, objfs's seq_read_4x, the phase right after
    MooseFS's seq_1x, read 399-406 MiB/s; without it 634.)"""
    deadline = time.monotonic() + SETTLE_MAX
    while not quiet(SETTLE_WINDOW):
        if time.monotonic() > deadline:
            note(f"the machine was still busy {SETTLE_MAX:.0f} s after a phase")
            return


def run_one(run: Run, target: Target, name: str, fn: Callable[[Path, Sizes], Metrics],
            sizes: Sizes) -> None:
    d = target.work / name
    os.sync()                                   # what the previous directory left dirty
    settle()
    try:
        d.mkdir(parents=True)
        m = fn(d, sizes)
    except (OSError, BenchError, subprocess.SubprocessError) as exc:
        run.note(f"{name} on {target.name}: {type(exc).__name__}: {exc}")
        m = {}
    finally:
        shutil.rmtree(d, ignore_errors=True)
    run.results.setdefault(target.name, {}).update(m)
    progress(f"{name} on {target.name}: " + ", ".join(f"{k} {fmt(v)}" for k, v in m.items()))


def run_all(run: Run, sizes: Sizes) -> None:
    for name, fn in WORKLOADS:
        for target in run.targets:
            run_one(run, target, name, fn, sizes)
    for target in run.targets:
        run.results.setdefault(target.name, {}).update(memory(target))
        shutil.rmtree(target.work, ignore_errors=True)


# --------------------------------------------------------------- output
def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"


def metric_order(run: Run) -> list[str]:
    seen: dict[str, None] = {}
    for t in run.targets:
        for k in run.results.get(t.name, {}):
            seen.setdefault(k, None)
    return sorted(seen, key=lambda k: k.startswith("mem_"))


def ratio(v: float | None, base: float | None) -> float | None:
    return v / base if v is not None and base else None


def table(run: Run) -> str:
    names = [t.name for t in run.targets]
    first = names[0]
    head = ["metric"] + [c for n in names for c in ([n] if n == first else [n, f"/{first}"])]
    rows = [head]
    for k in metric_order(run):
        base = run.results.get(first, {}).get(k)
        row = [k]
        for n in names:
            v = run.results.get(n, {}).get(k)
            row += [fmt(v)] if n == first else [fmt(v), fmt(ratio(v, base))]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def report(run: Run, sizes: Sizes, scale: float) -> dict[str, Any]:
    first = run.targets[0].name
    return {"scale": scale, "sizes": sizes.__dict__,
            "workload_seconds": time.monotonic() - run.started,
            "first": first, "directories": {t.name: str(t.path) for t in run.targets},
            "results": run.results,
            "ratios": {t.name: {k: ratio(v, run.results.get(first, {}).get(k))
                                for k, v in run.results.get(t.name, {}).items()}
                       for t in run.targets},
            "notes": run.notes}


def print_report(run: Run, sizes: Sizes, scale: float, json_path: Path | None) -> None:
    data = report(run, sizes, scale)
    print(table(run))
    print(f"\nratios: value / value on {data['first']}. MiB/s, IOPS, ops/s: higher is better; "
          f"s, mem MiB (peak resident, VmHWM): lower is better. scale {scale}, "
          f"workloads {data['workload_seconds']:.0f} s.")
    for n in run.notes:
        print(f"note: {n}")
    if json_path:
        json_path.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="*", type=Path, help="directories to measure (first = baseline)")
    p.add_argument("--objfs", action="store_true", help="start a local objfs cluster and add it")
    p.add_argument("--moosefs", action="store_true", help="start MooseFS (goal 3) and add it")
    p.add_argument("--local", type=Path, help="add a local directory (the physical ceiling)")
    p.add_argument("--scale", type=float, default=1.0, help="size factor (1.0 = full sizes)")
    p.add_argument("--phase-limit", type=float, default=600.0,
                   help="seconds at most per timed phase")
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    a = p.parse_args(argv)
    if not (a.dirs or a.objfs or a.moosefs or a.local):
        p.error("nothing to measure: give directories, --objfs, --moosefs or --local")
    return a


def plain_target(path: Path) -> Target:
    if not path.is_dir():
        raise BenchError(f"{path}: not a directory")
    return Target(str(path), path.resolve(), mount_roles(path.resolve()))


def on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def mounted_under(root: Path) -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(root) + "/")]


@dataclass
class Started:
    """What this run started or created, for cleanup."""
    tmp: Path
    cluster: LocalCluster | None = None
    mfs: MooseFS | None = None
    local: Path | None = None                  # created by us: delete it
    targets: list[Target] = field(default_factory=list)


def set_up(a: argparse.Namespace, st: Started) -> None:
    st.targets += [plain_target(d) for d in a.dirs]
    if a.objfs:
        st.cluster = make_objfs(st.tmp)
        progress(f"starting objfs (metadata node {st.cluster.meta_address}, "
                 f"state {st.cluster.state})")
        st.cluster.up()
        st.targets.append(objfs_target(st.cluster))
    if a.moosefs:
        st.mfs = MooseFS(st.tmp)
        st.targets.append(st.mfs.up())
    if a.local:
        st.local = None if a.local.exists() else a.local
        a.local.mkdir(parents=True, exist_ok=True)
        st.targets.append(Target("local", a.local.resolve(), lambda: {}))


def main(argv: list[str] | None = None) -> int:
    global CURRENT
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    sizes = Sizes.scaled(a.scale, a.phase_limit)
    st = Started(Path(tempfile.mkdtemp(prefix="objfs-bench-", dir="/tmp")))
    st.tmp.chmod(0o755)                         # MooseFS runs as user mfs
    try:
        set_up(a, st)
        CURRENT = Run(st.targets)
        progress(f"building the source tarball ({sizes.tree_entries} entries)")
        source_tarball(sizes.tree_entries)
        run_all(CURRENT, sizes)
        print_report(CURRENT, sizes, a.scale, a.json)
        return 0
    except (BenchError, ClusterError, OSError, subprocess.SubprocessError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup(st)


def cleanup(st: Started) -> None:
    """Unmount and stop what we started; delete our folders if nothing is mounted there."""
    for t in st.targets:
        shutil.rmtree(t.work, ignore_errors=True)
    if st.cluster:
        progress("stopping objfs")
        stop_objfs(st.cluster)
    if st.mfs:
        progress("stopping MooseFS")
        st.mfs.down()
    if st.local:
        shutil.rmtree(st.local, ignore_errors=True)
    left = mounted_under(st.tmp)
    if left:
        progress(f"still mounted, not deleting {st.tmp}: {left}")
    else:
        shutil.rmtree(st.tmp, ignore_errors=True)
    progress(f"cleaned up; wall time {time.monotonic() - T0:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
