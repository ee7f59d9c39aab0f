"""Shared fixtures: a real cluster, a volume and a mount, always cleaned up."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from storagenode import auth

from .cluster import Cluster, checked_cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A started cluster; after the test, every mount is unmounted and the
    metadata and stored objects are checked for consistency (fsck)."""
    with checked_cluster(tmp_path / "cluster") as c:
        yield c


@pytest.fixture
def mnt(cluster: Cluster, tmp_path: Path) -> Iterator[Path]:
    cluster.create_volume("vol")
    mountpoint = tmp_path / "mnt"
    cluster.mount(mountpoint)
    yield mountpoint


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cluster secret for tests that start single nodes (module-wide)."""
    path = tmp_path_factory.mktemp("secret") / "secret"
    auth.create_secret(path)
    return path


@pytest.fixture(scope="module")
def secret(secret_file: Path) -> str:
    return auth.load_secret(secret_file)
