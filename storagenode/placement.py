"""Where objects live: weighted rendezvous hashing over the cluster map.

How this works
--------------
For an object id, every eligible data node gets a score from a hash of
(node id, object id) and its weight: ``weight / -ln(u)`` with ``u`` the hash
mapped into (0, 1).  The nodes with the highest scores hold the replicas, in
that order.  This is highest-random-weight (rendezvous) hashing: a node's
score for an object never depends on the other nodes, so adding a node moves
to it exactly the objects for which it now ranks in the top ``count`` (about
``count/(N+1)`` of them) and nothing moves between the old nodes; removing a
node moves only the objects it held.  Weights scale a node's expected share.

Failure domains: replicas first go to distinct domains in score order; only
when there are fewer domains than replicas do two replicas share a domain.

Pure code: no I/O, no clock, deterministic for tests and simulation.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from .ids import NodeId, ObjectId

_TWO64 = float(1 << 64)


@dataclass(frozen=True)
class NodeSlot:
    """A data node as placement sees it."""

    node_id: NodeId
    weight: float = 1.0
    domain: str = ""


def score(node: NodeSlot, oid: ObjectId) -> float:
    digest = hashlib.blake2b(
        f"{node.node_id}\0{oid}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "little") + 0.5) / _TWO64
    return node.weight / -math.log(u)


def rank(oid: ObjectId, nodes: Iterable[NodeSlot]) -> list[NodeSlot]:
    """Every node with positive weight, best place for ``oid`` first."""
    usable = [n for n in nodes if n.weight > 0]
    return sorted(usable, key=lambda n: (-score(n, oid), n.node_id))


def place(oid: ObjectId, nodes: Sequence[NodeSlot], count: int) -> list[NodeId]:
    """The ``count`` nodes (fewer if fewer exist) that should hold ``oid``.

    Distinct failure domains are preferred over score order.
    """
    ranked = rank(oid, nodes)
    chosen: list[NodeSlot] = []
    domains: set[str] = set()
    for node in ranked:
        if len(chosen) < count and node.domain not in domains:
            chosen.append(node)
            domains.add(node.domain)
    for node in ranked:
        if len(chosen) < count and node not in chosen:
            chosen.append(node)
    return [n.node_id for n in chosen]
