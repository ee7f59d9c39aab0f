"""Users other than root on a root-made mount: the kernel checks mode bits,
objfs stores owners, groups and the setgid/sticky semantics."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
from pathlib import Path

import pytest

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
