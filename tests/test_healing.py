"""Nodes die, come back, join and leave; users see normal service and every
acknowledged byte survives.  Real node processes, real mounts, SIGKILL."""

from __future__ import annotations

import filecmp
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from .cluster import Cluster

# Fast clocks so the test sees a whole death-to-repair cycle in seconds.
META_ARGS = ["--repair-interval", "1", "--repair-grace", "2", "--node-down-after", "4",
             "--orphan-interval", "2", "--orphan-grace", "12", "--gc-interval", "1"]


@pytest.fixture
def healing(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster", data_nodes=4, meta_args=META_ARGS)
    problems: list[str] = []
    try:
        c.start()
        c.create_volume("vol", block_size=1 << 20, replicas=3)
        yield c
        c.unmount_all()
        problems = c.consistency_problems()
    finally:
        c.stop()
    assert not problems, "inconsistent after the test:\n" + "\n".join(problems[:20])


def make_tree(root: Path, seed: int, files: int, max_size: int) -> None:
    rng = random.Random(seed)
    for i in range(files):
        path = root / f"d{i % 5}" / f"f{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = rng.randrange(max_size)
        # half random, half compressible
        path.write_bytes(rng.randbytes(size) if i % 2 else bytes([i % 251]) * size)


def trees_equal(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(
        trees_equal(a / d, b / d) for d in cmp.common_dirs)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 90) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def fully_redundant(c: Cluster, excluded: set[str], copies: int = 3) -> bool:
    holders = c.block_holders()
    return bool(holders) and all(
        len(set(h)) == copies and not set(h) & excluded for h in holders.values()) \
        and not c.consistency_problems()


def stored_objects(c: Cluster, node_id: str) -> set[str]:
    return {p.name for p in (c.root / node_id / "objects").glob("*/*/*")}


def every_copy_accounted(c: Cluster) -> bool:
    """Every object on every node is one the block map says that node holds."""
    holders = c.block_holders()
    return all(node.state.name in holders.get(oid, ())
               for node in c.data for oid in stored_objects(c, node.state.name))


def settled_passes(c: Cluster, passes: int = 2) -> bool:
    """``passes`` more repair passes ran, and the last found nothing to do."""
    first = c.call("repair_status")["repair"]["passes"]
    wait_for("repair passes", lambda: c.call("repair_status")["repair"]["passes"] >= first + passes)
    status = c.call("repair_status")["repair"]
    return bool(status["misplaced"] == 0 and status["degraded"] == 0)


def test_a_killed_node_is_invisible_and_redundancy_comes_back(healing: Cluster,
                                                              tmp_path: Path) -> None:
    c = healing
    src, out = tmp_path / "src", tmp_path / "out"
    make_tree(src, 1, 40, 3 << 20)
    mnt = tmp_path / "mnt"
    c.mount(mnt)
    make_tree(mnt / "old", 2, 20, 2 << 20)
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    expected_old = tmp_path / "old"
    make_tree(expected_old, 2, 20, 2 << 20)

    results: dict[str, subprocess.CompletedProcess[bytes]] = {}

    def run(name: str, argv: list[str]) -> None:
        results[name] = subprocess.run(argv, capture_output=True, timeout=300)

    jobs = [threading.Thread(target=run, args=("in", ["cp", "-a", str(src), str(mnt / "in")])),
            threading.Thread(target=run, args=("out", ["cp", "-a", str(mnt / "old"), str(out)]))]
    for job in jobs:
        job.start()
    time.sleep(0.5)
    victim = c.data[1]
    victim.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    for job in jobs:
        job.join()
    for name, result in results.items():
        assert result.returncode == 0, f"cp {name} failed: {result.stderr.decode()[-2000:]}"
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    assert trees_equal(src, mnt / "in")
    assert trees_equal(expected_old, out)

    dead = {"data2"}
    wait_for("full redundancy without the dead node", lambda: fully_redundant(c, dead))
    print(f"\nredundancy restored {time.monotonic() - killed_at:.1f} s after the kill "
          f"({sum(f.stat().st_size for f in src.rglob('*') if f.is_file()) >> 20} MiB "
          "copied in plus 20 files)")

    # the node comes back with its stale copies: they are adopted or removed,
    # never counted twice, and no file changes
    victim.start()
    c.wait_nodes_up(4)
    wait_for("stale copies reconciled", lambda: fully_redundant(c, set()) and
             every_copy_accounted(c), timeout=120)
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
    assert trees_equal(src, mnt / "in")
    assert trees_equal(expected_old, mnt / "old")


def test_adding_a_node_moves_a_fair_share_and_draining_empties_one(healing: Cluster,
                                                                    tmp_path: Path) -> None:
    c = healing
    mnt = tmp_path / "mnt"
    c.mount(mnt)
    for i in range(600):
        (mnt / f"f{i}").write_bytes(os.urandom(6000))
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    before = {n: stored_objects(c, n) for n in ("data1", "data2", "data3", "data4")}
    copies = sum(len(objs) for objs in before.values())
    assert copies == 3 * 600

    c.add_data_node("data5")
    c.wait_nodes_up(5)
    wait_for("rebalance", lambda: settled_passes(c) and fully_redundant(c, set()))
    assert sum(len(stored_objects(c, n)) for n in before) + \
        len(stored_objects(c, "data5")) == copies
    share = len(stored_objects(c, "data5")) / copies
    print(f"\nadding a 5th node moved {share:.3f} of the copies to it (ideal 0.200)")
    assert abs(share - 0.2) <= 0.1 * 0.2
    for node, objs in before.items():
        assert stored_objects(c, node) <= objs, f"objects moved onto old node {node}"

    c.call("set_node_admin", node_id="data3", admin="draining")

    def drained() -> bool:
        holders = c.block_holders()
        assert min(len(set(h)) for h in holders.values()) >= 3, "redundancy dropped"
        return all(len(set(h)) == 3 and "data3" not in h for h in holders.values()) \
            and not stored_objects(c, "data3")
    wait_for("drain", drained)
    c.call("set_node_admin", node_id="data3", admin="removed")
    assert [n["node_id"] for n in c.call("cluster_map")["nodes"]] == \
        ["data1", "data2", "data4", "data5"]
    for i in range(0, 600, 37):
        assert len((mnt / f"f{i}").read_bytes()) == 6000
