"""The random-operation exerciser on a real mount: every step byte for byte
against a local reference file, and the result again after a remount."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.fsx import random_ops, run_ops, shrink

from .cluster import Cluster


@pytest.mark.parametrize("seed", [11, 12])
def test_random_file_operations_match_a_local_file(cluster: Cluster, mnt: Path,
                                                   tmp_path: Path, seed: int) -> None:
    ref = tmp_path / "ref"
    ref.mkdir()
    ops = random_ops(seed, 1000, 12 << 20)
    failed = run_ops(ops, mnt, ref)
    if failed is not None:
        short = shrink(ops[:failed + 1], mnt, ref)
        pytest.fail(f"seed {seed}: mismatch; shortest failing operations: "
                    + ", ".join(map(str, short)))
    cluster.umount(mnt)
    cluster.mount(mnt)
    assert (mnt / "fsx").read_bytes() == (ref / "fsx").read_bytes()
