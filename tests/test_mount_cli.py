"""Mounting like any Linux filesystem: mount/umount, fstab, errors, --help."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .cluster import Cluster, is_mounted, umount


def objfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["objfs", *args], capture_output=True, text=True, timeout=60)


def test_help_explains_source_and_every_option() -> None:
    out = objfs("--help")
    assert out.returncode == 0
    assert "HOST:PORT/VOLUME" in out.stdout
    for option in ("secret_file", "cache_dir", "attr_timeout", "entry_timeout", "cache_size",
                   "dirty_limit", "readahead", "timeout", "allow_other", "_netdev"):
        assert option in out.stdout, option


def mount_with(source: str, mountpoint: Path, secret_file: Path) -> subprocess.CompletedProcess[str]:
    return objfs(source, str(mountpoint), "-o", f"secret_file={secret_file}")


def one_line_error(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    return lines[0]


def test_mount_and_umount_with_mount_command(cluster: Cluster, tmp_path: Path) -> None:
    cluster.create_volume("vol")
    mp = tmp_path / "m"
    cluster.mount(mp)
    assert is_mounted(mp)
    with open("/proc/mounts") as f:
        line = next(line for line in f if line.split()[1] == str(mp))
    assert line.split()[0] == f"{cluster.meta.address}/vol"
    assert line.split()[2] == "fuse.objfs"
    (mp / "hello").write_text("hi\n")
    assert subprocess.run(["umount", str(mp)]).returncode == 0
    assert not is_mounted(mp)
    cluster.mounts.remove(mp)
    cluster.mount(mp)
    assert (mp / "hello").read_text() == "hi\n"


def test_fstab_line_mounts(cluster: Cluster, tmp_path: Path) -> None:
    cluster.create_volume("vol")
    mp = tmp_path / "fstab-mnt"
    mp.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"{cluster.meta.address}/vol {mp} fuse.objfs "
        f"_netdev,nofail,allow_other,secret_file={cluster.secret_file},"
        f"cache_dir={tmp_path / 'fstab-cache'} 0 0\n")
    try:
        run = subprocess.run(["mount", "--fstab", str(fstab), str(mp)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert is_mounted(mp)
        (mp / "f").write_bytes(b"x" * 10)
        assert (mp / "f").stat().st_size == 10
    finally:
        umount(mp)


def test_missing_metadata_node(tmp_path: Path, cluster: Cluster) -> None:
    mp = tmp_path / "m"
    mp.mkdir()
    line = one_line_error(mount_with("127.0.0.1:1/vol", mp, cluster.secret_file))
    assert "not reachable" in line
    assert not is_mounted(mp)


def test_wrong_volume(cluster: Cluster, tmp_path: Path) -> None:
    mp = tmp_path / "m"
    mp.mkdir()
    line = one_line_error(mount_with(f"{cluster.meta.address}/nosuch", mp, cluster.secret_file))
    assert "does not exist" in line and "nosuch" in line
    assert not is_mounted(mp)


def test_bad_mount_points(cluster: Cluster, tmp_path: Path) -> None:
    cluster.create_volume("vol")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    src = f"{cluster.meta.address}/vol"
    opt = f"secret_file={cluster.secret_file}"
    assert "not empty" in one_line_error(mount_with(src, full, cluster.secret_file))
    missing = tmp_path / "missing"
    assert "does not exist" in one_line_error(mount_with(src, missing, cluster.secret_file))
    assert not is_mounted(full)
    via_mount = subprocess.run(["mount", "-t", "fuse.objfs", src, str(full), "-o", opt],
                               capture_output=True, text=True, timeout=60)
    assert via_mount.returncode != 0 and "not empty" in via_mount.stderr


def test_wrong_secret(cluster: Cluster, tmp_path: Path) -> None:
    cluster.create_volume("vol")
    bad = tmp_path / "bad-secret"
    bad.write_text("0" * 64 + "\n")
    mp = tmp_path / "m"
    mp.mkdir()
    line = one_line_error(mount_with(f"{cluster.meta.address}/vol", mp, bad))
    assert "secret" in line or "refused" in line
    assert not is_mounted(mp)


def test_systemd_units_verify() -> None:
    units = sorted((Path(__file__).parent.parent / "systemd").iterdir())
    assert {u.name for u in units} >= {"objfs-meta@.service", "objfs-data@.service",
                                       "mnt-objfs.mount"}
    for unit in units:
        run = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and not run.stderr.strip(), (unit.name, run.stderr)
