"""A whole objfs cluster on this machine: 1 metadata node, N data nodes on
loopback, every bit of state under one folder, and a mounted volume.

Layout of the state folder::

    secret            the cluster secret (0600)
    meta/             the metadata node's state;   meta.log
    data1/ data2/ ..  the data nodes' state;       data1.log ...
    pids/             one file per running process (role name -> PID)
    cache/            the mount's cache folder and its log

``up`` is idempotent: nodes already running (PID alive and /health
answering) are kept, missing ones started; the volume is created if missing;
the mount is made if not mounted.  ``down`` unmounts and stops every process
by its PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from storagenode.auth import create_secret
from storagenode.metaclient import MetaError

from .common import sync_call

NODE_CMD = [sys.executable, "-m", "storagenode.main"]


class ClusterError(Exception):
    pass


@dataclass
class LocalCluster:
    state: Path
    mountpoint: Path
    data_nodes: int = 3
    base_port: int = 9400
    volume: str = "demo"
    replicas: int = 3
    ec: tuple[int, int] = (0, 0)       # (k, m) for an erasure-coded volume
    block_size: int = 4 * 1024 * 1024

    @property
    def secret_file(self) -> Path:
        return self.state / "secret"

    @property
    def meta_address(self) -> str:
        return f"127.0.0.1:{self.base_port}"

    @property
    def source(self) -> str:
        return f"{self.meta_address}/{self.volume}"

    def roles(self) -> list[tuple[str, list[str], str]]:
        common = ["--secret-file", str(self.secret_file)]
        out = [("meta", ["meta", "--state", str(self.state / "meta"),
                         "--listen", self.meta_address] + common, self.meta_address)]
        for i in range(1, self.data_nodes + 1):
            addr = f"127.0.0.1:{self.base_port + i}"
            out.append((f"data{i}", ["data", "--state", str(self.state / f"data{i}"),
                                     "--listen", addr, "--meta", self.meta_address,
                                     "--node-id", f"data{i}"] + common, addr))
        return out

    # ----- processes
    def _pid(self, name: str) -> int | None:
        try:
            pid = int((self.state / "pids" / name).read_text())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def _start(self, name: str, argv: list[str], address: str) -> None:
        if self._pid(name) is not None and healthy(address):
            return
        log = open(self.state / f"{name}.log", "ab")
        proc = subprocess.Popen(NODE_CMD + argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=Path(__file__).resolve().parent.parent)
        (self.state / "pids" / name).write_text(str(proc.pid))
        deadline = time.monotonic() + 30
        while not healthy(address):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"{name} did not start; see {self.state / (name + '.log')}")
            time.sleep(0.1)

    def start_nodes(self) -> None:
        (self.state / "pids").mkdir(parents=True, exist_ok=True)
        create_secret(self.secret_file)
        for name, argv, address in self.roles():
            self._start(name, argv, address)
        self._wait_registered()

    def _wait_registered(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            cmap = sync_call(self.meta_address, self.secret_file, "cluster_map")
            if sum(n["state"] == "up" for n in cmap["nodes"]) >= self.data_nodes:
                return
            time.sleep(0.2)
        raise ClusterError("data nodes did not register with the metadata node")

    def ensure_volume(self) -> None:
        try:
            sync_call(self.meta_address, self.secret_file, "volume", name=self.volume)
        except MetaError:
            sync_call(self.meta_address, self.secret_file, "create_volume", name=self.volume,
                      block_size=self.block_size, replicas=self.replicas,
                      ec_k=self.ec[0], ec_m=self.ec[1])

    def mounted(self) -> bool:
        return is_mounted(self.mountpoint)

    def mount(self) -> None:
        if self.mounted():
            return
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        opts = f"secret_file={self.secret_file},cache_dir={self.state / 'cache'},allow_other"
        run = subprocess.run(["mount", "-t", "fuse.objfs", self.source, str(self.mountpoint),
                              "-o", opts], capture_output=True, text=True)
        if run.returncode != 0:
            raise ClusterError(f"mount failed: {run.stderr.strip() or run.stdout.strip()}")

    def up(self) -> None:
        self.start_nodes()
        self.ensure_volume()
        self.mount()

    def down(self) -> None:
        if self.mounted():
            r = subprocess.run(["umount", str(self.mountpoint)], capture_output=True, text=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        for name, _, _ in reversed(self.roles()):
            pid = self._pid(name)
            if pid is not None:
                stop_pid(pid)
            (self.state / "pids" / name).unlink(missing_ok=True)


def healthy(address: str) -> bool:
    """Does the node at ``address`` answer /health?"""
    try:
        return httpx.get(f"http://{address}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_mounted(mountpoint: Path) -> bool:
    target = str(mountpoint.resolve())
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def stop_pid(pid: int, grace: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return                  # our own child, exited and now reaped
        except ChildProcessError:
            pass                        # not our child: watch it another way
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
