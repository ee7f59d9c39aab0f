"""Nodes die, come back, join and leave; users see normal service and every
acknowledged byte survives.  Real node processes, real mounts, SIGKILL."""

from __future__ import annotations

import filecmp
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

from fusefront.fs import ROOM_BEHIND
from storagenode import blockformat
from storagenode.ids import new_object_id

from .cluster import Cluster, checked_cluster, fsync_all
from .procs import REPO

# Fast clocks so the test sees a whole death-to-repair cycle in seconds.
META_ARGS = ["--repair-interval", "1", "--repair-grace", "2", "--node-down-after", "4",
             "--orphan-interval", "2", "--orphan-grace", "12", "--gc-interval", "1"]
DATA_ARGS = ["--scrub-rate", str(64 << 20), "--scrub-interval", "1"]


@pytest.fixture
def healing(tmp_path: Path) -> Iterator[Cluster]:
    with checked_cluster(tmp_path / "cluster", data_nodes=4, meta_args=META_ARGS,
                         data_args=DATA_ARGS) as c:
        c.create_volume("vol", block_size=1 << 20, replicas=3)
        yield c


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
    """Every object on every node is one the block map says that node holds
    (a shard ``<oid>.<i>``: at position i)."""
    holders = c.block_holders()

    def accounted(node_id: str, name: str) -> bool:
        oid, _, index = name.partition(".")
        named = holders.get(oid, [])
        if index:
            return int(index) < len(named) and named[int(index)] == node_id
        return node_id in named
    return all(accounted(node.state.name, name)
               for node in c.data for name in stored_objects(c, node.state.name))


def settled_passes(c: Cluster, passes: int = 2) -> bool:
    """``passes`` more repair passes ran, and the last found nothing to do."""
    first = c.call("repair_status")["repair"]["passes"]
    wait_for("repair passes", lambda: c.call("repair_status")["repair"]["passes"] >= first + passes)
    status = c.call("repair_status")["repair"]
    return bool(status["misplaced"] == 0 and status["degraded"] == 0)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_failed_node_is_invisible_and_redundancy_comes_back(healing: Cluster,
                                                              tmp_path: Path, sig: int) -> None:
    c = healing
    src, out = tmp_path / "src", tmp_path / "out"
    make_tree(src, 1, 40, 3 << 20)
    mnt = tmp_path / "mnt"
    c.mount(mnt)
    make_tree(mnt / "old", 2, 20, 2 << 20)
    fsync_all(mnt)
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
    if sig == signal.SIGKILL:
        victim.kill(sig)
    else:
        assert victim.proc is not None
        victim.proc.send_signal(sig)        # hung: accepts connections, answers nothing
    killed_at = time.monotonic()
    for job in jobs:
        job.join()
    for name, result in results.items():
        assert result.returncode == 0, f"cp {name} failed: {result.stderr.decode()[-2000:]}"
    fsync_all(mnt)
    assert trees_equal(src, mnt / "in")
    assert trees_equal(expected_old, out)

    dead = {"data2"}
    wait_for("full redundancy without the dead node", lambda: fully_redundant(c, dead))
    print(f"\nredundancy restored {time.monotonic() - killed_at:.1f} s after the failure "
          f"({sum(f.stat().st_size for f in src.rglob('*') if f.is_file()) >> 20} MiB "
          "copied in plus 20 files)")

    # the node comes back with its stale copies: they are adopted or removed,
    # never counted twice, and no file changes
    if sig == signal.SIGKILL:
        victim.start()
    else:
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGCONT)
    c.wait_nodes_up(4)
    wait_for("stale copies reconciled", lambda: fully_redundant(c, set()) and
             every_copy_accounted(c), timeout=120)
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
    assert trees_equal(src, mnt / "in")
    assert trees_equal(expected_old, mnt / "old")


def test_with_one_of_three_nodes_dead_writes_go_on_and_redundancy_comes_back(
        tmp_path: Path) -> None:
    """3 data nodes, 3 replicas, one killed: a copy into the mount right
    after the kill (the map still says the node is up) and one after it is
    marked down both succeed, with two copies of each block; when the node
    is back, repair makes the third, and nothing changed in the files."""
    with checked_cluster(tmp_path / "cluster", data_nodes=3, meta_args=META_ARGS,
                         data_args=DATA_ARGS) as c:
        c.create_volume("vol", block_size=1 << 20, replicas=3)
        src, mnt = tmp_path / "src", tmp_path / "mnt"
        make_tree(src / "a", 3, 12, 3 << 20)
        make_tree(src / "b", 4, 12, 3 << 20)
        c.mount(mnt)
        victim = c.data[0]
        victim.kill(signal.SIGKILL)
        subprocess.run(["cp", "-a", str(src / "a"), str(mnt / "a")], check=True, timeout=120)
        wait_for("the node marked down", lambda: "data1" not in {
            n["node_id"] for n in c.call("cluster_map")["nodes"] if n["state"] == "up"})
        subprocess.run(["cp", "-a", str(src / "b"), str(mnt / "b")], check=True, timeout=120)
        fsync_all(mnt)
        holders = c.block_holders()
        assert holders and all(len(set(h)) == 2 for h in holders.values())
        assert trees_equal(src / "a", mnt / "a") and trees_equal(src / "b", mnt / "b")
        victim.start()
        c.wait_nodes_up(3)
        wait_for("full redundancy", lambda: fully_redundant(c, set()), timeout=120)
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
        assert trees_equal(src / "a", mnt / "a") and trees_equal(src / "b", mnt / "b")


def test_adding_a_node_moves_a_fair_share_and_draining_empties_one(healing: Cluster,
                                                                    tmp_path: Path) -> None:
    c = healing
    mnt = tmp_path / "mnt"
    c.mount(mnt)
    for i in range(600):
        (mnt / f"f{i}").write_bytes(os.urandom(20_000))    # past INLINE_MAX: stored
    fsync_all(mnt)
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
        assert len((mnt / f"f{i}").read_bytes()) == 20_000


def admin(c: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.admin", *args, "--meta", c.meta.address,
                           "--secret-file", str(c.secret_file)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def object_path(c: Cluster, node_id: str, oid: str) -> Path:
    return c.root / node_id / "objects" / oid[:2] / oid[2:4] / oid


def test_rot_and_loss_are_found_reported_and_repaired(healing: Cluster,
                                                      tmp_path: Path) -> None:
    c = healing
    mnt = tmp_path / "mnt"
    c.mount(mnt)
    content = {f"f{i}": os.urandom(300_000) for i in range(6)}
    for name, data in content.items():
        (mnt / name).write_bytes(data)
    fsync_all(mnt)
    holders = c.block_holders()
    assert len(holders) == 6
    (flip, flip_nodes), (cut, cut_nodes), (gone, gone_nodes) = list(holders.items())[:3]
    path = object_path(c, flip_nodes[0], flip)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    cut_path = object_path(c, cut_nodes[0], cut)
    cut_path.write_bytes(cut_path.read_bytes()[:1000])
    object_path(c, gone_nodes[1], gone).unlink()
    # an upload never committed; fsck is told to count it as old at once
    # (the node's own orphan scan waits 12 s, so it does not race fsck)
    orphan = new_object_id()
    orphan_path = object_path(c, "data1", orphan)
    orphan_path.parent.mkdir(parents=True, exist_ok=True)
    orphan_path.write_bytes(blockformat.encode(b"left behind"))

    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
    for name, data in content.items():       # readers never see the damage
        assert (mnt / name).read_bytes() == data

    found = admin(c, "fsck", "--verify", "--orphan-grace", "0")
    assert found.returncode == 1, found.stdout + found.stderr
    # the deleted copy: reported by fsck as missing; or the node's background
    # scan already found it gone and took it out of the block map, and fsck
    # reports an under-replicated block, or repair already copied it again
    # (on a busy machine all of that can happen before fsck looks)
    assert f"{gone} on {gone_nodes[1]}" in found.stdout or \
        f"  {gone}\n" in found.stdout or gone_nodes[1] not in c.block_holders()[gone] \
        or object_path(c, gone_nodes[1], gone).exists()
    assert f"{orphan} on data1" in found.stdout
    assert "PROBLEMS FOUND" in found.stdout

    fixed = admin(c, "fsck", "--verify", "--repair", "--orphan-grace", "0")
    assert "repair:" in fixed.stdout, fixed.stdout + fixed.stderr
    wait_for("fsck clean", lambda: admin(c, "fsck", "--verify", "--orphan-grace", "0")
             .returncode == 0, timeout=120)
    assert not orphan_path.exists()
    quarantined = {p.name.split(".")[0] for n in c.data
                   for p in (n.state / "quarantine").iterdir()}
    assert {flip, cut} <= quarantined, "the scrub or a read quarantines rotten copies"
    assert fully_redundant(c, set())
    status = admin(c, "status")
    assert status.returncode == 0 and "repair:" in status.stdout, status.stderr
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
    for name, data in content.items():
        assert (mnt / name).read_bytes() == data


def test_erasure_coded_volume_rebuilds_a_dead_nodes_shards(tmp_path: Path) -> None:
    with checked_cluster(tmp_path / "cluster", data_nodes=7, meta_args=META_ARGS) as c:
        c.create_volume("vol", block_size=1 << 20, replicas=1, ec_k=4, ec_m=2)
        mnt = tmp_path / "mnt"
        c.mount(mnt)
        content = {f"f{i}": os.urandom(700_000 * (i + 1)) for i in range(5)}
        for name, data in content.items():
            (mnt / name).write_bytes(data)
        fsync_all(mnt)
        victim = c.data[2]
        victim.kill(signal.SIGKILL)

        def healed() -> bool:
            holders = c.block_holders()
            return all(len(set(h)) == 6 and "" not in h and "data3" not in h
                       for h in holders.values()) and not c.consistency_problems()
        took = wait_for("shards rebuilt", healed)
        print(f"\nerasure-coded shards rebuilt {took:.1f} s after the kill")
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
        for name, data in content.items():
            assert (mnt / name).read_bytes() == data
        victim.start()
        c.wait_nodes_up(7)
        wait_for("stale shards removed", lambda: every_copy_accounted(c), timeout=120)


@pytest.mark.parametrize("nodes,k,m", [(6, 2, 2), (8, 4, 2)], ids=["2+2-of-6", "4+2-of-8"])
def test_erasure_coded_volume_serves_copies_while_two_nodes_die(
        tmp_path: Path, nodes: int, k: int, m: int) -> None:
    """kill -9 two of the nodes while a tree is copied in and another read
    out: writes still find k+m live nodes (so every acknowledged block has
    its full redundancy), reads rebuild from any k shards."""
    with checked_cluster(tmp_path / "cluster", data_nodes=nodes, meta_args=META_ARGS) as c:
        c.create_volume("vol", block_size=1 << 20, replicas=1, ec_k=k, ec_m=m)
        mnt, src, out, old = (tmp_path / n for n in ("mnt", "src", "out", "old"))
        c.mount(mnt)
        make_tree(src, 3, 24, 3 << 20)
        make_tree(old, 4, 12, 2 << 20)
        subprocess.run(["cp", "-a", str(old), str(mnt / "old")], check=True)
        fsync_all(mnt)
        jobs = [subprocess.Popen(["cp", "-a", str(src), str(mnt / "in")],
                                 stderr=subprocess.PIPE),
                subprocess.Popen(["cp", "-a", str(mnt / "old"), str(out)],
                                 stderr=subprocess.PIPE)]
        time.sleep(0.5)
        c.data[1].kill(signal.SIGKILL)
        c.data[5].kill(signal.SIGKILL)
        for job in jobs:
            _, err = job.communicate(timeout=300)
            assert job.returncode == 0, err.decode()[-2000:]
        fsync_all(mnt)
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
        assert trees_equal(src, mnt / "in") and trees_equal(old, out)
        wait_for("shards rebuilt", lambda: all(
            len(set(h)) == k + m and "" not in h and not {"data2", "data6"} & set(h)
            for h in c.block_holders().values()) and not c.consistency_problems())


def test_an_upload_waiting_for_its_commit_is_never_collected(tmp_path: Path) -> None:
    """The race between a slow writer and the orphan scan: with a 4 s orphan
    grace (commits of objects older than 2 s are refused), a block uploaded
    in the background and committed 3 s later is stored again, never lost."""
    args = [a for a in META_ARGS]
    args[args.index("--orphan-grace") + 1] = "4"
    args[args.index("--orphan-interval") + 1] = "0.5"
    with checked_cluster(tmp_path / "cluster", data_nodes=3, meta_args=args) as c:
        c.create_volume("vol", block_size=1 << 20, replicas=3)
        mnt = tmp_path / "mnt"
        c.mount(mnt)
        data = os.urandom(3 << 20) + b"tail"
        with open(mnt / "slow", "wb") as f:
            f.write(data[:(2 << 20) + 10])      # blocks 0 and 1 upload in the background
            time.sleep(3)                         # ... older than the commit limit now
            f.write(data[(2 << 20) + 10:])
            f.flush()
            os.fsync(f.fileno())                  # the commit, not a moment after close
        metrics = httpx.get(f"http://{c.meta.address}/metrics").text
        assert 'objfs_meta_rpc_total{method="commit_blocks",outcome="error"} 1.0' in metrics, \
            "the late commit was refused once (too old) and the blocks stored again"
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
        assert (mnt / "slow").read_bytes() == data
        time.sleep(6)                             # the first uploads are orphans: collected
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
        assert (mnt / "slow").read_bytes() == data
        wait_for("orphans collected", lambda: every_copy_accounted(c), timeout=30)


def test_a_piece_lost_without_a_report_is_found_and_restored(healing: Cluster,
                                                             tmp_path: Path) -> None:
    """A copy deleted behind the node's back (nothing quarantined, nothing
    reported) is found by the background scan and copied again."""
    c = healing
    mnt = tmp_path / "mnt"
    c.mount(mnt)
    data = os.urandom(2_500_000)
    (mnt / "f").write_bytes(data)
    fsync_all(mnt)
    oid, holders = next(iter(c.block_holders().items()))
    object_path(c, holders[0], oid).unlink()
    wait_for("the lost copy restored", lambda: fully_redundant(c, set()) and all(
        object_path(c, node, o).exists() for o, h in c.block_holders().items() for node in h))
    assert c.call("repair_status")["orphans"]["missing"] >= 1
    status = admin(c, "status")
    assert "missing pieces found" in status.stdout, status.stderr
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
    assert (mnt / "f").read_bytes() == data


def test_files_closed_while_every_data_node_hangs_land_when_they_answer(
        healing: Cluster, tmp_path: Path) -> None:
    """With room on the volume, a close leaves storing its data to the
    commit after it: a cp whose data nodes all hang returns, keeps the
    data, and stores and commits it once they answer again; then another
    mount reads it.  An fsync meanwhile reports the failure."""
    if shutil.disk_usage(tmp_path).free < ROOM_BEHIND + (1 << 30):
        pytest.skip("the disk has too little room for closes to store behind")
    c = healing
    mnt, other = tmp_path / "mnt", tmp_path / "other"
    c.mount(mnt)
    c.mount(other)
    (mnt / "before").write_bytes(b"x" * 100_000)     # the mount has asked for the free space
    fsync_all(mnt)
    time.sleep(0.5)
    data = {f"f{i}": os.urandom(300_000 + 70_001 * i) for i in range(4)}
    hung = [node for node in c.data if node.proc is not None]
    for node in hung:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGSTOP)
    try:
        for name, content in data.items():
            (mnt / name).write_bytes(content)        # returns: stored after the close
        fd = os.open(mnt / "f0", os.O_RDONLY)
        try:
            with pytest.raises(OSError):
                os.fsync(fd)                         # durable it is not: fsync says so
        finally:
            os.close(fd)
        time.sleep(2)
    finally:
        for node in hung:
            assert node.proc is not None
            node.proc.send_signal(signal.SIGCONT)
    for name, content in data.items():         # wait_for fails the test on its timeout
        wait_for(f"{name} seen by another mount",
                 lambda: (other / name).exists() and (other / name).read_bytes() == content,
                 timeout=60)
