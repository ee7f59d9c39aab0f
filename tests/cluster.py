"""A real cluster for tests: one metadata node and N data nodes as processes
on loopback, a volume, and real FUSE mounts made with ``mount -t fuse.objfs``.
Everything is stopped and unmounted on exit, also when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sqlite3
import subprocess
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator


from storagenode import blockformat, erasure, metastate
from storagenode.ids import shard_id
from storagenode.auth import create_secret

from tools.common import sync_call
from tools.localcluster import is_mounted

from .procs import NodeProcess


@contextmanager
def checked_cluster(root: Path, **kw: Any) -> Iterator["Cluster"]:
    """A started cluster; on a normal exit every mount is unmounted and the
    consistency oracle must find nothing.  Always stopped."""
    c = Cluster(root, **kw)
    problems: list[str] = []
    try:
        c.start()
        yield c
        c.unmount_all()
        problems = c.consistency_problems()
    finally:
        c.stop()
    assert not problems, "inconsistent after the test:\n" + "\n".join(problems[:20])


class Cluster:
    def __init__(self, root: Path, data_nodes: int = 3,
                 meta_args: list[str] | None = None,
                 data_args: list[str] | None = None, meta_host: str = "127.0.0.1") -> None:
        self.root = root
        self.secret_file = root / "secret"
        create_secret(self.secret_file)
        self.secret = self.secret_file.read_text().strip()
        self.meta = NodeProcess("meta", root / "meta", self.secret_file, meta_args,
                                host=meta_host)
        self.data: list[NodeProcess] = []
        self.n_data = data_nodes
        self.data_args = data_args or []
        self.mounts: list[Path] = []

    def start(self) -> "Cluster":
        self.meta.start()
        for i in range(self.n_data):
            self.add_data_node(f"data{i + 1}")
        self.wait_nodes_up(self.n_data)
        return self

    def add_data_node(self, node_id: str, extra: list[str] | None = None, *,
                      host: str = "127.0.0.1", netns: str | None = None) -> NodeProcess:
        """Start data node ``node_id`` with the cluster's data args plus ``extra``,
        listening on ``host`` (inside network namespace ``netns`` if given)."""
        node = NodeProcess("data", self.root / node_id, self.secret_file,
                           ["--meta", self.meta.address, "--node-id", node_id]
                           + self.data_args + (extra or []), host=host, netns=netns)
        node.start()
        self.data.append(node)
        return node

    def call(self, method: str, **args: Any) -> Any:
        return sync_call(self.meta.address, self.secret_file, method, **args)

    def wait_nodes_up(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = self.call("cluster_map")["nodes"]
            if sum(n["state"] == "up" for n in nodes) >= count:
                return
            time.sleep(0.1)
        raise RuntimeError("data nodes did not come up")

    def create_volume(self, name: str = "vol", **kw: Any) -> dict[str, Any]:
        args = {"block_size": 4 << 20, "replicas": 3} | kw
        result: dict[str, Any] = self.call("create_volume", name=name, **args)
        return result

    def mount(self, mountpoint: Path, volume: str = "vol", options: str = "",
              check: bool = True, *, netns: str | None = None
              ) -> subprocess.CompletedProcess[str]:
        """Mount ``volume`` on ``mountpoint``; with ``netns`` the mount's daemon
        lives in that network namespace (``nsenter --net``: only the network
        namespace changes, so the mount is still made in this one's mounts)."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        opts = f"secret_file={self.secret_file},cache_dir={self.root / ('cache-' + mountpoint.name)}"
        if options:
            opts += "," + options
        prefix = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
        argv = ["mount", "-t", "fuse.objfs", f"{self.meta.address}/{volume}", str(mountpoint),
                "-o", opts]
        run = subprocess.run(prefix + argv, capture_output=True, text=True, timeout=60)
        if run.returncode == 0:
            self.mounts.append(mountpoint)
        elif check:
            raise RuntimeError(f"mount failed: {run.stderr}")
        return run

    def umount(self, mountpoint: Path) -> None:
        umount(mountpoint)
        if mountpoint in self.mounts:
            self.mounts.remove(mountpoint)

    def restart_all_nodes(self) -> None:
        for node in [self.meta] + self.data:
            node.stop()
        self.meta.start()
        for node in self.data:
            node.start()
        self.wait_nodes_up(len(self.data))

    def unmount_all(self) -> None:
        for mp in list(self.mounts):
            umount(mp)
        self.mounts.clear()

    def stop(self) -> None:
        self.unmount_all()
        for node in self.data + [self.meta]:
            node.stop()

    def consistency_problems(self) -> list[str]:
        """The test oracle: metadata fsck, and every referenced object present
        and intact on every node the block map names (on an erasure-coded
        volume: shard i, a verified shard of that block, on holder i)."""
        db = self.root / "meta" / "meta.db"
        if not db.exists():
            return []
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            problems = metastate.fsck(conn)
            for oid, nodes, k, m in conn.execute(
                    "SELECT b.oid, b.nodes, v.ec_k, v.ec_m FROM blocks b "
                    "JOIN volumes v ON v.vol = b.vol WHERE b.oid IS NOT NULL"):  # not inline
                holders = json.loads(nodes)
                problems += self._shard_problems(oid, holders, k, m) if k else [
                    f"object {oid} missing or corrupt on {node_id}"
                    for node_id in holders if not self._object_ok(node_id, oid)]
        finally:
            conn.close()
        return problems

    def _shard_problems(self, oid: str, holders: list[str], k: int, m: int) -> list[str]:
        if len(holders) != k + m:
            return [f"block {oid}: {len(holders)} holders for a {k}+{m} code"]
        named = [h for h in holders if h]
        problems = [f"block {oid}: shards on {len(set(named))} distinct of {len(named)} nodes"
                    ] if len(set(named)) != len(named) else []
        shards = []
        for i, node_id in enumerate(holders):
            shard = self._shard(node_id, oid, i, k, m) if node_id else None
            if node_id and shard is None:
                problems.append(f"shard {i} of {oid} missing or corrupt on {node_id}")
            elif shard is not None:
                shards.append(shard)
        if len({(s.length, s.digest) for s in shards}) > 1:
            problems.append(f"block {oid}: its shards belong to different objects")
        return problems

    def block_holders(self) -> dict[str, list[str]]:
        """object id -> the nodes the block map names, in the order readers try them."""
        conn = sqlite3.connect(f"file:{self.root / 'meta' / 'meta.db'}?mode=ro", uri=True)
        try:
            return {oid: json.loads(nodes)
                    for oid, nodes in conn.execute(
                        "SELECT oid, nodes FROM blocks WHERE oid IS NOT NULL")}
        finally:
            conn.close()

    def _object_ok(self, node_id: str, oid: str) -> bool:
        path = self.root / node_id / "objects" / oid[:2] / oid[2:4] / oid
        try:
            blockformat.verify(path.read_bytes())
        except (OSError, blockformat.CorruptedObject):
            return False
        return True

    def _shard(self, node_id: str, oid: str, index: int, k: int, m: int
               ) -> erasure.Shard | None:
        """Shard ``index`` of block ``oid`` on ``node_id``, verified (None if not)."""
        sid = shard_id(oid, index)
        path = self.root / node_id / "objects" / sid[:2] / sid[2:4] / sid
        try:
            return erasure.verify_shard(path.read_bytes(), k, m, index)
        except (OSError, erasure.CorruptShard):
            return None


def daemon_pids(mountpoint: Path) -> list[int]:
    """PIDs of objfs daemons serving ``mountpoint`` (from their command lines)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"objfs") for a in argv[:2]) and str(mountpoint).encode() in argv:
            pids.append(int(entry))
    return pids


def fsync_all(root: Path) -> None:
    """Every file under ``root`` committed, what ``sync`` means on a local
    filesystem: a mount commits a file it closed a moment after the close,
    and Linux passes no syncfs to a FUSE filesystem (``sync -f`` waits for
    nothing there), so a test that looks at the nodes next fsyncs."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def umount(mountpoint: Path) -> None:
    """Unmount, lazily if busy, and make sure the daemon is gone."""
    pids = daemon_pids(mountpoint)
    if is_mounted(mountpoint):
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
    deadline = time.monotonic() + 20
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists()]
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
