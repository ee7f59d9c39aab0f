"""Many processes changing the same directories of one mount at once."""

from __future__ import annotations

import errno
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

EXPECTED = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY}


def worker(root: str, seed: int, count: int) -> list[str]:
    """Create, write, rename, link and delete in shared folders; files hold
    their own creator's tag, so a mixed-up file shows."""
    rng = random.Random(seed)
    dirs = [Path(root) / d for d in ("d0", "d1", "d2")]
    unexpected = []
    for i in range(count):
        a = rng.choice(dirs) / f"f{rng.randrange(40)}"
        b = rng.choice(dirs) / f"f{rng.randrange(40)}"
        try:
            match rng.randrange(5):
                case 0:
                    fd = os.open(a, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    os.write(fd, f"{a.name}\n".encode() * 50)
                    os.close(fd)
                case 1:
                    os.rename(a, a.parent / f"r{a.name}")
                    os.rename(a.parent / f"r{a.name}", a)
                case 2:
                    os.unlink(a)
                case 3:
                    os.rename(a, b.parent / a.name)
                case 4:
                    data = a.read_bytes()
                    if data and data != f"{a.name}\n".encode() * 50:
                        unexpected.append(f"{a}: wrong content")
        except OSError as exc:
            if exc.errno not in EXPECTED:
                unexpected.append(f"{a}: {exc}")
    return unexpected


def test_sixteen_processes_lose_nothing(mnt: Path) -> None:
    for d in ("d0", "d1", "d2"):
        (mnt / d).mkdir()
    with ProcessPoolExecutor(16) as pool:
        results = list(pool.map(worker, [str(mnt)] * 16, range(16), [150] * 16))
    assert [r for res in results for r in res] == []
    for d in ("d0", "d1", "d2"):
        names = os.listdir(mnt / d)
        assert len(names) == len(set(names))
        for name in names:
            assert (mnt / d / name).read_bytes() == f"{name.lstrip('r')}\n".encode() * 50
