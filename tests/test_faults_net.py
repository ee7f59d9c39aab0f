"""A link is cut, a disk fills up; users see normal service and every
acknowledged byte survives.  Real node processes, real mounts.

The cut node runs in a network namespace of its own, joined to this host by
a veth pair: it has its own address, its process stays alive, and the cut
is the host end of the link going down (connections to it fail or hang;
it cannot reach the metadata node either).  The full node keeps its store
on a small tmpfs.  Each test ends with the cluster's consistency oracle.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from storagenode import blockformat

from .cluster import Cluster, fsync_all
from .test_healing import (META_ARGS, every_copy_accounted, fully_redundant, make_tree,
                           stored_objects, trees_equal, wait_for)
from .test_posix_errors import write_all

MiB = 1 << 20


# ---------------------------------------------------------------- a cut link

@dataclass(frozen=True)
class Link:
    """Network namespace ``netns`` joined to this host by a veth pair: this
    end ``host_if`` with ``host_addr``, the namespace end ``node_addr``."""
    netns: str
    host_if: str
    node_if: str
    host_addr: str
    node_addr: str
    subnet: str

    def cut(self, how: str) -> None:
        """``link-down``: the host end goes down (the host knows: connecting
        fails at once, connections open hang); ``silent``: the namespace
        drops whatever it would send the host (the host learns nothing:
        every connection, new or open, hangs)."""
        if how == "link-down":
            ip("link", "set", self.host_if, "down")
        else:
            ip("-n", self.netns, "route", "add", "blackhole", f"{self.host_addr}/32")

    def restore(self, how: str) -> None:
        if how == "link-down":
            ip("link", "set", self.host_if, "up")
        else:
            ip("-n", self.netns, "route", "del", "blackhole", f"{self.host_addr}/32")


def ip(*args: str) -> None:
    run = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if run.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {run.stderr.strip()}")


@contextmanager
def namespace_link() -> Iterator[Link]:
    """A namespace and its veth link, removed again whatever happens.  Skips
    the test if this process may not create network namespaces."""
    tag = os.getpid()
    net = f"10.77.{tag % 250 + 1}"
    link = Link(f"objfs-t{tag}", f"ofh{tag}", f"ofn{tag}", f"{net}.1", f"{net}.2", f"{net}.0/24")
    try:
        added = subprocess.run(["ip", "netns", "add", link.netns], capture_output=True,
                               text=True, timeout=30)
    except OSError as exc:
        pytest.skip(f"cannot run ip netns add: {exc}")
    if added.returncode != 0:
        pytest.skip(f"ip netns add is not permitted: {added.stderr.strip()}")
    # With the host end down its connected route goes; without this
    # fallback the node's address would follow the default route off the machine.
    unreachable = ["route", "add", "unreachable", link.subnet, "metric", "4096"]
    try:
        ip("link", "add", link.host_if, "type", "veth", "peer", "name", link.node_if,
           "netns", link.netns)
        ip("addr", "add", f"{link.host_addr}/24", "dev", link.host_if)
        ip("link", "set", link.host_if, "up")
        ip(*unreachable)
        inside = ["-n", link.netns]
        ip(*inside, "addr", "add", f"{link.node_addr}/24", "dev", link.node_if)
        ip(*inside, "link", "set", link.node_if, "up")
        ip(*inside, "link", "set", "lo", "up")
        ip(*inside, "route", "add", "default", "via", link.host_addr)
        yield link
    finally:
        subprocess.run(["ip", "netns", "del", link.netns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", link.host_if], capture_output=True, timeout=30)
        subprocess.run(["ip", "route", "del", *unreachable[2:]], capture_output=True,
                       timeout=30)


@pytest.fixture
def linked(tmp_path: Path) -> Iterator[tuple[Cluster, Link]]:
    """Metadata node and data1..data3 on this host, data4 in its own
    namespace; the metadata node listens on the host end of the link (a local
    address, so the host reaches it whether the link is up or down)."""
    with namespace_link() as link:
        c = Cluster(tmp_path / "cluster", data_nodes=3, meta_args=META_ARGS,
                    meta_host=link.host_addr)
        problems: list[str] = []
        try:
            c.start()
            c.add_data_node("data4", host=link.node_addr, netns=link.netns)
            c.wait_nodes_up(4)
            c.create_volume("vol", block_size=1 << 20, replicas=3)
            yield c, link
            c.unmount_all()
            problems = c.consistency_problems()
        finally:
            c.stop()
    assert not problems, "inconsistent after the test:\n" + "\n".join(problems[:20])


class Job(threading.Thread):
    """A command run in the background, timed."""

    def __init__(self, script: str) -> None:
        super().__init__()
        self.script = script
        self.result: subprocess.CompletedProcess[bytes] | None = None
        self.seconds = 0.0

    def run(self) -> None:
        started = time.monotonic()
        self.result = subprocess.run(["sh", "-ec", self.script], capture_output=True,
                                     timeout=600)
        self.seconds = time.monotonic() - started

    def check(self) -> None:
        assert self.result is not None, f"{self.script} did not finish"
        assert self.result.returncode == 0, \
            f"{self.script} failed: {self.result.stderr.decode()[-2000:]}"


def cluster_state(c: Cluster) -> str:
    """What a timed-out wait leaves to look at: nodes, repair, oracle."""
    nodes = [(n["node_id"], n["state"], round(n["silent"], 1))
             for n in c.call("cluster_map")["nodes"]]
    holders = c.block_holders()
    unaccounted = {node.state.name: sorted(stored_objects(c, node.state.name)
                                           - {o for o, h in holders.items()
                                              if node.state.name in h})[:5]
                   for node in c.data}
    short = [(o, h) for o, h in holders.items() if len(set(h)) != 3][:5]
    return (f"nodes {nodes}\nrepair {c.call('repair_status')['repair']}\n"
            f"copies not in the block map {unaccounted}\nblocks not at 3 copies {short}\n"
            "oracle: " + "\n".join(c.consistency_problems()[:10]))


def wait_or_explain(c: Cluster, what: str, check: Callable[[], bool],
                    timeout: float = 90) -> float:
    try:
        return wait_for(what, check, timeout)
    except AssertionError:
        raise AssertionError(f"timed out waiting for {what}:\n{cluster_state(c)}") from None


def drop_caches() -> None:
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)


@pytest.mark.parametrize("how", ["link-down", "silent"])
def test_a_cut_link_loses_nothing_and_the_node_rejoins(linked: tuple[Cluster, Link],
                                                       tmp_path: Path, how: str) -> None:
    c, link = linked
    node = c.data[3]
    addresses = {n["node_id"]: n["address"] for n in c.call("cluster_map")["nodes"]}
    assert addresses["data4"] == f"{link.node_addr}:{node.port}"
    src, old, out = tmp_path / "src", tmp_path / "old", tmp_path / "out"
    make_tree(src, 1, 40, 3 << 20)
    make_tree(old, 2, 30, 3 << 20)
    writer, reader = tmp_path / "writer", tmp_path / "reader"
    c.mount(writer)
    subprocess.run(["cp", "-a", str(old), str(writer / "old")], check=True)
    fsync_all(writer)
    assert sum("data4" in h for h in c.block_holders().values()) > 10
    c.mount(reader)             # another client: its reads come from the data nodes

    jobs = [Job(f"cp -a {src} {writer / 'in'}; sync -f {writer}"),
            Job(f"cp -a {reader / 'old'} {out}")]
    for job in jobs:
        job.start()
    time.sleep(0.5)
    link.cut(how)
    cut_at = time.monotonic()
    for job in jobs:
        job.join()
    for job in jobs:
        job.check()
    assert node.proc is not None and node.proc.poll() is None, "cut off, not dead"
    assert trees_equal(src, writer / "in")
    assert trees_equal(old, out)
    wait_or_explain(c, "full redundancy without the cut node",
                    lambda: fully_redundant(c, {"data4"}))
    print(f"\n{how}, 0.5 s in: copy in {jobs[0].seconds:.1f} s "
          f"({sum(f.stat().st_size for f in src.rglob('*') if f.is_file()) >> 20} MiB), "
          f"copy out {jobs[1].seconds:.1f} s; full redundancy "
          f"{time.monotonic() - cut_at:.1f} s after the cut")

    link.restore(how)
    c.wait_nodes_up(4, timeout=30)
    reconciled = wait_or_explain(c, "stale copies reconciled", lambda: fully_redundant(
        c, set()) and every_copy_accounted(c), timeout=120)
    print(f"link back: the node rejoined and its copies were reconciled in {reconciled:.1f} s")
    assert stored_objects(c, "data4"), "the rejoined node holds copies again"
    checker = tmp_path / "checker"
    c.mount(checker)            # a fresh client: every byte comes from the data nodes
    drop_caches()
    assert trees_equal(src, checker / "in")
    assert trees_equal(old, checker / "old")
    assert trees_equal(old, writer / "old")


# ---------------------------------------------------------------- a full node

FULL_DISK = 16 * MiB


@pytest.fixture
def one_full(tmp_path: Path) -> Iterator[Cluster]:
    """Four data nodes; data2 stores on a 16 MiB tmpfs with no reserve."""
    c = Cluster(tmp_path / "cluster", data_nodes=0, meta_args=META_ARGS)
    disk = c.root / "data2"
    disk.mkdir(parents=True)
    problems: list[str] = []
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FULL_DISK}", "tmpfs", str(disk)],
                   check=True)
    try:
        c.start()
        for i in range(1, 5):
            c.add_data_node(f"data{i}", ["--reserve-bytes", "0"] if i == 2 else [])
        c.wait_nodes_up(4)
        c.create_volume("vol", block_size=1 << 20, replicas=3)
        yield c
        c.unmount_all()
        problems = c.consistency_problems()
    finally:
        c.stop()
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    assert not problems, "inconsistent after the test:\n" + "\n".join(problems[:20])


class Oracle(threading.Thread):
    """Runs the consistency oracle over and over until stopped; keeps the
    problems seen on two runs in a row (a block moved between the map read
    and the object check is not one)."""

    def __init__(self, c: Cluster) -> None:
        super().__init__()
        self.c = c
        self.stopped = threading.Event()
        self.problems: set[str] = set()
        self.runs = 0

    def run(self) -> None:
        last: set[str] = set()
        while not self.stopped.wait(0.5):
            try:
                now = set(self.c.consistency_problems())
            except sqlite3.OperationalError:
                continue
            self.problems |= now & last
            last = now
            self.runs += 1


def refused_puts(address: str) -> float:
    """PUTs the data node at ``address`` answered 507 (disk full)."""
    text = httpx.get(f"http://{address}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "objfs_data_requests_total"
               and sample.labels == {"method": "PUT", "status": "507"})


def test_a_full_node_is_passed_over_and_nothing_is_damaged(one_full: Cluster,
                                                           tmp_path: Path) -> None:
    c = one_full
    full = c.data[1]
    mnt = tmp_path / "mnt"
    c.mount(mnt)
    contents = {f"f{i:02}": os.urandom(3 * MiB + 4099 * i) for i in range(20)}
    oracle = Oracle(c)
    oracle.start()
    started = time.monotonic()
    try:
        outcomes = {name: write_all(mnt / name, data) for name, data in contents.items()}
    finally:
        oracle.stopped.set()
        oracle.join()
    took = time.monotonic() - started
    assert outcomes == {name: "ok" for name in contents}
    refused = refused_puts(full.address)
    print(f"\n{sum(map(len, contents.values())) >> 20} MiB written in {took:.1f} s; "
          f"the full node refused {refused:.0f} PUTs and holds "
          f"{len(stored_objects(c, 'data2'))} objects; oracle ran {oracle.runs} times")
    assert refused > 0, "the node never filled up: the test tested nothing"
    assert not oracle.problems, "\n".join(sorted(oracle.problems)[:20])

    holders = c.block_holders()
    assert all(len(set(h)) == 3 for h in holders.values()), "a block short of copies"
    stored = stored_objects(c, "data2")
    assert stored and {oid for oid, h in holders.items() if "data2" in h} <= stored
    for path in (full.state / "objects").glob("*/*/*"):
        blockformat.verify(path.read_bytes())
    assert not list((full.state / "tmp").iterdir()), "partial uploads left on the full node"
    assert not list((full.state / "quarantine").iterdir())

    checker = tmp_path / "checker"
    c.mount(checker)            # a fresh client: every byte comes from the data nodes
    drop_caches()
    for name, data in contents.items():
        assert (checker / name).read_bytes() == data
        assert (mnt / name).read_bytes() == data
