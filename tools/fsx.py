"""A random-operation exerciser for file data (in the spirit of fsx).

A seeded random mix of write, read, truncate, mmap read/write, fsync,
close/reopen and remount on one or more files in a directory under test,
mirrored on reference files in a local directory; after every step the two
files must be identical (size, the touched range and the tail; whole files on
reopen and remount).  On a mismatch it prints the seed and the operations so
far, and shrinks them to the shortest failing list it can find.

    python -m tools.fsx DIR_UNDER_TEST --ops 1000000 --seed 7 --files 3 \
        --remount "umount /mnt/objfs && mount -t fuse.objfs ... /mnt/objfs"

Without --remount the remount steps are skipped (they are drawn all the
same, so a seed names the same operations either way).
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MiB = 1 << 20


@dataclass(frozen=True)
class Op:
    kind: str
    offset: int = 0
    length: int = 0
    seed: int = 0
    file: int = 0

    def __str__(self) -> str:
        return f"{self.kind}(file={self.file}, offset={self.offset}, length={self.length})"


KINDS = (["write"] * 30 + ["read"] * 25 + ["truncate"] * 8 + ["mapwrite"] * 8 +
         ["mapread"] * 8 + ["fsync"] * 5 + ["reopen"] * 6 + ["append"] * 6 + ["hole"] * 4)


def random_ops(seed: int, count: int, max_size: int, files: int = 1,
               remount_every: int = 0) -> list[Op]:
    """``count`` operations; with ``remount_every`` N, a remount about once
    in N operations."""
    rng = random.Random(seed)
    ops = []
    for _ in range(count):
        kind = rng.choice(KINDS)
        if remount_every and rng.randrange(remount_every) == 0:
            kind = "remount"
        offset = rng.randrange(max_size)
        length = rng.choice([1, 7, 512, 4096, 65536, 200_000, MiB, 5 * MiB])
        length = min(length, max_size - offset) or 1
        ops.append(Op(kind, offset, length, rng.getrandbits(32), rng.randrange(files)))
    return ops


class Mismatch(Exception):
    pass


class Pair:
    """A file under test and its local reference, driven in lockstep."""

    def __init__(self, test_path: Path, ref_path: Path) -> None:
        self.paths = (test_path, ref_path)
        for p in self.paths:
            p.write_bytes(b"")
        self.fds: list[int] = []
        self.open()

    def open(self) -> None:
        self.fds = [os.open(p, os.O_RDWR) for p in self.paths]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def size(self) -> int:
        sizes = [os.fstat(fd).st_size for fd in self.fds]
        if sizes[0] != sizes[1]:
            raise Mismatch(f"size {sizes[0]} != reference {sizes[1]}")
        return sizes[0]

    def compare(self, offset: int, length: int) -> None:
        got = os.pread(self.fds[0], length, offset)
        want = os.pread(self.fds[1], length, offset)
        if got != want:
            first = next(i for i in range(min(len(got), len(want)) + 1)
                         if i >= len(got) or i >= len(want) or got[i] != want[i])
            raise Mismatch(f"bytes differ at {offset + first} ({len(got)} vs {len(want)} read)")

    def compare_all(self) -> None:
        size = self.size()
        for offset in range(0, max(size, 1), 8 * MiB):
            self.compare(offset, 8 * MiB)

    def apply(self, op: Op) -> None:
        data = random.Random(op.seed).randbytes(op.length)
        getattr(self, "op_" + op.kind)(op, data)
        size = self.size()
        self.compare(max(0, op.offset - 4096), op.length + 8192)
        self.compare(max(0, size - 5000), 5000)

    def each(self, fn: Callable[[int], object]) -> None:
        for fd in self.fds:
            fn(fd)

    def op_write(self, op: Op, data: bytes) -> None:
        self.each(lambda fd: os.pwrite(fd, data, op.offset))

    def op_append(self, op: Op, data: bytes) -> None:
        self.each(lambda fd: os.pwrite(fd, data, os.fstat(fd).st_size))

    def op_hole(self, op: Op, data: bytes) -> None:
        self.each(lambda fd: os.pwrite(fd, data[:1], os.fstat(fd).st_size + op.length))

    def op_read(self, op: Op, data: bytes) -> None:
        self.compare(op.offset, op.length)

    def op_truncate(self, op: Op, data: bytes) -> None:
        self.each(lambda fd: os.ftruncate(fd, op.offset))

    def op_fsync(self, op: Op, data: bytes) -> None:
        self.each(os.fsync)

    def op_reopen(self, op: Op, data: bytes) -> None:
        self.close()
        self.open()
        self.compare_all()

    def op_mapwrite(self, op: Op, data: bytes) -> None:
        size = self.size()
        if size == 0:
            return
        start = min(op.offset, size - 1)
        piece = data[:size - start]
        for fd in self.fds:
            with mmap.mmap(fd, size) as m:
                m[start:start + len(piece)] = piece
                m.flush()

    def op_mapread(self, op: Op, data: bytes) -> None:
        size = self.size()
        if size == 0:
            return
        views = []
        for fd in self.fds:
            with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
                start = min(op.offset, size - 1)
                views.append(m[start:start + op.length])
        if views[0] != views[1]:
            raise Mismatch(f"mmap read differs at offset {op.offset}")


Remount = Callable[[], None]


class Files:
    """Several pairs; a remount closes every file, remounts, reopens them and
    compares them whole."""

    def __init__(self, test_dir: Path, ref_dir: Path, name: str, files: int,
                 remount: Remount | None) -> None:
        self.remount = remount
        self.pairs: list[Pair] = []
        try:
            for i in range(files):
                suffix = f".{i}" if i else ""
                self.pairs.append(Pair(test_dir / (name + suffix), ref_dir / (name + suffix)))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for pair in self.pairs:
            if pair.fds:
                pair.close()

    def apply(self, op: Op) -> None:
        if op.kind != "remount":
            self.pairs[op.file % len(self.pairs)].apply(op)
        elif self.remount is not None:
            self.close()
            self.remount()
            for pair in self.pairs:
                pair.open()
                pair.compare_all()


def run_ops(ops: list[Op], test_dir: Path, ref_dir: Path, name: str = "fsx", *,
            files: int = 1, remount: Remount | None = None) -> int | None:
    """Apply ``ops``; the index of the first failing op, or None."""
    state = Files(test_dir, ref_dir, name, files, remount)
    try:
        for i, op in enumerate(ops):
            try:
                state.apply(op)
            except (Mismatch, OSError) as exc:
                print(f"op {i} {op}: {exc}", file=sys.stderr)
                return i
        return None
    finally:
        state.close()


def shrink(ops: list[Op], test_dir: Path, ref_dir: Path, *, files: int = 1,
           remount: Remount | None = None) -> list[Op]:
    """A shorter failing list: drop operations one chunk at a time."""
    current = list(ops)
    chunk = max(1, len(current) // 2)
    while chunk >= 1:
        i = 0
        while i < len(current):
            candidate = current[:i] + current[i + chunk:]
            if candidate and run_ops(candidate, test_dir, ref_dir, "fsx-shrink",
                                     files=files, remount=remount) is not None:
                current = candidate
            else:
                i += chunk
        chunk //= 2
    return current


def exercise(test_dir: Path, seed: int, count: int, max_size: int = 12 * MiB, *,
             files: int = 1, remount: Remount | None = None,
             remount_every: int = 0) -> list[Op] | None:
    """Run; None when every step matched, else the shrunk failing operations."""
    ops = random_ops(seed, count, max_size, files, remount_every)
    with tempfile.TemporaryDirectory() as ref:
        failed = run_ops(ops, test_dir, Path(ref), files=files, remount=remount)
        if failed is None:
            return None
        return shrink(ops[:failed + 1], test_dir, Path(ref), files=files, remount=remount)


def shell_remount(command: str) -> Remount:
    def remount() -> None:
        subprocess.run(command, shell=True, check=True)
    return remount


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, help="directory under test (on the mount)")
    p.add_argument("--ops", type=int, default=10000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-size", type=int, default=12 * MiB)
    p.add_argument("--files", type=int, default=1, help="files operated on at once")
    p.add_argument("--remount", metavar="COMMAND",
                   help="shell command that unmounts and mounts DIR's filesystem again")
    p.add_argument("--remount-every", type=int, default=2000, metavar="N",
                   help="a remount about once in N operations (with --remount)")
    a = p.parse_args(argv)
    remount = shell_remount(a.remount) if a.remount else None
    done = 0
    seed = a.seed
    started = time.monotonic()
    while done < a.ops:
        batch = min(5000, a.ops - done)
        failing = exercise(a.dir, seed, batch, a.max_size, files=a.files, remount=remount,
                           remount_every=a.remount_every)
        if failing is not None:
            print(f"MISMATCH with seed {seed}; shortest failing operations:")
            for op in failing:
                print(f"  {op}")
            return 1
        done += batch
        rate = done / max(time.monotonic() - started, 1e-9) * 60
        print(f"seed {seed}: {batch} operations matched ({done}/{a.ops}, {rate:.0f}/min)",
              flush=True)
        seed += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
