"""What users do with shell tools, and that everything persists across
unmount/remount and a restart of every node."""

from __future__ import annotations

import os
import subprocess
import sysconfig
from pathlib import Path

from .cluster import Cluster

SOURCE_TREE = Path(sysconfig.get_paths()["stdlib"]) / "email"     # a real source tree


def sh(*args: str, cwd: Path | None = None) -> str:
    run = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{args}: {run.stderr}"
    return run.stdout


def test_cp_a_diff_tar_and_remount(cluster: Cluster, mnt: Path, tmp_path: Path) -> None:
    sh("cp", "-a", str(SOURCE_TREE), str(mnt / "tree"))
    sh("diff", "-r", str(SOURCE_TREE), str(mnt / "tree"))
    sh("tar", "cf", str(mnt / "tree.tar"), "-C", str(mnt), "tree")
    (mnt / "untar").mkdir()
    sh("tar", "xf", str(mnt / "tree.tar"), "-C", str(mnt / "untar"))
    sh("diff", "-r", str(SOURCE_TREE), str(mnt / "untar" / "tree"))
    listing = sh("ls", "-lR", "--time-style=full-iso", str(mnt))
    cluster.umount(mnt)
    cluster.mount(mnt)
    sh("diff", "-r", str(SOURCE_TREE), str(mnt / "tree"))
    assert sh("ls", "-lR", "--time-style=full-iso", str(mnt)) == listing
    cluster.umount(mnt)
    cluster.restart_all_nodes()
    cluster.mount(mnt)
    sh("diff", "-r", str(SOURCE_TREE), str(mnt / "untar" / "tree"))
    assert sh("ls", "-lR", "--time-style=full-iso", str(mnt)) == listing


def test_git_on_the_mount(cluster: Cluster, mnt: Path) -> None:
    repo = mnt / "repo"
    repo.mkdir()
    env = ["-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"]
    sh("git", *env, "init", "-q", cwd=repo)
    sh("cp", "-a", str(SOURCE_TREE), str(repo / "src"))
    sh("git", *env, "add", "-A", cwd=repo)
    sh("git", *env, "commit", "-qm", "first", cwd=repo)
    (repo / "src" / "__init__.py").write_text("changed\n")
    sh("git", *env, "commit", "-qam", "second", cwd=repo)
    head = sh("git", "rev-parse", "HEAD", cwd=repo)
    cluster.umount(mnt)
    cluster.mount(mnt)
    assert sh("git", "rev-parse", "HEAD", cwd=repo) == head
    sh("git", "fsck", "--strict", cwd=repo)
    assert sh("git", "status", "--porcelain", cwd=repo) == ""
    assert sh("git", "log", "--oneline", cwd=repo).count("\n") == 2


def test_data_survives_restart_of_every_node(cluster: Cluster, mnt: Path) -> None:
    data = os.urandom(10 << 20)
    (mnt / "blob").write_bytes(data)
    (mnt / "d").mkdir()
    os.symlink("../blob", mnt / "d" / "link")
    os.setxattr(mnt / "blob", "user.k", b"v")
    cluster.restart_all_nodes()                    # while mounted
    assert (mnt / "d" / "link").read_bytes() == data
    assert os.getxattr(mnt / "blob", "user.k") == b"v"
    (mnt / "after").write_text("written after restart")
    cluster.umount(mnt)
    cluster.mount(mnt)
    assert (mnt / "after").read_text() == "written after restart"
