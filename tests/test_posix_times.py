"""Timestamps as a user sees them (issue 3, point 3): every operation runs on
the mount and on a local ext4 directory, and the same timestamps of the same
inodes must change (or stay) on both."""

from __future__ import annotations

import mmap
import os
import stat
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from .cluster import Cluster
from .posix import RENAME_EXCHANGE, Pair, pair, renameat2

__all__ = ["pair"]       # the module-scoped fixture used below


def setup_tree(r: Path) -> None:
    (r / "d1" / "sub").mkdir(parents=True)
    (r / "d2").mkdir()
    (r / "d1" / "f").write_bytes(b"hello")
    (r / "d2" / "g").write_bytes(b"g")
    (r / "d1" / "linked").write_bytes(b"two names")
    os.link(r / "d1" / "linked", r / "d2" / "linked")


# Every name the operations below make or keep, in the order that picks an
# inode's name (by lstat only: listing a directory would set its atime).
NAMES = [".", "d1", "d2", "d1/sub", "d1/f", "d2/g", "d1/linked", "d2/linked", "d2/h",
         "d2/f2", "d1/f2", "d2/sub"]


def times_by_inode(r: Path) -> dict[int, tuple[str, int, int, int]]:
    """inode -> (first name, mtime, ctime, atime) for the NAMES that exist."""
    out: dict[int, tuple[str, int, int, int]] = {}
    for name in NAMES:
        try:
            st = os.lstat(r / name)
        except FileNotFoundError:
            continue
        out.setdefault(st.st_ino, (name, st.st_mtime_ns, st.st_ctime_ns, st.st_atime_ns))
    return out


def changes(r: Path, action: Callable[[Path], Any]) -> dict[str, str]:
    """Which of mtime, ctime, atime ("m", "c", "a") ``action`` changes, for
    every inode that exists before and after, by its path before."""
    setup_tree(r)
    time.sleep(0.03)            # the local clock is coarse (jiffies)
    before = times_by_inode(r)
    time.sleep(0.03)
    action(r)
    after = times_by_inode(r)
    out = {}
    for ino, (path, *old) in before.items():
        if ino in after:
            new = after[ino][1:]
            flags = "".join(c for c, x, y in zip("mca", old, new) if x != y)
            if flags:
                out[path] = flags
    return out


def write(p: Path) -> None:
    with open(p, "r+b") as f:
        f.write(b"X")


def read(p: Path) -> None:
    with open(p, "rb") as f:
        f.read()


def write_nothing(p: Path) -> None:
    with open(p, "ab") as f:
        f.write(b"")


def mmap_write(p: Path) -> None:
    fd = os.open(p, os.O_RDWR)
    with mmap.mmap(fd, 5) as m:
        m[0:1] = b"M"
        m.flush()
    os.close(fd)


def ftruncate_same(p: Path) -> None:
    fd = os.open(p, os.O_RDWR)
    os.ftruncate(fd, os.fstat(fd).st_size)
    os.close(fd)


def open_trunc(p: Path) -> None:
    os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))


F = "d1/f"
OPS: dict[str, tuple[Callable[[Path], Any], dict[str, str]]] = {
    "write": (lambda r: write(r / F), {F: "mc"}),
    "write nothing": (lambda r: write_nothing(r / F), {}),
    "mmap write": (lambda r: mmap_write(r / F), {F: "mca"}),
    "read": (lambda r: read(r / F), {F: "a"}),
    "stat": (lambda r: os.stat(r / F), {}),
    "readdir": (lambda r: os.listdir(r / "d1"), {"d1": "a"}),
    "truncate": (lambda r: os.truncate(r / F, 2), {F: "mc"}),
    "truncate to the same size": (lambda r: os.truncate(r / F, 5), {F: "mc"}),
    "ftruncate to the same size": (lambda r: ftruncate_same(r / F), {F: "mc"}),
    "open O_TRUNC": (lambda r: open_trunc(r / F), {F: "mc"}),
    "link": (lambda r: os.link(r / F, r / "d2" / "h"), {F: "c", "d2": "mc"}),
    "unlink one of two names": (lambda r: os.unlink(r / "d2" / "linked"),
                                {"d1/linked": "c", "d2": "mc"}),
    "rename across directories": (lambda r: os.rename(r / F, r / "d2" / "f2"),
                                  {F: "c", "d1": "mc", "d2": "mc"}),
    "rename in one directory": (lambda r: os.rename(r / F, r / "d1" / "f2"),
                                {F: "c", "d1": "mc"}),
    "rename a directory": (lambda r: os.rename(r / "d1" / "sub", r / "d2" / "sub"),
                           {"d1/sub": "c", "d1": "mc", "d2": "mc"}),
    "rename over a file": (lambda r: os.rename(r / F, r / "d2" / "g"),
                           {F: "c", "d1": "mc", "d2": "mc"}),
    "exchange": (lambda r: renameat2(r / F, r / "d2" / "g", RENAME_EXCHANGE),
                 {F: "c", "d2/g": "c", "d1": "mc", "d2": "mc"}),
    "chmod": (lambda r: os.chmod(r / F, 0o600), {F: "c"}),
    "chown": (lambda r: os.chown(r / F, 1, 1), {F: "c"}),
    "setxattr": (lambda r: os.setxattr(r / F, "user.a", b"1"), {F: "c"}),
    "mkdir": (lambda r: os.mkdir(r / "d1" / "new"), {"d1": "mc"}),
    "rmdir": (lambda r: os.rmdir(r / "d1" / "sub"), {"d1": "mc"}),
    "create": (lambda r: (r / "d1" / "new").write_bytes(b""), {"d1": "mc"}),
    "symlink": (lambda r: os.symlink("x", r / "d1" / "s"), {"d1": "mc"}),
    "mknod a fifo": (lambda r: os.mknod(r / "d1" / "p", stat.S_IFIFO | 0o600), {"d1": "mc"}),
    "create in a subdirectory": (lambda r: (r / "d1" / "sub" / "x").write_bytes(b""),
                                 {"d1/sub": "mc"}),
    "utime now": (lambda r: os.utime(r / F), {F: "mca"}),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_timestamps_change_as_on_a_local_filesystem(pair: Pair, name: str) -> None:
    action, expected = OPS[name]
    on_mount, on_disk = pair.fresh(name.replace(" ", "-"))
    assert (changes(on_mount, action), changes(on_disk, action)) == (expected, expected)


def test_removexattr_changes_ctime_only(pair: Pair) -> None:
    for root in pair.fresh("removexattr"):
        (root / "f").write_bytes(b"x")
        os.setxattr(root / "f", "user.a", b"1")
        time.sleep(0.03)
        before = os.stat(root / "f")
        time.sleep(0.03)
        os.removexattr(root / "f", "user.a")
        after = os.stat(root / "f")
        assert after.st_mtime_ns == before.st_mtime_ns
        assert after.st_ctime_ns > before.st_ctime_ns


def test_a_write_shows_new_times_before_close(pair: Pair) -> None:
    """While the written data is still buffered in the mount, fstat shows the
    new mtime and a ctime not older than it."""
    for root in pair.fresh("open-write"):
        (root / "f").write_bytes(b"abc")
        time.sleep(0.03)
        before = os.stat(root / "f")
        fd = os.open(root / "f", os.O_WRONLY)
        os.write(fd, b"Z")
        during = os.fstat(fd)
        os.close(fd)
        assert during.st_mtime_ns > before.st_mtime_ns
        assert during.st_ctime_ns >= during.st_mtime_ns


def test_times_shown_at_close_are_the_ones_kept(cluster: Cluster, mnt: Path) -> None:
    """The mtime and ctime a stat shows right after close (the mount
    commits a closed file a moment later) are the ones stored: the same a
    moment later and after a remount.  (git's index and make compare them;
    a ctime that moved after the fact makes git hash every file again.)"""
    shown = {}
    for i in range(20):
        (mnt / f"f{i}").write_bytes(os.urandom(i * 3_000))      # inline and in blocks
        shown[i] = os.stat(mnt / f"f{i}")
    os.rename(mnt / "f3", mnt / "g3")               # a change of its own after the close
    moved = os.stat(mnt / "g3")
    assert moved.st_ctime_ns >= shown[3].st_ctime_ns
    time.sleep(0.2)
    later = {i: os.stat(mnt / (f"f{i}" if i != 3 else "g3")) for i in shown}
    cluster.umount(mnt)
    cluster.mount(mnt)
    for i, st in shown.items():
        expect = moved if i == 3 else st
        again = os.stat(mnt / (f"f{i}" if i != 3 else "g3"))
        for seen in (later[i], again):
            assert (seen.st_size, seen.st_mtime_ns, seen.st_ctime_ns) == \
                (expect.st_size, expect.st_mtime_ns, expect.st_ctime_ns), i


TIMES = [(1, 2), (1_000_000_123, 2_000_000_456), (2**32 * 10**9 + 5, 2**33 * 10**9 + 7),
         (-1_000_000_001, -5), (0, 0)]


def test_nanosecond_times_round_trip(cluster: Cluster, mnt: Path) -> None:
    """utimensat with nanoseconds, past 2^32 s and before 1970, kept exactly,
    also after a remount."""
    for i, ns in enumerate(TIMES):
        (mnt / f"t{i}").write_bytes(b"")
        os.utime(mnt / f"t{i}", ns=ns)
        st = os.stat(mnt / f"t{i}")
        assert (st.st_atime_ns, st.st_mtime_ns) == ns
    cluster.umount(mnt)
    cluster.mount(mnt)
    for i, ns in enumerate(TIMES):
        st = os.stat(mnt / f"t{i}")
        assert (st.st_atime_ns, st.st_mtime_ns) == ns


def test_directory_nlink_is_two_plus_subdirectories(pair: Pair) -> None:
    for root in pair.fresh("nlink"):
        (root / "a" / "x").mkdir(parents=True)
        (root / "a" / "y").mkdir()
        (root / "a" / "file").write_text("f")
        (root / "b").mkdir()
        assert [os.stat(root / n).st_nlink for n in ("a", "b")] == [4, 2]
        os.rename(root / "a" / "x", root / "b" / "x")
        assert [os.stat(root / n).st_nlink for n in ("a", "b")] == [3, 3]
        os.rmdir(root / "a" / "y")
        assert os.stat(root / "a").st_nlink == 2
        assert os.stat(root).st_nlink == 4
