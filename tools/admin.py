"""``objfs-admin``: volumes, cluster status, garbage collection, and a local
demo cluster.

Every command that talks to a cluster takes ``--meta HOST:PORT`` (default
``$OBJFS_META`` or 127.0.0.1:9400) and ``--secret-file`` (default
``$OBJFS_SECRET_FILE`` or /etc/objfs/secret).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

import trio

from storagenode.auth import SecretError, load_secret
from storagenode.dataclient import DataClient
from storagenode.metaclient import MetaClient, MetaError, MetaUnavailable
from storagenode import collector

from . import fsck
from .common import sync_call
from .localcluster import ClusterError, LocalCluster

SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in SIZE_UNITS and not t[-1:].isdigit() else ""
    number = t[:-1] if unit else t
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(number) * SIZE_UNITS[unit]


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def parse_ec(text: str) -> tuple[int, int]:
    """``K+M`` (data and parity shards), e.g. ``4+2``."""
    k, plus, m = text.strip().partition("+")
    if not plus or not k.isdigit() or not m.isdigit() or int(k) < 1 or int(m) < 1:
        raise argparse.ArgumentTypeError(f"not an erasure code K+M: {text!r}")
    return int(k), int(m)


def durability(v: dict[str, Any]) -> str:
    """How a volume keeps its blocks: ``replicas 3`` or ``ec 4+2``."""
    if v.get("ec_k"):
        return f"ec {v['ec_k']}+{v['ec_m']}"
    return f"replicas {v['replicas']}"


def cmd_volume_create(a: argparse.Namespace) -> int:
    k, m = a.ec or (0, 0)
    v = sync_call(a.meta, a.secret_file, "create_volume", name=a.name,
                  block_size=a.block_size, replicas=3 if a.replicas is None else a.replicas,
                  ec_k=k, ec_m=m)
    print(f"created volume {v['name']}: block size {human(v['block_size'])}, {durability(v)}")
    return 0


def cmd_volume_list(a: argparse.Namespace) -> int:
    for v in sync_call(a.meta, a.secret_file, "volumes"):
        print(f"{v['name']}\tblock size {human(v['block_size'])}\t{durability(v)}")
    return 0


def bar(done: float, total: float, width: int = 20) -> str:
    filled = int(width * done / total) if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}]"


def cmd_status(a: argparse.Namespace) -> int:
    cmap = sync_call(a.meta, a.secret_file, "cluster_map")
    print(f"cluster map epoch {cmap['epoch']}, {len(cmap['nodes'])} data nodes")
    print(f"{'node':<12} {'address':<22} {'state':<8} {'admin':<9} {'weight':>6} "
          f"{'used':>10} {'capacity':>10}")
    for n in cmap["nodes"]:
        used = n["capacity"] - n["free"]
        silent = f" (silent {n['silent']:.0f} s)" if n["state"] != "up" else ""
        print(f"{n['node_id']:<12} {n['address']:<22} {n['state']:<8} {n['admin']:<9} "
              f"{n['weight']:>6.1f} {human(used):>10} {human(n['capacity']):>10} "
              f"{bar(used, n['capacity'], 10)}{silent}")
    print()
    for v in sync_call(a.meta, a.secret_file, "volumes"):
        print(f"volume {v['name']}: {durability(v)}, block size {human(v['block_size'])}")
    status = sync_call(a.meta, a.secret_file, "repair_status")
    r, o = status["repair"], status["orphans"]
    print(f"\nrepair: {r['passes']} passes; last pass saw {r['total_blocks']} blocks: "
          f"{r['degraded']} below full redundancy, {r['misplaced']} to move")
    if r["total_blocks"]:
        print(f"current pass {bar(r['scanned'], r['total_blocks'])} "
              f"{r['scanned']}/{r['total_blocks']} blocks, {r['pending']} need work")
    print(f"repaired so far: {r['copies_made']} pieces ({human(r['bytes_copied'])}), "
          f"{r['deleted']} surplus removed, {r['failures']} attempts to retry")
    print(f"orphan scan: {o['scanned']} objects seen, {o['deleted']} deleted, "
          f"{o['adopted']} adopted, {o['missing']} missing pieces found")
    return 0


def cmd_fsck(a: argparse.Namespace) -> int:
    secret = load_secret(a.secret_file)

    async def run() -> fsck.Report:
        async with MetaClient(a.meta, secret) as meta:
            data = DataClient(secret, timeout=30.0)
            try:
                report = await fsck.check(meta, data, verify=a.verify,
                                          orphan_grace=a.orphan_grace)
                if a.repair and not report.clean:
                    await fsck.repair(meta, data, report, a.orphan_grace)
                return report
            finally:
                await data.aclose()

    report = trio.run(run)
    fsck.print_report(report)
    if a.repair and not report.clean:
        print("repair: bad pieces handed to the repair loop, old orphans collected; "
              "run `objfs-admin status` to follow, fsck again to confirm")
    return 0 if report.clean else 1


def cmd_node(a: argparse.Namespace) -> int:
    admin = {"drain": "draining", "activate": "active", "remove": "removed"}[a.action]
    sync_call(a.meta, a.secret_file, "set_node_admin", node_id=a.node_id, admin=admin)
    print(f"node {a.node_id}: {admin}")
    return 0


def cmd_gc(a: argparse.Namespace) -> int:
    secret = load_secret(a.secret_file)

    async def run() -> int:
        meta = MetaClient(a.meta, secret)
        data = DataClient(secret)
        try:
            return await collector.collect_all(meta, data)
        finally:
            await meta.aclose()
            await data.aclose()

    print(f"deleted {trio.run(run)} unreferenced objects")
    return 0


def _local(a: argparse.Namespace) -> LocalCluster:
    return LocalCluster(state=a.state.resolve(), mountpoint=a.mount.resolve(),
                        data_nodes=a.data_nodes, base_port=a.port, volume=a.volume,
                        replicas=3 if a.replicas is None else a.replicas, ec=a.ec or (0, 0))


def cmd_local_up(a: argparse.Namespace) -> int:
    c = _local(a)
    c.up()
    print(f"objfs is mounted on {c.mountpoint} (volume {c.volume}, metadata node "
          f"{c.meta_address}, {c.data_nodes} data nodes, state in {c.state}).")
    print(f"Try:  cp -a /usr/share/doc {c.mountpoint}/ && ls -l {c.mountpoint}/doc | head")
    print(f"      df -h {c.mountpoint};  objfs-admin status --meta {c.meta_address} "
          f"--secret-file {c.secret_file}")
    print(f"Stop: objfs-admin local down --state {c.state} --mount {c.mountpoint}")
    return 0


def cmd_local_down(a: argparse.Namespace) -> int:
    _local(a).down()
    print("local cluster stopped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="objfs-admin", description="Administer objfs.")
    sub = parser.add_subparsers(dest="command", required=True)

    def cluster_cmd(name: str, helptext: str, fn: Callable[[argparse.Namespace], int],
                    parent: Any = sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=helptext)
        p.add_argument("--meta", default=os.environ.get("OBJFS_META", "127.0.0.1:9400"))
        p.add_argument("--secret-file", type=Path,
                       default=Path(os.environ.get("OBJFS_SECRET_FILE", "/etc/objfs/secret")))
        p.set_defaults(fn=fn)
        return p

    vol = sub.add_parser("volume", help="create and list volumes").add_subparsers(
        dest="volume_command", required=True)
    create = cluster_cmd("create", "create a volume", cmd_volume_create, vol)
    create.add_argument("name")
    create.add_argument("--block-size", type=parse_size, default=4 << 20)
    durable = create.add_mutually_exclusive_group()
    durable.add_argument("--replicas", type=int, help="copies of each block (default 3)")
    durable.add_argument("--ec", type=parse_ec, metavar="K+M",
                         help="erasure coding: K data + M parity shards (e.g. 4+2)")
    cluster_cmd("list", "list volumes", cmd_volume_list, vol)
    cluster_cmd("status", "data nodes, capacity, redundancy and repair progress", cmd_status)
    check = cluster_cmd("fsck", "compare the metadata with what the data nodes hold",
                        cmd_fsck)
    check.add_argument("--verify", action="store_true",
                       help="also read every piece back and check its checksum")
    check.add_argument("--repair", action="store_true",
                       help="rebuild missing/corrupt pieces, collect old orphans")
    check.add_argument("--orphan-grace", type=float, default=3600.0,
                       help="unreferenced objects younger than this are left alone")
    node = cluster_cmd("node", "drain, reactivate or remove a data node", cmd_node)
    node.add_argument("action", choices=["drain", "activate", "remove"])
    node.add_argument("node_id")
    cluster_cmd("gc", "delete objects no longer referenced", cmd_gc)

    local = sub.add_parser("local", help="a whole cluster on this machine").add_subparsers(
        dest="local_command", required=True)
    for name, fn, helptext in (("up", cmd_local_up, "start nodes, create the volume, mount it"),
                               ("down", cmd_local_down, "unmount and stop every node")):
        p = local.add_parser(name, help=helptext)
        p.add_argument("--state", type=Path, default=Path("/var/lib/objfs-local"))
        p.add_argument("--mount", type=Path, default=Path("/mnt/objfs"))
        p.add_argument("--data-nodes", type=int, default=3)
        p.add_argument("--port", type=int, default=9400, help="metadata node port; data nodes follow")
        p.add_argument("--volume", default="demo")
        durable = p.add_mutually_exclusive_group()
        durable.add_argument("--replicas", type=int, help="copies of each block (default 3)")
        durable.add_argument("--ec", type=parse_ec, metavar="K+M",
                             help="erasure coding: K data + M parity shards (e.g. 4+2)")
        p.set_defaults(fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (SecretError, ClusterError) as exc:
        print(f"objfs-admin: {exc}", file=sys.stderr)
    except MetaError as exc:
        print(f"objfs-admin: {exc}", file=sys.stderr)
    except MetaUnavailable as exc:
        print(f"objfs-admin: metadata node {args.meta} not reachable: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
