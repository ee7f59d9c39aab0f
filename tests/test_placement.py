"""Placement by weighted rendezvous hashing: distinct nodes, domains, minimal movement."""

from collections import Counter

from hypothesis import given, settings, strategies as st

from storagenode.ids import NodeId, new_object_id
from storagenode.placement import NodeSlot, place

OIDS = [new_object_id() for _ in range(3000)]


def nodes(n: int, **kw: object) -> list[NodeSlot]:
    return [NodeSlot(NodeId(f"n{i}"), **kw) for i in range(n)]  # type: ignore[arg-type]


def test_replicas_on_distinct_nodes() -> None:
    ring = nodes(5)
    for oid in OIDS[:500]:
        chosen = place(oid, ring, 3)
        assert len(chosen) == 3 == len(set(chosen))


def test_fewer_nodes_than_replicas() -> None:
    assert sorted(place(OIDS[0], nodes(2), 3)) == ["n0", "n1"]


def test_placement_is_deterministic_and_order_free() -> None:
    ring = nodes(6)
    for oid in OIDS[:200]:
        assert place(oid, ring, 3) == place(oid, list(reversed(ring)), 3)


def test_spread_is_even() -> None:
    counts = Counter(n for oid in OIDS for n in place(oid, nodes(4), 1))
    for c in counts.values():
        assert abs(c - len(OIDS) / 4) < len(OIDS) / 4 * 0.15


def test_weight_scales_share() -> None:
    ring = nodes(3) + [NodeSlot(NodeId("big"), weight=3.0)]
    counts = Counter(place(oid, ring, 1)[0] for oid in OIDS)
    assert 0.44 < counts["big"] / len(OIDS) < 0.56     # expected 3/6


def test_failure_domains_preferred() -> None:
    ring = [NodeSlot(NodeId(f"{d}{i}"), domain=d) for d in "abc" for i in range(3)]
    for oid in OIDS[:300]:
        assert len({n[0] for n in place(oid, ring, 3)}) == 3


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 12), replicas=st.integers(1, 3))
def test_adding_a_node_moves_only_to_it(n: int, replicas: int) -> None:
    before, after = nodes(n), nodes(n + 1)
    new = f"n{n}"
    moved = 0
    for oid in OIDS[:1500]:
        old, cur = place(oid, before, replicas), place(oid, after, replicas)
        lost = set(old) - set(cur)
        gained = set(cur) - set(old)
        assert gained <= {new}                 # nothing moves between old nodes
        assert len(lost) == len(gained)
        moved += len(gained)
    share = moved / (1500 * replicas)
    assert abs(share - 1 / (n + 1)) < 0.1 * (1 / (n + 1)) + 0.03


@settings(max_examples=25, deadline=None)
@given(n=st.integers(4, 12), gone=st.integers(0, 11))
def test_removing_a_node_moves_only_its_objects(n: int, gone: int) -> None:
    before = nodes(n)
    victim = before[gone % n].node_id
    after = [s for s in before if s.node_id != victim]
    for oid in OIDS[:1000]:
        old, cur = place(oid, before, 3), place(oid, after, 3)
        if victim not in old:
            assert old == cur
        else:
            assert set(old) - {victim} <= set(cur)
