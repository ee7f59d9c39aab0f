"""Users other than root on a root-made mount: the kernel checks mode bits,
objfs stores owners, groups and the setgid/sticky semantics."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from .cluster import checked_cluster

USER = "objfs-test"


@pytest.fixture(scope="module")
def user() -> tuple[int, int]:
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", USER], check=True)
    out = subprocess.run(["id", "-u", USER], capture_output=True, text=True, check=True)
    gid = subprocess.run(["id", "-g", USER], capture_output=True, text=True, check=True)
    return int(out.stdout), int(gid.stdout)


@pytest.fixture
def mnt(mnt: Path) -> Path:
    """The mount, reachable by other users (pytest's folders are 0700)."""
    for folder in list(mnt.parents)[:-2]:
        if str(folder).startswith("/tmp/"):
            os.chmod(folder, folder.stat().st_mode | 0o011)
    return mnt


def as_user(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", USER, "--", *cmd], capture_output=True, text=True,
                          timeout=60)


def test_other_users_get_mode_bit_checks(mnt: Path, user: tuple[int, int]) -> None:
    uid, gid = user
    run = as_user("touch", str(mnt / "nope"))
    assert run.returncode != 0 and "Permission denied" in run.stderr
    shared = mnt / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    assert as_user("sh", "-c", f"echo mine > {shared}/mine").returncode == 0
    st = (shared / "mine").stat()
    assert (st.st_uid, st.st_gid) == (uid, gid)
    (shared / "roots").write_text("root's")
    run = as_user("rm", "-f", str(shared / "roots"))            # sticky directory
    assert run.returncode != 0 and (shared / "roots").exists()
    os.chmod(shared / "roots", 0o600)
    run = as_user("cat", str(shared / "roots"))
    assert run.returncode != 0 and "Permission denied" in run.stderr
    run = as_user("chown", "root", str(shared / "mine"))          # only root changes owner
    assert run.returncode != 0


def test_setgid_directory_passes_group_on(mnt: Path, user: tuple[int, int]) -> None:
    d = mnt / "team"
    d.mkdir()
    os.chown(d, 0, 4321)
    os.chmod(d, 0o2777)
    assert as_user("touch", str(d / "f")).returncode == 0
    assert as_user("mkdir", str(d / "sub")).returncode == 0
    assert (d / "f").stat().st_gid == 4321
    sub = (d / "sub").stat()
    assert sub.st_gid == 4321 and sub.st_mode & 0o2000


def test_unprivileged_write_clears_setuid(mnt: Path, user: tuple[int, int]) -> None:
    f = mnt / "prog"
    f.write_text("#!/bin/sh\n")
    os.chmod(f, 0o4777)
    assert as_user("sh", "-c", f"echo more >> {f}").returncode == 0
    assert not f.stat().st_mode & 0o4000


def test_unprivileged_write_drops_file_capabilities(mnt: Path, user: tuple[int, int]) -> None:
    f = mnt / "capped"
    f.write_text("#!/bin/sh\n")
    os.chmod(f, 0o777)
    # struct vfs_cap_data, revision 2: CAP_NET_BIND_SERVICE permitted
    os.setxattr(f, "security.capability", struct.pack("<5I", 0x02000000, 1 << 10, 0, 0, 0))
    assert as_user("sh", "-c", f"echo more >> {f}").returncode == 0
    with pytest.raises(OSError) as exc:
        os.getxattr(f, "security.capability")
    assert exc.value.errno == errno.ENODATA
    assert f.read_text() == "#!/bin/sh\nmore\n"


# ---- every check a local filesystem makes, as users with no password entry
A, B = 23001, 23002                 # two users
G, H = 24001, 24002                 # A's group, and a group only B is in (supplementary)


def as_id(uid: int, gid: int, groups: list[int], fn: Callable[[], object]) -> int:
    """Run ``fn`` in a child process with these ids: 0, or the errno it raised."""
    pid = os.fork()
    if pid == 0:                     # pragma: no cover (the child)
        code = 0
        try:
            os.setgroups(groups)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            fn()
        except OSError as exc:
            code = exc.errno or 255
        except BaseException:
            code = 254
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def a_(fn: Callable[[], object]) -> int:
    return as_id(A, G, [G], fn)


def b_(fn: Callable[[], object]) -> int:
    return as_id(B, B, [B, H], fn)


def accessible(path: Path, mode: int) -> None:
    """access(2), an EACCES if it says no."""
    if not os.access(path, mode):
        raise PermissionError(errno.EACCES, f"no access to {path}")


def owned(path: Path, uid: int, gid: int, mode: int, *, folder: bool = True) -> Path:
    """``path``, made (a folder, or an empty file) with this owner and mode."""
    if folder:
        path.mkdir()
    else:
        path.touch()
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def test_search_permission_guards_what_a_directory_holds(mnt: Path) -> None:
    d = owned(mnt / "private", A, G, 0o700)
    (d / "f").write_text("x")
    (d / "sub").mkdir()
    os.stat(d / "f")                                  # known to the kernel now
    assert b_(lambda: os.stat(d / "f")) == errno.EACCES
    assert b_(lambda: os.stat(d / "none")) == errno.EACCES
    assert b_(lambda: os.listdir(d / "sub")) == errno.EACCES
    assert a_(lambda: os.stat(d / "f")) == 0
    os.chmod(d, 0o711)
    assert b_(lambda: os.stat(d / "f")) == 0
    assert b_(lambda: os.listdir(d)) == errno.EACCES   # search, not read
    os.chmod(d, 0o700)                                # taken back: cached names too
    assert b_(lambda: os.stat(d / "f")) == errno.EACCES
    assert b_(lambda: os.chdir(d)) == errno.EACCES
    assert a_(lambda: os.chdir(d)) == 0
    os.chmod(d, 0o600)                                # the owner's own bits count
    assert a_(lambda: os.stat(d / "f")) == errno.EACCES
    assert os.stat(d / "f").st_size == 1              # not root's
    os.chmod(d, 0o070)
    assert as_id(B, G, [G], lambda: os.stat(d / "f")) == 0     # group member
    assert as_id(B, B, [B, G], lambda: os.stat(d / "f")) == 0  # supplementary
    assert a_(lambda: os.stat(d / "f")) == errno.EACCES        # owner bits rule


def test_open_needs_the_access_it_asks_for(mnt: Path) -> None:
    f = owned(mnt / "f", A, G, 0o644, folder=False)
    f.write_text("data")
    for flags, want in ((os.O_RDONLY, 0), (os.O_WRONLY, errno.EACCES), (os.O_RDWR, errno.EACCES),
                        (os.O_RDONLY | os.O_TRUNC, errno.EACCES),
                        (os.O_WRONLY | os.O_APPEND, errno.EACCES)):
        assert b_(lambda: os.close(os.open(f, flags))) == want, flags
    assert a_(lambda: os.close(os.open(f, os.O_RDWR))) == 0
    os.chmod(f, 0o066)
    assert a_(lambda: os.close(os.open(f, os.O_RDONLY))) == errno.EACCES
    assert b_(lambda: os.close(os.open(f, os.O_RDWR))) == 0
    os.chmod(f, 0o640)
    assert b_(lambda: os.close(os.open(f, os.O_RDONLY))) == errno.EACCES
    assert as_id(B, B, [B, G], lambda: os.close(os.open(f, os.O_RDONLY))) == 0
    os.chmod(f, 0)
    assert f.read_text() == "data"                    # root reads anything
    assert a_(lambda: accessible(f, os.R_OK)) == errno.EACCES
    os.chmod(f, 0o600)
    assert a_(lambda: accessible(f, os.W_OK)) == 0
    assert os.access(f, os.R_OK | os.W_OK) and not os.access(f, os.X_OK)


def test_changing_a_directory_needs_write_and_search(mnt: Path) -> None:
    d = owned(mnt / "d", A, G, 0o755)
    (d / "old").write_text("x")
    (d / "olddir").mkdir()
    made: list[Callable[[], object]] = [
        lambda: os.mkdir(d / "new"), lambda: os.close(os.open(d / "new", os.O_CREAT | os.O_WRONLY)),
        lambda: os.symlink("t", d / "new"), lambda: os.mkfifo(d / "new"),
        lambda: os.unlink(d / "old"), lambda: os.rmdir(d / "olddir"),
        lambda: os.rename(d / "old", d / "new")]
    for op in made:
        assert b_(op) == errno.EACCES
    os.chmod(d, 0o772)                            # write without search
    for op in made:
        assert b_(op) == errno.EACCES
    os.chmod(d, 0o777)
    assert b_(lambda: os.rename(d / "old", d / "new")) == 0
    assert b_(lambda: (d / "mine").write_text("b's")) == 0
    assert b_(lambda: os.link(d / "mine", d / "again")) == 0
    assert b_(lambda: os.mkdir(d / "made")) == 0
    assert (d / "made").stat().st_uid == B and (d / "again").stat().st_nlink == 2
    assert sorted(os.listdir(d)) == ["again", "made", "mine", "new", "olddir"]


def test_sticky_directories_keep_others_names(mnt: Path) -> None:
    d = owned(mnt / "tmp", 0, 0, 0o1777)
    assert a_(lambda: (d / "a").write_text("a's")) == 0
    assert a_(lambda: os.mkdir(d / "adir")) == 0
    for op in (lambda: os.unlink(d / "a"), lambda: os.rename(d / "a", d / "b"),
               lambda: os.rmdir(d / "adir")):
        assert b_(op) == errno.EPERM
    assert b_(lambda: (d / "b").write_text("b's")) == 0
    assert a_(lambda: os.rename(d / "a", d / "b")) == errno.EPERM      # over B's
    os.chown(d, B, B)                                 # the directory's owner may
    assert b_(lambda: os.unlink(d / "a")) == 0
    assert sorted(os.listdir(d)) == ["adir", "b"]


def test_moving_a_directory_elsewhere_needs_write_on_it(mnt: Path) -> None:
    one = owned(mnt / "one", 0, 0, 0o777)
    two = owned(mnt / "two", 0, 0, 0o777)
    sub = owned(one / "sub", A, G, 0o555)
    assert a_(lambda: os.rename(sub, two / "sub")) == errno.EACCES   # its ".." changes
    assert a_(lambda: os.rename(sub, one / "renamed")) == 0          # same parent: no
    os.chmod(one / "renamed", 0o755)
    assert a_(lambda: os.rename(one / "renamed", two / "sub")) == 0
    assert os.listdir(two) == ["sub"]


def test_owner_rules_for_mode_owner_and_times(mnt: Path) -> None:
    f = owned(mnt / "f", A, G, 0o666, folder=False)
    assert b_(lambda: os.chmod(f, 0o600)) == errno.EPERM
    assert a_(lambda: os.chmod(f, 0o2640)) == 0
    assert f.stat().st_mode & 0o7777 == 0o2640
    os.chown(f, A, H)                                 # a group A is not in
    os.chmod(f, 0o666)
    assert a_(lambda: os.chmod(f, 0o2666)) == 0
    assert f.stat().st_mode & 0o7777 == 0o666         # setgid dropped, not refused
    assert a_(lambda: os.chown(f, B, -1)) == errno.EPERM
    assert a_(lambda: os.chown(f, -1, H)) == 0        # no change: allowed
    assert a_(lambda: os.chown(f, -1, B)) == errno.EPERM
    assert as_id(A, G, [G, 5555], lambda: os.chown(f, -1, 5555)) == 0
    assert f.stat().st_gid == 5555
    assert b_(lambda: os.chown(f, -1, B)) == errno.EPERM
    assert b_(lambda: os.utime(f, (1, 2))) == errno.EPERM   # writable, not B's
    assert b_(lambda: os.utime(f)) == 0                     # now: writing is enough
    os.chmod(f, 0o644)
    assert b_(lambda: os.utime(f)) == errno.EACCES
    assert a_(lambda: os.utime(f, (1, 2))) == 0
    assert f.stat().st_mtime == 2


def test_truncate_and_xattrs_need_write(mnt: Path) -> None:
    f = owned(mnt / "f", A, G, 0o644, folder=False)
    f.write_text("0123456789")
    os.setxattr(f, "user.k", b"v")
    assert b_(lambda: os.truncate(f, 2)) == errno.EACCES
    assert b_(lambda: os.setxattr(f, "user.k", b"w")) == errno.EACCES
    assert b_(lambda: os.removexattr(f, "user.k")) == errno.EACCES
    assert b_(lambda: os.getxattr(f, "user.k")) == 0
    os.chmod(f, 0o640)
    assert b_(lambda: os.getxattr(f, "user.k")) == errno.EACCES
    os.chmod(f, 0o646)
    assert b_(lambda: os.truncate(f, 2)) == 0
    assert b_(lambda: os.setxattr(f, "user.k", b"w")) == 0
    assert f.read_text() == "01" and os.getxattr(f, "user.k") == b"w"
    fd = os.open(f, os.O_RDWR)
    try:
        os.chmod(f, 0o400)
        assert a_(lambda: os.ftruncate(fd, 1)) == 0  # the open descriptor is enough
    finally:
        os.close(fd)
    assert f.read_text() == "0"


def test_a_directory_made_private_on_one_mount_is_closed_on_the_other(tmp_path: Path) -> None:
    """Names the other mount's kernel caches under a directory are walked
    through without asking the mount: closing the directory on one mount
    makes the other forget them at once, those it made itself included."""
    for folder in [tmp_path, *list(tmp_path.parents)[:-2]]:
        if str(folder).startswith("/tmp/"):
            os.chmod(folder, folder.stat().st_mode | 0o011)
    with checked_cluster(tmp_path / "cluster") as c:
        c.create_volume("vol")
        one, two = tmp_path / "one", tmp_path / "two"
        c.mount(one)
        c.mount(two)
        os.chmod(one, 0o755)
        d = owned(one / "d", A, G, 0o755)
        (one / "d" / "theirs").write_text("x")
        (two / "d" / "mine").write_text("y")          # made on two: its kernel knows it
        for name in ("theirs", "mine"):
            assert b_(lambda: os.stat(two / "d" / name)) == 0
        os.chmod(d, 0o700)
        for name in ("theirs", "mine"):
            assert b_(lambda: os.stat(two / "d" / name)) == errno.EACCES
            assert a_(lambda: os.stat(two / "d" / name)) == 0
        os.chmod(two / "d", 0o755)                    # and back, from the other side
        assert b_(lambda: os.stat(one / "d" / "mine")) == 0
