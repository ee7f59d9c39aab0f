"""A two-mount exerciser for close-to-open coherence.

Two mounts of one volume take turns changing one file: the one whose turn
it is opens it, writes at random offsets, truncates, chmods and sometimes
fsyncs, and closes it; then the other opens it and must read exactly the
bytes, size and mode of a local reference file that had the same changes.
Meanwhile a second thread stats and reads the file through both mounts at
random (``--noise``), which is what makes the mounts recall each other's
leases mid-turn.  On a mismatch it prints the turn, what differs (which
4 KiB pages, and whether a re-read 3 s later is right) and the last
operations, and exits 1.

    python -m tools.mcx /mnt/a/f /mnt/b/f --seconds 60 --seed 3 --noise read
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

PAGE = 4096


def read_direct(path: Path) -> bytes:
    """The file's bytes read past the kernel's page cache (O_DIRECT)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 1 << 20)
        out = bytearray()
        while True:
            n = os.preadv(fd, [buf], len(out))
            out += buf[:n]
            if n == 0:
                return bytes(out)
    finally:
        os.close(fd)


class Run:
    def __init__(self, paths: list[Path], seed: int, noise: str, truncate: bool,
                 third: Path | None = None) -> None:
        self.paths = paths
        self.third = third
        self.rnd = random.Random(seed)
        self.noise = noise
        self.truncate = truncate
        self.ref = bytearray()
        self.mode = 0o644
        self.turns = 0
        self.ops: list[tuple[Any, ...]] = []
        self.problems: list[str] = []
        self.stop_at = 0.0

    def turn(self) -> None:
        me = self.rnd.randrange(2)
        with open(self.paths[me], "r+b") as f:
            for _ in range(self.rnd.randint(1, 3)):
                self.step(me, f)
                if self.rnd.random() < 0.2:
                    os.fsync(f.fileno())
        self.turns += 1
        self.check(1 - me)

    def step(self, me: int, f: Any) -> None:
        choice = self.rnd.random()
        if choice < 0.6 or (choice < 0.8 and not self.truncate):
            offset = self.rnd.randint(0, len(self.ref) + 50_000)
            data = os.urandom(self.rnd.randint(1, 150_000))
            f.seek(offset)
            f.write(data)
            f.flush()
            if offset > len(self.ref):
                self.ref.extend(bytes(offset - len(self.ref)))
            self.ref[offset:offset + len(data)] = data
            self.ops.append((me, "write", offset, len(data)))
        elif choice < 0.8:
            size = self.rnd.randint(0, len(self.ref) + 10_000)
            f.truncate(size)
            del self.ref[size:]
            self.ref.extend(bytes(size - len(self.ref)))
            self.ops.append((me, "truncate", size))
        else:
            self.mode = self.rnd.choice([0o600, 0o640, 0o644, 0o755])
            os.fchmod(f.fileno(), self.mode)
            self.ops.append((me, "chmod", oct(self.mode)))

    def check(self, other: int) -> None:
        path = self.paths[other]
        got = path.read_bytes()
        st = os.stat(path)
        if got == self.ref and st.st_size == len(self.ref) and \
                stat.S_IMODE(st.st_mode) == self.mode:
            return
        pages = [i // PAGE for i in range(0, max(len(got), len(self.ref)), PAGE)
                 if got[i:i + PAGE] != self.ref[i:i + PAGE]]
        direct = read_direct(path)
        seen = f"an O_DIRECT read there is {'right' if direct == self.ref else 'wrong'}; "
        others = [("writing mount", self.paths[1 - other])]
        if self.third is not None:
            others.append(("third mount", self.third))
        seen += "; ".join(f"{name} reads it {'right' if p.read_bytes() == self.ref else 'wrong'}"
                          f" (mode {oct(stat.S_IMODE(os.stat(p).st_mode))})"
                          for name, p in others)
        time.sleep(3)
        later = path.read_bytes() == self.ref
        seen += f"; mode there 3 s later {oct(stat.S_IMODE(os.stat(path).st_mode))}"
        self.problems.append(
            f"turn {self.turns}: mount {other} read {len(got)} bytes (size {st.st_size}, "
            f"mode {oct(stat.S_IMODE(st.st_mode))}), expected {len(self.ref)} bytes, mode "
            f"{oct(self.mode)}; {len(pages)} pages differ (first {pages[:5]}); "
            f"{seen}; right 3 s later: {later}")

    def noise_loop(self) -> None:
        rnd = random.Random(self.rnd.random())
        while time.monotonic() < self.stop_at and not self.problems:
            if self.noise == "none":
                time.sleep(0.1)
                continue
            path = rnd.choice(self.paths)
            try:
                os.stat(path)
                if self.noise == "read" and rnd.random() < 0.3:
                    with open(path, "rb") as f:
                        f.read(rnd.randint(1, 300_000))
            except OSError as exc:
                self.problems.append(f"stat or read through {path}: {exc!r}")

    def run(self, seconds: float) -> None:
        self.paths[0].write_bytes(b"")
        os.chmod(self.paths[0], self.mode)
        self.stop_at = time.monotonic() + seconds
        noise = threading.Thread(target=self.noise_loop)
        noise.start()
        try:
            while time.monotonic() < self.stop_at and not self.problems:
                self.turn()
        except OSError as exc:
            self.problems.append(f"turn {self.turns}: {exc!r}")
        finally:
            self.stop_at = 0.0
            noise.join()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mcx", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first", type=Path, help="the file, through one mount")
    p.add_argument("second", type=Path, help="the same file, through another mount")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--noise", choices=("none", "stat", "read"), default="read")
    p.add_argument("--no-truncate", action="store_true")
    p.add_argument("--third", type=Path,
                   help="the same file through a third mount, read only after a mismatch")
    a = p.parse_args(argv)
    run = Run([a.first, a.second], a.seed, a.noise, not a.no_truncate, a.third)
    run.run(a.seconds)
    print(f"seed {a.seed}: {run.turns} turns, noise {a.noise}")
    for problem in run.problems:
        print("  " + problem)
    if run.problems:
        print("  last operations (mount, op, ...): " + repr(run.ops[-12:]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
