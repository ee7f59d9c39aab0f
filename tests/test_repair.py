"""The repair planner: pure decisions about where a block's pieces go."""

from __future__ import annotations

import collections

from storagenode.ids import new_object_id, shard_id
from storagenode.repair import Layout, NodeView, plan_block

GRACE = 60.0
R3 = Layout(replicas=3)
EC42 = Layout(replicas=1, k=4, m=2)


def cluster(n: int, **changes: tuple[str, str, float]) -> dict[str, NodeView]:
    nodes = {f"n{i}": NodeView(f"n{i}", f"127.0.0.1:{9000 + i}", "up", "active", 0.5)
             for i in range(n)}
    for node_id, (state, admin, silent) in changes.items():
        nodes[node_id] = NodeView(node_id, nodes[node_id].address, state, admin, silent)
    return nodes


def settled(oid: str, nodes: dict[str, NodeView], layout: Layout = R3) -> list[str]:
    """Where a block lands when nothing is wrong."""
    return plan_block(oid, [], nodes, layout, GRACE).final


def test_a_well_placed_block_needs_nothing() -> None:
    nodes = cluster(5)
    oid = new_object_id()
    holders = settled(oid, nodes)
    plan = plan_block(oid, holders, nodes, R3, GRACE)
    assert plan.idle and plan.final == holders and plan.good == 3


def test_a_dead_holder_is_replaced_and_dropped_without_deleting() -> None:
    oid = new_object_id()
    holders = settled(oid, cluster(5))
    dead = holders[0]
    nodes = cluster(5, **{dead: ("down", "active", GRACE + 1)})
    plan = plan_block(oid, holders, nodes, R3, GRACE)
    assert plan.good == 2 and len(plan.copies) == 1
    target = plan.copies[0][1]
    assert target not in holders and nodes[target].state == "up"
    assert dead not in plan.final and len(plan.final) == 3
    assert plan.deletes == []       # the dead node cannot be told; the orphan scan will


def test_a_node_down_within_grace_is_waited_for() -> None:
    oid = new_object_id()
    holders = settled(oid, cluster(5))
    nodes = cluster(5, **{holders[1]: ("down", "active", GRACE - 1)})
    plan = plan_block(oid, holders, nodes, R3, GRACE)
    assert plan.idle and plan.final == holders


def test_under_replicated_block_gets_its_missing_copy() -> None:
    nodes = cluster(4)
    oid = new_object_id()
    want = settled(oid, nodes)
    plan = plan_block(oid, want[:2], nodes, R3, GRACE)
    assert plan.copies == [(None, want[2])] and sorted(plan.final) == sorted(want)


def test_draining_moves_copies_off_before_deleting() -> None:
    oid = new_object_id()
    holders = settled(oid, cluster(5))
    nodes = cluster(5, **{holders[0]: ("up", "draining", 0.0)})
    plan = plan_block(oid, holders, nodes, R3, GRACE)
    assert len(plan.copies) == 1 and holders[0] not in plan.final
    assert plan.deletes == [(oid, holders[0])]


def test_the_last_copy_is_never_deleted_while_targets_are_unreachable() -> None:
    oid = new_object_id()
    nodes = cluster(4)
    want = settled(oid, nodes)
    other = next(n for n in nodes if n not in want)
    # only a non-desired node holds the block, and one desired node is suspect
    nodes = cluster(4, **{want[0]: ("suspect", "active", 8.0)})
    plan = plan_block(oid, [other], nodes, R3, GRACE)
    assert plan.blocked and plan.deletes == [] and other in plan.final
    assert {t for _, t in plan.copies} == set(want[1:])


def test_adding_a_node_moves_a_fair_share_to_it_and_nothing_between_old_nodes() -> None:
    old, new = cluster(4), cluster(5)
    blocks = [new_object_id() for _ in range(3000)]
    moved = 0
    for oid in blocks:
        holders = settled(oid, old)
        plan = plan_block(oid, holders, new, R3, GRACE)
        assert all(target == "n4" for _, target in plan.copies)
        assert len(plan.deletes) == len(plan.copies)
        moved += len(plan.copies)
    share = moved / (3 * len(blocks))
    assert abs(share - 1 / 5) < 0.1 * (1 / 5), share


def test_erasure_coded_block_rebuilds_only_the_lost_position() -> None:
    oid = new_object_id()
    holders = settled(oid, cluster(8), EC42)
    assert len(set(holders)) == 6
    dead = holders[3]
    nodes = cluster(8, **{dead: ("down", "active", GRACE + 5)})
    plan = plan_block(oid, holders, nodes, EC42, GRACE)
    assert len(plan.copies) == 1 and plan.copies[0][0] == 3
    assert plan.final[:3] == holders[:3] and plan.final[4:] == holders[4:]
    assert plan.final[3] not in holders and plan.good == 5


def test_erasure_coded_blank_position_is_filled_and_moves_delete_the_old_shard() -> None:
    nodes = cluster(7)
    oid = new_object_id()
    holders = settled(oid, nodes, EC42)
    blank = list(holders)
    blank[1] = ""
    plan = plan_block(oid, blank, nodes, EC42, GRACE)
    assert [i for i, _ in plan.copies] == [1] and "" not in plan.final
    drained = cluster(7, **{holders[2]: ("up", "draining", 0.0)})
    plan = plan_block(oid, holders, drained, EC42, GRACE)
    assert [i for i, _ in plan.copies] == [2]
    assert plan.deletes == [(shard_id(oid, 2), holders[2])]


def test_erasure_coded_blocks_spread_over_nodes() -> None:
    nodes = cluster(6)
    counts = collections.Counter(i for _ in range(200)
                                 for i, n in enumerate(settled(new_object_id(), nodes, EC42)) if n)
    assert set(counts.values()) == {200}


def test_a_copy_for_a_block_that_changed_meanwhile_is_left_to_the_orphan_scan() -> None:
    """A node comes back with its stale copy: the repair's PUT there stores
    nothing new, and the orphan scan adopts that copy before the repair's
    compare-and-set, which fails.  Deleting "the copy it made" then would
    leave the block map naming a node without the object."""
    import trio
    from typing import Any
    from storagenode.repair import Repairer

    oid = new_object_id()
    nodes = cluster(4)
    want = settled(oid, nodes)
    back, spare = want[0], next(n for n in nodes if n not in want)
    block_map = {"holders": want[1:] + [spare]}         # written while `back` was away
    stores: dict[str, dict[str, bytes]] = {n.address: {} for n in nodes.values()}
    for node_id in want + [spare]:                      # `back` kept its stale copy
        stores[nodes[node_id].address][oid] = b"block"

    class Meta:
        async def call(self, method: str, **args: Any) -> Any:
            if method == "cluster_map":
                return {"nodes": [n.__dict__ for n in nodes.values()]}
            if method == "volumes":
                return [{"vol": 1, "replicas": 3, "ec_k": 0, "ec_m": 0}]
            if method == "scan_blocks":
                return [[1, 1, 0, oid, list(block_map["holders"])]]
            assert method == "set_holders"
            if args["old"] != block_map["holders"]:
                return False
            block_map["holders"] = args["new"]
            return True

    class Data:
        async def health(self, address: str) -> dict[str, Any]:
            return {"status": "ok"}

        async def get(self, address: str, name: str) -> bytes:
            return stores[address][name]

        async def put(self, address: str, name: str, obj: bytes) -> None:
            stores[address][name] = obj
            if address == nodes[back].address:          # the orphan scan adopts it now
                block_map["holders"] = block_map["holders"] + [back]

        async def delete(self, address: str, name: str) -> bool:
            return stores[address].pop(name, None) is not None

    repairer = Repairer(Meta(), Data(), grace=GRACE)  # type: ignore[arg-type]
    trio.run(repairer.run_pass)
    assert back in block_map["holders"]
    assert all(oid in stores[nodes[h].address] for h in block_map["holders"])


def test_a_pass_over_many_blocks_keeps_to_its_rate() -> None:
    """A pass plans at most ``rate`` blocks a second (the metadata node's
    CPU is the clients'), and still sees every block; a small block map is
    done at once."""
    import trio
    import trio.testing
    from typing import Any
    from storagenode.repair import PAGE, Repairer

    nodes = cluster(4)
    blocks = []
    for i in range(3 * PAGE + 10):
        oid = new_object_id()
        blocks.append([1, 1, i, oid, settled(oid, nodes)])

    class Meta:
        def __init__(self, rows: list[Any]) -> None:
            self.rows = rows

        async def call(self, method: str, **args: Any) -> Any:
            if method == "cluster_map":
                return {"nodes": [n.__dict__ for n in nodes.values()]}
            if method == "volumes":
                return [{"vol": 1, "replicas": 3, "ec_k": 0, "ec_m": 0}]
            assert method == "scan_blocks"
            after = args["after"]
            return [r for r in self.rows if r[:3] > after][:args["limit"]]

    async def timed(rows: list[Any]) -> tuple[float, int]:
        repairer = Repairer(Meta(rows), None, grace=GRACE, rate=1000.0)  # type: ignore[arg-type]
        start = trio.current_time()
        status = await repairer.run_pass()
        return trio.current_time() - start, status.scanned

    clock = trio.testing.MockClock(autojump_threshold=0)
    took, scanned = trio.run(timed, blocks, clock=clock)
    assert scanned == len(blocks)
    assert 3 * PAGE / 1000.0 <= took < 3 * PAGE / 1000.0 + 0.1
    took, scanned = trio.run(timed, blocks[:PAGE - 1], clock=clock)
    assert (took, scanned) == (0.0, PAGE - 1)


def test_a_repair_rate_must_be_positive() -> None:
    import pytest
    from storagenode.main import build_parser
    common = ["meta", "--state", "s", "--listen", "h:1", "--secret-file", "f"]
    assert build_parser().parse_args(common).repair_rate == 2000.0
    assert build_parser().parse_args(common + ["--repair-rate", "50"]).repair_rate == 50.0
    for bad in ("0", "-3", "nan"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(common + ["--repair-rate", bad])
