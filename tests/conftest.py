"""Shared fixtures: a real cluster, a volume and a mount, always cleaned up."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from .cluster import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A started cluster; after the test, every mount is unmounted and the
    metadata and stored objects are checked for consistency (fsck)."""
    c = Cluster(tmp_path / "cluster")
    problems: list[str] = []
    try:
        c.start()
        yield c
        c.unmount_all()
        problems = c.consistency_problems()
    finally:
        c.stop()
    assert not problems, "inconsistent after the test:\n" + "\n".join(problems[:20])


@pytest.fixture
def mnt(cluster: Cluster, tmp_path: Path) -> Iterator[Path]:
    cluster.create_volume("vol")
    mountpoint = tmp_path / "mnt"
    cluster.mount(mountpoint)
    yield mountpoint
