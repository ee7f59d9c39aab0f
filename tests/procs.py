"""Real node processes for tests: started on free loopback ports, always stopped.

``NodeProcess`` starts ``objfs-node`` in a role, waits until ``/health``
answers, and on exit stops the process by PID (SIGTERM, then SIGKILL).
A node may listen on another address of this machine (``host``) and run
inside a network namespace (``netns``: the command is prefixed with
``ip netns exec``, which execs the node, so the PID is still the node's).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tools.localcluster import free_port, healthy

NODE = [sys.executable, "-m", "storagenode.main"]
REPO = Path(__file__).resolve().parent.parent


class NodeProcess:
    """One ``objfs-node`` process; use as a context manager or call stop()."""

    def __init__(self, role: str, state: Path, secret_file: Path,
                 extra: list[str] | None = None, port: int | None = None, *,
                 host: str = "127.0.0.1", netns: str | None = None) -> None:
        self.role = role
        self.state = state
        self.port = port or free_port()
        self.address = f"{host}:{self.port}"
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.argv = prefix + NODE + [role, "--state", str(state), "--listen", self.address,
                                     "--secret-file", str(secret_file)] + (extra or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state.parent / f"{state.name}.log"

    def start(self, timeout: float = 20.0) -> "NodeProcess":
        self.state.mkdir(parents=True, exist_ok=True)
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=logf, stderr=subprocess.STDOUT,
                                     cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.role} node exited: {self.log.read_text()[-2000:]}")
            if healthy(self.address):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.role} node did not become healthy: {self.log.read_text()[-2000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)     # a test may have hung it (SIGSTOP)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> "NodeProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
