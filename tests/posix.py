"""What the POSIX tests share: one mount per test module (many small probes
would otherwise start a cluster each), a local directory to compare with,
an unprivileged user, and renameat2."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from .cluster import Cluster

USER = "objfs-test"
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)


class Pair:
    """A directory on the mount and one on the local disk, to run a probe on both."""

    def __init__(self, cluster: Cluster, mount: Path, local: Path) -> None:
        self.cluster = cluster
        self.mount = mount
        self.local = local

    def fresh(self, name: str) -> tuple[Path, Path]:
        """An empty folder ``name`` under each root."""
        out = []
        for root in (self.mount, self.local):
            folder = root / name
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            out.append(folder)
        return out[0], out[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """A cluster and a mount shared by the module's tests (checked by fsck at
    the end, like the ``cluster`` fixture), and a local directory on ext4."""
    base = tmp_path_factory.mktemp("posix")
    open_to_all(base)
    cluster = Cluster(base / "cluster")
    problems: list[str] = []
    try:
        cluster.start()
        cluster.create_volume("vol")
        cluster.mount(base / "mnt")
        (base / "local").mkdir()
        yield Pair(cluster, base / "mnt", base / "local")
        cluster.unmount_all()
        problems = cluster.consistency_problems()
    finally:
        cluster.stop()
    assert not problems, "inconsistent after the tests:\n" + "\n".join(problems[:20])


def open_to_all(folder: Path) -> None:
    """Let other users through ``folder`` and its parents under /tmp (pytest's are 0700)."""
    for f in [folder, *folder.parents]:
        if str(f).startswith("/tmp/"):
            os.chmod(f, f.stat().st_mode | 0o011)


def errname(fn: Callable[[], Any]) -> str:
    """"ok", or the errno's name a call fails with."""
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(old))


@pytest.fixture(scope="module")
def user() -> tuple[int, int]:
    """(uid, gid) of an unprivileged user, created if missing."""
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", USER], check=True)
    uid = subprocess.run(["id", "-u", USER], capture_output=True, text=True, check=True)
    gid = subprocess.run(["id", "-g", USER], capture_output=True, text=True, check=True)
    return int(uid.stdout), int(gid.stdout)


def as_user(code: str, *args: str) -> str:
    """Run Python ``code`` as the unprivileged user; what it prints."""
    run = subprocess.run(["runuser", "-u", USER, "--", "python3", "-c", code, *args],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()
