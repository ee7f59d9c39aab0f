"""Files through the kernel: every operation the issue names, on a real mount."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from .cluster import Cluster

MiB = 1 << 20


def test_create_open_flags(mnt: Path) -> None:
    p = mnt / "f"
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    os.write(fd, b"hello world")
    os.close(fd)
    assert stat.S_IMODE(p.stat().st_mode) == 0o640 & ~_umask()
    with pytest.raises(FileExistsError):
        os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"!")
    os.close(fd)
    assert p.read_bytes() == b"hello world!"
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"new")
    os.close(fd)
    assert p.read_bytes() == b"new"
    with pytest.raises(FileNotFoundError):
        os.open(mnt / "nope", os.O_RDONLY)


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_writes_at_any_offset_sparse_and_past_eof(mnt: Path) -> None:
    p = mnt / "sparse"
    ref = bytearray()
    with open(p, "wb") as f:
        for off, data in [(0, b"a" * 100), (5 * MiB + 3, b"b" * 5000), (1000, b"c" * (4 * MiB)),
                          (20 * MiB, b"end")]:
            f.seek(off)
            f.write(data)
            if len(ref) < off + len(data):
                ref.extend(bytes(off + len(data) - len(ref)))
            ref[off:off + len(data)] = data
    assert p.stat().st_size == len(ref)
    assert p.read_bytes() == bytes(ref)
    with open(p, "rb") as f:
        f.seek(12 * MiB)
        assert f.read(100) == bytes(100)          # a hole reads as zeros


def test_rewrites_of_blocks_being_uploaded_land_whole(cluster: Cluster, mnt: Path,
                                                       tmp_path: Path) -> None:
    """A full 4 MiB block starts uploading at once, from the very buffer
    written into; writes into it right after (while the upload runs) must
    neither change what that upload stores nor be lost: another mount reads
    exactly the last bytes written, and so does this one."""
    block = 4 << 20
    blocks = 12
    expected = bytearray(os.urandom(block * blocks))
    path = mnt / "rewritten"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for i in range(blocks):
            os.pwrite(fd, expected[i * block:(i + 1) * block], i * block)
            patch = os.urandom(1000 + i)
            at = i * block + (i * 7919) % (block - len(patch))
            os.pwrite(fd, patch, at)             # the block's upload is under way
            expected[at:at + len(patch)] = patch
        os.fsync(fd)
        os.pwrite(fd, b"tail", len(expected) - 4)
        expected[-4:] = b"tail"
    finally:
        os.close(fd)
    other = tmp_path / "other"
    cluster.mount(other)
    assert (other / "rewritten").read_bytes() == bytes(expected)
    assert path.read_bytes() == bytes(expected)


def test_truncate_up_and_down(mnt: Path) -> None:
    p = mnt / "t"
    data = os.urandom(9 * MiB + 77)
    p.write_bytes(data)
    os.truncate(p, 5 * MiB + 1)
    assert p.read_bytes() == data[:5 * MiB + 1]
    os.truncate(p, 7 * MiB)
    assert p.read_bytes() == data[:5 * MiB + 1] + bytes(2 * MiB - 1)
    os.truncate(p, 10)
    with open(p, "r+b") as f:
        f.seek(20)
        f.write(b"Z")
    assert p.read_bytes() == data[:10] + bytes(10) + b"Z"
    os.truncate(p, 0)
    assert p.read_bytes() == b"" and p.stat().st_size == 0


def test_truncate_while_open_with_buffered_writes(mnt: Path) -> None:
    p = mnt / "tb"
    with open(p, "w+b") as f:
        f.write(b"x" * (6 * MiB))
        f.truncate(MiB)
        f.seek(2 * MiB)
        f.write(b"y")
        f.flush()
        os.fsync(f.fileno())
    assert p.read_bytes() == b"x" * MiB + bytes(MiB) + b"y"


def test_fsync_and_size_visible_before_close(mnt: Path) -> None:
    p = mnt / "fs"
    with open(p, "wb") as f:
        f.write(b"q" * 3000)
        f.flush()
        assert os.stat(p).st_size == 3000
        os.fsync(f.fileno())
    assert p.read_bytes() == b"q" * 3000


def test_directories(mnt: Path) -> None:
    (mnt / "d" / "e").mkdir(parents=True)
    assert (mnt / "d").stat().st_nlink == 3
    with pytest.raises(OSError) as exc:
        (mnt / "d").rmdir()
    assert exc.value.errno == errno.ENOTEMPTY
    (mnt / "d" / "e").rmdir()
    (mnt / "d").rmdir()
    assert not (mnt / "d").exists()
    (mnt / "x").mkdir()
    with pytest.raises(FileExistsError):
        (mnt / "x").mkdir()


def test_big_directory_lists_completely(mnt: Path) -> None:
    d = mnt / "big"
    d.mkdir()
    names = {f"entry-{i:05d}-{'x' * (i % 50)}" for i in range(20000)}
    for name in names:
        os.close(os.open(d / name, os.O_CREAT | os.O_WRONLY))
    assert set(os.listdir(d)) == names
    out = subprocess.run(["ls", "-f", str(d)], capture_output=True, text=True, check=True)
    assert len(out.stdout.split()) == 20002            # with . and ..


def test_rename_files_and_directories(mnt: Path) -> None:
    (mnt / "a").mkdir()
    (mnt / "b").mkdir()
    (mnt / "a" / "f").write_text("one")
    (mnt / "a" / "g").write_text("two")
    os.rename(mnt / "a" / "f", mnt / "b" / "f2")              # across directories
    assert (mnt / "b" / "f2").read_text() == "one"
    os.rename(mnt / "a" / "g", mnt / "b" / "f2")               # replacing a target
    assert (mnt / "b" / "f2").read_text() == "two"
    assert not (mnt / "a" / "g").exists()
    (mnt / "a" / "sub").mkdir()
    (mnt / "a" / "sub" / "deep").write_text("deep")
    os.rename(mnt / "a" / "sub", mnt / "b" / "moved")          # a directory
    assert (mnt / "b" / "moved" / "deep").read_text() == "deep"
    assert (mnt / "a").stat().st_nlink == 2 and (mnt / "b").stat().st_nlink == 3
    (mnt / "b" / "empty").mkdir()
    os.rename(mnt / "b" / "moved", mnt / "b" / "empty")        # over an empty directory
    with pytest.raises(OSError) as exc:
        os.rename(mnt / "b", mnt / "b" / "empty" / "inside")
    assert exc.value.errno == errno.EINVAL


def test_unlink_symlink_hardlink(mnt: Path) -> None:
    p = mnt / "file"
    p.write_text("data")
    os.symlink("file", mnt / "sym")
    assert os.readlink(mnt / "sym") == "file"
    assert (mnt / "sym").read_text() == "data"
    assert stat.S_ISLNK(os.lstat(mnt / "sym").st_mode)
    os.link(p, mnt / "hard")
    assert p.stat().st_nlink == 2
    assert os.stat(mnt / "hard").st_ino == p.stat().st_ino
    p.unlink()
    assert (mnt / "hard").stat().st_nlink == 1
    assert (mnt / "hard").read_text() == "data"
    assert not (mnt / "sym").exists()          # dangling now
    (mnt / "sym").unlink()
    (mnt / "hard").unlink()
    assert os.listdir(mnt) == []


def test_unlinked_open_file_stays_readable(mnt: Path) -> None:
    p = mnt / "ghost"
    p.write_bytes(b"g" * 100000)
    with open(p, "r+b") as f:
        p.unlink()
        assert f.read() == b"g" * 100000
        f.write(b"more")
        f.flush()
        f.seek(0)
        assert f.read() == b"g" * 100000 + b"more"
    assert not p.exists()


def test_chmod_chown_utimens(mnt: Path) -> None:
    p = mnt / "attrs"
    p.write_text("x")
    os.chmod(p, 0o4751)
    assert stat.S_IMODE(p.stat().st_mode) == 0o4751
    os.chown(p, 1234, 5678)
    st = p.stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.utime(p, ns=(1_000_000_123, 2_000_000_456))
    st = p.stat()
    assert st.st_atime_ns == 1_000_000_123 and st.st_mtime_ns == 2_000_000_456
    ctime = st.st_ctime_ns
    os.chmod(p, 0o600)
    assert p.stat().st_ctime_ns >= ctime


def test_xattrs(mnt: Path) -> None:
    p = mnt / "x"
    p.write_text("x")
    os.setxattr(p, "user.color", b"blue")
    os.setxattr(p, "user.empty", b"")
    assert os.getxattr(p, "user.color") == b"blue"
    assert sorted(os.listxattr(p)) == ["user.color", "user.empty"]
    os.removexattr(p, "user.color")
    assert os.listxattr(p) == ["user.empty"]
    with pytest.raises(OSError) as exc:
        os.getxattr(p, "user.color")
    assert exc.value.errno == errno.ENODATA
    run = subprocess.run(["getfattr", "-d", str(p)], capture_output=True, text=True)
    assert "user.empty" in run.stdout


def test_xattrs_until_the_inode_is_full(mnt: Path) -> None:
    """Adding xattrs ends in ENOSPC (as on ext4), with every one kept still
    listed and copied by the usual tools."""
    p = mnt / "tagged"
    p.write_text("x")
    added = []
    with pytest.raises(OSError) as exc:
        for i in range(1000):
            name = f"user.{i:04d}" + "t" * 240
            os.setxattr(p, name, b"v")
            added.append(name)
    assert exc.value.errno == errno.ENOSPC and len(added) > 200
    assert sorted(os.listxattr(p)) == added
    run = subprocess.run(["cp", "-a", str(p), str(mnt / "copy")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert sorted(os.listxattr(mnt / "copy")) == added


def test_statfs_reports_node_capacity(mnt: Path, cluster: Cluster) -> None:
    st = os.statvfs(mnt)
    nodes = cluster.call("cluster_map")["nodes"]
    raw = sum(n["capacity"] for n in nodes)
    assert st.f_blocks * st.f_frsize == pytest.approx(raw / 3, rel=0.01)
    assert 0 < st.f_bavail <= st.f_blocks
    assert st.f_namemax == 255
    df = subprocess.run(["df", "-P", str(mnt)], capture_output=True, text=True, check=True)
    assert str(mnt) in df.stdout


def test_name_too_long(mnt: Path) -> None:
    with pytest.raises(OSError) as exc:
        (mnt / ("n" * 256)).write_text("x")
    assert exc.value.errno == errno.ENAMETOOLONG
    (mnt / ("n" * 255)).write_text("ok")


def test_atime_is_relatime(mnt: Path, cluster: Cluster) -> None:
    p = mnt / "a"
    p.write_bytes(b"data")
    os.utime(p, ns=(1_000_000_000, 2_000_000_000))     # atime older than mtime
    p.read_bytes()
    first = p.stat().st_atime_ns
    assert first > 2_000_000_000
    p.read_bytes()                                     # already newer than mtime: kept
    assert p.stat().st_atime_ns == first
    cluster.umount(mnt)
    cluster.mount(mnt)
    st = p.stat()
    assert st.st_atime_ns == first and st.st_mtime_ns == 2_000_000_000


def test_a_read_access_recorded_in_the_background_never_overtakes_later_changes(
        mnt: Path, cluster: Cluster) -> None:
    """close does not wait for a read's atime to be recorded; an explicit
    atime set right after must still win, and an unmount keeps the read."""
    p = mnt / "b"
    p.write_bytes(b"data")
    for i in range(20):
        os.utime(p, ns=(1_000_000_000, 2_000_000_000))     # a read is due again
        p.read_bytes()
        assert p.stat().st_atime_ns > 2_000_000_000
        os.utime(p, ns=(3_000_000_000 + i, 2_000_000_000))
        assert p.stat().st_atime_ns == 3_000_000_000 + i
    os.utime(p, ns=(1_000_000_000, 2_000_000_000))
    p.read_bytes()
    read = p.stat().st_atime_ns
    cluster.umount(mnt)
    cluster.mount(mnt)
    assert p.stat().st_atime_ns == read > 2_000_000_000
    os.utime(p, ns=(3_000_000_000, 2_000_000_000))
    cluster.umount(mnt)
    cluster.mount(mnt)
    assert p.stat().st_atime_ns == 3_000_000_000


def test_reads_of_many_files_are_all_recorded(mnt: Path, cluster: Cluster) -> None:
    """A burst of reads (more than one op records) leaves every atime set,
    on this mount at once and after a remount."""
    d = mnt / "many"
    d.mkdir()
    files = [d / f"f{i}" for i in range(1100)]
    for f in files:
        f.write_bytes(b"x")
        os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    for f in files:
        f.read_bytes()
    assert all(f.stat().st_atime_ns > 2_000_000_000 for f in files)
    cluster.umount(mnt)
    cluster.mount(mnt)
    late = [f.name for f in files if f.stat().st_atime_ns <= 2_000_000_000]
    assert late == []


def test_dot_and_dotdot_in_listings(mnt: Path) -> None:
    def listed(d: Path) -> dict[str, int]:
        out = subprocess.run(["ls", "-ai", str(d)], capture_output=True, text=True,
                             check=True).stdout.split()
        return dict(zip(out[1::2], map(int, out[0::2])))
    (mnt / "p" / "c").mkdir(parents=True)
    (mnt / "q").mkdir()
    assert listed(mnt / "p" / "c") == {".": (mnt / "p" / "c").stat().st_ino,
                                       "..": (mnt / "p").stat().st_ino}
    (mnt / "p" / "c").rename(mnt / "q" / "c")          # ".." follows a rename
    assert listed(mnt / "q" / "c") == {".": (mnt / "q" / "c").stat().st_ino,
                                       "..": (mnt / "q").stat().st_ino}


def test_new_file_written_while_another_handle_reads_it(mnt: Path) -> None:
    """A file made write-only (as tar and cp make theirs) and read through a
    second handle at the same time: every write shows there at once, also
    over bytes that handle has read already."""
    p = mnt / "shared"
    w = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    r = os.open(p, os.O_RDONLY)
    try:
        os.write(w, b"a" * 10240)                      # tar's record, ends mid-page
        assert os.pread(r, 8, 0) == b"a" * 8
        os.pwrite(w, b"bbbb", 0)
        assert os.pread(r, 8, 0) == b"bbbbaaaa"
        os.write(w, b"c" * 10240)
        assert os.fstat(r).st_size == 20480 and os.pread(r, 4, 10240) == b"cccc"
    finally:
        os.close(w)
        os.close(r)
    assert p.read_bytes() == b"bbbb" + b"a" * 10236 + b"c" * 10240
    r = os.open(p, os.O_RDONLY)                        # an existing file rewritten
    try:
        assert os.pread(r, 4, 0) == b"bbbb"
        w = os.open(p, os.O_WRONLY | os.O_TRUNC)
        os.write(w, b"new")
        assert os.pread(r, 100, 0) == b"new"
        os.close(w)
    finally:
        os.close(r)
    log = mnt / "log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for i in range(3):
            os.write(fd, b"%d" % i * 5000)
            os.lseek(fd, 0, os.SEEK_SET)               # O_APPEND writes at the end anyway
    finally:
        os.close(fd)
    assert log.read_bytes() == b"0" * 5000 + b"1" * 5000 + b"2" * 5000
