"""The namespace exerciser on a real mount: every operation's errno and the
final tree match a local directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.nsx import run


@pytest.mark.parametrize("seed", [21, 22])
def test_random_namespace_operations_match_a_local_directory(mnt: Path, seed: int) -> None:
    problem = run(mnt, seed, 1200)
    assert problem is None, f"seed {seed}: {problem}"
