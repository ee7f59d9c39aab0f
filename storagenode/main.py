"""``objfs-node``: runs one node of an objfs cluster, in the data or metadata role."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Callable, TypeVar

import trio

from . import gctune
from .auth import SecretError, load_secret

T = TypeVar("T", int, float)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", type=Path, required=True,
                   help="folder holding this node's state (created if missing)")
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to serve HTTP on")
    p.add_argument("--secret-file", type=Path, required=True,
                   help="file with the cluster's shared secret")
    p.add_argument("--log-level", default="INFO")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="objfs-node", description="Run one node of an objfs cluster.")
    roles = parser.add_subparsers(dest="role", required=True)
    meta = roles.add_parser("meta", help="metadata node: namespace, block maps, cluster map")
    _common(meta)
    meta.add_argument("--gc-interval", type=float, default=2.0,
                      help="seconds between passes of the object collector")
    meta.add_argument("--gc-grace", type=float, default=5.0,
                      help="seconds an unreferenced object is kept before it is deleted")
    meta.add_argument("--node-down-after", type=float, default=15.0,
                      help="seconds without a heartbeat before a data node counts as down "
                           "(suspect from 6 s)")
    meta.add_argument("--lease-time", type=float, default=10.0,
                      help="seconds a client's session and leases live without a renewal "
                           "(a crashed client holds others up at most this long)")
    meta.add_argument("--repair-interval", type=float, default=10.0,
                      help="seconds between repair passes over the block map")
    meta.add_argument("--repair-rate", type=_positive(float), default=2000.0,
                      help="blocks a repair pass checks per second at most (bounds the "
                           "CPU it takes from clients)")
    meta.add_argument("--repair-grace", type=float, default=300.0,
                      help="seconds a data node may be silent before its copies are "
                           "rebuilt elsewhere")
    meta.add_argument("--orphan-interval", type=float, default=600.0,
                      help="seconds between scans of the data nodes for orphan objects")
    meta.add_argument("--orphan-grace", type=float, default=3600.0,
                      help="an unreferenced object younger than this is never collected "
                           "(commits of objects older than half of it are refused)")
    data = roles.add_parser("data", help="data node: stores immutable block objects")
    _common(data)
    data.add_argument("--meta", required=True, metavar="HOST:PORT",
                      help="metadata node to register with and heartbeat to")
    data.add_argument("--node-id", help="stable id of this node (default: kept in the state folder)")
    data.add_argument("--advertise", metavar="HOST:PORT",
                      help="address clients use to reach this node (default: --listen)")
    data.add_argument("--domain", default="", help="failure domain (rack, host)")
    data.add_argument("--weight", type=float, default=1.0, help="placement weight")
    data.add_argument("--max-object-bytes", type=int, default=65 * 1024 * 1024,
                      help="largest object body accepted")
    data.add_argument("--reserve-bytes", type=int, default=64 * 1024 * 1024,
                      help="refuse new objects when free disk space falls below this")
    data.add_argument("--scrub-rate", type=_not_negative(int), default=16 * 1024 * 1024,
                      metavar="BYTES_PER_SECOND",
                      help="pace of the background scrub re-verifying stored objects "
                           "(0: no scrub)")
    data.add_argument("--scrub-interval", type=_not_negative(float), default=86400.0,
                      metavar="SECONDS", help="pause between the end of a scrub pass and the next")
    return parser


def _checked(kind: Callable[[str], T], ok: Callable[[T], bool],
             says: str) -> Callable[[str], T]:
    def parse(text: str) -> T:
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{says}: {text}")
        return value
    parse.__name__ = kind.__name__      # argparse names the type in its error
    return parse


def _not_negative(kind: Callable[[str], T]) -> Callable[[str], T]:
    return _checked(kind, lambda v: v >= 0, "must not be negative")


def _positive(kind: Callable[[str], T]) -> Callable[[str], T]:
    return _checked(kind, lambda v: v > 0, "must be positive")


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def _run(args: argparse.Namespace, secret: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
        if args.role == "meta":
            from . import metanode
            await metanode.run(args, secret)
        else:
            from . import datanode
            await datanode.run(args, secret)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for chatty in ("httpx", "httpcore"):      # one line per request
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.root.level))
    try:
        secret = load_secret(args.secret_file)
    except SecretError as exc:
        print(f"objfs-node: {exc}", file=sys.stderr)
        return 2
    gctune.tune()
    try:
        trio.run(_run, args, secret)
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:
        return _exit_status(group)
    except OSError as exc:
        print(f"objfs-node: {exc}", file=sys.stderr)
        return 1
    return 0


def _exit_status(group: BaseExceptionGroup) -> int:
    """One line for an expected failure (port in use, refused state); re-raise bugs."""
    exits, rest = group.split(SystemExit)
    if exits is not None and rest is None:
        first = exits.exceptions[0]
        code = first.code if isinstance(first, SystemExit) else 1
        return code if isinstance(code, int) else 1
    oserrors, rest = group.split(OSError)
    if oserrors is not None and rest is None:
        print(f"objfs-node: {oserrors.exceptions[0]}", file=sys.stderr)
        return 1
    raise group


if __name__ == "__main__":
    sys.exit(main())
