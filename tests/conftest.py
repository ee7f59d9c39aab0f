"""Shared fixtures: a real cluster, a volume and a mount, always cleaned up."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from .cluster import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster")
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def mnt(cluster: Cluster, tmp_path: Path) -> Iterator[Path]:
    cluster.create_volume("vol")
    mountpoint = tmp_path / "mnt"
    cluster.mount(mountpoint)
    yield mountpoint
