"""The h11 server (storagenode/h11serve.py) and the metadata client's pool.

The server runs in the test's own trio run on a loopback port; clients are
raw sockets speaking bytes (to send what a well-behaved client would not),
``h11`` client state machines, or ``MetaClient`` against an in-process
``MetaNode``.  Timeouts are tested over memory streams with a fake clock.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import socket
import struct
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import h11
import msgpack
import pytest
import trio
import trio.testing

from storagenode import h11serve
from storagenode.h11serve import serve, serve_stream, split_bind
from storagenode.httpserve import HTTPError, Request, Response
from storagenode.metaclient import MetaClient, MetaUnavailable
from storagenode.metanode import MetaNode
from tests.procs import free_port

LIMIT = 1000
SECRET = "s" * 32


@pytest.fixture(autouse=True)
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Nothing a client does may make the server log an error (a bug)."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


class Recorder:
    """A handler that echoes the body and remembers what it saw."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.reading = trio.Event()         # set when a handler starts reading a body

    async def __call__(self, request: Request) -> Response:
        if request.path == "/slow":
            await trio.sleep_forever()
        self.reading.set()
        try:
            body = await request.body(LIMIT)
        except HTTPError as exc:
            self.seen.append(f"{exc.status} {exc.message}")
            raise
        self.seen.append(f"{request.method} {request.path}")
        return Response(200, body, {"x-query": ",".join(request.query.get("q", []))})


@asynccontextmanager
async def serving(handle: Callable[[Request], Awaitable[Response]],
                  **kw: Any) -> AsyncIterator[str]:
    """A server on a free loopback port while the block runs; its address."""
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(functools.partial(serve, handle, "127.0.0.1:0", **kw))
        yield addresses[0]
        nursery.cancel_scope.cancel()


async def connect(address: str) -> trio.SocketStream:
    host, port = split_bind(address)
    return await trio.open_tcp_stream(host or "127.0.0.1", port)


async def exchange(stream: trio.abc.Stream, conn: h11.Connection, method: str, target: str,
                   body: bytes = b"") -> tuple[h11.Response, bytes]:
    """One request and its whole response, through an h11 client machine."""
    headers = [("host", "x"), ("content-length", str(len(body)))]
    await stream.send_all(b"".join(conn.send(e) or b"" for e in (
        h11.Request(method=method, target=target, headers=headers),
        h11.Data(data=body), h11.EndOfMessage())))
    response, chunks = None, []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return response, b"".join(chunks)
        else:
            raise AssertionError(f"unexpected {event!r}")


async def answer_bodies(stream: trio.abc.ReceiveStream, count: int) -> list[bytes]:
    """The bodies of the next ``count`` answers on ``stream`` (requests sent already)."""
    conn, bodies = h11.Connection(h11.CLIENT), []
    for _ in range(count):
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())             # (what was sent, as h11 must know it)
        chunks = []
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
        bodies.append(b"".join(chunks))
        conn.start_next_cycle()
    return bodies


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until the server closes (or resets) the connection."""
    chunks = []
    with trio.fail_after(10):
        try:
            while chunk := await stream.receive_some(65536):
                chunks.append(bytes(chunk))
        except trio.BrokenResourceError:
            pass
    return b"".join(chunks)


async def still_serves(address: str) -> None:
    stream = await connect(address)
    async with stream:
        response, body = await exchange(stream, h11.Connection(h11.CLIENT), "POST", "/ok", b"hi")
    assert response.status_code == 200 and body == b"hi"


def run(test: Callable[[], Awaitable[None]]) -> None:
    trio.run(test)


# ---- the server


def test_keep_alive_serves_many_requests_on_one_connection() -> None:
    handler = Recorder()

    async def test() -> None:
        async with serving(handler) as address, await connect(address) as stream:
            conn = h11.Connection(h11.CLIENT)
            for i in range(300):
                response, body = await exchange(stream, conn, "POST", f"/n?q={i}", b"%d" % i)
                assert response.status_code == 200 and body == b"%d" % i
                assert (b"x-query", b"%d" % i) in response.headers
                conn.start_next_cycle()
    run(test)
    assert len(handler.seen) == 300


def test_pipelined_requests_are_answered_in_order() -> None:
    async def test() -> None:
        async with serving(Recorder()) as address, await connect(address) as stream:
            await stream.send_all(b"".join(
                b"POST /p HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\n%d" % i
                for i in range(3)) + b"GET /last HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            answer = await read_all(stream)
        assert answer.count(b"HTTP/1.1 200") == 4
        assert [answer.index(b"\r\n\r\n%d" % i) for i in range(3)] == sorted(
            answer.index(b"\r\n\r\n%d" % i) for i in range(3))
    run(test)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_body_past_the_limit_gets_413_and_the_answer_arrives(framing: str) -> None:
    handler = Recorder()
    body = b"x" * (LIMIT * 300)

    async def test() -> None:
        async with serving(handler) as address:
            async with await connect(address) as stream:
                if framing == "chunked":
                    head = b"POST /big HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                    payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
                else:
                    head = b"POST /big HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body)
                    payload = body
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_send_quietly, stream, head + payload)
                    answer = await read_all(stream)
            assert answer.startswith(b"HTTP/1.1 413 ")
            assert b"connection: close" in answer.lower()
            await still_serves(address)
    run(test)
    assert handler.seen[0].startswith("413 ")


async def _send_quietly(stream: trio.abc.SendStream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


def test_expect_100_continue() -> None:
    async def test() -> None:
        async with serving(Recorder()) as address, await connect(address) as stream:
            await stream.send_all(b"POST /e HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n"
                                  b"expect: 100-continue\r\nconnection: close\r\n\r\n")
            assert (await stream.receive_some(1000)).startswith(b"HTTP/1.1 100 ")
            await stream.send_all(b"hello")
            answer = await read_all(stream)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\nhello")
    run(test)


@pytest.mark.parametrize("garbage", [
    b"\x00\x01\x02 not http at all\r\n\r\n",
    b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
    b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n",
    b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
])
def test_malformed_http_gets_400_and_the_server_goes_on(garbage: bytes) -> None:
    async def test() -> None:
        async with serving(Recorder()) as address:
            async with await connect(address) as stream:
                await stream.send_all(garbage)
                answer = await read_all(stream)
            assert answer.startswith(b"HTTP/1.1 400 ")
            await still_serves(address)
    run(test)


def test_oversized_head_gets_431() -> None:
    async def test() -> None:
        async with serving(Recorder()) as address:
            async with await connect(address) as stream:
                filler = b"x-filler: " + b"a" * (3 * h11serve.MAX_HEADER_BYTES) + b"\r\n"
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_send_quietly, stream,
                                       b"GET / HTTP/1.1\r\nhost: x\r\n" + filler + b"\r\n")
                    answer = await read_all(stream)
            assert answer.startswith(b"HTTP/1.1 431 ")
            await still_serves(address)
    run(test)


def test_client_gone_mid_body_breaks_nothing() -> None:
    handler = Recorder()

    async def test() -> None:
        async with serving(handler, body_max=0) as address:    # the handler reads the body
            for how in ("close", "reset"):
                handler.reading = trio.Event()
                stream = await connect(address)
                await stream.send_all(b"POST /cut HTTP/1.1\r\nhost: x\r\n"
                                      b"content-length: 500\r\n\r\n0123456789")
                with trio.fail_after(10):
                    await handler.reading.wait()
                if how == "reset":           # RST instead of FIN
                    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      struct.pack("ii", 1, 0))
                await stream.aclose()
                await still_serves(address)
    run(test)
    assert handler.seen.count("400 client disconnected") == 2


def test_a_body_read_whole_before_the_handler_arrives_whole_in_any_pieces() -> None:
    """A plain request whose body (up to ``body_max``) is still arriving
    when its head is read: the body is read whole, from pieces of any size,
    bytes of the next request after it are kept for that request, and a
    client gone mid-body ends only its connection."""
    handler = Recorder()
    body = bytes(range(256)) * 3

    async def test() -> None:
        async with serving(handler, body_max=LIMIT) as address:
            stream = await connect(address)
            async with stream:
                await stream.send_all(b"PUT /big HTTP/1.1\r\nhost: x\r\nconnection: keep-alive"
                                      b"\r\ncontent-length: %d\r\n\r\n" % len(body))
                for i in range(0, len(body), 100):
                    await trio.sleep(0.01)
                    last = i + 100 >= len(body)
                    await stream.send_all(body[i:i + 100] + (
                        b"POST /next HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi"
                        if last else b""))
                assert await answer_bodies(stream, 2) == [body, b"hi"]
            stream = await connect(address)
            await stream.send_all(b"PUT /cut HTTP/1.1\r\nhost: x\r\ncontent-length: 500\r\n\r\n01")
            await stream.aclose()
            await still_serves(address)
    run(test)
    assert handler.seen == ["PUT /big", "POST /next", "POST /ok"]


def test_a_body_read_whole_is_received_into_the_buffer_the_server_makes() -> None:
    """A data node has each PUT body received into a page-aligned buffer of
    its own making (to write it with O_DIRECT): the handler gets that very
    buffer, holding exactly the bytes sent, however they were cut."""
    made: list[mmap.mmap] = []
    got: list[object] = []
    body = os.urandom(300_000)

    def buffer(length: int) -> mmap.mmap:
        made.append(mmap.mmap(-1, length))
        return made[-1]

    async def handle(request: Request) -> Response:
        whole = await request.body_buffer(len(body))
        got.append(whole)
        return Response(200, bytes(whole[:5]) + bytes(whole[-5:]))

    async def test() -> None:
        async with serving(handle, body_max=len(body), buffer=buffer) as address:
            stream = await connect(address)
            async with stream:
                await stream.send_all(b"PUT /o HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n"
                                      % len(body) + body[:1000])
                for i in range(1000, len(body), 77_777):
                    await trio.sleep(0.01)
                    await stream.send_all(body[i:i + 77_777])
                assert await answer_bodies(stream, 1) == [body[:5] + body[-5:]]
    run(test)
    assert len(made) == 1 and got[0] is made[0]
    assert bytes(made[0]) == body


def test_only_admitted_requests_have_their_body_read_before_the_handler() -> None:
    """The nodes admit only requests carrying the secret to the eager read:
    anyone else's body waits for the handler (which refuses it first)."""
    handler = Recorder()

    async def test() -> None:
        async with serving(handler, body_max=LIMIT,
                           admit=lambda fields: fields.get("x-ok") == "1") as address:
            for admitted in (b"x-ok: 1\r\n", b""):
                handler.reading = trio.Event()
                stream = await connect(address)
                await stream.send_all(b"PUT /cut HTTP/1.1\r\nhost: x\r\n%scontent-length: 500"
                                      b"\r\n\r\n01" % admitted)
                if not admitted:
                    with trio.fail_after(10):
                        await handler.reading.wait()     # the handler runs at once
                await stream.aclose()
                await still_serves(address)
    run(test)
    assert handler.seen == ["POST /ok", "400 client disconnected", "POST /ok"]


def test_bodies_read_before_their_handler_are_bounded_in_number() -> None:
    """At most ``slots`` such bodies are held at once: the next one is read
    once a handler holding one returns."""
    running, most = 0, 0
    release = trio.Event()

    async def handler(request: Request) -> Response:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return Response(200, await request.body(LIMIT))

    async def put(address: str, body: bytes, results: list[bytes]) -> None:
        stream = await connect(address)
        async with stream:
            await stream.send_all(b"PUT /b HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n"
                                  % len(body))
            await trio.sleep(0.05)
            await stream.send_all(body)
            results.extend(await answer_bodies(stream, 1))

    async def test() -> None:
        results: list[bytes] = []
        async with serving(handler, body_max=LIMIT, slots=2) as address:
            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(put, address, bytes([i]) * 500, results)
                await trio.sleep(0.5)
                assert (running, most) == (2, 2)
                release.set()
        assert sorted(results) == [bytes([i]) * 500 for i in range(5)]
    run(test)


def test_many_concurrent_connections() -> None:
    handler = Recorder()

    async def client(address: str, n: int) -> None:
        async with await connect(address) as stream:
            conn = h11.Connection(h11.CLIENT)
            for i in range(5):
                response, body = await exchange(stream, conn, "POST", "/c", b"%d-%d" % (n, i))
                assert body == b"%d-%d" % (n, i)
                conn.start_next_cycle()

    async def test() -> None:
        async with serving(handler) as address:
            async with trio.open_nursery() as nursery:
                for n in range(200):
                    nursery.start_soon(client, address, n)
    run(test)
    assert len(handler.seen) == 1000


def test_connections_past_the_limit_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    async def test() -> None:
        async with serving(Recorder(), max_connections=2) as address:
            first, second = await connect(address), await connect(address)
            await still_serves_on(first)
            await still_serves_on(second)
            third = await connect(address)
            assert await read_all(third) == b""          # closed unread
            await first.aclose()
            with trio.fail_after(10):       # once the server has seen the close
                while not await served(address):
                    await trio.sleep(0.01)
            await second.aclose()
    run(test)
    assert "refusing connections" in caplog.text


async def served(address: str) -> bool:
    """Does a new connection get an answer (rather than being refused)?"""
    async with await connect(address) as stream:
        try:
            await still_serves_on(stream)
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            return False
    return True


async def still_serves_on(stream: trio.SocketStream) -> None:
    response, _ = await exchange(stream, h11.Connection(h11.CLIENT), "POST", "/ok", b"")
    assert response.status_code == 200


def test_handler_bug_is_a_logged_500(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(request: Request) -> Response:
        raise RuntimeError("bug")

    async def test() -> None:
        async with serving(broken) as address, await connect(address) as stream:
            conn = h11.Connection(h11.CLIENT)
            response, _ = await exchange(stream, conn, "GET", "/")
            assert response.status_code == 500
            conn.start_next_cycle()                      # the connection stays usable
            response, _ = await exchange(stream, conn, "GET", "/")
            assert response.status_code == 500
    run(test)
    assert "unhandled error serving GET /" in caplog.text
    caplog.clear()                  # expected here


def test_idle_and_stalled_connections_are_closed() -> None:
    """Over memory streams with a fake clock: no real waiting."""
    async def test() -> None:
        for sent in (b"", b"GET / HTTP/1.1\r\nhost: x\r\n", b"POST / HTTP/1.1\r\n"
                     b"host: x\r\ncontent-length: 10\r\n\r\n12"):
            client, server = trio.testing.memory_stream_pair()
            started = trio.current_time()
            await client.send_all(sent)
            await serve_stream(Recorder(), server)
            waited = trio.current_time() - started
            limit = h11serve.READ_SECONDS if sent.endswith(b"12") else h11serve.IDLE_SECONDS
            assert limit <= waited < limit + 1
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


def test_cancelling_serve_closes_connections() -> None:
    async def test() -> None:
        async with trio.open_nursery() as nursery:
            address = (await nursery.start(serve, Recorder(), "127.0.0.1:0"))[0]
            stream = await connect(address)
            await still_serves_on(stream)
            slow = await connect(address)
            await slow.send_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert await read_all(stream) == b""
        assert await read_all(slow) == b""
        with pytest.raises(OSError):
            await connect(address)
    run(test)


# ---- the metadata node over h11serve, and MetaClient's pool


@asynccontextmanager
async def meta_node(db: Path, bind: str = "127.0.0.1:0") -> AsyncIterator[str]:
    """A metadata node in this run, serving on ``bind``; its address."""
    node = MetaNode(db, SECRET)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.write_loop)
            yield (await nursery.start(serve, node.handle, bind))[0]
            nursery.cancel_scope.cancel()
    finally:
        node.close()


def test_meta_health_metrics_and_rpc(tmp_path: Path) -> None:
    async def test() -> None:
        async with meta_node(tmp_path / "meta.db") as address:
            async with await connect(address) as stream:
                conn = h11.Connection(h11.CLIENT)
                response, body = await exchange(stream, conn, "GET", "/health")
                assert response.status_code == 200
                assert body == b'{"status": "ok", "role": "meta"}'
                conn.start_next_cycle()
                response, body = await exchange(stream, conn, "POST", "/v1/rpc",
                                                msgpack.packb({"method": "volumes"}))
                assert response.status_code == 401
                conn.start_next_cycle()
            async with MetaClient(address, SECRET) as client:
                assert await client.call("volumes") == []
                await client.call("create_volume", name="v", block_size=4096, replicas=1)
            async with await connect(address) as stream:
                response, body = await exchange(stream, h11.Connection(h11.CLIENT),
                                                "GET", "/metrics")
            assert response.status_code == 200
            assert b'objfs_meta_rpc_total{method="create_volume",outcome="ok"} 1.0' in body
    run(test)


def test_client_pool_across_runs_and_node_restarts(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    client = MetaClient(address, SECRET)                 # built outside any trio run

    async def first_run() -> None:
        async with meta_node(tmp_path / "meta.db", address):
            async with trio.open_nursery() as nursery:   # several pooled connections
                for _ in range(20):
                    nursery.start_soon(functools.partial(client.call, "volumes"))

    async def second_run() -> None:                      # the same client, a new run
        async with meta_node(tmp_path / "meta.db", address):
            assert await client.call("volumes") == []
        with pytest.raises(MetaUnavailable) as info:     # the node is gone
            await client.call("volumes")
        assert info.value.sent is False
        async with meta_node(tmp_path / "meta.db", address):
            assert await client.call("volumes") == []    # back: a new connection
        await client.aclose()

    trio.run(first_run)
    trio.run(second_run)


def test_client_timeout_is_unavailable_and_maybe_sent() -> None:
    async def never(request: Request) -> Response:
        await trio.sleep_forever()
        raise AssertionError

    async def test() -> None:
        async with serving(never) as address:
            async with MetaClient(address, SECRET, timeout=0.2) as client:
                with pytest.raises(MetaUnavailable) as info:
                    await client.call("volumes")
                assert info.value.sent is True
    run(test)
