"""Several mounts of one volume: close-to-open, leases recalled on change,
concurrent namespace changes, and a crashed client.  Real mounts, real
processes."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from .cluster import Cluster, checked_cluster, daemon_pids

LEASE_TIME = 4.0


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Cluster, Path, Path]]:
    with checked_cluster(tmp_path / "cluster", meta_args=["--lease-time", str(LEASE_TIME)]) as c:
        c.create_volume("vol", block_size=1 << 20)
        a, b = tmp_path / "a", tmp_path / "b"
        c.mount(a)
        c.mount(b)
        yield c, a, b


def test_close_to_open_and_sizes_never_go_back(two: tuple[Cluster, Path, Path]) -> None:
    _, a, b = two
    for round_ in range(20):
        data = os.urandom(1000 + 70_001 * round_)
        (a / "f").write_bytes(data)                  # closed on A ...
        assert os.stat(b / "f").st_size == len(data)  # ... B sees the size at once
        assert (b / "f").read_bytes() == data         # and every byte
    with open(a / "log", "ab") as log:
        for i in range(30):
            log.write(b"line %d\n" % i)
            log.flush()
            os.fsync(log.fileno())
            assert os.stat(b / "log").st_size == log.tell()


def test_writes_racing_recalls_of_their_lease_are_all_committed(
        two: tuple[Cluster, Path, Path]) -> None:
    """B opens and stats the file A appends to, over and over: every open
    recalls A's WRITE lease.  A write that lands while A flushes for a recall
    goes under A's next lease: no write or fsync fails, no byte is lost."""
    _, a, b = two
    stop = threading.Event()
    seen: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(os.stat(b / "log").st_size)
                with open(b / "log", "rb") as f:
                    f.read(1)
            except FileNotFoundError:
                pass
    (a / "log").write_bytes(b"")
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        with open(a / "log", "ab") as log:
            for i in range(300):
                log.write(b"line %d\n" % i)
                log.flush()
                if i % 3 == 0:
                    os.fsync(log.fileno())
    finally:
        stop.set()
        thread.join()
    assert (b / "log").read_bytes() == b"".join(b"line %d\n" % i for i in range(300))
    assert len(seen) > 10


def test_attributes_set_on_a_file_open_for_writing_show_on_the_other_client(
        two: tuple[Cluster, Path, Path]) -> None:
    """A write, futimens, fchown and fchmod (what tar and cp -a do before
    close) are buffered together on A; B sees all of them at once, before
    and after A's close, and a remount of A sees them too."""
    c, a, b = two
    old = (1_000_000_000, 1_500_000_123)          # atime, mtime (ns)
    with open(a / "f", "wb", buffering=0) as f:
        f.write(b"x" * 5000)
        os.utime(f.fileno(), ns=old)
        os.fchown(f.fileno(), 1234, 5678)
        os.fchmod(f.fileno(), 0o4751)
        mine = os.fstat(f.fileno())
        assert (mine.st_uid, mine.st_gid, oct(mine.st_mode)) == (1234, 5678, "0o104751")
        assert (mine.st_atime_ns, mine.st_mtime_ns, mine.st_size) == (*old, 5000)
        assert mine.st_ctime_ns > old[1]
        theirs = os.stat(b / "f")                  # recalls A's WRITE lease: A commits
        assert (theirs.st_uid, theirs.st_gid, oct(theirs.st_mode)) == (1234, 5678, "0o104751")
        assert (theirs.st_mtime_ns, theirs.st_size) == (old[1], 5000)
        f.write(b"y")                              # a later write sets mtime again
        os.fchmod(f.fileno(), 0o640)
        os.fchown(f.fileno(), 1234, 4321)
        mid = os.stat(b / "f")                     # buffered on A again: B waits for them
        assert (mid.st_size, oct(mid.st_mode), mid.st_gid) == (5001, "0o100640", 4321)
    after = os.stat(b / "f")
    assert (after.st_size, oct(after.st_mode), after.st_uid, after.st_gid) == \
        (5001, "0o100640", 1234, 4321)
    assert after.st_mtime_ns > old[1]
    assert (b / "f").read_bytes() == b"x" * 5000 + b"y"
    c.umount(a)
    c.mount(a)
    again = os.stat(a / "f")
    assert (again.st_mode, again.st_uid, again.st_gid, again.st_mtime_ns) == \
        (after.st_mode, after.st_uid, after.st_gid, after.st_mtime_ns)


def test_changes_on_one_client_show_on_the_other_at_once(two: tuple[Cluster, Path, Path]
                                                         ) -> None:
    _, a, b = two
    (a / "d").mkdir()
    assert os.listdir(b / "d") == []                 # B caches the empty directory
    assert not (b / "d" / "x").exists()              # ... and the absence of x
    took = []
    for i in range(10):
        started = time.monotonic()
        (a / "d" / "x").write_bytes(b"hello")
        took.append(time.monotonic() - started)
        assert os.listdir(b / "d") == ["x"]
        assert (b / "d" / "x").read_bytes() == b"hello"
        os.rename(a / "d" / "x", a / "d" / "y")
        assert os.listdir(b / "d") == ["y"] and not (b / "d" / "x").exists()
        os.unlink(a / "d" / "y")
        assert os.listdir(b / "d") == [] and not (b / "d" / "y").exists()
    print(f"\ncreate+write on A while B caches the directory: "
          f"median {sorted(took)[len(took) // 2] * 1000:.1f} ms")


def test_a_directory_moved_on_one_client_shows_its_new_parent_on_the_other(
        two: tuple[Cluster, Path, Path]) -> None:
    _, a, b = two
    (a / "p" / "c").mkdir(parents=True)
    (a / "q").mkdir()
    for i in range(5):
        old, new = (a / "p", a / "q") if i % 2 == 0 else (a / "q", a / "p")
        b_old, b_new = b / old.name, b / new.name
        assert os.stat(b_old / "c" / "..").st_ino == os.stat(b_old).st_ino
        assert sorted(os.listdir(b_old / "c")) == []      # B caches c, its parent ...
        dotdot = subprocess.run(["ls", "-ai", str(b_old / "c")], capture_output=True,
                                text=True, check=True).stdout.split()
        assert dotdot[dotdot.index("..") - 1] == str(os.stat(b_old).st_ino)
        os.rename(old / "c", new / "c")                   # ... A moves c
        dotdot = subprocess.run(["ls", "-ai", str(b_new / "c")], capture_output=True,
                                text=True, check=True).stdout.split()
        assert dotdot[dotdot.index("..") - 1] == str(os.stat(b_new).st_ino)


def test_mkdir_race_has_one_winner(two: tuple[Cluster, Path, Path]) -> None:
    _, a, b = two
    results: list[str] = []

    def make(root: Path, i: int) -> None:
        try:
            os.mkdir(root / f"race{i}")
            results.append("ok")
        except FileExistsError:
            results.append("exists")
    for i in range(20):
        threads = [threading.Thread(target=make, args=(root, i)) for root in (a, b, a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results.count("ok") == 20 and results.count("exists") == 60
    assert sorted(os.listdir(b)) == sorted(f"race{i}" for i in range(20))


def test_crashed_writer_holds_others_up_only_for_the_lease_time(
        two: tuple[Cluster, Path, Path]) -> None:
    c, a, b = two
    fd = os.open(a / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"durable" * 1000)
    os.fsync(fd)                                      # acknowledged
    os.write(fd, b"never flushed" * 1000)            # buffered under A's write lease
    for pid in daemon_pids(a):
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(OSError):
        os.close(fd)                                  # the dead mount fails the close
    started = time.monotonic()
    assert (b / "f").read_bytes() == b"durable" * 1000
    waited = time.monotonic() - started
    print(f"\nB proceeded {waited:.1f} s after A was killed (lease time {LEASE_TIME} s)")
    assert waited < LEASE_TIME + 3
    c.umount(a)                                       # the dead mount can be cleaned ...
    c.mount(a)                                        # ... and mounted again
    assert (a / "f").read_bytes() == b"durable" * 1000
    subprocess.run(["sync", "-f", str(a)], check=True)


def test_new_files_are_seen_whole_at_once_and_outlive_a_killed_mount(
        two: tuple[Cluster, Path, Path]) -> None:
    """Files a mount made itself (their creates and data commits batched)
    are seen by another mount at once, every byte and the right size.
    Then A is killed: files it closed a moment before, and files closed
    just before an fsync of their directory, are all whole for B."""
    c, a, b = two
    (a / "d").mkdir()                        # made here: its names are known here
    files = {f"f{i}": os.urandom(i * 9_000) for i in range(24)}   # inline and in blocks
    for name, data in files.items():
        (a / "d" / name).write_bytes(data)
    for name, data in files.items():
        assert os.stat(b / "d" / name).st_size == len(data)
        assert (b / "d" / name).read_bytes() == data

    (a / "e").mkdir()
    settled = {f"s{i}": os.urandom(3_000 + i * 20_000) for i in range(10)}
    for name, data in settled.items():
        (a / "e" / name).write_bytes(data)
    time.sleep(1.0)                          # far past the few ms the commits wait
    synced = {f"y{i}": os.urandom(5_000 + i * 30_000) for i in range(10)}
    for name, data in synced.items():
        (a / "e" / name).write_bytes(data)
    fd = os.open(a / "e", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for pid in daemon_pids(a):
        os.kill(pid, signal.SIGKILL)
    for name, data in {**settled, **synced}.items():
        assert (b / "e" / name).read_bytes() == data, name
    c.umount(a)


def test_a_file_renamed_over_another_just_after_it_was_written_is_never_found_empty(
        two: tuple[Cluster, Path, Path]) -> None:
    """An editor's save: write a new file, rename it over the old one.  A
    mount commits a closed file a moment after the close; killed at once
    after the rename, it must not leave the rename done and the data not:
    B finds the old file or the new one, whole, each time."""
    c, a, b = two
    for turn in range(4):
        old, new = f"old {turn}.".encode() * 3_000, os.urandom(20_000 + turn * 9_000)
        with open(a / "doc", "wb") as f:
            f.write(old)
            os.fsync(f.fileno())
        assert (b / "doc").read_bytes() == old          # B reads the directory too
        (a / "doc.tmp").write_bytes(new)
        os.rename(a / "doc.tmp", a / "doc")
        for pid in daemon_pids(a):
            os.kill(pid, signal.SIGKILL)
        found = (b / "doc").read_bytes()
        assert found in (old, new), f"turn {turn}: {len(found)} bytes"
        c.umount(a)
        c.mount(a)


def test_locks_hold_among_the_processes_of_one_mount(two: tuple[Cluster, Path, Path]) -> None:
    _, a, _ = two
    (a / "lock").write_bytes(b"")
    script = ("import fcntl, sys\n"
              "f = open(sys.argv[1], 'r+')\n"
              "try:\n"
              "    fcntl.{call}(f, fcntl.{flag} | fcntl.LOCK_NB)\n"
              "    print('got')\n"
              "except BlockingIOError:\n"
              "    print('busy')\n")
    for call, flag in (("flock", "LOCK_EX"), ("lockf", "LOCK_EX")):
        with open(a / "lock", "r+") as held:
            import fcntl
            getattr(fcntl, call)(held, getattr(fcntl, flag))
            other = subprocess.run([sys.executable, "-c", script.format(call=call, flag=flag),
                                    str(a / "lock")], capture_output=True, text=True)
            assert other.stdout.strip() == "busy", (call, other.stderr)
        free = subprocess.run([sys.executable, "-c", script.format(call=call, flag=flag),
                               str(a / "lock")], capture_output=True, text=True)
        assert free.stdout.strip() == "got", (call, free.stderr)


WORKER = r"""
import json, os, random, sys
root, me, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
mine = set()
for i in range(150):
    d = os.path.join(root, f"d{rng.randrange(3)}")
    choice = rng.random()
    if choice < 0.5 or not mine:
        name = os.path.join(d, f"{me}-{i}")
        with open(name, "wb") as f:
            f.write(name.encode())
        mine.add(name)
    elif choice < 0.8:
        old = rng.choice(sorted(mine))
        new = os.path.join(root, f"d{rng.randrange(3)}", f"{me}-r{i}")
        os.rename(old, new)
        mine.discard(old)
        mine.add(new)
    else:
        victim = rng.choice(sorted(mine))
        os.unlink(victim)
        mine.discard(victim)
print(json.dumps(sorted(os.path.relpath(p, root) for p in mine)))
"""


def test_four_clients_change_one_directory_tree_and_lose_nothing(tmp_path: Path) -> None:
    with checked_cluster(tmp_path / "cluster", meta_args=["--lease-time", str(LEASE_TIME)]) as c:
        c.create_volume("vol", block_size=1 << 20)
        mounts = [tmp_path / f"m{i}" for i in range(4)]
        for m in mounts:
            c.mount(m)
        for d in range(3):
            (mounts[0] / f"d{d}").mkdir()
        workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(m), f"c{i}", str(i)],
                                    stdout=subprocess.PIPE, text=True)
                   for i, m in enumerate(mounts)]
        expected: set[str] = set()
        for w in workers:
            out, _ = w.communicate(timeout=300)
            assert w.returncode == 0
            expected |= set(json.loads(out))
        for m in mounts:                  # every client sees the same, complete tree
            seen = {str(p.relative_to(m)) for p in m.glob("d*/*")}
            assert seen == expected, (m, sorted(seen ^ expected)[:10])
            for rel in sorted(expected)[:40]:     # content written by the file's creator
                writer = os.path.basename((m / rel).read_bytes().decode()).split("-")[0]
                assert writer == os.path.basename(rel).split("-")[0], rel


def test_a_file_read_again_shows_what_the_other_client_wrote_since(
        two: tuple[Cluster, Path, Path]) -> None:
    """A keeps the block map of a file it closed (a re-read after the kernel
    dropped its pages needs no round trip); a same-size rewrite on B, or a
    truncate on A itself, must never leave A reading the old bytes."""
    _, a, b = two
    for size in (3000, 3 << 20):               # inline, and in a data block
        first, second = os.urandom(size), os.urandom(size)
        (a / "f").write_bytes(first)
        assert (a / "f").read_bytes() == first
        drop_kernel_caches()
        assert (a / "f").read_bytes() == first     # from the kept map
        (b / "f").write_bytes(second)              # recalls A's lease
        drop_kernel_caches()
        assert (a / "f").read_bytes() == second
        os.truncate(a / "f", size // 2)            # closed on A: a setattr
        drop_kernel_caches()
        assert (a / "f").read_bytes() == second[:size // 2]
        assert (b / "f").read_bytes() == second[:size // 2]


def drop_kernel_caches() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def test_a_writer_changing_an_open_file_while_another_mount_stats_it_loses_nothing(
        two: tuple[Cluster, Path, Path]) -> None:
    """A rewrites, chmods, chowns and fsyncs a file it keeps open, over and
    over, while B stats and reads it: every stat of B recalls A's WRITE
    lease.  No call of A fails (a lost track of its WRITE lease made a close
    fail with EIO and drop the data), and both mounts end agreeing."""
    _, a, b = two
    (a / "f").write_bytes(b"")
    stop = time.monotonic() + 20
    failures: list[BaseException] = []
    rnd = random.Random(5)

    def reader() -> None:
        while time.monotonic() < stop and not failures:
            try:
                os.stat(b / "f")
                if rnd.random() < 0.3:
                    (b / "f").read_bytes()
            except Exception as exc:             # noqa: BLE001 (reported below)
                failures.append(exc)
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        while time.monotonic() < stop and not failures:
            with open(a / "f", "r+b") as f:
                for _ in range(rnd.randint(1, 4)):
                    step = rnd.random()
                    if step < 0.5:
                        f.seek(0)
                        f.truncate()
                        f.write(os.urandom(rnd.randint(0, 200_000)))
                        f.flush()
                    elif step < 0.8:
                        os.fchmod(f.fileno(), rnd.choice([0o600, 0o640, 0o644, 0o755]))
                    else:
                        os.fchown(f.fileno(), rnd.choice([0, 1000, 1234]), -1)
                    if rnd.random() < 0.2:
                        os.fsync(f.fileno())
    finally:
        stop = 0
        thread.join()
    assert not failures, failures
    mine, theirs = os.stat(a / "f"), os.stat(b / "f")
    assert (mine.st_mode, mine.st_uid, mine.st_size) == (theirs.st_mode, theirs.st_uid,
                                                        theirs.st_size)
    assert (a / "f").read_bytes() == (b / "f").read_bytes()


def test_a_new_open_reads_what_the_other_mount_wrote_while_an_older_handle_stays_open(
        two: tuple[Cluster, Path, Path]) -> None:
    """Close-to-open holds for each open, even while this mount keeps an
    older handle of the file open (the handles share one view of the file
    and the kernel's pages): same-size rewrites, inline and in data blocks."""
    _, a, b = two
    for size in (3000, 3 << 20):
        first = os.urandom(size)
        (a / "f").write_bytes(first)
        with open(b / "f", "rb") as older:
            assert older.read() == first
            for _ in range(3):
                second = os.urandom(size)
                with open(a / "f", "r+b") as f:     # recalls B's lease
                    f.write(second)
                with open(b / "f", "rb") as newer:
                    assert newer.read() == second
        drop_kernel_caches()
        assert (b / "f").read_bytes() == second     # and after the last close


def test_a_handle_open_on_one_mount_follows_what_the_other_appends(
        two: tuple[Cluster, Path, Path]) -> None:
    """As tail -f does: B keeps the file open, sees its size grow in fstat
    and reads on from where it was.  Each read through the old handle gets
    the bytes A appended and closed, and never cuts the size B's kernel
    knows back to what B read first (a short read does that: a new open on
    B then read the file at its old length)."""
    _, a, b = two
    lines = [b"line %d " % i + os.urandom(30_000) for i in range(12)]
    (a / "log").write_bytes(lines[0])
    with open(b / "log", "rb", buffering=0) as follower:
        seen = follower.read(1 << 20)
        for line in lines[1:]:
            with open(a / "log", "ab") as writer:    # recalls B's lease
                writer.write(line)
            size = os.fstat(follower.fileno()).st_size
            assert size == sum(map(len, lines[:lines.index(line) + 1]))
            while len(seen) < size:
                got = follower.read(size - len(seen))
                assert got, f"the old handle read nothing at {len(seen)} of {size}"
                seen += got
            assert seen == b"".join(lines[:lines.index(line) + 1])
            assert (b / "log").read_bytes() == seen     # a new open on B agrees
            assert os.stat(b / "log").st_size == size


def test_a_file_changed_at_once_by_the_other_mount_is_read_whole(
        two: tuple[Cluster, Path, Path]) -> None:
    """A makes a file and chmods it; B at once opens it and extends it by a
    truncate; A then reads it, while a thread stats and reads it through
    both mounts.  A must read B's size every time: an answer A sent under
    its lease just before the recall could reach A's kernel after the
    recall's invalidation, and A's kernel then kept the size 0 for seconds
    (about one try in 500 on a busy machine)."""
    _, a, b = two
    wrong: list[str] = []
    for i in range(100):
        stop = threading.Event()
        rnd = random.Random(i)

        def noise(paths: tuple[Path, Path] = (a / f"c{i}", b / f"c{i}"),
                  stop: threading.Event = stop, rnd: random.Random = rnd) -> None:
            while not stop.is_set():
                try:
                    os.stat(rnd.choice(paths))
                    if rnd.random() < 0.3:
                        rnd.choice(paths).read_bytes()
                except OSError:
                    pass
        (a / f"c{i}").write_bytes(b"")
        os.chmod(a / f"c{i}", 0o640)
        thread = threading.Thread(target=noise)
        thread.start()
        try:
            with open(b / f"c{i}", "r+b") as f:
                f.truncate(2136)
            got = (a / f"c{i}").read_bytes()
            if got != bytes(2136):
                wrong.append(f"try {i}: A read {len(got)} bytes, size "
                             f"{os.stat(a / f'c{i}').st_size}")
        finally:
            stop.set()
            thread.join()
    assert not wrong, wrong


def test_two_mounts_taking_turns_at_writing_and_truncating_see_each_others_turns(
        two: tuple[Cluster, Path, Path]) -> None:
    """tools/mcx: two mounts take turns writing, truncating and chmodding one
    file while both keep statting and reading it; after each turn the other
    mount must read exactly what was written.  (A truncate used to hold the
    file's lock while waiting behind the other mount's open, which waited
    for this mount's recall flush: both got EIO after 10 s.)"""
    from tools import mcx
    _, a, b = two
    assert mcx.main([str(a / "f"), str(b / "f"), "--seconds", "20", "--seed", "4",
                     "--noise", "read"]) == 0


def meta_rpcs(c: Cluster, method: str, outcome: str = "ok") -> float:
    text = httpx.get(f"http://{c.meta.address}/metrics").text
    prefix = f'objfs_meta_rpc_total{{method="{method}",outcome="{outcome}"}} '
    return sum(float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix))


def test_unlinks_one_mount_answered_itself_are_seen_at_once_by_the_other(
        two: tuple[Cluster, Path, Path]) -> None:
    """A removes 200 files from one directory: it takes the directory's
    WRITE lease, answers the unlinks itself and sends them in batches
    (fusefront/nsqueue.py).  B looks in between, while some are still
    queued: its lookups recall A's lease and wait for the batch, so B
    never sees a removed name; a name A removed and B made again is B's
    new file on both."""
    c, a, b = two
    (a / "d").mkdir()
    assert os.listdir(b / "d") == []          # B caches the directory
    for i in range(200):
        (a / "d" / f"f{i}").write_bytes(b"x" * i)
    unlinks, batches = meta_rpcs(c, "unlink"), meta_rpcs(c, "batch")
    for i in range(200):
        os.unlink(a / "d" / f"f{i}")
        if i % 20 == 0 or i == 199:
            assert not (b / "d" / f"f{i}").exists()
    assert os.listdir(b / "d") == [] and os.listdir(a / "d") == []
    assert meta_rpcs(c, "unlink") - unlinks < 30          # most went in batches
    assert meta_rpcs(c, "batch") > batches
    for i in range(10):
        (a / "d" / f"g{i}").write_bytes(b"a")
        os.unlink(a / "d" / f"g{i}")
        (b / "d" / f"g{i}").write_bytes(b"b")
        assert (a / "d" / f"g{i}").read_bytes() == b"b"
    fd = os.open(a / "d", os.O_RDONLY)
    try:
        os.fsync(fd)                                     # nothing refused
    finally:
        os.close(fd)
    assert sorted(os.listdir(b / "d")) == [f"g{i}" for i in range(10)]


def test_a_tree_one_mount_made_and_removes_is_gone_for_the_other_at_once(
        two: tuple[Cluster, Path, Path]) -> None:
    """`rm -r` of a tree the mount made: its unlinks and rmdirs (of
    directories it made, known empty) are answered there and batched; B,
    looking at any point, never sees what was removed, and can make the
    same names again at once."""
    import shutil
    c, a, b = two
    for d in range(5):
        (a / "t" / f"d{d}" / "sub").mkdir(parents=True)
        for i in range(20):
            (a / "t" / f"d{d}" / f"f{i}").write_bytes(b"x" * i)
    rmdirs, batches = meta_rpcs(c, "rmdir"), meta_rpcs(c, "batch")
    for d in range(5):
        shutil.rmtree(a / "t" / f"d{d}")
        assert not (b / "t" / f"d{d}").exists()
        assert sorted(os.listdir(b / "t")) == [f"d{j}" for j in range(d + 1, 5)]
    (b / "t" / "d0" / "sub").mkdir(parents=True)         # the names are free again
    assert os.listdir(a / "t") == ["d0"] and os.listdir(a / "t" / "d0") == ["sub"]
    assert meta_rpcs(c, "rmdir") - rmdirs < 5             # most went in batches
    assert meta_rpcs(c, "batch") > batches


def test_what_one_mount_made_itself_the_other_sees_at_once_as_made(
        two: tuple[Cluster, Path, Path]) -> None:
    """A makes a tree (mkdir, files written and closed): it answers the
    mkdirs and creates itself under its directory's WRITE lease, with inode
    numbers reserved ahead, and a new file's data commit rides with its
    create in one batch.  B, looking at any point, sees every name A made,
    with the attributes A showed (owner, mode, times, size) and the data;
    a file A made and B then writes is B's on both."""
    c, a, b = two
    (a / "m").mkdir()
    os.chmod(a / "m", 0o2775)                      # setgid: new entries take its group
    os.chown(a / "m", 0, 7)
    assert os.listdir(b / "m") == []
    calls = {m: meta_rpcs(c, m) for m in ("mkdir", "mknod", "commit_blocks", "batch")}
    shown = {}
    for d in range(4):
        (a / "m" / f"d{d}").mkdir()
        for i in range(25):
            p = a / "m" / f"d{d}" / f"f{i}"
            p.write_bytes(bytes([i]) * (i * 100))
            shown[p.relative_to(a)] = os.stat(p)
        shown[(a / "m" / f"d{d}").relative_to(a)] = os.stat(a / "m" / f"d{d}")
        if d % 2 == 0:
            assert sorted(os.listdir(b / "m")) == [f"d{j}" for j in range(d + 1)]
            assert len(os.listdir(b / "m" / f"d{d}")) == 25
    for rel, before in shown.items():
        after = os.stat(b / rel)
        assert (after.st_ino, after.st_mode, after.st_uid, after.st_gid, after.st_size,
                after.st_nlink, after.st_mtime_ns, after.st_ctime_ns) == (
            before.st_ino, before.st_mode, before.st_uid, before.st_gid, before.st_size,
            before.st_nlink, before.st_mtime_ns, before.st_ctime_ns), rel
        assert after.st_gid == 7
        if stat.S_ISREG(after.st_mode):
            i = int(rel.name[1:])
            assert (b / rel).read_bytes() == bytes([i]) * (i * 100)
        else:
            assert after.st_mode & stat.S_ISGID and after.st_nlink == 2
    assert os.stat(b / "m").st_nlink == 6
    # few made the synchronous way: creates and the commits of closed files
    # go in batches, several files to a round trip (B's looks send them too)
    assert meta_rpcs(c, "mkdir") - calls["mkdir"] < 2
    assert meta_rpcs(c, "mknod") - calls["mknod"] < 5
    assert meta_rpcs(c, "commit_blocks") - calls["commit_blocks"] < 20
    assert 4 <= meta_rpcs(c, "batch") - calls["batch"] < 60
    (a / "m" / "new").write_bytes(b"from a")
    (b / "m" / "new").write_bytes(b"from b")
    assert (a / "m" / "new").read_bytes() == b"from b"
    fd = os.open(a / "m", os.O_RDONLY)
    try:
        os.fsync(fd)                                     # nothing refused
    finally:
        os.close(fd)


def test_owner_mode_and_times_set_on_directories_one_mount_made_are_what_the_other_sees(
        two: tuple[Cluster, Path, Path]) -> None:
    """tar's way: A makes directories and then sets their owner, mode and
    times, which A answers itself under its WRITE leases and batches; B
    sees each directory as A showed it (ctime too), at once."""
    c, a, b = two
    (a / "s").mkdir()
    setattrs = meta_rpcs(c, "setattr")
    shown = {}
    for i in range(12):
        d = a / "s" / f"d{i}"
        d.mkdir()
        os.chown(d, 1000 + i, 2000 + i)
        os.chmod(d, 0o1700 | i)
        os.utime(d, ns=(1_000_000_007 * i, 2_000_000_011 * i - 5))
        shown[d.name] = os.stat(d)
        if i % 4 == 0:
            assert os.stat(b / "s" / d.name).st_mtime_ns == 2_000_000_011 * i - 5
    for name, before in shown.items():
        after = os.stat(b / "s" / name)
        assert (after.st_mode, after.st_uid, after.st_gid, after.st_atime_ns,
                after.st_mtime_ns, after.st_ctime_ns) == (
            before.st_mode, before.st_uid, before.st_gid, before.st_atime_ns,
            before.st_mtime_ns, before.st_ctime_ns), name
        i = int(name[1:])
        assert stat.S_IMODE(after.st_mode) == 0o1700 | i and after.st_uid == 1000 + i
    assert meta_rpcs(c, "setattr") - setattrs < 6      # most were batched


def test_renames_one_mount_answered_itself_are_seen_at_once_by_the_other(
        two: tuple[Cluster, Path, Path]) -> None:
    """Renames within a directory A holds the WRITE lease on (of what it
    made: directories, files, a file saved the editor's way over another)
    are answered by A and batched; B sees each at once, and a file replaced
    while open on A still reads its old data there."""
    c, a, b = two
    (a / "r").mkdir()
    for i in range(20):
        (a / "r" / f"d{i}").mkdir()
    renames = meta_rpcs(c, "rename")
    for i in range(20):
        os.rename(a / "r" / f"d{i}", a / "r" / f"e{i}")
        if i % 5 == 0:
            assert (b / "r" / f"e{i}").is_dir() and not (b / "r" / f"d{i}").exists()
    assert sorted(os.listdir(b / "r")) == sorted(f"e{i}" for i in range(20))
    (a / "r" / "doc").write_bytes(b"v0")
    os.link(a / "r" / "doc", a / "r" / "doc.bak")
    for v in range(1, 4):                            # save: write a temporary, rename over
        (a / "r" / ".doc.tmp").write_bytes(b"v%d" % v)
        os.rename(a / "r" / ".doc.tmp", a / "r" / "doc")
        assert (b / "r" / "doc").read_bytes() == b"v%d" % v
    assert meta_rpcs(c, "rename") - renames < 5     # most went in batches
    assert (b / "r" / "doc.bak").read_bytes() == b"v0"
    assert os.stat(b / "r" / "doc.bak").st_nlink == 1 == os.stat(a / "r" / "doc.bak").st_nlink
    assert not (b / "r" / ".doc.tmp").exists()
    (a / "r" / "new").write_bytes(b"new")
    with open(a / "r" / "doc", "rb") as old:          # open here: replaced the usual way
        os.rename(a / "r" / "new", a / "r" / "doc")
        assert old.read() == b"v3"
    assert (b / "r" / "doc").read_bytes() == b"new"
    assert sorted(os.listdir(a / "r")) == sorted(os.listdir(b / "r"))


def test_reads_of_many_files_record_their_atimes_in_few_ops(
        two: tuple[Cluster, Path, Path]) -> None:
    """B reads 150 files A wrote, one after the other (relatime: each
    first read after a write moves its atime): the read accesses go to
    the node many to an op, and A then sees every atime B's read set."""
    c, a, b = two
    (a / "r").mkdir()
    for i in range(150):
        (a / "r" / f"f{i}").write_bytes(b"x" * (i + 1))
    written = {i: os.stat(a / "r" / f"f{i}") for i in range(150)}
    touches = meta_rpcs(c, "touch_atimes")
    started = time.time_ns()
    for i in range(150):
        assert (b / "r" / f"f{i}").read_bytes() == b"x" * (i + 1)
    for i in range(150):
        seen = os.stat(a / "r" / f"f{i}")
        assert seen.st_atime_ns >= started > written[i].st_atime_ns, i
        assert seen.st_mtime_ns == written[i].st_mtime_ns
    assert meta_rpcs(c, "touch_atimes") - touches < 40


def test_small_files_read_in_a_row_cost_few_round_trips_and_changes_still_show(
        two: tuple[Cluster, Path, Path]) -> None:
    """A knows of 200 small files B wrote (it listed them) and reads them one
    after the other: their contents come a few dozen files to a round trip.
    A file B changes after A fetched it that way is read as changed."""
    c, a, b = two
    (b / "s").mkdir()
    expect = {i: b"%d " % i * (i + 1) for i in range(200)}
    for i, data in expect.items():
        (b / "s" / f"f{i:03}").write_bytes(data)
    assert len([os.stat(p) for p in sorted((a / "s").iterdir())]) == 200
    asked = meta_rpcs(c, "get_blocks") + meta_rpcs(c, "small_maps")
    assert (a / "s" / "f000").read_bytes() == expect[0]
    for i in (5, 30):
        expect[i] = b"changed by B %d" % i
        (b / "s" / f"f{i:03}").write_bytes(expect[i])
    for i, data in expect.items():
        assert (a / "s" / f"f{i:03}").read_bytes() == data, i
    assert meta_rpcs(c, "get_blocks") + meta_rpcs(c, "small_maps") - asked < 20


@contextlib.contextmanager
def few_leases_on_a(tmp_path: Path) -> Iterator[tuple[Cluster, Path, Path]]:
    """A cluster with two mounts: a may hold 200 leases, b the default."""
    with checked_cluster(tmp_path / "cluster", meta_args=["--lease-time", str(LEASE_TIME)]) as c:
        c.create_volume("vol")
        a, b = tmp_path / "a", tmp_path / "b"
        c.mount(a, options="max_leases=200")
        c.mount(b)
        yield c, a, b


def test_a_mount_gives_back_leases_it_no_longer_uses_and_stays_fast_and_right(
        tmp_path: Path) -> None:
    """A mount that may hold 200 leases makes 900 files in 30 directories:
    it gives back the leases it used longest ago (release calls), its
    creates stay batched (none sent alone), and every file reads back right
    there and on another mount, also after the other mount changed some."""
    with few_leases_on_a(tmp_path) as (c, a, b):
        released = meta_rpcs(c, "release")
        alone = meta_rpcs(c, "mknod") + meta_rpcs(c, "mkdir")
        expect = {}
        for d in range(30):
            (a / f"d{d}").mkdir()
            for i in range(30):
                expect[f"d{d}/f{i}"] = b"%d/%d " % (d, i) * (i + 1)
                (a / f"d{d}" / f"f{i}").write_bytes(expect[f"d{d}/f{i}"])
        assert meta_rpcs(c, "release") - released >= 2
        assert meta_rpcs(c, "mknod") + meta_rpcs(c, "mkdir") - alone < 20
        for name in ("d0/f0", "d3/f7", "d29/f29"):
            expect[name] = b"changed on b " + name.encode()
            (b / name).write_bytes(expect[name])
        for name, data in expect.items():
            assert (a / name).read_bytes() == data, name
            assert (b / name).read_bytes() == data, name
        assert sorted(p.name for p in (a / "d5").iterdir()) == sorted(f"f{i}" for i in range(30))


def test_removing_what_a_mount_made_leaves_no_leases_behind(tmp_path: Path) -> None:
    """A mount that may hold 200 leases makes and removes 150 files, four
    times over: the lease on each file it removes ends with the file (the
    batch carrying the unlink frees the inode and says so), so it seldom
    has more than 200 to give back (few release calls), and the node holds
    a handful of leases at the end (objfs_meta_leases); before, every
    removed file stayed leased until the mount gave the leases back,
    which slowed each later rm -rf.  So does each file replaced by a
    rename (300 saves the way an editor saves).  The other mount then
    sees the last save, none of the rest, and a name made again."""
    with few_leases_on_a(tmp_path) as (c, a, b):
        released = meta_rpcs(c, "release")
        for n in range(4):
            (a / "d").mkdir()
            for i in range(150):
                (a / "d" / f"f{i}").write_text(f"round {n} file {i}")
            assert (a / "d" / "f77").read_text() == f"round {n} file 77"
            for i in range(150):
                os.unlink(a / "d" / f"f{i}")
            os.rmdir(a / "d")
        for n in range(300):            # an editor saving: a new file renamed over the old
            (a / "saved.tmp").write_text(f"version {n}")
            os.rename(a / "saved.tmp", a / "saved")
        assert (a / "saved").read_text() == "version 299"
        # (a recall's, or a trim when a round's leases overlap the last
        # round's on a slow machine: the node's count below tells)
        assert meta_rpcs(c, "release") - released <= 3
        held = httpx.get(f"http://{c.meta.address}/metrics").text
        assert float(held.split("\nobjfs_meta_leases ")[1].split()[0]) < 20
        assert not (b / "d").exists()
        assert (b / "saved").read_text() == "version 299"
        (a / "d").mkdir()
        (a / "d" / "f7").write_text("made again")
        assert (b / "d" / "f7").read_text() == "made again"
        assert os.listdir(b / "d") == ["f7"]


def test_many_new_names_in_a_directory_made_elsewhere_cost_few_lookups(
        two: tuple[Cluster, Path, Path]) -> None:
    """A creates 300 files in a directory B made and filled: after a few
    lookups of absent names A reads the listing once and answers the rest
    itself (fusefront/fs.py, learn_listing).  What B adds to the directory
    later is seen by A at once, and A cannot create over it."""
    c, a, b = two

    def lookups() -> float:
        return sum(meta_rpcs(c, "lookup", outcome) for outcome in ("ok", "error"))

    (b / "d").mkdir()
    for i in range(100):
        (b / "d" / f"old{i}").write_text(f"old {i}")
    before = lookups()
    for i in range(300):
        (a / "d" / f"new{i}").write_text(f"new {i}")
    assert lookups() - before < 50
    assert all((a / "d" / f"old{i}").read_text() == f"old {i}" for i in range(100))
    names = {f"old{i}" for i in range(100)} | {f"new{i}" for i in range(300)}
    assert set(os.listdir(a / "d")) == set(os.listdir(b / "d")) == names
    (b / "d" / "late").write_text("from B")
    assert (a / "d" / "late").read_text() == "from B"
    with pytest.raises(FileExistsError):
        os.open(a / "d" / "late", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.mkdir(b / "d" / "sub")
    assert (a / "d" / "sub").is_dir()


def test_symlinks_a_mount_made_it_removes_on_its_own(two: tuple[Cluster, Path, Path]) -> None:
    """A new symlink comes with a WRITE lease, as a new file does: its
    maker removes it without a round trip (rm -rf of a tree with links
    went one unlink op a link).  The other mount reads one on the way."""
    c, a, b = two
    (a / "d").mkdir()
    for i in range(50):
        os.symlink(f"target{i}", a / "d" / f"l{i}")
    assert os.readlink(b / "d" / "l7") == "target7"
    unlinks = meta_rpcs(c, "unlink")
    for i in range(50):
        os.unlink(a / "d" / f"l{i}")
    assert meta_rpcs(c, "unlink") - unlinks < 5
    assert os.listdir(b / "d") == [] and os.listdir(a / "d") == []


def test_symlinks_are_made_on_the_mount_and_sent_in_its_batches(
        two: tuple[Cluster, Path, Path]) -> None:
    """tar makes links as it makes files: each link is answered by the mount
    and sent with the directory's other queued changes (it was one
    synchronous op a link, 6.5 ms each in an untar).  Each reads back at
    once, on the other mount too, with its owner, size and target; a bad
    target is refused at once."""
    c, a, b = two
    (a / "d").mkdir()
    before = meta_rpcs(c, "symlink")
    for i in range(50):
        os.symlink(f"target{i}" * (i + 1), a / "d" / f"l{i}")
        assert os.readlink(a / "d" / f"l{i}") == f"target{i}" * (i + 1)
    assert meta_rpcs(c, "symlink") - before < 5
    st = os.lstat(a / "d" / "l9")
    assert stat.S_ISLNK(st.st_mode) and st.st_size == len("target9") * 10
    for i in (0, 49):
        assert os.readlink(b / "d" / f"l{i}") == f"target{i}" * (i + 1)
        assert os.lstat(b / "d" / f"l{i}").st_size == os.lstat(a / "d" / f"l{i}").st_size
    with pytest.raises(OSError) as exc:
        os.symlink("x" * 4096, a / "d" / "long")
    assert exc.value.errno == errno.ENAMETOOLONG
    os.symlink("again", a / "d" / "new")
    os.rename(a / "d" / "new", a / "d" / "l0")
    assert os.readlink(b / "d" / "l0") == "again"
    assert sorted(os.listdir(b / "d")) == sorted(f"l{i}" for i in range(50))
