"""An erasure-coded (4+2) volume through a real mount on six real data
nodes: shards on distinct nodes, the storage overhead measured on the
nodes' disks, and every byte read back with two nodes killed (kill -9)."""

from __future__ import annotations

import errno
import json
import os
import random
import sqlite3
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from storagenode import erasure
from storagenode.ids import shard_id

from .cluster import Cluster, checked_cluster, fsync_all

MiB = 1 << 20
K, M = 4, 2


@pytest.fixture
def ec_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Six data nodes and a 4+2 volume; checked for consistency afterwards
    (the test restarts any node it killed first)."""
    with checked_cluster(tmp_path / "cluster", data_nodes=6) as c:
        c.create_volume("vol", replicas=1, ec_k=K, ec_m=M)
        yield c


def make_files(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    text = b"".join(b"record %d: the quick brown fox jumps over the lazy dog\n" % i
                    for i in range(220_000))
    files = {"random": rng.randbytes(32 * MiB), "text": text,
             "odd": rng.randbytes(5 * MiB + 123)}
    for i in range(8):
        files[f"small/{i}"] = rng.randbytes(rng.randrange(1, 200_000))
    return files


def shard_path(c: Cluster, node_id: str, oid: str, index: int) -> Path:
    sid = shard_id(oid, index)
    return c.root / node_id / "objects" / sid[:2] / sid[2:4] / sid


def blocks_of(c: Cluster, ino: int) -> list[tuple[str, list[str]]]:
    conn = sqlite3.connect(f"file:{c.root / 'meta' / 'meta.db'}?mode=ro", uri=True)
    try:
        return [(oid, json.loads(nodes)) for oid, nodes in conn.execute(
            "SELECT oid, nodes FROM blocks WHERE ino = ? ORDER BY idx", (ino,))]
    finally:
        conn.close()


def disk_and_framed(c: Cluster, blocks: list[tuple[str, list[str]]]) -> tuple[int, int]:
    """Bytes the blocks' shards take on the nodes' disks, and the size of
    the blocks' compressed framed objects (from the shards' headers)."""
    disk = framed = 0
    for oid, holders in blocks:
        for i, node_id in enumerate(holders):
            obj = shard_path(c, node_id, oid, i).read_bytes()
            disk += len(obj)
            if i == 0:
                framed += erasure.verify_shard(obj, K, M, 0).length
    return disk, framed


def store_bytes(c: Cluster) -> int:
    return sum(p.stat().st_size for n in c.data
               for p in (n.state / "objects").rglob("*") if p.is_file())


def read_all(mnt: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (mnt / name).read_bytes() == data, f"{name} differs"


def test_ec_volume_spreads_shards_costs_k_plus_m_over_k_and_survives_two_dead_nodes(
        ec_cluster: Cluster, tmp_path: Path) -> None:
    c = ec_cluster
    mnt = tmp_path / "mnt"
    c.mount(mnt)
    files = make_files(7)
    (mnt / "small").mkdir()
    for name, data in files.items():
        (mnt / name).write_bytes(data)
    fsync_all(mnt)
    inos = {name: (mnt / name).stat().st_ino for name in files}

    # every block: k + m shards, each a verified shard on its own node
    holders = c.block_holders()
    assert len(holders) == sum(-(-len(data) // (4 * MiB)) for data in files.values())
    for oid, nodes in holders.items():
        assert len(nodes) == K + M and len(set(nodes)) == K + M, nodes
        for i, node_id in enumerate(nodes):
            erasure.verify_shard(shard_path(c, node_id, oid, i).read_bytes(), K, M, i)

    # storage overhead on the nodes' disks vs the compressed framed blocks
    disk, framed = disk_and_framed(c, blocks_of(c, inos["random"]))
    all_disk, all_framed = disk_and_framed(
        c, [b for ino in inos.values() for b in blocks_of(c, ino)])
    text_disk, text_framed = disk_and_framed(c, blocks_of(c, inos["text"]))
    print(f"\n4+2 on disk: random data {disk / framed:.4f} x its framed size "
          f"({disk} / {framed} bytes); compressible text {text_disk / text_framed:.4f} x "
          f"(framed {text_framed} bytes for {len(files['text'])} bytes of text); "
          f"all files {all_disk / all_framed:.4f} x; ideal {(K + M) / K:.4f}")
    assert 1.45 <= disk / framed <= 1.7
    assert 1.45 <= all_disk / all_framed <= 1.7
    assert text_framed < len(files["text"]) / 4          # compressed before coding
    assert store_bytes(c) == all_disk                    # nothing else stored

    # kill -9 two data nodes; a fresh mount (empty caches) reads every byte
    c.umount(mnt)
    victims = [c.data[1], c.data[4]]
    dead = {v.state.name for v in victims}
    assert any(nodes[i] in dead for nodes in holders.values() for i in range(K)), \
        "no data shard on a killed node: nothing would be decoded"
    for victim in victims:
        victim.kill()
    c.mount(mnt)
    read_all(mnt, files)
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
    read_all(mnt, files)
    c.umount(mnt)
    c.mount(mnt)
    read_all(mnt, files)

    # with 4 of 6 nodes left a new block cannot get its 6 shards: EIO, cleanly
    with pytest.raises(OSError) as info:
        with open(mnt / "new", "wb") as f:
            f.write(os.urandom(MiB))
    assert info.value.errno == errno.EIO
    read_all(mnt, files)

    for victim in victims:             # back with their shards for the final check
        victim.start()
    c.wait_nodes_up(6)
