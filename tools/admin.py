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


def cmd_volume_create(a: argparse.Namespace) -> int:
    v = sync_call(a.meta, a.secret_file, "create_volume", name=a.name,
                  block_size=a.block_size, replicas=a.replicas)
    print(f"created volume {v['name']}: block size {human(v['block_size'])}, "
          f"{v['replicas']} replicas")
    return 0


def cmd_volume_list(a: argparse.Namespace) -> int:
    for v in sync_call(a.meta, a.secret_file, "volumes"):
        print(f"{v['name']}\tblock size {human(v['block_size'])}\treplicas {v['replicas']}")
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    cmap = sync_call(a.meta, a.secret_file, "cluster_map")
    print(f"cluster map epoch {cmap['epoch']}, {len(cmap['nodes'])} data nodes")
    print(f"{'node':<12} {'address':<22} {'state':<6} {'weight':>6} {'used':>12} {'capacity':>12}")
    for n in cmap["nodes"]:
        used = n["capacity"] - n["free"]
        print(f"{n['node_id']:<12} {n['address']:<22} {n['state']:<6} {n['weight']:>6.1f} "
              f"{human(used):>12} {human(n['capacity']):>12}")
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
                        replicas=a.replicas)


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
    create.add_argument("--replicas", type=int, default=3)
    cluster_cmd("list", "list volumes", cmd_volume_list, vol)
    cluster_cmd("status", "data nodes, their state and capacity", cmd_status)
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
        p.add_argument("--replicas", type=int, default=3)
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
