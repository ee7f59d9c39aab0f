"""The data node role: the HTTP API over one ``ObjectStore`` (docs/DESIGN.md).

How this works
--------------
``DataNode.handle`` routes on method and path, checks the bearer secret
(except ``/health`` and ``/metrics``), validates object ids with
``ids.parse_object_id`` (so no request can name a path outside the store)
and runs every piece of disk work in a worker thread, at most
``DISK_THREADS`` at a time (``trio.CapacityLimiter``).  Request bodies are
bounded by ``--max-object-bytes`` and at most ``BODIES_IN_FLIGHT`` object
bodies are held in memory at once.  Store errors are translated to HTTP
statuses in one table, ``_STATUS``.

``run`` opens the store, serves HTTP, and in the background keeps the node
registered with the metadata node: ``register_node`` once, then a
``heartbeat`` every ``HEARTBEAT_SECONDS``; an ENOENT answer means the
metadata node forgot us, so the next round registers again.  An unreachable
metadata node is logged at most every ``WARN_EVERY_SECONDS`` and retried
forever: a data node serves whether or not the metadata node is up.
Each heartbeat carries ``lost``: up to ``HEARTBEAT_LOST_MAX`` ids from the
store's ``LostCopies`` (objects quarantined here, by a read or the scrub);
only after the metadata node accepted that heartbeat are they forgotten, so
a lost copy is reported at least once, even across a restart (the store
seeds the set from ``quarantine/``).  The metadata node takes this node out
of those objects' holders and repair restores their redundancy.

The ``Scrubber`` walks the store in object-id order, one page of
``SCRUB_PAGE`` ids at a time, and re-verifies each object in full
(``ObjectStore.verify``: a bad one is quarantined and so becomes lost).  It
verifies one object at a time, in a worker thread taken from the same
``DISK_THREADS`` limiter as requests, so it holds at most one of those
threads and never starves clients.  Its pace is ``--scrub-rate`` bytes per
second: before each object it asks a ``TokenBucket`` (pure: it takes the
current time and returns how long to wait) and sleeps that long.  After a
complete pass it sleeps ``--scrub-interval`` seconds; objects stored or
deleted during a pass are simply met or missed by the walk.
"""

from __future__ import annotations

import argparse
import errno
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator, Sequence, TypeVar

import prometheus_client as prom
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import blockformat, buffers, h11serve
from .auth import authorized
from .httpserve import HTTPError, Request, Response
from .ids import NodeId, ObjectId, parse_object_id
from .metaclient import BadRequest, MetaClient, MetaError, MetaUnavailable
from .objectstore import (BadFraming, NodeIdMismatch, NoSuchObject, NoSuchPieces,
                          ObjectExists, ObjectStore, QuarantinedObject, StoreError,
                          StoreFull, check_object, load_node_id)

log = logging.getLogger(__name__)

T = TypeVar("T")

DISK_THREADS = 16
BODIES_IN_FLIGHT = 32
MAX_LIST_LIMIT = 10_000
DEFAULT_LIST_LIMIT = 1000
HEARTBEAT_SECONDS = 2.0
WARN_EVERY_SECONDS = 30.0
META_TIMEOUT = 5.0
OBJECTS_PREFIX = "/v1/objects/"
HEARTBEAT_LOST_MAX = 1000   # most lost ids one heartbeat reports
SCRUB_PAGE = 1000           # object ids the scrub lists at a time

# Store errors and the HTTP status they become, most specific first.
_STATUS: list[tuple[type[Exception], int, str]] = [
    (QuarantinedObject, 500, "corrupt"),
    (NoSuchObject, 404, "no such object"),
    (NoSuchPieces, 416, "the object has no such piece"),
    (ObjectExists, 409, "a different object is stored under this id"),
    (BadFraming, 400, "malformed object framing"),
    (blockformat.CorruptedObject, 422, "object does not match its checksum"),
    (StoreFull, 507, "disk full or below the reserve"),
]


class _StoreCollector(Collector):
    """Metrics the store counts itself, read when /metrics is scraped."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("objfs_data_objects_stored", "objects in the store",
                                value=self.store.object_count)
        yield CounterMetricFamily("objfs_data_corrupt_objects",
                                  "stored objects found corrupt and quarantined",
                                  value=self.store.corrupt_found)
        yield GaugeMetricFamily("objfs_data_lost_copies",
                                "quarantined objects not yet reported to the metadata node",
                                value=len(self.store.lost))


class _Metrics:
    """The node's Prometheus metrics, in a registry of their own."""

    def __init__(self, store: ObjectStore) -> None:
        self.registry = prom.CollectorRegistry()
        reg = self.registry
        reg.register(_StoreCollector(store))
        self.requests = prom.Counter("objfs_data_requests", "HTTP requests served",
                                     ["method", "status"], registry=reg)
        self.bytes_in = prom.Counter("objfs_data_bytes_in", "object bytes received",
                                     registry=reg)
        self.bytes_out = prom.Counter("objfs_data_bytes_out", "object bytes sent",
                                      registry=reg)
        self.put_seconds = prom.Histogram("objfs_data_put_seconds",
                                          "time to store one object durably",
                                          registry=reg)
        self.scrub = _ScrubMetrics(reg)

    def render(self) -> Response:
        return Response(200, prom.generate_latest(self.registry),
                        {"content-type": prom.CONTENT_TYPE_LATEST})


class _ScrubMetrics:
    """What the scrub counts."""

    def __init__(self, reg: prom.CollectorRegistry) -> None:
        self.objects = prom.Counter("objfs_scrub_objects", "objects the scrub verified",
                                    registry=reg)
        self.bytes = prom.Counter("objfs_scrub_bytes", "object bytes the scrub verified",
                                  registry=reg)
        self.corrupt = prom.Counter("objfs_scrub_corrupt",
                                    "objects the scrub found corrupt and quarantined",
                                    registry=reg)
        self.passes = prom.Counter("objfs_scrub_passes", "complete scrub passes",
                                   registry=reg)
        self.progress = prom.Gauge("objfs_scrub_pass_progress",
                                   "objects verified in the current pass / objects stored",
                                   registry=reg)


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_PIECES = re.compile(r"(\d{1,9})-(\d{1,9})")


def parse_range(header: str, size: int) -> tuple[int, int]:
    """The half-open byte span [start, end) a ``Range`` header asks for.

    One range only: ``bytes=a-b``, ``bytes=a-`` or ``bytes=-n``.  Anything
    else, or a range that selects no byte of ``size``, is HTTPError 416.
    """
    match = _RANGE.fullmatch(header.strip())
    if match is None or match.groups() == ("", ""):
        raise _unsatisfiable(size)
    first, last = match.groups()
    if first == "":
        start, end = max(0, size - int(last)), size
    else:
        start = int(first)
        end = size if last == "" else min(size, int(last) + 1)
    if start >= end:
        raise _unsatisfiable(size)
    return start, end


def _unsatisfiable(size: int) -> HTTPError:
    return HTTPError(416, "range not satisfiable", size=size)


def _object_id(text: str) -> ObjectId:
    try:
        return parse_object_id(text)
    except ValueError as exc:
        raise HTTPError(400, str(exc)) from None


def _list_args(request: Request) -> tuple[str, int]:
    after = request.arg("after", "") or ""
    if after:
        _object_id(after)
    limit_text = request.arg("limit", str(DEFAULT_LIST_LIMIT)) or ""
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIST_LIMIT:
        raise HTTPError(400, f"limit must be 1..{MAX_LIST_LIMIT}")
    return after, int(limit_text)


class DataNode:
    """Request handling for one data node; ``handle`` is the httpserve handler."""

    def __init__(self, store: ObjectStore, node_id: NodeId, secret: str,
                 max_object_bytes: int, scrub: ScrubSettings | None = None) -> None:
        self.store = store
        self.node_id = node_id
        self.secret = secret
        self.max_object_bytes = max_object_bytes
        self.metrics = _Metrics(store)
        self._disk = trio.CapacityLimiter(DISK_THREADS)
        self._bodies = trio.CapacityLimiter(BODIES_IN_FLIGHT)
        self.scrubber = Scrubber(store, self._disk, self.metrics.scrub,
                                 scrub or ScrubSettings())

    async def handle(self, request: Request) -> Response:
        """Serve one request and count it by method and status."""
        status = 500
        try:
            response = await self._route(request)
            status = response.status
            return response
        except HTTPError as exc:
            status = exc.status
            raise
        finally:
            self.metrics.requests.labels(request.method, str(status)).inc()

    async def _route(self, request: Request) -> Response:
        method, path = request.method, request.path
        if path == "/health" and method == "GET":
            return Response.json({"status": "ok", "role": "data", "node_id": self.node_id})
        if path == "/metrics" and method == "GET":
            return self.metrics.render()
        if not authorized(request.header("authorization"), self.secret):
            raise HTTPError(401, "missing or wrong cluster secret")
        if path.startswith(OBJECTS_PREFIX):
            return await self._object(request, _object_id(path[len(OBJECTS_PREFIX):]))
        if path == "/v1/objects" and method == "GET":
            return await self._list(request)
        if path == "/v1/stats" and method == "GET":
            return await self._stats()
        raise HTTPError(404, f"no route for {method} {path[:200]}")

    async def _object(self, request: Request, oid: ObjectId) -> Response:
        handlers: dict[str, Callable[[Request, ObjectId], Awaitable[Response]]] = {
            "PUT": self._put, "GET": self._get, "HEAD": self._head, "DELETE": self._delete}
        handler = handlers.get(request.method)
        if handler is None:
            raise HTTPError(405, f"method {request.method} not allowed on objects")
        return await handler(request, oid)

    async def _disk_call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking store work in a worker thread; store errors become HTTPError."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._disk)
        except (StoreError, blockformat.CorruptedObject) as exc:
            raise _http_error(exc) from None

    async def heartbeat_args(self) -> dict[str, Any]:
        """What the metadata node's ``heartbeat`` wants to hear from us."""
        stats = await self._disk_call(self.store.stats)
        return {"node_id": self.node_id, "capacity": stats.capacity, "free": stats.free,
                "objects": stats.objects,
                "lost": self.store.lost.pending(HEARTBEAT_LOST_MAX)}

    def heartbeat_delivered(self, args: dict[str, Any]) -> None:
        """The metadata node accepted a heartbeat: its lost ids are reported."""
        self.store.lost.forget(args.get("lost", []))

    async def _put(self, request: Request, oid: ObjectId) -> Response:
        async with self._bodies:
            body = await request.body_buffer(self.max_object_bytes)
            self.metrics.bytes_in.inc(len(body))
            started = time.perf_counter()
            try:        # hashing it here, not in the disk thread: see blockformat.decoding_is_checking
                header = check_object(body)
            except (BadFraming, blockformat.CorruptedObject) as exc:
                raise _http_error(exc) from None
            created = await self._disk_call(self.store.put, oid, body, header)
        self.metrics.put_seconds.observe(time.perf_counter() - started)
        return Response.json({"oid": oid, "created": created}, 201 if created else 200)

    async def _get(self, request: Request, oid: ObjectId) -> Response:
        """The object, checked against its checksum first (a bad copy is put
        aside: 422), unless the reader says it checks every byte itself
        (``reader_verifies=1``, a whole object): then as stored, the reader
        asking again the checked way if it finds it bad.  (A mount reading a
        block checked it twice before: a fifth of a data node's CPU.)"""
        pieces = request.arg("pieces")
        if pieces is not None:
            return await self._get_pieces(oid, pieces)
        async with self._bodies:
            range_header = request.header("range")
            unchecked = range_header is None and request.arg("reader_verifies") == "1"
            obj = await self._disk_call(self.store.get_unverified if unchecked
                                        else self.store.get, oid)
            if range_header is None:
                response = Response(200, obj, {"content-type": "application/octet-stream"})
            else:
                start, end = parse_range(range_header, len(obj))
                response = Response(206, obj[start:end], {
                    "content-type": "application/octet-stream",
                    "content-range": f"bytes {start}-{end - 1}/{len(obj)}"})
        self.metrics.bytes_out.inc(len(response.body))
        return response

    async def _get_pieces(self, oid: ObjectId, pieces: str) -> Response:
        """``?pieces=a-b``: the object's header and piece table, then the
        stored bytes of pieces a .. b (fewer if it has fewer), for a reader
        that checks them (``blockformat.decode_range``); an object with no
        pieces comes whole.  A random 4 KiB read of a file costs one 64 KiB
        piece, not its 4 MiB block."""
        match = _PIECES.fullmatch(pieces)
        if match is None or int(match[1]) > int(match[2]):
            raise HTTPError(400, "pieces must be first-last, first <= last")
        async with self._bodies:
            body = await self._disk_call(self.store.get_pieces, oid,
                                         int(match[1]), int(match[2]))
        self.metrics.bytes_out.inc(len(body))
        return Response(200, body, {"content-type": "application/octet-stream"})

    async def _head(self, request: Request, oid: ObjectId) -> Response:
        size, checksum = await self._disk_call(self.store.head, oid)
        return Response(200, b"", {"x-objfs-checksum": checksum.hex(),
                                   "content-length": str(size)})

    async def _delete(self, request: Request, oid: ObjectId) -> Response:
        if not await self._disk_call(self.store.delete, oid):
            raise HTTPError(404, "no such object")
        return Response(204)

    async def _list(self, request: Request) -> Response:
        after, limit = _list_args(request)
        found, more = await self._disk_call(self.store.list, after, limit)
        return Response.json({"objects": [{"oid": oid, "size": size} for oid, size in found],
                              "more": more})

    async def _stats(self) -> Response:
        stats = await self._disk_call(self.store.stats)
        return Response.json({"node_id": self.node_id, "capacity": stats.capacity,
                              "free": stats.free, "used": stats.used,
                              "objects": stats.objects, "lost": len(self.store.lost),
                              "scrub": self.scrubber.status()})


def _http_error(exc: Exception) -> HTTPError:
    for kind, status, message in _STATUS:
        if isinstance(exc, kind):
            return HTTPError(status, message, detail=str(exc))
    raise exc


# -- the scrub -------------------------------------------------------------------

class TokenBucket:
    """Paces work to ``rate`` units per second, with bursts up to ``burst``.

    Pure: ``take`` is told the time.  The level may go below zero (one
    object can be bigger than the burst); the debt is the wait returned.
    """

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 0:
            raise ValueError("rate must be positive and burst not negative")
        self.rate = rate
        self.burst = burst
        self._level = burst
        self._at: float | None = None

    def take(self, amount: float, now: float) -> float:
        """Spend ``amount`` at time ``now``; seconds to wait before doing that work."""
        if self._at is not None:
            self._level = min(self.burst, self._level + max(0.0, now - self._at) * self.rate)
        self._at = now if self._at is None else max(self._at, now)
        self._level -= amount
        return max(0.0, -self._level / self.rate)


@dataclass(frozen=True)
class ScrubSettings:
    rate: int = 16 * 1024 * 1024     # bytes per second; 0 disables the scrub
    interval: float = 86400.0        # seconds between the end of a pass and the next


@dataclass
class _ScrubPass:
    """Where the current pass is."""
    after: str = ""
    done: int = 0
    corrupt: list[ObjectId] = field(default_factory=list)


class Scrubber:
    """The background scrub; see the module docstring."""

    def __init__(self, store: ObjectStore, disk: trio.CapacityLimiter,
                 metrics: _ScrubMetrics, settings: ScrubSettings,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self._disk = disk
        self.wall_clock = wall_clock
        self._bucket = TokenBucket(settings.rate, settings.rate) if settings.rate else None
        self.passes = 0
        self.corrupt = 0
        self.last_pass_at: float | None = None     # wall clock at the end of a pass

    def status(self) -> dict[str, Any]:
        return {"rate": self.settings.rate, "passes": self.passes,
                "corrupt": self.corrupt, "last_pass_at": self.last_pass_at}

    async def run(self) -> None:
        """Scrub pass after pass, until cancelled; return at once if disabled."""
        if self._bucket is None:
            log.info("scrub disabled (--scrub-rate 0)")
            return
        while True:
            await self.scrub_pass()
            await trio.sleep(self.settings.interval)

    async def scrub_pass(self) -> list[ObjectId]:
        """Verify every stored object once, at the set pace; the ids found corrupt."""
        state = _ScrubPass()
        self.metrics.progress.set(0)
        more = True
        while more:
            page, more = await self._thread(self.store.list, state.after, SCRUB_PAGE)
            await self._scrub_page(page, state)
        self.passes += 1
        self.last_pass_at = self.wall_clock()
        self.metrics.passes.inc()
        self.metrics.progress.set(1)
        log.info("scrub pass %d done: %d objects, %d corrupt",
                 self.passes, state.done, len(state.corrupt))
        return state.corrupt

    async def _scrub_page(self, page: Sequence[tuple[ObjectId, int]],
                          state: _ScrubPass) -> None:
        for oid, size in page:
            if self._bucket is not None:
                await trio.sleep(self._bucket.take(size, trio.current_time()))
            if not await self._verify(oid, size):
                state.corrupt.append(oid)
            state.after = oid
            state.done += 1
            stored = self.store.object_count
            self.metrics.progress.set(min(1.0, state.done / stored) if stored else 1.0)

    async def _verify(self, oid: ObjectId, size: int) -> bool:
        """Verify one object; False if it was corrupt (and is now quarantined)."""
        self.metrics.objects.inc()
        self.metrics.bytes.inc(size)
        try:
            await self._thread(self.store.verify, oid)
        except QuarantinedObject:
            self.corrupt += 1
            self.metrics.corrupt.inc()
            return False
        except NoSuchObject:
            pass                        # deleted since it was listed
        except OSError as exc:
            log.error("scrub could not read object %s: %s", oid, exc)
        return True

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._disk)


# -- registration with the metadata node -------------------------------------

class _Throttled:
    """Logs a warning at most once per ``every`` seconds."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._last: float | None = None

    def warn(self, message: str, *args: Any) -> None:
        now = trio.current_time()
        if self._last is None or now - self._last >= self.every:
            self._last = now
            log.warning(message, *args)


MetaCall = Callable[[str, dict[str, Any]], Awaitable[Any]]


def _nothing(args: dict[str, Any]) -> None:
    pass


async def keep_registered(call: MetaCall, meta: str, registration: dict[str, Any],
                          heartbeat: Callable[[], Awaitable[dict[str, Any]]],
                          delivered: Callable[[dict[str, Any]], None] = _nothing) -> None:
    """Register with the metadata node, then heartbeat forever (until cancelled).

    ``call(method, args)`` is one metadata RPC; ``registration`` are the
    ``register_node`` args; ``heartbeat()`` gives the current ``heartbeat``
    args, and ``delivered(args)`` is told of each heartbeat that succeeded.
    """
    warnings = _Throttled(WARN_EVERY_SECONDS)
    registered = False
    while True:
        try:
            if not registered:
                await call("register_node", registration)
                registered = True
                log.info("registered with metadata node %s", meta)
            beat = await heartbeat()
            await call("heartbeat", beat)
            delivered(beat)
        except MetaError as exc:
            if exc.errno == errno.ENOENT:
                registered = False      # it forgot us (restarted): register next round
            else:
                warnings.warn("metadata node %s refused us: %s", meta, exc)
        except (MetaUnavailable, BadRequest) as exc:
            warnings.warn("metadata node %s unreachable: %s", meta, exc)
        await trio.sleep(HEARTBEAT_SECONDS)


# -- the role ------------------------------------------------------------------

def _registration(args: argparse.Namespace, node_id: NodeId) -> dict[str, Any]:
    return {"node_id": node_id, "address": args.advertise or args.listen,
            "domain": args.domain, "weight": float(args.weight)}


async def run(args: argparse.Namespace, secret: str) -> None:
    """Run a data node until cancelled (``objfs-node data``)."""
    try:
        node_id = await trio.to_thread.run_sync(load_node_id, args.state, args.node_id)
    except (NodeIdMismatch, ValueError) as exc:
        log.error("refusing to start: %s", exc)
        raise SystemExit(2) from None
    store = await trio.to_thread.run_sync(
        lambda: ObjectStore(args.state, reserve_bytes=args.reserve_bytes))
    node = DataNode(store, node_id, secret, args.max_object_bytes,
                    ScrubSettings(args.scrub_rate, args.scrub_interval))
    log.info("data node %s serving %d objects on %s", node_id, store.object_count, args.listen)
    async with MetaClient(args.meta, secret, timeout=META_TIMEOUT) as meta:
        async def call(method: str, call_args: dict[str, Any]) -> Any:
            return await meta.call(method, **call_args)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_registered, call, args.meta, _registration(args, node_id),
                               node.heartbeat_args, node.heartbeat_delivered)
            nursery.start_soon(node.scrubber.run)
            await h11serve.serve(
                node.handle, args.listen, body_max=args.max_object_bytes,
                admit=lambda fields: authorized(fields.get("authorization"), secret),
                buffer=buffers.scratch)
