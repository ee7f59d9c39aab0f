"""Who may do what: the permission checks a local filesystem's kernel makes,
made by the mount itself.

The mount runs without ``default_permissions``: with it, Linux asks for a
directory's attributes again after every change in it (6.18 marks its mode,
owner and group stale each time) before the next permission check, one
request more per mkdir, create, unlink, rmdir or rename.  Without it the
kernel checks nothing from the mode bits (except execute permission of
regular files, and the sticky rule on cached attributes), and these
functions do it, from the attributes the mount holds under its leases
(fresh), with the caller's ids from the request:

- search (x) on a directory to look a name up in it; write and search to
  make, remove or rename a name in it; the sticky rule; write on a
  directory moved to another parent (its ``..`` changes);
- read/write on open by the access asked for (``O_TRUNC`` needs write);
  read on opening a directory; ``access(2)`` and ``chdir(2)``;
- chmod and times by the owner (times "now" by anyone who may write),
  chown by root, chgrp by the owner to a group it is in, setgid dropped
  on a chmod by someone outside the file's group; truncate by path needs
  write; ``user.*`` extended attributes need read or write.

uid 0 is root with every capability (as without user namespaces).  A name
under a directory not everyone may search is never cached by the kernel
(``Operations.entry``): each walk through it then comes here.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

import pyfuse3

R, W, X = os.R_OK, os.W_OK, os.X_OK
KILL_PRIV = stat.S_ISUID | stat.S_ISGID
FMODE_EXEC = 0x20               # in an open's flags: execve(2) opens the file
NOW_SLACK_NS = 2_000_000_000    # times this close to the clock count as "now"


def all_search(mode: int) -> bool:
    """May everyone search a directory of this mode?"""
    return mode & 0o111 == 0o111


def groups_of(pid: int) -> frozenset[int]:
    """The supplementary groups of the thread ``pid`` (none if it is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


def in_group(ctx: Any, gid: int) -> bool:
    return ctx.gid == gid or gid in groups_of(ctx.pid)


def permits(ctx: Any, a: dict[str, Any], want: int) -> bool:
    """May the caller of ``ctx`` read/write/search-or-execute (``want``,
    R|W|X bits) the inode of attributes ``a``?  As Linux's
    generic_permission: the owner's bits for the owner, else the group's
    for a member of the file's group, else the others'."""
    mode = a["mode"]
    if ctx.uid == 0:
        return not want & X or stat.S_ISDIR(mode) or bool(mode & 0o111)
    if ctx.uid == a["uid"]:
        bits = mode >> 6
    elif (mode >> 3) & want == mode & want:
        bits = mode             # group and others alike: no need to ask who is in the group
    elif in_group(ctx, a["gid"]):
        bits = mode >> 3
    else:
        bits = mode
    return bits & want == want


def check(ctx: Any, a: dict[str, Any], want: int) -> None:
    if not permits(ctx, a, want):
        raise pyfuse3.FUSEError(errno.EACCES)


def owner_or_root(ctx: Any, a: dict[str, Any]) -> bool:
    return ctx.uid == 0 or ctx.uid == a["uid"]


def check_sticky(ctx: Any, parent: dict[str, Any], child: dict[str, Any]) -> None:
    """In a sticky directory only a name's owner, the directory's owner or
    root may remove or rename it."""
    if parent["mode"] & stat.S_ISVTX and ctx.uid not in (0, parent["uid"], child["uid"]):
        raise pyfuse3.FUSEError(errno.EPERM)


def open_wants(flags: int) -> int:
    if flags & FMODE_EXEC:
        return 0                # the kernel checked execute permission itself
    acc = flags & os.O_ACCMODE
    want = R if acc in (os.O_RDONLY, os.O_RDWR) else 0
    if acc in (os.O_WRONLY, os.O_RDWR) or flags & os.O_TRUNC:
        want |= W
    return want


def xattr_wants(name: bytes) -> bool:
    """Is access to xattr ``name`` checked against the mode bits (``user.*``;
    the kernel rules on trusted.*, security.* and system.* itself)?"""
    return name.startswith(b"user.")


def checked_setattr(ctx: Any, a: dict[str, Any], changes: dict[str, Any], fh: int | None,
                    now_ns: int) -> dict[str, Any]:
    """``changes`` (mode, uid, gid, atime_ns, mtime_ns, size) to the inode
    of attributes ``a`` as the caller may make them (a chmod by someone
    outside the file's group drops setgid), or EPERM/EACCES.  With ``fh``
    (the kernel names an open file: ftruncate, or its own flush of the
    times a write set) size and times need no check."""
    if ctx.uid == 0:
        return changes
    owner = ctx.uid == a["uid"]
    if "uid" in changes and not (owner and changes["uid"] == a["uid"]):
        raise pyfuse3.FUSEError(errno.EPERM)
    if "gid" in changes and not (owner and (changes["gid"] == a["gid"]
                                            or in_group(ctx, changes["gid"]))):
        raise pyfuse3.FUSEError(errno.EPERM)
    if "mode" in changes:
        mode, old = changes["mode"] & 0o7777, a["mode"] & 0o7777
        if not owner:
            # the kernel drops setuid/setgid after a write or truncate by
            # whoever may write the file (file_remove_privs)
            if mode != old & ~KILL_PRIV or not (fh is not None or permits(ctx, a, W)):
                raise pyfuse3.FUSEError(errno.EPERM)
        elif mode & stat.S_ISGID and not in_group(ctx, changes.get("gid", a["gid"])):
            changes = dict(changes, mode=changes["mode"] & ~stat.S_ISGID)
    times = [changes[k] for k in ("atime_ns", "mtime_ns") if k in changes]
    if times and not owner and fh is None:
        if any(abs(t - now_ns) > NOW_SLACK_NS for t in times):
            raise pyfuse3.FUSEError(errno.EPERM)      # only the owner sets times
        check(ctx, a, W)                              # "now": writing is enough
    if "size" in changes and fh is None:
        check(ctx, a, W)
    return changes
