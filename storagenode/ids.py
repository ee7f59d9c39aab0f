"""Identifiers shared by every part of objfs.

One name for one thing: an inode number is an ``InodeId``, a stored block
object is named by an ``ObjectId`` (32 lowercase hex digits: 80 random
bits and the creation time), a data node by its ``NodeId``.  Object ids are validated wherever
they cross a trust boundary so that no id can name a path outside a store.

On an erasure-coded volume a block's object id names k + m shards, and
shard i is stored under its own object id ``<oid>.<i>`` (``shard_id``):
an object id is 32 hex digits, optionally followed by ``.`` and one or two
decimal digits.  A block's id in the block map never has the suffix.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import NewType

InodeId = NewType("InodeId", int)
ObjectId = NewType("ObjectId", str)
NodeId = NewType("NodeId", str)
VolumeId = NewType("VolumeId", int)

ROOT_INODE = InodeId(1)

_OBJECT_ID = re.compile(r"[0-9a-f]{32}(\.[0-9]{1,2})?")
_BLOCK_ID = re.compile(r"[0-9a-f]{32}")
MAX_SHARDS = 100            # shard indexes are 0..99
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def new_object_id(now_ns: int | None = None) -> ObjectId:
    """A fresh, never reused object id: 80 random bits, then 12 hex digits of
    creation time in milliseconds since the epoch (random first, so stores
    that fan out by the leading digits stay balanced).  The time lets the
    orphan collector and the commit check agree on an object's age (an
    object too old to commit may already have been collected)."""
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    return ObjectId(f"{secrets.token_hex(10)}{ms & (1 << 48) - 1:012x}")


def object_age_ns(oid: str, now_ns: int) -> int:
    """How long ago object ``oid`` was created, by its id (ns)."""
    return now_ns - int(oid[20:32], 16) * 1_000_000


def is_object_id(text: str) -> bool:
    """A stored object's id: a block's id, or a shard's (``<oid>.<i>``)."""
    return _OBJECT_ID.fullmatch(text) is not None


def is_block_id(text: str) -> bool:
    """A block's object id as block maps hold it (no shard suffix)."""
    return _BLOCK_ID.fullmatch(text) is not None


def shard_id(oid: str, index: int) -> ObjectId:
    """The object id of shard ``index`` of the erasure-coded block ``oid``."""
    if not is_block_id(oid) or not 0 <= index < MAX_SHARDS:
        raise ValueError(f"no shard {index} of {oid[:80]!r}")
    return ObjectId(f"{oid}.{index}")


def split_shard_id(oid: str) -> tuple[ObjectId, int | None]:
    """The block id and shard index of ``oid`` (None for a whole block's object)."""
    parsed = parse_object_id(oid)
    block, dot, index = parsed.partition(".")
    return ObjectId(block), int(index) if dot else None


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
