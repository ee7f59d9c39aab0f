"""The one boundary where failures become errno values."""

from __future__ import annotations

import errno

import pyfuse3

from fusefront.datapath import DataUnavailable, NoSpace
from fusefront.fs import to_fuse_error
from storagenode.metaclient import MetaError


def test_errors_inside_task_groups_keep_their_meaning() -> None:
    grouped = ExceptionGroup("nursery", [NoSpace("full"), DataUnavailable("x")])
    assert to_fuse_error("flush", grouped).errno == errno.ENOSPC
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [MetaError(errno.EEXIST, "")])])
    assert to_fuse_error("mkdir", nested).errno == errno.EEXIST


def test_node_failures_are_eio_and_bugs_too() -> None:
    assert to_fuse_error("write", DataUnavailable("2 of 3")).errno == errno.EIO
    assert to_fuse_error("read", KeyError("bug")).errno == errno.EIO
    assert to_fuse_error("open", PermissionError(errno.EACCES, "no")).errno == errno.EACCES
    assert to_fuse_error("x", pyfuse3.FUSEError(errno.ENOENT)).errno == errno.ENOENT
