"""Open files, special files, and big and odd files through the mount
(issue 3, points 4 and 5), where test_files.py does not cover them already."""

from __future__ import annotations

import mmap
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from .cluster import Cluster
from .posix import RENAME_EXCHANGE, RENAME_NOREPLACE, Pair, errname, pair, renameat2

__all__ = ["pair"]      # the module-scoped fixture used below

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 4 * MiB        # the block size of the test volume


def stored_objects(cluster: Cluster) -> int:
    """Block objects on all data nodes together."""
    return sum(1 for node in cluster.data
               for p in (node.state / "objects").rglob("*") if p.is_file())


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.25)


# ---------------------------------------------------------------- open files

def test_unlinked_open_file_lives_until_last_close(cluster: Cluster, mnt: Path) -> None:
    (mnt / "keep").write_bytes(b"k" * 20_000)   # past the inline limit: 3 objects
    wait_for(lambda: stored_objects(cluster) == 3)
    data = os.urandom(9 * MiB)                 # three blocks, three copies each
    (mnt / "ghost").write_bytes(data)
    wait_for(lambda: stored_objects(cluster) == 12)   # stored just after the close
    first = os.open(mnt / "ghost", os.O_RDWR)
    second = os.open(mnt / "ghost", os.O_RDONLY)
    os.unlink(mnt / "ghost")
    assert errname(lambda: os.stat(mnt / "ghost")) == "ENOENT"
    assert os.fstat(first).st_nlink == 0
    os.pwrite(first, b"tail", len(data))
    os.fsync(first)
    os.close(first)
    time.sleep(6)                              # past the collector's grace period
    assert stored_objects(cluster) >= 12       # still open: nothing freed
    assert os.pread(second, len(data) + 10, 0) == data + b"tail"
    os.close(second)
    wait_for(lambda: stored_objects(cluster) == 3)
    assert (mnt / "keep").read_bytes() == b"k" * 20_000
    assert os.listdir(mnt) == ["keep"]


def test_file_replaced_by_rename_while_open_stays_readable(mnt: Path) -> None:
    (mnt / "old").write_bytes(b"old contents")
    (mnt / "new").write_bytes(b"new contents")
    with open(mnt / "old", "rb") as f:
        os.rename(mnt / "new", mnt / "old")
        assert f.read() == b"old contents"
        assert os.fstat(f.fileno()).st_nlink == 0
    assert (mnt / "old").read_bytes() == b"new contents"


def test_o_append_writers_in_one_mount_never_overwrite(mnt: Path) -> None:
    p = mnt / "log"
    p.write_bytes(b"")
    writers, records = 4, 150

    def append(i: int) -> None:
        fd = os.open(p, os.O_WRONLY | os.O_APPEND)
        try:
            for n in range(records):
                os.write(fd, f"writer {i} record {n:04d} ".encode().ljust(100 + 37 * i, b".")
                         + b"\n")
        finally:
            os.close(fd)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = p.read_bytes().splitlines()
    assert len(lines) == writers * records
    for i in range(writers):
        mine = [line for line in lines if line.startswith(f"writer {i} ".encode())]
        assert [int(line.split()[3]) for line in mine] == list(range(records))
        assert all(len(line) == 100 + 37 * i for line in mine)


def test_append_right_after_a_close_is_seen_at_once(mnt: Path) -> None:
    """Reopened for writing while the commit of its last close is on its
    way (the file has an xattr, so the open asks the node for its names):
    the new bytes show in the size and the reads that follow.  (Once, the
    commit's end forgot the file while the open waited, and the new handle
    wrote to a copy nobody read: about one in six of these came back short.)"""
    for i in range(100):
        p = mnt / f"log{i}"
        p.write_text("first\n")
        os.setxattr(p, "user.note", b"x")
        time.sleep(0.003 * (i % 5))     # the commit follows the close by ~10 ms
        with open(p, "a") as f:
            f.write("second\n")
        assert (p.stat().st_size, p.read_text()) == (13, "first\nsecond\n"), p.name


def test_fifo_socket_and_device_nodes(mnt: Path) -> None:
    os.mkfifo(mnt / "fifo")
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append((mnt / "fifo").read_bytes()))
    reader.start()
    (mnt / "fifo").write_bytes(b"through the fifo")
    reader.join(10)
    assert got == [b"through the fifo"]
    assert stat.S_ISFIFO(os.stat(mnt / "fifo").st_mode)

    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(mnt / "sock"))
        server.listen()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(mnt / "sock"))
            conn, _ = server.accept()
            with conn:
                client.sendall(b"hello")
                assert conn.recv(5) == b"hello"
    assert stat.S_ISSOCK(os.stat(mnt / "sock").st_mode)

    os.mknod(mnt / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(mnt / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    (mnt / "null").write_bytes(b"vanishes")
    assert (mnt / "null").read_bytes() == b""
    st = os.stat(mnt / "blk")
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 200)
    assert os.stat(mnt / "null").st_rdev == os.makedev(1, 3)


def test_renameat2_noreplace_and_exchange(pair: Pair) -> None:
    """Exchange a file with a directory across two directories: contents,
    types and the parents' link counts as on a local filesystem."""
    seen = []
    for root in pair.fresh("renameat2"):
        (root / "a").mkdir()
        (root / "b").mkdir()
        (root / "a" / "file").write_bytes(b"file")
        (root / "b" / "dir" / "inner").mkdir(parents=True)
        assert errname(lambda: renameat2(root / "a" / "file", root / "b" / "dir",
                                         RENAME_NOREPLACE)) == "EEXIST"
        renameat2(root / "a" / "file", root / "b" / "new", RENAME_NOREPLACE)
        renameat2(root / "b" / "new", root / "b" / "dir", RENAME_EXCHANGE)
        renameat2(root / "b" / "new", root / "a" / "file", RENAME_NOREPLACE)
        renameat2(root / "a" / "file", root / "b" / "dir", RENAME_EXCHANGE)
        seen.append(((root / "a" / "file").read_bytes() if (root / "a" / "file").is_file()
                     else sorted(os.listdir(root / "a" / "file")),
                     (root / "b" / "dir").read_bytes() if (root / "b" / "dir").is_file()
                     else sorted(os.listdir(root / "b" / "dir")),
                     os.stat(root / "a").st_nlink, os.stat(root / "b").st_nlink))
    assert seen[0] == seen[1] == (b"file", ["inner"], 2, 3)


def test_mmap_and_read_write_see_the_same_bytes(cluster: Cluster, mnt: Path) -> None:
    p = mnt / "mapped"
    size = 9 * MiB
    data = bytearray(os.urandom(size))
    p.write_bytes(data)
    fd = os.open(p, os.O_RDWR)
    with mmap.mmap(fd, size) as m:
        assert m[:] == data                                  # mmap read == write
        edges = [0, 4 * MiB - 3, 8 * MiB + 5, size - 7]      # across block edges
        for off in edges:
            m[off:off + 7] = b"MAPPED!"
            data[off:off + 7] = b"MAPPED!"
        m.flush()
        other = os.open(p, os.O_RDONLY)
        assert os.pread(other, size, 0) == data              # msync reaches read()
        os.close(other)
        os.pwrite(fd, b"WRITTEN", 6 * MiB)
        data[6 * MiB:6 * MiB + 7] = b"WRITTEN"
        assert m[6 * MiB:6 * MiB + 7] == b"WRITTEN"          # write() reaches the map
    os.close(fd)
    cluster.umount(mnt)
    cluster.mount(mnt)
    assert p.read_bytes() == data


# ---------------------------------------------------------------- big and odd files

def test_sparse_10_gib_file_costs_only_its_blocks(cluster: Cluster, mnt: Path) -> None:
    p = mnt / "sparse"
    pieces = {0: b"start", 3 * GiB + 123: b"middle" * 1000, 2**32 - 2: b"across 4 GiB",
              10 * GiB - 5: b"end!!"}
    with open(p, "wb") as f:
        for off, piece in pieces.items():
            f.seek(off)
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())          # committed (a close's commit follows it)
    st = os.stat(p)
    assert st.st_size == 10 * GiB
    assert len(cluster.block_holders()) == 5     # blocks 0, 768, 1023, 1024, 2559
    assert 0 < st.st_blocks * 512 <= 5 * BLOCK   # those blocks, up to their last byte
    assert stored_objects(cluster) == 5 * 3
    with open(p, "rb") as f:
        for off, piece in pieces.items():
            f.seek(off)
            assert f.read(len(piece)) == piece
        f.seek(5 * GiB)
        assert f.read(MiB) == bytes(MiB)
        f.seek(10 * GiB - 5)
        assert f.read(100) == b"end!!"


def test_offsets_past_4_gib_and_near_the_largest_size(mnt: Path) -> None:
    p = mnt / "far"
    offsets = [2**32 - 4, 2**32 + 4, 2**33 + 4097, 2**40 + 1, 2**43 + 12345]
    with open(p, "w+b") as f:
        for off in offsets:
            f.seek(off)
            f.write(off.to_bytes(8, "little"))
        f.flush()
        os.fsync(f.fileno())
    with open(p, "rb") as f:
        for off in offsets:
            f.seek(off)
            assert f.read(8) == off.to_bytes(8, "little")
    assert os.stat(p).st_size == 2**43 + 12345 + 8
    os.truncate(p, 2**32 + 3)
    with open(p, "rb") as f:
        f.seek(2**32 - 4)
        assert f.read() == (2**32 - 4).to_bytes(8, "little")[:7]


def odd_names() -> list[bytes]:
    every = bytes(b for b in range(1, 256) if b != ord("/"))      # 254 bytes
    return [every, every[::-1] + b"!", b"\xff" * 255, b"\xc3\x28 invalid utf-8",
            b"new\nline", b"-rf", b" ", b"...", b"\\", b"*?[", b"\x01", b"\xed\xa0\x80"]


@pytest.mark.parametrize("remount", [False, True])
def test_names_of_any_bytes_but_slash_and_nul(cluster: Cluster, mnt: Path,
                                              remount: bool) -> None:
    names = odd_names()
    top = os.fsencode(mnt)
    for name in names:
        with open(top + b"/" + name, "wb") as f:
            f.write(name)
    os.mkdir(top + b"/" + b"\xfe dir")
    os.symlink(names[0], top + b"/\xfe dir/link")
    if remount:
        cluster.umount(mnt)
        cluster.mount(mnt)
    assert sorted(os.listdir(top)) == sorted(names + [b"\xfe dir"])
    for name in names:
        with open(top + b"/" + name, "rb") as f:
            assert f.read() == name
    assert os.readlink(top + b"/\xfe dir/link") == names[0]
    os.rename(top + b"/" + names[2], top + b"/\xfe dir/" + names[3][::-1])
    assert sorted(os.listdir(top + b"/\xfe dir")) == sorted([b"link", names[3][::-1]])
    assert (top + b"/" + names[2]) not in [top + b"/" + n for n in os.listdir(top)]
