"""What users do with shell tools, and that everything persists across
unmount/remount and a restart of every node."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import threading
import time
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


WRITER = """
import hashlib, json, os, sys
d, stop = sys.argv[1], sys.argv[2]
closed, failed, i = {}, [], 0
while not os.path.exists(stop):
    data = os.urandom(1000 + (i * 7919) % 100_000)
    try:
        with open(os.path.join(d, f"f{i}"), "wb") as f:
            f.write(data)
        closed[f"f{i}"] = hashlib.md5(data).hexdigest()
    except OSError:
        failed.append(f"f{i}")
    i += 1
print(json.dumps({"closed": closed, "failed": failed}))
"""


CLOSER = """
import hashlib, os, sys, time
path = sys.argv[1]
data = os.urandom(200_000)
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
other = os.dup(fd)
print("ready", hashlib.md5(data).hexdigest(), flush=True)
sys.stdin.readline()                     # the metadata node is down now
os.write(fd, data)
os.close(fd)                             # the commit follows, and waits
time.sleep(1)
started = time.monotonic()
os.close(other)
print(f"{time.monotonic() - started:.3f}", flush=True)
"""


def test_another_close_of_a_file_whose_commit_waits_returns(cluster: Cluster,
                                                            mnt: Path) -> None:
    """The metadata node is down and a file's commit, left behind by its
    close, waits for it.  Another close of the same open file (a forked
    child closing the descriptor it inherited does this before its exec)
    returns at once instead of waiting for the node; then the file is there
    whole.  (The file is written by a process of its own: this one forks the
    restarted node.)"""
    (mnt / "warm").write_bytes(b"w" * 100_000)      # the mount knows the free space
    closer = subprocess.Popen([sys.executable, "-c", CLOSER, str(mnt / "f")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert closer.stdin is not None and closer.stdout is not None
    try:
        ready, md5 = closer.stdout.readline().split()
        assert ready == "ready"
        time.sleep(0.5)                              # the create has landed
        cluster.meta.kill()
        closer.stdin.write("go\n")
        closer.stdin.flush()
        took: list[str] = []
        reader = threading.Thread(target=lambda: took.append(closer.stdout.readline()))
        reader.start()
        reader.join(15)
    finally:
        cluster.meta.start()
        closer.wait(120)
    assert took and float(took[0]) < 5, "a second close of the file waited for the metadata node"
    deadline = time.monotonic() + 60
    while not ((mnt / "f").exists() and (mnt / "f").stat().st_size == 200_000):
        assert time.monotonic() < deadline, "the file's commit never landed"
        time.sleep(0.25)
    cluster.umount(mnt)
    cluster.mount(mnt)
    assert hashlib.md5((mnt / "f").read_bytes()).hexdigest() == md5


def test_a_metadata_node_restart_under_a_writer(cluster: Cluster, mnt: Path) -> None:
    """The metadata node is killed and restarted while a loop writes files.
    Every file whose close returned is there whole.  (A mount answers
    creates and closes itself and sends them ~5-10 ms later; those sent
    just before the kill, whose answers were lost, are answered again by
    the restarted node from its record of them; those never sent go under
    the leases the restart forgot, which the node gives back if nothing
    changed since.  Without those, 1-4 files closed in the moment before
    the kill were lost, and some maps named objects the mount deleted.
    While the node is out of reach the mount answers nothing itself: about
    500 of 900 files were lost when it went on alone.)  Writes right after
    the restart succeed (the restarted node counted the data nodes as down
    until their next heartbeat: closes failed with EIO for a second or two)."""
    (mnt / "w").mkdir()
    stop = mnt.parent / "stop-writing"
    # The writer is a process of its own: this one forks the restarted node,
    # and a forked child closes every descriptor it inherited (a FLUSH,
    # which waits for the metadata node while it is out of reach), so a
    # file the writer holds open here would hang the fork.
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(mnt / "w"), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        cluster.meta.kill()
        time.sleep(1.5)
        cluster.meta.start()
        time.sleep(1.5)
    finally:
        stop.touch()
        out, _ = writer.communicate(timeout=300)
    result = json.loads(out)
    closed: dict[str, str] = result["closed"]
    failed: list[str] = result["failed"]
    for i in range(3):
        (mnt / f"after{i}").write_bytes(b"a" * (1 << 20))
    lost = [n for n, h in closed.items() if not (mnt / "w" / n).exists()
            or hashlib.md5((mnt / "w" / n).read_bytes()).hexdigest() != h]
    print(f"\n{len(closed)} files closed, {len(failed)} closes failed, {len(lost)} lost")
    assert len(closed) > 100
    assert lost == []
    cluster.umount(mnt)
    cluster.mount(mnt)
    assert [n for n, h in closed.items() if n not in lost and hashlib.md5(
        (mnt / "w" / n).read_bytes()).hexdigest() != h] == []
    assert all((mnt / f"after{i}").read_bytes() == b"a" * (1 << 20) for i in range(3))
