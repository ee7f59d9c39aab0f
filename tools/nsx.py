"""A random namespace exerciser: the same seeded operations on a directory
under test and on a local directory, comparing every operation's outcome
(errno) and, at the end, the two trees (names, types, modes, sizes, link
counts, xattrs, contents, symlink targets).

    python -m tools.nsx DIR_UNDER_TEST --ops 100000 --seed 3
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

NAMES = ["a", "b", "c", "dir1", "dir2", "x" * 255]
DEPTH = 3


def random_path(rng: random.Random) -> str:
    parts = [rng.choice(NAMES) for _ in range(rng.randint(1, DEPTH))]
    return "/".join(parts)


def make_ops(seed: int, count: int) -> list[tuple[str, str, str, int]]:
    rng = random.Random(seed)
    kinds = ["create", "mkdir", "mkdir", "rename", "link", "symlink", "unlink", "rmdir",
             "chmod", "setxattr", "write", "truncate", "removexattr", "exchange", "noreplace"]
    return [(rng.choice(kinds), random_path(rng), random_path(rng), rng.getrandbits(16))
            for _ in range(count)]


def _renameat2(a: str, b: str, flags: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, a.encode(), -100, b.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


ACTIONS: dict[str, Callable[[str, str, int], Any]] = {
    "create": lambda p, q, n: os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)),
    "mkdir": lambda p, q, n: os.mkdir(p, 0o755),
    "rename": lambda p, q, n: os.rename(p, q),
    "link": lambda p, q, n: os.link(p, q),
    "symlink": lambda p, q, n: os.symlink(q, p),
    "unlink": lambda p, q, n: os.unlink(p),
    "rmdir": lambda p, q, n: os.rmdir(p),
    "chmod": lambda p, q, n: os.chmod(p, n & 0o7777, follow_symlinks=False)
    if not os.path.islink(p) else None,
    "setxattr": lambda p, q, n: os.setxattr(p, f"user.k{n % 3}", str(n).encode(),
                                            follow_symlinks=False),
    "removexattr": lambda p, q, n: os.removexattr(p, f"user.k{n % 3}", follow_symlinks=False),
    "write": lambda p, q, n: Path(p).write_bytes(bytes([n % 256]) * (n % 5000)),
    "truncate": lambda p, q, n: os.truncate(p, n % 3000),
    "exchange": lambda p, q, n: _renameat2(p, q, 2),
    "noreplace": lambda p, q, n: _renameat2(p, q, 1),
}


def outcome(root: Path, op: tuple[str, str, str, int]) -> str:
    kind, p, q, n = op
    cwd = os.getcwd()
    os.chdir(root)
    try:
        ACTIONS[kind](p, q, n)
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    finally:
        os.chdir(cwd)


def describe(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything a user can see of the tree, path by path."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            extra: Any = None
            if stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                extra = p.read_bytes()
            xattrs = () if stat.S_ISLNK(st.st_mode) else tuple(sorted(
                (k, os.getxattr(p, k)) for k in os.listxattr(p) if k.startswith("user.")))
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode)
                        if not stat.S_ISLNK(st.st_mode) else None,
                        size, st.st_nlink, xattrs, extra)
    return out


def compare(test_dir: Path, ref_dir: Path, ops: list[tuple[str, str, str, int]]) -> str | None:
    """None when all matched, else a description of the first difference."""
    for i, op in enumerate(ops):
        got, want = outcome(test_dir, op), outcome(ref_dir, op)
        if got != want:
            return f"op {i} {op[:3]}: {got} but a local filesystem gives {want}"
    a, b = describe(test_dir), describe(ref_dir)
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        first = diff[0]
        return f"trees differ at {first}: {a.get(first)!r:.200} vs {b.get(first)!r:.200}"
    return None


def run(test_root: Path, seed: int, count: int) -> str | None:
    with tempfile.TemporaryDirectory() as ref:
        test_dir = test_root / f"nsx-{seed}"
        test_dir.mkdir()
        return compare(test_dir, Path(ref), make_ops(seed, count))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path)
    p.add_argument("--ops", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    problem = run(a.dir, a.seed, a.ops)
    if problem:
        print(f"MISMATCH with seed {a.seed}: {problem}")
        return 1
    print(f"seed {a.seed}: {a.ops} namespace operations matched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
