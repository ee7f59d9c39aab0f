"""Errors as a user sees them through the mount: every probe runs on the
mount and on a local ext4 directory, and both must fail with the errno a
local filesystem gives (issue 3, point 1)."""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from storagenode.metastate import MAX_FILE_SIZE

from .cluster import Cluster
from .procs import NodeProcess
from .posix import (RENAME_EXCHANGE, RENAME_NOREPLACE, Pair, as_user, errname, open_to_all,
                    pair, renameat2, user)

__all__ = ["pair", "user"]      # module-scoped fixtures used below

MiB = 1 << 20
RD, WR = os.O_RDONLY, os.O_WRONLY
LONG = "n" * 256


def tree(r: Path) -> None:
    """f (a file), d/e (nested directories), empty/, l1 <-> l2 (a symlink loop),
    lf -> f, dangling -> nowhere."""
    (r / "f").write_bytes(b"x")
    (r / "d" / "e").mkdir(parents=True)
    (r / "empty").mkdir()
    os.symlink("l2", r / "l1")
    os.symlink("l1", r / "l2")
    os.symlink("f", r / "lf")
    os.symlink("nowhere", r / "dangling")
    os.setxattr(r / "f", "user.present", b"1")


def create_in_removed_cwd(r: Path) -> None:
    """open(O_CREAT) relative to a working directory removed meanwhile."""
    old = os.getcwd()
    os.chdir(r / "empty")
    try:
        os.rmdir(r / "empty")
        os.close(os.open("new", os.O_CREAT | WR))
    finally:
        os.chdir(old)


Probe = Callable[[Path], Any]
PROBES: dict[str, tuple[str, Probe]] = {
    "open_missing": ("ENOENT", lambda r: os.open(r / "nope", RD)),
    "create_in_removed_directory": ("ENOENT", create_in_removed_cwd),
    "exchange_with_missing": ("ENOENT", lambda r: renameat2(r / "f", r / "nope", RENAME_EXCHANGE)),
    "link_missing": ("ENOENT", lambda r: os.link(r / "nope", r / "g")),
    "mkdir_existing": ("EEXIST", lambda r: os.mkdir(r / "d")),
    "create_excl_existing": ("EEXIST", lambda r: os.open(r / "f", os.O_CREAT | os.O_EXCL | WR)),
    "create_excl_dangling_symlink": ("EEXIST", lambda r: os.open(
        r / "dangling", os.O_CREAT | os.O_EXCL | WR)),
    "link_over_existing": ("EEXIST", lambda r: os.link(r / "f", r / "lf")),
    "rename_noreplace_existing": ("EEXIST", lambda r: renameat2(r / "f", r / "lf",
                                                                RENAME_NOREPLACE)),
    "open_below_file": ("ENOTDIR", lambda r: os.open(r / "f" / "x", RD)),
    "mkdir_below_file": ("ENOTDIR", lambda r: os.mkdir(r / "f" / "x")),
    "o_directory_on_file": ("ENOTDIR", lambda r: os.open(r / "f", RD | os.O_DIRECTORY)),
    "rmdir_file": ("ENOTDIR", lambda r: os.rmdir(r / "f")),
    "rename_dir_over_file": ("ENOTDIR", lambda r: os.rename(r / "empty", r / "f")),
    "open_dir_for_writing": ("EISDIR", lambda r: os.open(r / "d", WR)),
    "o_creat_on_dir": ("EISDIR", lambda r: os.open(r / "d", os.O_CREAT | WR)),
    "unlink_dir": ("EISDIR", lambda r: os.unlink(r / "d")),
    "rename_file_over_dir": ("EISDIR", lambda r: os.rename(r / "f", r / "empty")),
    "truncate_dir": ("EISDIR", lambda r: os.truncate(r / "d", 0)),
    "rmdir_not_empty": ("ENOTEMPTY", lambda r: os.rmdir(r / "d")),
    "rename_over_full_dir": ("ENOTEMPTY", lambda r: os.rename(r / "empty", r / "d")),
    "rmdir_dotdot": ("ENOTEMPTY", lambda r: os.rmdir(r / "d" / "e" / "..")),
    "rename_dir_into_own_subtree": ("EINVAL", lambda r: os.rename(r / "d", r / "d" / "e" / "x")),
    "rename_dir_onto_own_child": ("EINVAL", lambda r: os.rename(r / "d", r / "d" / "e")),
    "rmdir_dot": ("EINVAL", lambda r: os.rmdir(f"{r}/empty/.")),
    "readlink_file": ("EINVAL", lambda r: os.readlink(r / "f")),
    "truncate_negative": ("EINVAL", lambda r: os.truncate(r / "f", -1)),
    "rename_both_flags": ("EINVAL", lambda r: renameat2(r / "f", r / "lf",
                                                        RENAME_EXCHANGE | RENAME_NOREPLACE)),
    "symlink_loop": ("ELOOP", lambda r: os.open(r / "l1", RD)),
    "symlink_loop_as_directory": ("ELOOP", lambda r: os.stat(r / "l1" / "x")),
    "o_nofollow_on_symlink": ("ELOOP", lambda r: os.open(r / "lf", RD | os.O_NOFOLLOW)),
    "create_256_byte_name": ("ENAMETOOLONG", lambda r: os.open(r / LONG, os.O_CREAT | WR)),
    "stat_256_byte_name": ("ENAMETOOLONG", lambda r: os.stat(r / LONG)),
    "mkdir_256_byte_name": ("ENAMETOOLONG", lambda r: os.mkdir(r / LONG)),
    "rename_to_256_byte_name": ("ENAMETOOLONG", lambda r: os.rename(r / "f", r / LONG)),
    "link_to_256_byte_name": ("ENAMETOOLONG", lambda r: os.link(r / "f", r / LONG)),
    "symlink_target_4096_bytes": ("ENAMETOOLONG", lambda r: os.symlink("a" * 4096, r / "s")),
    "path_past_path_max": ("ENAMETOOLONG", lambda r: os.stat(str(r) + "/d" * 2100)),
    "hard_link_directory": ("EPERM", lambda r: os.link(r / "d", r / "d2")),
    "mknod_directory": ("EPERM", lambda r: os.mknod(r / "x", stat.S_IFDIR | 0o755)),
    "user_xattr_on_symlink": ("EPERM", lambda r: os.setxattr(r / "lf", "user.a", b"1",
                                                            follow_symlinks=False)),
    "getxattr_missing": ("ENODATA", lambda r: os.getxattr(r / "f", "user.absent")),
    "removexattr_missing": ("ENODATA", lambda r: os.removexattr(r / "f", "user.absent")),
    "xattr_replace_missing": ("ENODATA", lambda r: os.setxattr(r / "f", "user.absent", b"",
                                                              os.XATTR_REPLACE)),
    "xattr_create_existing": ("EEXIST", lambda r: os.setxattr(r / "f", "user.present", b"",
                                                             os.XATTR_CREATE)),
    "xattr_name_256_bytes": ("ERANGE", lambda r: os.setxattr(r / "f", "user." + "x" * 251, b"")),
    "truncate_past_max_file_size": ("EFBIG", lambda r: os.truncate(r / "f", MAX_FILE_SIZE + 1)),
    "truncate_to_2**63-1": ("EFBIG", lambda r: os.truncate(r / "f", 2**63 - 1)),
    "truncate_to_max_file_size": ("ok", lambda r: os.truncate(r / "f", MAX_FILE_SIZE)),
}


@pytest.mark.parametrize("name", sorted(PROBES))
def test_errno_matches_a_local_filesystem(pair: Pair, name: str) -> None:
    expected, probe = PROBES[name]
    on_mount, on_disk = pair.fresh(name)
    tree(on_mount)
    tree(on_disk)
    assert (errname(lambda: probe(on_mount)), errname(lambda: probe(on_disk))) \
        == (expected, expected)


def test_descriptor_errors(pair: Pair) -> None:
    """EBADF for the wrong access mode or a closed descriptor, EINVAL for
    ftruncate on a read-only one: the same on the mount and on disk."""
    for root in pair.fresh("ebadf"):
        (root / "f").write_bytes(b"data")
        fd = os.open(root / "f", RD)
        assert errname(lambda: os.write(fd, b"x")) == "EBADF"
        assert errname(lambda: os.ftruncate(fd, 0)) == "EINVAL"
        os.close(fd)
        assert errname(lambda: os.fstat(fd)) == "EBADF"
        fd = os.open(root / "f", WR)
        assert errname(lambda: os.read(fd, 1)) == "EBADF"
        os.close(fd)
        assert (root / "f").read_bytes() == b"data"


def test_writes_stop_at_the_largest_file_size(pair: Pair) -> None:
    """A write starting at the largest size fails with EFBIG; one crossing
    it is cut short there; the bytes before it read back (as on ext4)."""
    for root in pair.fresh("efbig"):
        fd = os.open(root / "f", os.O_CREAT | os.O_RDWR)
        try:
            assert errname(lambda: os.pwrite(fd, b"abc", MAX_FILE_SIZE)) == "EFBIG"
            assert os.pwrite(fd, b"abc", MAX_FILE_SIZE - 2) == 2
            assert os.fstat(fd).st_size == MAX_FILE_SIZE
            assert os.pread(fd, 10, MAX_FILE_SIZE - 4) == b"\0\0ab"
        finally:
            os.close(fd)


def test_exdev_across_mounts(pair: Pair, tmp_path: Path) -> None:
    """rename and link between two mounts of one volume, or to a local disk, fail with EXDEV."""
    second = tmp_path / "second"
    pair.cluster.mount(second)
    try:
        folder, local = pair.fresh("exdev")
        (folder / "f").write_text("x")
        other = second / "exdev"
        assert (other / "f").read_text() == "x"          # the same volume
        assert errname(lambda: os.rename(folder / "f", other / "g")) == "EXDEV"
        assert errname(lambda: os.link(folder / "f", other / "g")) == "EXDEV"
        assert errname(lambda: os.rename(folder / "f", local / "g")) == "EXDEV"
        (local / "h").write_text("y")
        assert errname(lambda: os.link(local / "h", folder / "h")) == "EXDEV"
        assert sorted(os.listdir(other)) == ["f"]
    finally:
        pair.cluster.umount(second)


USER_PROBES = r"""
import errno, json, os, sys
r = sys.argv[1]
def run(fn):
    try:
        fn()
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "ok"
print(json.dumps({
    "create in root's 0755 dir": run(lambda: open(r + "/rootdir/new", "w")),
    "read root's 0600 file": run(lambda: open(r + "/secret")),
    "write root's 0644 file": run(lambda: open(r + "/public", "a")),
    "unlink root's file in sticky dir": run(lambda: os.unlink(r + "/sticky/roots")),
    "chmod root's file": run(lambda: os.chmod(r + "/public", 0o777)),
    "chown own file to root": run(lambda: os.chown(r + "/sticky/mine", 0, -1)),
    "set times of root's file": run(lambda: os.utime(r + "/public", (1, 1))),
    "touch root's 0644 file": run(lambda: os.utime(r + "/public")),
    "touch root's 0666 file": run(lambda: os.utime(r + "/open")),
    "O_NOATIME on root's file": run(lambda: os.open(r + "/public", os.O_RDONLY | os.O_NOATIME)),
    "user xattr on root's file": run(lambda: os.setxattr(r + "/public", "user.a", b"1")),
    "trusted xattr": run(lambda: os.setxattr(r + "/sticky/mine", "trusted.a", b"1")),
}))
"""


def test_eperm_and_eacces_for_another_user(pair: Pair, user: tuple[int, int]) -> None:
    results = []
    for root in pair.fresh("perm"):
        open_to_all(root)
        (root / "rootdir").mkdir(mode=0o755)
        for name, mode in (("secret", 0o600), ("public", 0o644), ("open", 0o666)):
            (root / name).write_text(name)
            os.chmod(root / name, mode)
        (root / "sticky").mkdir()
        os.chmod(root / "sticky", 0o1777)
        (root / "sticky" / "roots").write_text("root's")
        (root / "sticky" / "mine").write_text("mine")
        os.chown(root / "sticky" / "mine", *user)
        results.append(json.loads(as_user(USER_PROBES, str(root))))
    on_mount, on_disk = results
    assert on_mount == on_disk
    assert on_mount["create in root's 0755 dir"] == "EACCES"
    assert on_mount["unlink root's file in sticky dir"] == "EPERM"
    assert on_mount["touch root's 0666 file"] == "ok"


# ---------------------------------------------------------------- ENOSPC

NODE_DISK = 24 * MiB


@pytest.fixture
def small_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Three data nodes, each on a 24 MiB tmpfs of its own, no reserve."""
    c = Cluster(tmp_path / "cluster")
    disks: list[Path] = []
    problems: list[str] = []
    try:
        c.meta.start()
        for i in range(1, 4):
            state = c.root / f"data{i}"
            state.mkdir(parents=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={NODE_DISK}", "tmpfs",
                            str(state)], check=True)
            disks.append(state)
            c.data.append(NodeProcess("data", state, c.secret_file, [
                "--meta", c.meta.address, "--node-id", f"data{i}", "--reserve-bytes", "0"]).start())
        c.wait_nodes_up(3)
        yield c
        c.unmount_all()
        problems = c.consistency_problems()
    finally:
        c.stop()
        for disk in disks:
            subprocess.run(["umount", "-l", str(disk)], check=False)
    assert not problems, "inconsistent after the test:\n" + "\n".join(problems[:20])


def write_all(path: Path, data: bytes) -> str:
    """Write, fsync and close; the first errno on the way, or "ok"."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
    outcome = "ok"
    try:
        for off in range(0, len(data), MiB):
            os.write(fd, data[off:off + MiB])
        os.fsync(fd)
    except OSError as exc:
        outcome = errno.errorcode[exc.errno or 0]
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            outcome = outcome if outcome != "ok" else errno.errorcode[exc.errno or 0]
    return outcome


def test_enospc_when_every_data_node_is_full(small_cluster: Cluster, tmp_path: Path) -> None:
    small_cluster.create_volume("vol", block_size=1 * MiB, replicas=3)
    mnt = tmp_path / "mnt"
    small_cluster.mount(mnt)
    kept = os.urandom(4 * MiB)
    assert write_all(mnt / "kept", kept) == "ok"
    assert write_all(mnt / "too-big", os.urandom(2 * NODE_DISK)) == "ENOSPC"
    assert (mnt / "kept").read_bytes() == kept
    assert errname(lambda: (mnt / "too-big").unlink()) == "ok"
    deadline = time.monotonic() + 60        # the collector frees the objects
    while write_all(mnt / "after", b"a" * MiB) != "ok":
        assert time.monotonic() < deadline, "space never came back"
        time.sleep(1)
    assert (mnt / "after").read_bytes() == b"a" * MiB
    assert (mnt / "kept").read_bytes() == kept


def test_posix_acls_are_not_supported(pair: Pair) -> None:
    """Like ext4 mounted noacl: setting, reading or removing an ACL is
    EOPNOTSUPP, and the mode bits stay the one permission check."""
    folder, _ = pair.fresh("acl")
    (folder / "f").write_text("x")
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF)
                                          for tag, perm in ((1, 6), (4, 4), (0x20, 0)))
    name = "system.posix_acl_access"
    unsupported = errno.errorcode[errno.EOPNOTSUPP]      # "ENOTSUP": the same number
    assert errname(lambda: os.setxattr(folder / "f", name, acl)) == unsupported
    assert errname(lambda: os.removexattr(folder / "f", name)) == unsupported
    assert errname(lambda: os.getxattr(folder / "f", name)) == unsupported
    assert errname(lambda: os.getxattr(folder, "system.posix_acl_default")) == unsupported
    os.chmod(folder / "f", 0o640)
    assert stat.S_IMODE(os.stat(folder / "f").st_mode) == 0o640
