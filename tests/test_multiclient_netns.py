"""Mounts of one volume whose daemons live in network namespaces of their
own, as on separate machines: close-to-open, another client's changes shown
at once (lease recalls), one winner of a mkdir race, a partitioned writer
fenced out, a killed client.  Real processes, real mounts, real links.

Each client's namespace is joined to this host by a veth pair.  The
metadata node and the data nodes listen on an extra address of this host's
loopback device, which every namespace reaches through its own link.  A
mount's daemon is started under ``nsenter --net`` (not ``ip netns exec``,
which also gives the command a mount namespace of its own), so the mount
point is in this host's mounts and the test drives it with ordinary
processes.  A client is cut off by taking the host end of its link down.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from .cluster import Cluster, checked_cluster, daemon_pids
from .test_faults_net import Link, ip

LEASE_TIME = 4.0
SLACK = 3.0                 # scheduling and RPC time allowed on top of a lease time
NETWORKS = itertools.count()   # tells apart the networks made by one test process


# ---------------------------------------------------------------- the network

@dataclass(frozen=True)
class Client:
    """A mount whose daemon runs in the namespace at the far end of ``link``."""
    mnt: Path
    link: Link


@contextmanager
def client_network(count: int) -> Iterator[tuple[str, list[Link]]]:
    """The nodes' address (an extra address of this host's loopback device)
    and ``count`` client namespaces, each with its own veth link; everything
    removed again whatever happens.  Skips if this process may not make
    namespaces."""
    tag = f"{os.getpid()}{next(NETWORKS)}"
    net = int(tag) % 250 + 1
    service = f"10.78.{net}.1"
    links = [Link(f"objfs-c{tag}-{i}", f"och{tag}{i}", f"ocn{tag}{i}", f"10.{79 + i}.{net}.1",
                  f"10.{79 + i}.{net}.2", f"10.{79 + i}.{net}.0/24") for i in range(count)]
    probe = subprocess.run(["ip", "netns", "add", links[0].netns], capture_output=True,
                           text=True, timeout=30)
    if "not permitted" in probe.stderr:
        pytest.skip(f"ip netns add is not permitted: {probe.stderr.strip()}")
    elif probe.returncode != 0:
        raise RuntimeError(f"ip netns add: {probe.stderr.strip()}")
    ip("netns", "del", links[0].netns)
    try:
        ip("addr", "add", f"{service}/32", "dev", "lo")
        for link in links:
            add_link(link)
        yield service, links
    finally:
        for link in links:
            remove_link(link)
        subprocess.run(["ip", "addr", "del", f"{service}/32", "dev", "lo"], capture_output=True,
                       timeout=30)


def add_link(link: Link) -> None:
    ip("netns", "add", link.netns)
    ip("link", "add", link.host_if, "type", "veth", "peer", "name", link.node_if,
       "netns", link.netns)
    ip("addr", "add", f"{link.host_addr}/24", "dev", link.host_if)
    ip("link", "set", link.host_if, "up")
    # With the host end down its connected route goes; without this fallback
    # the client's address would follow the default route off the machine.
    ip("route", "add", "unreachable", link.subnet, "metric", "4096")
    inside = ["-n", link.netns]
    ip(*inside, "addr", "add", f"{link.node_addr}/24", "dev", link.node_if)
    ip(*inside, "link", "set", link.node_if, "up")
    ip(*inside, "link", "set", "lo", "up")
    ip(*inside, "route", "add", "default", "via", link.host_addr)


def remove_link(link: Link) -> None:
    for argv in (["netns", "del", link.netns], ["link", "del", link.host_if],
                 ["route", "del", "unreachable", link.subnet, "metric", "4096"]):
        subprocess.run(["ip", *argv], capture_output=True, timeout=30)


def netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def served_from(client: Client) -> None:
    """The mount is in this host's mounts, and every process serving it is
    in the client's network namespace (and not in ours)."""
    found = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--mountpoint", str(client.mnt)],
                           capture_output=True, text=True)
    assert found.stdout.strip() == "fuse.objfs", (client.mnt, found.stdout, found.stderr)
    pids = daemon_pids(client.mnt)
    assert pids, f"no daemon serves {client.mnt}"
    theirs = f"net:[{os.stat(f'/run/netns/{client.link.netns}').st_ino}]"
    assert theirs != netns_of(os.getpid())
    assert {netns_of(pid) for pid in pids} == {theirs}, (client.mnt, pids)


@contextmanager
def namespaced_clients(root: Path, count: int) -> Iterator[tuple[Cluster, list[Client]]]:
    """Metadata node and three data nodes on this host, ``count`` mounts
    (a, b, c) each served from a namespace of its own.  Every link is up
    again before the mounts go; then the consistency oracle runs."""
    with client_network(count) as (service, links):
        with checked_cluster(root / "cluster", data_nodes=0, meta_host=service,
                             meta_args=["--lease-time", str(LEASE_TIME)]) as c:
            for i in range(3):
                c.add_data_node(f"data{i + 1}", host=service)
            c.wait_nodes_up(3)
            c.create_volume("vol", block_size=1 << 20)
            clients = [Client(root / "abc"[i], link) for i, link in enumerate(links)]
            try:
                for client in clients:
                    c.mount(client.mnt, netns=client.link.netns)
                yield c, clients
            finally:
                for link in links:
                    link.restore("link-down")       # idempotent: up stays up


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, list[Client]]]:
    """One cluster with three namespaced mounts for the tests that cut no
    link (each uses names of its own); checked once, after the last."""
    with namespaced_clients(tmp_path_factory.mktemp("three"), 3) as setup:
        yield setup


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Cluster, list[Client]]]:
    """A cluster of its own with two namespaced mounts, checked after the test."""
    with namespaced_clients(tmp_path, 2) as setup:
        yield setup


def mount_log(c: Cluster, client: Client, lines: int = 30) -> str:
    """The end of a mount's log and of the metadata node's, for a failure message."""
    logs = [c.root / f"cache-{client.mnt.name}" / "objfs.log", c.meta.log]
    return "\n".join(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
                     for p in logs if p.exists())


def ls(directory: Path) -> list[str]:
    """What ``ls`` shows, one name a line."""
    run = subprocess.run(["ls", "-1A", str(directory)], capture_output=True, text=True,
                         timeout=60, check=True)
    return run.stdout.split()


# ---------------------------------------------------------------- a process holding a file

HOLDER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
for line in sys.stdin:
    word, *args = line.split()
    try:
        if word == "write":
            os.write(fd, args[1].encode() * int(args[0]))
        elif word == "fsync":
            os.fsync(fd)
        elif word == "close":
            os.close(fd)
        print("ok", flush=True)
    except OSError as exc:
        print("error", exc.errno, exc.strerror, flush=True)
    if word == "close":
        break
"""


class Holder:
    """A process that keeps one file open for writing on a mount and writes,
    fsyncs and closes it when told; killed on exit if still running."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, command: str, timeout: float = 30) -> str:
        """The holder's answer to ``command``: "ok" or "error ERRNO TEXT"."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"{command!r} on the holder did not return in {timeout} s"
        return self.proc.stdout.readline().strip()

    def __enter__(self) -> "Holder":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


# ---------------------------------------------------------------- the tests

def test_close_to_open_between_namespaces(three: tuple[Cluster, list[Client]]) -> None:
    """What one client wrote and closed, every other client sees in full at
    its next open: the size at once and every byte, whichever wrote last."""
    _, clients = three
    for client in clients:
        served_from(client)
    for round_ in range(9):
        writer, *readers = clients[round_ % 3:] + clients[:round_ % 3]
        data = os.urandom(1000 + 300_001 * round_)          # up to 3 blocks of 1 MiB
        (writer.mnt / "f").write_bytes(data)
        for reader in readers:
            assert os.stat(reader.mnt / "f").st_size == len(data), (round_, reader.mnt)
            assert (reader.mnt / "f").read_bytes() == data, (round_, reader.mnt)
    a, b, c = clients
    with open(a.mnt / "log", "ab") as log:
        for i in range(20):
            log.write(b"line %d\n" % i)
            log.flush()
            os.fsync(log.fileno())
            for reader in (b, c):
                assert (reader.mnt / "log").read_bytes().endswith(b"line %d\n" % i)


def test_changes_in_one_namespace_show_in_ls_in_the_others_at_once(
        three: tuple[Cluster, list[Client]]) -> None:
    """A file created, renamed and deleted on A shows in ``ls`` on B and C
    right after A's call returns; A's call waits for B's and C's cached
    listings to be recalled over their links, not for a lease to run out."""
    _, (a, b, c) = three
    (a.mnt / "d").mkdir()
    for other in (b, c):
        assert ls(other.mnt / "d") == []                 # the empty listing is cached
        assert not (other.mnt / "d" / "x").exists()      # ... and so is x's absence
    took: list[float] = []          # A's call
    shown: list[float] = []         # A's call until ls on B has shown the change
    for i in range(8):
        content = b"hello %d" % i
        for change, expected in ((lambda: (a.mnt / "d" / "x").write_bytes(content), ["x"]),
                                 (lambda: os.rename(a.mnt / "d" / "x", a.mnt / "d" / "y"), ["y"]),
                                 (lambda: os.unlink(a.mnt / "d" / "y"), [])):
            started = time.monotonic()
            change()
            took.append(time.monotonic() - started)
            assert ls(b.mnt / "d") == expected, i
            shown.append(time.monotonic() - started)
            assert ls(c.mnt / "d") == expected, i
        assert not (b.mnt / "d" / "x").exists() and not (c.mnt / "d" / "y").exists()
    took.sort()
    shown.sort()
    print(f"\na change on A while B and C cache the directory: A's call median "
          f"{took[len(took) // 2] * 1000:.0f} ms (longest {took[-1] * 1000:.0f} ms); "
          f"shown by ls on B after median {shown[len(shown) // 2] * 1000:.0f} ms")
    assert took[-1] < LEASE_TIME / 2, "a change waited for a lease to run out, not for a recall"


def test_mkdir_race_between_namespaces_has_one_winner(three: tuple[Cluster, list[Client]]
                                                      ) -> None:
    """The same directory made on three clients at once: exactly one mkdir
    succeeds, the others fail with EEXIST, and every client lists the same."""
    _, clients = three
    rounds = 15
    outcomes: list[list[str]] = [[] for _ in range(rounds)]
    started = time.monotonic()
    for i in range(rounds):
        start = threading.Barrier(2 * len(clients))

        def make(root: Path, i: int = i, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                os.mkdir(root / f"race{i}")
                outcomes[i].append("made")
            except FileExistsError:
                outcomes[i].append("exists")
        threads = [threading.Thread(target=make, args=(client.mnt,))
                   for client in clients + clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    print(f"\n{rounds} mkdir races of six calls on three clients: "
          f"{(time.monotonic() - started) / rounds:.2f} s a race")
    assert all(sorted(o) == ["exists"] * 5 + ["made"] for o in outcomes), outcomes
    expected = sorted(f"race{i}" for i in range(rounds))
    for client in clients:
        assert sorted(n for n in ls(client.mnt) if n.startswith("race")) == expected, client.mnt


def test_a_partitioned_writer_is_fenced_out(two: tuple[Cluster, list[Client]]) -> None:
    """A holds a file open with writes buffered under its WRITE lease when
    its link goes down.  B's write proceeds once A's lease has run out, and
    when A's link is back A's close fails with EIO: A's stale data never
    lands over B's.  A's mount goes on working afterwards."""
    c, (a, b) = two
    with Holder(a.mnt / "f") as holder:
        assert holder.ask("write 1000 durable.") == "ok"
        assert holder.ask("fsync") == "ok"
        assert holder.ask("write 40000 stale.") == "ok"      # buffered on A, not committed
        a.link.cut("link-down")
        started = time.monotonic()
        newer = b"newer on B." * 2000
        (b.mnt / "f").write_bytes(newer)
        waited = time.monotonic() - started
        assert (b.mnt / "f").read_bytes() == newer
        a.link.restore("link-down")
        restored = time.monotonic()
        closed = holder.ask("close", timeout=60)
        close_took = time.monotonic() - restored
    print(f"\nB's write went through {waited:.1f} s after A was cut off (lease time "
          f"{LEASE_TIME} s); A's close answered {close_took:.1f} s after its link came back: "
          f"{closed}")
    assert LEASE_TIME / 2 < waited < LEASE_TIME + SLACK, \
        f"B waited {waited:.1f} s for A's lease\n{mount_log(c, b)}"
    assert (b.mnt / "f").read_bytes() == newer, mount_log(c, a)
    assert (a.mnt / "f").read_bytes() == newer, mount_log(c, a)
    assert closed.startswith(f"error {errno.EIO} "), f"A's close: {closed}\n{mount_log(c, a)}"
    (a.mnt / "after").write_bytes(b"A works again")
    assert (b.mnt / "after").read_bytes() == b"A works again"
    assert c.call("fsck") == []
    assert c.consistency_problems() == []


def test_a_partitioned_writer_that_writes_again_is_fenced_out_too(
        two: tuple[Cluster, list[Client]]) -> None:
    """As above, but A writes again once its link is back: its new write
    must not carry the stale buffered data in under a new lease.  The write
    or the fsync after it fails with EIO, and B's data stays."""
    c, (a, b) = two
    newer = b"newer on B." * 2000
    with Holder(a.mnt / "f") as holder:
        assert holder.ask("write 1000 durable.") == "ok"
        assert holder.ask("fsync") == "ok"
        assert holder.ask("write 40000 stale.") == "ok"      # buffered on A, not committed
        a.link.cut("link-down")
        (b.mnt / "f").write_bytes(newer)
        a.link.restore("link-down")
        time.sleep(LEASE_TIME / 2)           # A's renewal finds its session gone
        again = holder.ask("write 100 later.", timeout=60)
        synced = holder.ask("fsync", timeout=60)
        holder.ask("close", timeout=60)
    eio = f"error {errno.EIO} "
    assert again.startswith(eio) or synced.startswith(eio), (again, synced, mount_log(c, a))
    assert (b.mnt / "f").read_bytes() == newer, mount_log(c, a)
    assert (a.mnt / "f").read_bytes() == newer, mount_log(c, a)
    assert c.consistency_problems() == []


def test_a_killed_client_in_a_namespace_holds_others_up_only_for_the_lease_time(
        two: tuple[Cluster, list[Client]]) -> None:
    """A's daemon is killed while A holds a WRITE lease with unflushed data:
    B reads what A had acknowledged once A's lease has run out; A's mount
    point is cleaned by a plain umount and mounted again from A's namespace."""
    c, (a, b) = two
    fd = os.open(a.mnt / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"durable" * 1000)
    os.fsync(fd)                                      # acknowledged
    os.write(fd, b"never flushed" * 1000)            # buffered under A's write lease
    daemons = daemon_pids(a.mnt)
    assert daemons
    for pid in daemons:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(OSError):
        os.close(fd)                                  # the dead mount fails the close
    started = time.monotonic()
    assert (b.mnt / "f").read_bytes() == b"durable" * 1000
    waited = time.monotonic() - started
    print(f"\nB proceeded {waited:.1f} s after A was killed (lease time {LEASE_TIME} s)")
    assert waited < LEASE_TIME + SLACK
    cleaned = subprocess.run(["umount", str(a.mnt)], capture_output=True, text=True)
    assert cleaned.returncode == 0, cleaned.stderr
    c.mounts.remove(a.mnt)
    c.mount(a.mnt, netns=a.link.netns)
    served_from(a)
    assert (a.mnt / "f").read_bytes() == b"durable" * 1000
    (b.mnt / "f").write_bytes(b"from B")
    assert (a.mnt / "f").read_bytes() == b"from B"
    assert c.call("fsck") == []
