"""The client of the metadata node RPC, used by every other part of objfs.

``await client.call("mkdir", vol=1, parent=1, name=b"x", mode=0o755, uid=0,
gid=0)`` returns the method's result.  Errors come in three kinds, mapped
here once: ``MetaError`` (a filesystem errno the node answered),
``MetaUnavailable`` (transport failure, timeout or a 5xx: temporary, try
again or elsewhere) and ``BadRequest`` (the node refused the request as
malformed or unauthorized: a bug or a misconfiguration, never retried).

How this works
--------------
Each call is one HTTP/1.1 exchange (``POST /v1/rpc``, docs/DESIGN.md) on a
persistent connection: an ``h11.Connection`` state machine over a trio TCP
stream.  A pool keeps up to ``POOL_SIZE`` connections; a call takes an idle
one (or opens one), uses it alone, and gives it back only if the exchange
completed cleanly and both sides keep the connection alive.  Any failure,
timeout or cancellation mid-exchange closes that connection instead: its
state is unknown.  An idle connection is not reused once the node may have
closed it (it turned readable: end of stream, or idle past
``IDLE_SECONDS``, below the node's keep-alive of 75 s).

The pool belongs to one ``trio.run``: it is made on the first call inside a
run, and a call in a later run (tools call ``trio.run`` once per command)
closes the previous run's connections and starts a new pool.  So a client may
be built before the event loop starts.

``MetaUnavailable.sent`` is False only when no byte of the request was
written (connecting failed or timed out, or the pool was busy until the
deadline): then even an op may be sent again without doubt about its outcome.
"""

from __future__ import annotations

import select
import time
from dataclasses import dataclass
from typing import Any

import h11
import msgpack
import trio

from .auth import auth_header
from .metastate import BadRequest, MetaError

__all__ = ["MetaClient", "MetaError", "MetaUnavailable", "BadRequest"]

POOL_SIZE = 16
IDLE_SECONDS = 60.0
RECEIVE_BYTES = 64 * 1024
ANSWER_MAX = 64 * 1024 * 1024

# what the network can do to an exchange; always a MetaUnavailable
_TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                     h11.ProtocolError)


class MetaUnavailable(Exception):
    """The metadata node could not be reached or failed (a temporary failure).

    ``sent`` is False when the request certainly never reached the node (the
    connection was refused or not established), so that even a state-changing
    operation can be sent again without doubt about its outcome.
    """

    temporary = True

    def __init__(self, message: str, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class MetaClient:
    def __init__(self, address: str, secret: str, *, timeout: float = 30.0,
                 transport: None = None) -> None:
        if transport is not None:
            raise TypeError("MetaClient no longer takes an httpx transport")
        self.address = address
        self.timeout = timeout
        self._host, self._port = _split_address(address)
        self._headers = [(name.encode(), value.encode()) for name, value in (
            ("host", address), ("content-type", "application/msgpack"),
            *auth_header(secret).items())]
        self._pool: _Pool | None = None
        self.session: str | None = None     # sent with every call once set (leases)

    async def call(self, method: str, **args: Any) -> Any:
        """Call ``method`` with ``args``; its result, or MetaError / MetaUnavailable."""
        return (await self.exchange(method, args))["result"]

    async def call_leased(self, method: str, **args: Any) -> tuple[Any, list[Any]]:
        """A query answered with the READ leases taken for it (see metanode)."""
        answer = await self.exchange(method, args, lease=True)
        return answer["result"], list(answer.get("leases") or [])

    async def exchange(self, method: str, args: dict[str, Any], *, lease: bool = False,
                       timeout: float | None = None) -> dict[str, Any]:
        """One RPC; the whole answer map (``result``, maybe ``leases``)."""
        request: dict[str, Any] = {"method": method, "args": args}
        if self.session is not None:
            request["session"] = self.session
        if lease:
            request["lease"] = True
        exchange = _Exchange(self._headers, msgpack.packb(request, use_bin_type=True))
        limit = self.timeout if timeout is None else timeout
        try:
            with trio.fail_after(limit):
                await self._current_pool().run(exchange)
        except trio.TooSlowError:
            raise MetaUnavailable(f"{self.address}: {method}: no answer within "
                                  f"{limit} s", exchange.sent) from None
        except _TRANSPORT_ERRORS as exc:
            raise MetaUnavailable(f"{self.address}: {method}: {exc!r}", exchange.sent) from exc
        return self._answer(method, exchange.status, exchange.answer)

    def _current_pool(self) -> _Pool:
        """This run's pool; the pool of an earlier ``trio.run`` is closed."""
        token = trio.lowlevel.current_trio_token()
        if self._pool is None or self._pool.token is not token:
            if self._pool is not None:
                self._pool.close()
            self._pool = _Pool(token, self._host, self._port, POOL_SIZE)
        return self._pool

    def _answer(self, method: str, status: int, content: bytes) -> dict[str, Any]:
        if status >= 500:
            raise MetaUnavailable(f"{self.address}: {method}: HTTP {status}")
        if status != 200:
            text = content[:200].decode("utf-8", "replace")
            raise BadRequest(f"{self.address}: {method}: HTTP {status} {text}")
        try:
            answer = msgpack.unpackb(content, raw=False)
        except ValueError as exc:
            raise MetaUnavailable(f"{self.address}: {method}: garbled answer") from exc
        if not isinstance(answer, dict):
            raise MetaUnavailable(f"{self.address}: {method}: garbled answer")
        if "errno" in answer:
            raise MetaError(answer["errno"], answer.get("error", ""))
        return answer

    async def aclose(self) -> None:
        """Close the pooled connections (the client stays usable: it reconnects)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> "MetaClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


def _split_address(address: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port"."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"metadata node address {address!r} is not host:port")
    return host.strip("[]"), int(port)


@dataclass
class _Exchange:
    """One request and, once done, its answer; ``sent`` once any byte was written."""
    headers: list[tuple[bytes, bytes]]
    body: bytes
    sent: bool = False
    status: int = 0
    answer: bytes = b""


class _Pool:
    """Up to ``size`` connections to one node, all of one trio run."""

    def __init__(self, token: trio.lowlevel.TrioToken, host: str, port: int,
                 size: int) -> None:
        self.token = token
        self.host = host
        self.port = port
        self.slots = trio.Semaphore(size)
        self.idle: list[_Connection] = []
        self.closed = False

    async def run(self, exchange: _Exchange) -> None:
        """Run ``exchange`` on a connection of its own, kept only if still clean."""
        try:
            self.slots.acquire_nowait()     # the usual case: no scheduler round trip
        except trio.WouldBlock:
            await self.slots.acquire()
        try:
            await self._run_on_connection(exchange)
        finally:
            self.slots.release()

    async def _run_on_connection(self, exchange: _Exchange) -> None:
        connection = self._take_idle() or await self._connect()
        reusable = False
        try:
            await connection.run(exchange)
            reusable = connection.next_cycle()
        finally:
            if reusable and not self.closed:
                self.idle.append(connection)
            else:
                connection.close()

    def _take_idle(self) -> _Connection | None:
        """The most recently used idle connection still fit for a request."""
        while self.idle:
            connection = self.idle.pop()
            if connection.fresh():
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        return _Connection(await trio.open_tcp_stream(self.host, self.port))

    def close(self) -> None:
        """Close the idle connections; those in use are closed when their call ends."""
        self.closed = True
        while self.idle:
            self.idle.pop().close()


class _Connection:
    """One HTTP/1.1 connection: an h11 state machine over a trio stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = time.monotonic()

    async def run(self, exchange: _Exchange) -> None:
        """Send the request and read the whole answer into ``exchange``."""
        headers = [*exchange.headers, (b"content-length", b"%d" % len(exchange.body))]
        data = b"".join(self.h11.send(event) or b"" for event in (
            h11.Request(method="POST", target="/v1/rpc", headers=headers),
            h11.Data(data=exchange.body), h11.EndOfMessage()))
        exchange.sent = True
        await self.stream.send_all(data)
        exchange.status, exchange.answer = await self._answer()

    async def _answer(self) -> tuple[int, bytes]:
        """The status and body of the response (informational ones skipped)."""
        status, size, chunks = 0, 0, []
        while not isinstance(event := await self._next_event(), h11.EndOfMessage):
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > ANSWER_MAX:
                    raise h11.RemoteProtocolError(f"answer larger than {ANSWER_MAX} bytes")
                chunks.append(bytes(event.data))
        return status, b"".join(chunks)

    async def _next_event(self) -> h11.Event:
        while (event := self.h11.next_event()) is h11.NEED_DATA:
            self.h11.receive_data(await self.stream.receive_some(RECEIVE_BYTES))
        if isinstance(event, h11.ConnectionClosed) or not isinstance(event, h11.Event):
            raise trio.BrokenResourceError(f"the node ended the exchange: {event!r}")
        return event

    def next_cycle(self) -> bool:
        """Ready the connection for another request; False if it must be closed."""
        if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
            return False
        self.h11.start_next_cycle()
        self.idle_since = time.monotonic()
        return True

    def fresh(self) -> bool:
        """Not idle too long, and nothing (an end of stream) arrived while idle."""
        if time.monotonic() - self.idle_since > IDLE_SECONDS:
            return False
        poller = select.poll()
        poller.register(self.stream.socket.fileno(), select.POLLIN)
        return not poller.poll(0)

    def close(self) -> None:
        self.stream.socket.close()

