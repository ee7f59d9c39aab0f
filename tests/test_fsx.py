"""The random-operation exerciser on a real mount: every step byte for byte
against local reference files, remounts among the steps, and the result
again after a last remount."""

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

    def remount() -> None:
        cluster.umount(mnt)
        cluster.mount(mnt)
    ops = random_ops(seed, 1000, 12 << 20, files=2, remount_every=300)
    assert any(op.kind == "remount" for op in ops)
    failed = run_ops(ops, mnt, ref, files=2, remount=remount)
    if failed is not None:
        short = shrink(ops[:failed + 1], mnt, ref, files=2, remount=remount)
        pytest.fail(f"seed {seed}: mismatch; shortest failing operations: "
                    + ", ".join(map(str, short)))
    remount()
    for name in ("fsx", "fsx.1"):
        assert (mnt / name).read_bytes() == (ref / name).read_bytes()
