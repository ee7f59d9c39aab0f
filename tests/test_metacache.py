"""The mount's metadata cache: served only under leases, kept across
remounts in a SQLite file and revalidated there, never trusted blindly."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from fusefront.blockcache import BlockCache
from fusefront.filedata import Volume
from fusefront.fs import Operations
from fusefront.metacache import CacheFile, MetaCache, Saved

from .cluster import Cluster


def attrs(ino: int, size: int = 0) -> dict[str, Any]:
    return {"ino": ino, "mode": 0o100644, "nlink": 1, "size": size, "ctime_ns": 1,
            "mtime_ns": 1}


class Held:
    def __init__(self) -> None:
        self.leased: set[int] = set()

    def __call__(self, ino: int) -> bool:
        return ino in self.leased


def test_nothing_is_served_or_stored_without_a_lease() -> None:
    held = Held()
    cache = MetaCache(held)
    cache.put_attr(5, attrs(5), cache.stamp())
    assert cache.attr(5) is None                 # no lease: not even stored
    held.leased.add(5)
    cache.put_attr(5, attrs(5), cache.stamp())
    assert cache.attr(5) == attrs(5)
    held.leased.discard(5)                       # lease gone (expired, recalled)
    assert cache.attr(5) is None


def test_names_and_listings_live_under_the_directory_lease() -> None:
    held = Held()
    held.leased.update({1, 7})
    cache = MetaCache(held)
    cache.put_listing(1, [(3, b"a", 7), (9, b"b", 8)], cache.stamp())
    cache.put_entry(1, b"gone", 0, cache.stamp())
    assert cache.entry(1, b"a") == 7 and cache.entry(1, b"gone") == 0
    assert cache.entry(1, b"unknown") == 0       # not in the whole listing: absent
    assert cache.listing(1) == [(3, b"a", 7), (9, b"b", 8)]
    cache.touched([1], entries=False)            # a read access: entries unchanged
    assert cache.listing(1) == [(3, b"a", 7), (9, b"b", 8)]
    cache.touched([1])                           # this mount changed the directory
    assert cache.listing(1) is None and cache.entry(1, b"a") == 7
    cache.forget(1)                              # the lease on it was recalled
    assert cache.entry(1, b"a") is None


def test_a_directory_known_whole_answers_absent_names_until_a_name_is_unknown() -> None:
    held = Held()
    held.leased.update({1, 2})
    cache = MetaCache(held)
    assert cache.entry(2, b"x") is None          # nothing known of directory 2
    cache.put_new_directory(2)                   # this mount made it: empty
    assert cache.entry(2, b"x") == 0 and cache.listing(2) == []
    cache.touched([2])                           # this mount creates x in it ...
    cache.put_entry(2, b"x", 9, cache.stamp())   # ... and records the name
    assert cache.entry(2, b"x") == 9 and cache.entry(2, b"y") == 0
    cache.drop_entry(2, b"x")                    # a name it could not record
    assert cache.entry(2, b"x") is None and cache.entry(2, b"y") is None
    cache.put_listing(2, [(1, b"x", 9)], cache.stamp())
    assert cache.entry(2, b"y") == 0
    held.leased.discard(2)                       # the lease is gone: nothing is known
    assert cache.entry(2, b"y") is None
    held.leased.add(2)
    cache.forget(2)                              # recalled: another mount changes it
    assert cache.entry(2, b"y") is None
    cache.put_listing(2, [(1, b"x", 9)], cache.stamp())
    cache.clear()                                # an op's outcome is unknown
    assert cache.entry(2, b"y") is None
    held.leased.update(range(1, 7))
    small = MetaCache(held, max_names=8)         # names over the bound are dropped
    for d in range(1, 6):
        small.put_listing(d, [(1, b"a", 10 * d), (2, b"b", 10 * d + 1)], small.stamp())
    assert small.entry(1, b"other") is None      # cleared when directory 5 overflowed
    assert small.entry(5, b"b") == 51 and small.entry(5, b"other") is None


def test_a_removal_keeps_a_whole_directory_whole_unless_something_else_happened() -> None:
    held = Held()
    held.leased.update({2, 9})
    cache = MetaCache(held)
    cache.put_listing(2, [(1, b"x", 9), (2, b"y", 10)], cache.stamp())
    removed = cache.removing(2, b"x")            # unlink x sent: x is unknown meanwhile
    assert cache.entry(2, b"x") is None and cache.entry(2, b"z") is None
    cache.touched([2, 9])                        # its answer: the directory changed
    removed()
    assert cache.entry(2, b"x") == 0 and cache.entry(2, b"z") == 0
    assert cache.entry(2, b"y") == 10
    removed = cache.removing(2, b"y")
    cache.forget(2)                              # recalled while the unlink ran
    cache.put_entry(2, b"q", 11, cache.stamp())  # (another mount added q)
    cache.touched([2])
    removed()
    assert cache.entry(2, b"y") == 0 and cache.entry(2, b"q") == 11
    assert cache.entry(2, b"z") is None          # no longer known whole
    cache.put_listing(2, [(3, b"q", 11)], cache.stamp())
    removed = cache.removing(2, b"q")
    cache.touched([2])                           # another op of this mount's answer
    cache.touched([2])                           # and this one's
    removed()
    assert cache.entry(2, b"z") is None


def test_a_directorys_parent_is_known_while_its_lease_holds() -> None:
    held = Held()
    held.leased.update({4})
    cache = MetaCache(held)
    cache.put_parent(4, 1, cache.stamp())
    assert cache.parent_of(4) == 1
    cache.touched([4])                           # this mount renamed it
    assert cache.parent_of(4) is None
    sent = cache.stamp()
    cache.forget(4)                              # another mount renames it
    cache.put_parent(4, 1, sent)                 # an answer from before: not kept
    assert cache.parent_of(4) is None
    cache.put_parent(4, 2, cache.stamp())
    held.leased.discard(4)
    assert cache.parent_of(4) is None


def test_an_ops_answer_brings_the_new_attrs_of_what_it_touched() -> None:
    """After a mkdir the kernel asks for the parent's attrs: the op's answer
    carries them, kept only if no other change crossed it."""
    held = Held()
    held.leased.update({1, 5})
    cache = MetaCache(held)
    sent = cache.stamp()
    cache.touched([1], [attrs(1, 3)], sent)
    assert cache.attr(1) == attrs(1, 3)
    first, second = cache.stamp(), cache.stamp()     # two ops in flight on 1
    cache.touched([1], [attrs(1, 4)], second)
    cache.touched([1], [attrs(1, 5)], first)     # crossed by the other: not kept
    assert cache.attr(1) is None
    sent = cache.stamp()
    cache.forget(5)                              # lease on 5 recalled meanwhile
    cache.touched([1, 5], [attrs(1, 6), attrs(5, 6)], sent)
    assert cache.attr(1) == attrs(1, 6) and cache.attr(5) is None
    held.leased.discard(1)                       # no lease: nothing kept
    cache.touched([1], [attrs(1, 7)], cache.stamp())
    held.leased.add(1)
    assert cache.attr(1) is None
    cache.touched([1], [attrs(5, 8)], cache.stamp())     # not an inode it touched
    assert cache.attr(5) is None


def test_an_answer_overtaken_by_a_change_is_not_stored() -> None:
    """A getattr sent before this mount's own truncate but answered after it
    carries the old size: it must not replace what the truncate dropped."""
    held = Held()
    held.leased.add(5)
    cache = MetaCache(held)
    sent = cache.stamp()                         # getattr sent
    op_sent, drops = cache.stamp(), cache.drops(5)
    cache.touched([5])                           # the truncate's answer drops inode 5
    cache.put_own(5, attrs(5, 0), op_sent, drops)    # ... and may store its own result
    assert cache.attr(5) == attrs(5, 0)
    cache.put_attr(5, attrs(5, 4096), sent)      # the late getattr answer
    assert cache.attr(5) == attrs(5, 0)
    late_op, drops = cache.stamp(), cache.drops(5)   # two ops in flight on one inode:
    cache.touched([5])                           # the other's answer came first
    cache.touched([5])
    cache.put_own(5, attrs(5, 1), late_op, drops)    # ours cannot tell which is newer
    assert cache.attr(5) is None
    cache.put_attr(5, attrs(5, 7), cache.stamp())
    assert cache.attr(5) == attrs(5, 7)
    cache.clear()                                # a lost session: nothing older is stored
    cache.put_attr(5, attrs(5, 8), late_op)
    assert cache.attr(5) is None


def test_an_answer_sent_before_the_lease_on_its_inode_began_is_not_kept() -> None:
    """Found by tools/mcx.py: a read access recorded with no lease held (an
    older handle read on after the lease was recalled) was answered with
    the attributes of that moment, after another mount's chmod had landed
    and a new open here had taken a new lease.  No drop separated the two
    (this mount held no lease in between, so nobody told it of the chmod):
    the old mode was kept and served for as long as the new lease held."""
    held = Held()
    cache = MetaCache(held)
    sent, drops = cache.stamp(), cache.drops(5)   # touch_atime sent, no lease held
    held.leased.add(5)                           # a new open takes a new lease
    cache.began(5)
    cache.touched([5], [attrs(5, 1)], sent, entries=False)   # the late answer
    cache.put_own(5, attrs(5, 1), sent, drops)
    cache.put_attr(5, attrs(5, 1), sent)
    cache.put_entry(5, b"x", 9, sent)
    assert cache.attr(5) is None and cache.entry(5, b"x") is None
    cache.put_attr(5, attrs(5, 3), cache.stamp())   # sent while the lease held
    assert cache.attr(5) == attrs(5, 3)
    op_sent, drops = cache.stamp(), cache.drops(5)
    cache.touched([5])
    cache.put_own(5, attrs(5, 4), op_sent, drops)   # an op of this mount under it
    assert cache.attr(5) == attrs(5, 4)
    sent = cache.stamp()                         # a getattr that brings a new lease
    held.leased.add(6)
    cache.began(6)
    cache.put_attr(6, attrs(6, 2), sent)
    assert cache.attr(6) is None
    cache.put_attr(6, attrs(6, 2), sent, leased=True)   # read with its grant: kept
    assert cache.attr(6) == attrs(6, 2)


def test_the_kernel_caches_only_what_the_mounts_cache_keeps() -> None:
    """An answer the mount's cache refused (sent before the lease held now
    began, or overtaken by a change) reaches the kernel with timeouts of 0:
    else the kernel would keep it as long as the lease holds."""
    async def main() -> None:
        ops = Operations(Volume(1, 4096, None, None, BlockCache(1 << 20)),  # type: ignore[arg-type]
                         attr_timeout=30, entry_timeout=30, replicas=3)
        assert ops.leases is not None
        ops.leases.valid_until = trio.current_time() + 60
        full = dict(attrs(5), generation=0, uid=0, gid=0, rdev=0, blocks=0, atime_ns=1)
        sent = ops.cache.stamp()
        ops.leases.note(1, {"epoch": 1, "mode": "read"})        # the directory
        ops.leases.note(5, {"epoch": 2, "mode": "read"})        # begins after ``sent``
        ops.cache.put_attr(1, dict(full, ino=1, mode=0o40755), ops.cache.stamp())
        late = dict(full)
        ops.cache.put_attr(5, late, sent)
        ops.cache.put_entry(1, b"f", 5, sent)
        e = ops.entry(late, 1, b"f")
        assert e.attr_timeout == 0 and e.entry_timeout == 0
        kept = dict(full)
        ops.cache.put_attr(5, kept, ops.cache.stamp())
        ops.cache.put_entry(1, b"f", 5, ops.cache.stamp())
        e = ops.entry(kept, 1, b"f")
        assert e.attr_timeout > 20 and e.entry_timeout > 20
        assert ops.entry(late).attr_timeout == 0      # not the answer kept
        # a directory not everyone may search: the kernel walks cached names
        # without asking, so it caches none of its names
        ops.cache.put_attr(1, dict(full, ino=1, mode=0o40711), ops.cache.stamp())
        assert ops.entry(kept, 1, b"f").entry_timeout > 20
        ops.cache.put_attr(1, dict(full, ino=1, mode=0o40750), ops.cache.stamp())
        e = ops.entry(kept, 1, b"f")
        assert e.attr_timeout > 20 and e.entry_timeout == 0
    trio.run(main)


def test_xattr_names_listed_before_the_lease_began_are_not_kept() -> None:
    """The same race for the short-lived copy of a file's xattr names (the
    kernel asks for security.capability before every write): a listing
    sent with no lease held, answered after another mount's setxattr and a
    new lease here, must not answer "no such xattr" later."""
    async def main() -> None:
        ops = Operations(Volume(1, 4096, None, None, BlockCache(1 << 20)),  # type: ignore[arg-type]
                         attr_timeout=30, entry_timeout=30, replicas=3)
        assert ops.leases is not None
        ops.leases.valid_until = trio.current_time() + 60
        answers = [[], [b"user.new"]]

        async def listxattr(method: str, **args: Any) -> Any:
            if len(answers) == 2:          # meanwhile: an open here takes a lease
                ops.leases.note(5, {"epoch": 3, "mode": "read"})  # type: ignore[union-attr]
            return answers.pop(0)
        ops.call = listxattr    # type: ignore[method-assign]
        assert await ops.names_of(5) == frozenset()
        assert await ops.names_of(5) == {b"user.new"}       # asked again, not kept
        assert await ops.names_of(5) == {b"user.new"}       # sent under the lease: kept
    trio.run(main)


def test_the_cache_is_bounded() -> None:
    held = Held()
    held.leased.update(range(1, 1000))
    cache = MetaCache(held, max_inodes=100, max_names=50)
    for ino in range(1, 1000):
        cache.put_attr(ino, attrs(ino), cache.stamp())
        cache.put_entry(1, b"n%d" % ino, ino, cache.stamp())
    assert len(cache.attrs) == 100 and cache.attr(999) is not None and cache.attr(1) is None
    assert cache.names <= 50


def test_the_cache_file_round_trips_and_belongs_to_one_volume(tmp_path: Path) -> None:
    path = tmp_path / "metadata.sqlite"
    store = CacheFile.open(path, "m:1/vol#1")
    assert store is not None
    assert CacheFile.open(path, "m:1/vol#1") is None     # a second mount on the same folder
    store.write([(5, attrs(5, 10))], [(1, [(3, b"\xff name", 5)])])
    store.close()
    store = CacheFile.open(path, "m:1/vol#1")
    assert store is not None
    saved = store.read()
    assert saved.attrs == [(5, attrs(5, 10))] and saved.listings == {1: [(3, b"\xff name", 5)]}
    store.close()
    store = CacheFile.open(path, "m:1/other#2")          # another volume: nothing carries over
    assert store is not None and store.read().attrs == []
    store.close()
    path.write_bytes(b"this is not a database" * 100)    # damaged: starts afresh
    store = CacheFile.open(path, "m:1/vol#1")
    assert store is not None and store.read().attrs == []
    store.write([(6, attrs(6))], [])
    store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM attrs").fetchone() == (1,)


def test_load_keeps_only_what_the_node_confirmed() -> None:
    held = Held()
    held.leased.update({1, 5, 6})
    cache = MetaCache(held)
    saved = Saved([(1, attrs(1)), (5, attrs(5, 10)), (6, attrs(6)), (7, attrs(7))],
                  {1: [(3, b"a", 5)], 6: [(4, b"x", 9)]})
    cache.load(saved, [1, attrs(5, 99), {**attrs(6), "ctime_ns": 2}, 0], cache.stamp())
    assert cache.attr(1) == attrs(1) and cache.listing(1) == [(3, b"a", 5)]
    assert cache.attr(5) == attrs(5, 99)         # changed meanwhile: the fresh attrs
    assert cache.listing(6) is None              # a changed directory's entries are dropped
    assert cache.attr(7) is None                 # gone


def rpc_counts(cluster: Cluster) -> dict[str, float]:
    text = httpx.get(f"http://{cluster.meta.address}/metrics").text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("objfs_meta_rpc_total{"):
            labels, value = line.rsplit(" ", 1)
            method = labels.split('method="')[1].split('"')[0]
            out[method] = out.get(method, 0) + float(value)
    return out


def listing(root: Path) -> str:
    return subprocess.run(["ls", "-lRn", "--time-style=+%s.%N", str(root)], check=True,
                          capture_output=True, text=True).stdout


def test_a_remount_revalidates_instead_of_starting_cold(cluster: Cluster, mnt: Path,
                                                       tmp_path: Path) -> None:
    """After a remount, an unchanged tree is listed from the kept cache (no
    directory is read again), while whatever changed meanwhile on another
    client shows as it is now."""
    tree = mnt / "tree"
    for d in range(4):
        (tree / f"d{d}").mkdir(parents=True)
        for f in range(50):
            (tree / f"d{d}" / f"f{f}").write_bytes(b"x" * f)
    before = listing(tree)
    cluster.umount(mnt)
    cluster.mount(mnt)
    counts = rpc_counts(cluster)
    assert listing(tree) == before
    after = rpc_counts(cluster)
    assert after.get("readdir", 0) == counts.get("readdir", 0), "directories were read again"
    assert after.get("revalidate", 0) > 0

    # changes made elsewhere while this mount is away
    cluster.umount(mnt)
    other = tmp_path / "other"
    cluster.mount(other)
    (other / "tree" / "d1" / "f3").write_bytes(b"longer now")
    (other / "tree" / "d2" / "f4").unlink()
    (other / "tree" / "d3" / "new").write_bytes(b"new")
    os.chmod(other / "tree" / "d0" / "f5", 0o600)
    cluster.umount(other)
    cluster.mount(mnt)
    assert (tree / "d1" / "f3").read_bytes() == b"longer now"
    assert (tree / "d1" / "f3").stat().st_size == 10
    assert "f4" not in os.listdir(tree / "d2")
    assert (tree / "d3" / "new").read_bytes() == b"new"
    assert (tree / "d0" / "f5").stat().st_mode & 0o777 == 0o600
    cluster.mount(other)
    assert listing(tree) == listing(other / "tree").replace(str(other), str(mnt))


def test_changes_by_another_mount_are_seen_through_the_cache(cluster: Cluster, mnt: Path,
                                                             tmp_path: Path) -> None:
    """What one mount caches is recalled when another changes it: stat, ls
    and xattrs on the first always show the other's change at once."""
    other = tmp_path / "other"
    cluster.mount(other)
    (mnt / "d").mkdir()
    (mnt / "d" / "f").write_bytes(b"1")
    for _ in range(2):                       # now cached under leases on mnt
        assert (mnt / "d" / "f").stat().st_size == 1
        assert os.listxattr(mnt / "d" / "f") == []
        assert sorted(os.listdir(mnt / "d")) == ["f"]
    (other / "d" / "f").write_bytes(b"22")
    os.setxattr(other / "d" / "f", "user.k", b"v")
    (other / "d" / "g").write_bytes(b"")
    assert (mnt / "d" / "f").stat().st_size == 2
    assert os.listxattr(mnt / "d" / "f") == ["user.k"]
    assert os.getxattr(mnt / "d" / "f", "user.k") == b"v"
    assert sorted(os.listdir(mnt / "d")) == ["f", "g"]
    os.rename(other / "d" / "g", other / "d" / "h")
    assert sorted(os.listdir(mnt / "d")) == ["f", "h"]
    assert not (mnt / "d" / "g").exists()


def test_a_closed_files_block_map_is_kept_only_while_it_surely_holds() -> None:
    """Reading a file again after its last close (the kernel dropped its
    pages) takes the block map kept at that close: only under the lease,
    only for the same size, once, and never past a change or the budget."""
    held = Held()
    cache = MetaCache(held, max_map_bytes=1000)
    cache.put_map(5, 10, "map5", 100)
    assert cache.take_map(5, 10) is None             # no lease: not kept
    held.leased |= {5, 6, 7}
    cache.put_map(5, 10, "map5", 100)
    assert cache.take_map(5, 11) is None             # the file changed: dropped
    assert cache.take_map(5, 10) is None
    cache.put_map(5, 10, "map5", 100)
    assert cache.take_map(5, 10) == "map5"
    assert cache.take_map(5, 10) is None             # handed over: not kept twice
    cache.put_map(5, 10, "map5", 100)
    cache.touched([5], entries=False, blocks=False)  # a read's atime: the map stands
    assert cache.take_map(5, 10) == "map5"
    for change in (lambda: cache.touched([5]), lambda: cache.forget(5), cache.clear):
        cache.put_map(5, 10, "map5", 100)
        change()                                     # a truncate here, a recall, a lost session
        assert cache.take_map(5, 10) is None
    cache.put_map(5, 10, "map5", 600)
    cache.put_map(6, 10, "map6", 600)                # over the budget: the oldest goes
    assert cache.take_map(5, 10) is None and cache.take_map(6, 10) == "map6"
    assert cache.map_bytes == 0


def test_a_directory_this_mount_filled_is_listed_without_asking_the_node(
        cluster: Cluster, mnt: Path, tmp_path: Path) -> None:
    """A directory made and filled here (creates answered by the mount)
    keeps its listing, with the places the node gave its entries: `rm -rf`
    of an untarred tree read every directory again.  The listing is the
    node's, in the node's order (another mount lists the same), and a
    change by another mount is seen at once."""
    tree = mnt / "made"
    tree.mkdir()
    for d in range(3):
        (tree / f"d{d}").mkdir()
        for f in range(40):
            (tree / f"d{d}" / f"f{f}").write_bytes(b"x" * f)
    time.sleep(0.2)                  # the batches are answered (their cursors known)
    before = rpc_counts(cluster)
    names = {d: sorted(os.listdir(tree / f"d{d}")) for d in range(3)}
    assert listing(tree).count(" f") == 120
    after = rpc_counts(cluster)
    assert after.get("readdir", 0) == before.get("readdir", 0), "listed by the node"
    assert all(names[d] == sorted(f"f{f}" for f in range(40)) for d in range(3))

    # in the node's order (its cursors are the positions the kernel is told)
    other = tmp_path / "other"
    cluster.mount(other)
    dirfd = os.open(tree / "d0", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with os.scandir(dirfd) as it:
            first = [next(it).name for _ in range(10)]
        assert first == [e.name for e in list(os.scandir(other / "made" / "d0"))[:10]]
    finally:
        os.close(dirfd)
    (other / "made" / "d1" / "new").write_bytes(b"n")
    (other / "made" / "d2" / "f7").unlink()
    assert "new" in os.listdir(tree / "d1") and "f7" not in os.listdir(tree / "d2")
    assert listing(tree).replace(str(tree), "") == \
        listing(other / "made").replace(str(other / "made"), "")
