"""The ``objfs`` command line: SOURCE, MOUNTPOINT and ``-o`` options.

Pure parsing, no I/O, so that every rule here is unit tested.

SOURCE is ``HOST:PORT/VOLUME`` (the metadata node and the volume name),
optionally prefixed ``objfs://``.  Options that objfs understands are taken
out of ``-o``; the mount options the kernel or libfuse understand are passed
on to ``pyfuse3.init``; options that only ``mount``/fstab use (``_netdev``,
``nofail``, ``auto``, ``noauto``, ``user``, ``users``, ``defaults``) are dropped.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from storagenode.ids import is_volume_name

DEFAULT_SECRET = Path("/etc/objfs/secret")
DEFAULT_CACHE_ROOT = Path("/var/cache/objfs")

# objfs's own options: name -> (help, parser); flags parse "" as True.
OWN_OPTIONS: dict[str, str] = {
    "secret_file": "file holding the cluster's shared secret (default /etc/objfs/secret)",
    "cache_dir": "folder for this mount's cache and log (default /var/cache/objfs/VOLUME)",
    "attr_timeout": "most seconds the kernel may cache attributes, and only under a lease "
                    "(default 30; with noleases a fixed time, default then 1)",
    "entry_timeout": "most seconds the kernel may cache directory entries, as attr_timeout",
    "noleases": "no leases: caches last a fixed time and other mounts' changes show late",
    "cache_size": "bytes of clean file data kept in memory (default 96 MiB)",
    "dirty_limit": "bytes of unwritten file data buffered per mount before writers wait (default 64 MiB)",
    "readahead": "blocks fetched ahead of a sequential reader (default 4)",
    "max_leases": "leases held before the oldest unused ones are given back, down to three "
                  "quarters (default 40000)",
    "timeout": "seconds one request to a node may take before it counts as failed (default 10)",
    "foreground": "stay in the foreground instead of detaching (also -f)",
    "debug": "log every request at debug level",
    "log": "log file (default CACHE_DIR/objfs.log; '-' for standard error)",
    "nonempty": "allow mounting over a non-empty folder",
}
# Mount options libfuse / the kernel take (passed on to pyfuse3.init).
PASS_OPTIONS = frozenset({
    "allow_other", "allow_root", "auto_unmount", "ro", "rw", "dev", "nodev",
    "suid", "nosuid", "exec", "noexec", "atime", "noatime", "relatime",
    "norelatime", "strictatime", "sync", "async", "dirsync", "lazytime",
    "nolazytime", "default_permissions",
})
DROP_OPTIONS = frozenset({"_netdev", "nofail", "auto", "noauto", "user", "users",
                          "nouser", "defaults", "owner", "group", "comment"})


class UsageError(Exception):
    """A bad command line; the message is one line for the user."""


@dataclass
class MountConfig:
    meta: str
    volume: str
    mountpoint: Path
    secret_file: Path = DEFAULT_SECRET
    cache_dir: Path | None = None
    attr_timeout: float = 30.0
    entry_timeout: float = 30.0
    noleases: bool = False
    cache_size: int = 96 * 1024 * 1024
    dirty_limit: int = 64 * 1024 * 1024
    readahead: int = 4
    max_leases: int = 40_000
    timeout: float = 10.0
    foreground: bool = False
    debug: bool = False
    log: str | None = None
    nonempty: bool = False
    fuse_options: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        return f"{self.meta}/{self.volume}"

    def cache_path(self) -> Path:
        return self.cache_dir or DEFAULT_CACHE_ROOT / self.volume


def parse_source(source: str) -> tuple[str, str]:
    """(metadata node "host:port", volume name) from SOURCE."""
    text = source.removeprefix("objfs://")
    meta, sep, volume = text.rpartition("/")
    host, colon, port = meta.rpartition(":")
    if not sep or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"SOURCE must look like HOST:PORT/VOLUME, not {source!r}")
    if not is_volume_name(volume):
        raise UsageError(f"{volume!r} is not a valid volume name")
    return meta, volume


def _number(name: str, value: str, kind: type) -> float | int:
    try:
        number = kind(value)
    except ValueError:
        raise UsageError(f"option {name} needs a number, not {value!r}") from None
    if number < 0:
        raise UsageError(f"option {name} must not be negative")
    return number


def apply_option(cfg: MountConfig, item: str) -> None:
    name, eq, value = item.partition("=")
    if name in DROP_OPTIONS or not name:
        return
    if name in PASS_OPTIONS:
        cfg.fuse_options.append(name)
    elif name in ("secret_file", "cache_dir"):      # absolute: the daemon changes to /
        setattr(cfg, name, Path(value).absolute())
    elif name in ("attr_timeout", "entry_timeout", "timeout"):
        setattr(cfg, name, _number(name, value, float))
    elif name in ("cache_size", "dirty_limit", "readahead", "max_leases"):
        setattr(cfg, name, int(_number(name, value, int)))
    elif name in ("foreground", "debug", "nonempty", "noleases"):
        setattr(cfg, name, True)
    elif name == "log":
        cfg.log = os.path.abspath(value) if value else value
    else:
        raise UsageError(f"unknown option {name!r} (see objfs --help)")
    if eq and not value and name in ("secret_file", "cache_dir", "log"):
        raise UsageError(f"option {name} needs a value")


def build_parser() -> argparse.ArgumentParser:
    own = "\n".join(f"  {k:<14} {v}" for k, v in OWN_OPTIONS.items())
    passed = ", ".join(sorted(PASS_OPTIONS))
    parser = argparse.ArgumentParser(
        prog="objfs", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Mount an objfs volume (what `mount -t fuse.objfs` runs).",
        epilog=("SOURCE is HOST:PORT/VOLUME: the metadata node's address and the "
                "volume's name,\n  for example 127.0.0.1:9400/demo.\n\n"
                f"objfs options (-o name=value,...):\n{own}\n\n"
                f"Mount options passed to the kernel: {passed}.\n"
                "Mounted by root, a volume is open to every user (allow_other); the\n"
                "mount checks permissions from the mode bits as the kernel would.\n"
                "Options for mount/fstab only (ignored here): "
                + ", ".join(sorted(DROP_OPTIONS)) + ".\n\n"
                "fstab example:\n"
                "  127.0.0.1:9400/demo /mnt/objfs fuse.objfs "
                "_netdev,allow_other,secret_file=/etc/objfs/secret 0 0"))
    parser.add_argument("source", metavar="SOURCE")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    parser.add_argument("-o", dest="options", action="append", default=[],
                        metavar="OPTIONS", help="comma-separated options, see below")
    parser.add_argument("-f", dest="foreground", action="store_true",
                        help="stay in the foreground")
    parser.add_argument("-n", dest="no_mtab", action="store_true",
                        help="ignored (mount compatibility)")
    parser.add_argument("-s", "-v", dest="ignored", action="store_true", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str]) -> MountConfig:
    args = build_parser().parse_args(argv)
    meta, volume = parse_source(args.source)
    cfg = MountConfig(meta=meta, volume=volume, mountpoint=args.mountpoint)
    items = [item.strip() for group in args.options for item in group.split(",")]
    if "noleases" in items:       # fixed cache times: short by default
        cfg.attr_timeout = cfg.entry_timeout = 1.0
    for item in items:
        apply_option(cfg, item)
    cfg.foreground = cfg.foreground or args.foreground
    return cfg
