"""Identifiers shared by every part of objfs.

One name for one thing: an inode number is an ``InodeId``, a stored block
object is named by an ``ObjectId`` (32 lowercase hex digits, 128 random
bits), a data node by its ``NodeId``.  Object ids are validated wherever
they cross a trust boundary so that no id can name a path outside a store.
"""

from __future__ import annotations

import re
import secrets
from typing import NewType

InodeId = NewType("InodeId", int)
ObjectId = NewType("ObjectId", str)
NodeId = NewType("NodeId", str)
VolumeId = NewType("VolumeId", int)

ROOT_INODE = InodeId(1)

_OBJECT_ID = re.compile(r"[0-9a-f]{32}")
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def new_object_id() -> ObjectId:
    """A fresh, never reused object id."""
    return ObjectId(secrets.token_hex(16))


def is_object_id(text: str) -> bool:
    return _OBJECT_ID.fullmatch(text) is not None


def parse_object_id(text: str) -> ObjectId:
    """The object id in ``text``; ValueError if it is not well formed."""
    if not is_object_id(text):
        raise ValueError(f"malformed object id {text[:80]!r}")
    return ObjectId(text)


def parse_node_id(text: str) -> NodeId:
    if _NODE_ID.fullmatch(text) is None:
        raise ValueError(f"malformed node id {text[:80]!r}")
    return NodeId(text)


def is_volume_name(text: str) -> bool:
    return _VOLUME_NAME.fullmatch(text) is not None
