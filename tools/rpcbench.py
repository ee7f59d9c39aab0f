"""Round-trip cost of the metadata RPC, measured against a real node process.

``python -m tools.rpcbench [-n 2000] [--concurrency 8]`` starts an
``objfs-node meta`` process on a free loopback port with its state in a
temporary folder, then through one ``MetaClient``:

- N sequential ``getattr`` queries (the cost every FUSE operation pays),
- N sequential ``mkdir`` ops (a query's cost plus one group commit, fsync),
- N ``getattr`` queries spread over ``--concurrency`` tasks at once

(``--runs`` picks some of them, to profile one at a time), and prints for each microseconds per call (wall clock), calls per second, and
the CPU time per call spent by this client process and by the node process
(these last two hold still on a busy machine, where wall time does not), and
stops the process (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable

import trio

from storagenode.auth import create_secret, load_secret
from storagenode.metaclient import MetaClient

from .localcluster import free_port, healthy

REPO = Path(__file__).resolve().parent.parent


def start_node(state: Path, secret_file: Path, address: str) -> subprocess.Popen[bytes]:
    """An ``objfs-node meta`` process, returned once /health answers."""
    argv = [sys.executable, "-m", "storagenode.main", "meta", "--state", str(state),
            "--listen", address, "--secret-file", str(secret_file), "--log-level", "warning"]
    proc = subprocess.Popen(argv, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"rpcbench: the metadata node exited ({proc.returncode})")
        if healthy(address):
            return proc
        time.sleep(0.05)
    stop_node(proc)
    raise SystemExit("rpcbench: the metadata node did not become healthy")


def stop_node(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


Call = Callable[[int], Awaitable[object]]


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(label: str, calls: int, pid: int, run: Callable[[], Awaitable[None]]) -> None:
    """Run ``run`` (``calls`` calls) and print its cost per call."""
    wall, cpu, node = time.perf_counter(), time.process_time(), process_cpu(pid)
    await run()
    wall = time.perf_counter() - wall
    cpu, node = time.process_time() - cpu, process_cpu(pid) - node
    print(f"{label:<22} {calls:>6} calls {wall / calls * 1e6:>8.1f} µs/call "
          f"{calls / wall:>7.0f} calls/s   CPU µs/call: client {cpu / calls * 1e6:>6.1f}"
          f"  node {node / calls * 1e6:>6.1f}")


def sequential(calls: int, call: Call) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        for i in range(calls):
            await call(i)
    return run


def concurrent(calls: int, tasks: int, call: Call) -> Callable[[], Awaitable[None]]:
    async def worker(first: int) -> None:
        for i in range(first, calls, tasks):
            await call(i)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            for first in range(tasks):
                nursery.start_soon(worker, first)
    return run


RUNS = ("getattr", "mkdir", "concurrent")


async def bench(address: str, secret: str, pid: int, calls: int, tasks: int,
                runs: list[str]) -> None:
    async with MetaClient(address, secret) as client:
        vol = (await client.call("create_volume", name="bench", block_size=1 << 20,
                                 replicas=1))["vol"]

        async def getattr_(i: int) -> object:
            return await client.call("getattr", vol=vol, ino=1)

        async def mkdir(i: int) -> object:
            return await client.call("mkdir", vol=vol, parent=1, name=b"d%d" % i,
                                     mode=0o755, uid=0, gid=0)

        await sequential(min(200, calls), getattr_)()        # warm up
        if "getattr" in runs:
            await measure("getattr, sequential", calls, pid, sequential(calls, getattr_))
        if "mkdir" in runs:
            await measure("mkdir, sequential", calls, pid, sequential(calls, mkdir))
        if "concurrent" in runs:
            await measure(f"getattr, {tasks} concurrent", calls, pid,
                          concurrent(calls, tasks, getattr_))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rpcbench", description=__doc__.split("\n")[0])
    p.add_argument("-n", "--calls", type=int, default=2000, help="calls per measurement")
    p.add_argument("--concurrency", type=int, default=8, help="tasks in the concurrent run")
    p.add_argument("--runs", default=",".join(RUNS),
                   help=f"which measurements, comma-separated (default: {','.join(RUNS)})")
    args = p.parse_args(argv)
    runs = args.runs.split(",")
    if not set(runs) <= set(RUNS):
        p.error(f"--runs takes some of {', '.join(RUNS)}")
    with tempfile.TemporaryDirectory(prefix="rpcbench-") as tmp:
        secret_file = Path(tmp) / "secret"
        create_secret(secret_file)
        address = f"127.0.0.1:{free_port()}"
        proc = start_node(Path(tmp) / "meta", secret_file, address)
        try:
            trio.run(bench, address, load_secret(secret_file), proc.pid, args.calls,
                     args.concurrency, runs)
        finally:
            stop_node(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
