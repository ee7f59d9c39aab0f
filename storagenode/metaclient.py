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
persistent trio TCP stream.  The request's bytes are built once per client
but for the length and body.  An answer in the plain form the node sends
(``parse_answer_head``: a 2xx-5xx status, ``content-length`` framing, no
``connection`` field) is read directly; any other answer is handed, after
the request, to a fresh ``h11.Connection`` state machine, which reads and
judges it.  h11 per exchange cost as much CPU as the rest of a call.

A pool keeps up to ``POOL_SIZE`` connections; a call takes an idle
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

import re
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
HEAD_MAX = 64 * 1024            # past this without a blank line, h11 judges the answer

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
        self._head = _request_head(self._headers)
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
        exchange = _Exchange(self._head, self._headers,
                             msgpack.packb(request, use_bin_type=True))
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


def _request_head(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The bytes h11 sends for an RPC request with ``headers`` (host first),
    up to the content-length value; ValueError if h11 would refuse them."""
    names = [name.lower() for name, _ in headers]
    if not names or names[0] != b"host" or {b"content-length", b"transfer-encoding"} & set(names):
        raise ValueError("request fields: host first; the framing fields are ours")
    try:
        h11.Request(method="POST", target="/v1/rpc", headers=headers)
    except h11.LocalProtocolError as exc:
        raise ValueError(f"cannot send these request fields: {exc}") from None
    fields = b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)
    return b"POST /v1/rpc HTTP/1.1\r\n" + fields + b"content-length: "


def _split_address(address: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port"."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"metadata node address {address!r} is not host:port")
    return host.strip("[]"), int(port)


@dataclass
class _Exchange:
    """One request and, once done, its answer; ``sent`` once any byte was written."""
    head: bytes                         # the request's bytes up to its length
    headers: list[tuple[bytes, bytes]]  # the same fields, for h11
    body: bytes
    sent: bool = False
    status: int = 0
    answer: bytes = b""

    def request(self) -> bytes:
        return b"%s%d\r\n\r\n%s" % (self.head, len(self.body), self.body)

    def events(self) -> list[h11.Event]:
        """The request as h11 events (h11 encodes them as ``request()``)."""
        headers = [*self.headers, (b"content-length", b"%d" % len(self.body))]
        return [h11.Request(method="POST", target="/v1/rpc", headers=headers),
                h11.Data(data=self.body), h11.EndOfMessage()]


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
    """One HTTP/1.1 connection over a trio stream (see the module docstring)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reusable = False       # the last exchange ended cleanly, keep-alive
        self.idle_since = time.monotonic()

    async def run(self, exchange: _Exchange) -> None:
        """Send the request and read the whole answer into ``exchange``."""
        self.reusable = False
        exchange.sent = True
        await self.stream.send_all(exchange.request())
        received, closed = await self._receive_head()
        head = parse_answer_head(received)
        if head is None:
            exchange.status, exchange.answer = await self._answer_h11(exchange, received,
                                                                      closed)
        else:
            exchange.status, exchange.answer = await self._answer(head, received)

    async def _receive_head(self) -> tuple[bytes, bool]:
        """What arrives until the answer's head is complete (or the node
        closed, or it passed HEAD_MAX), and whether the node closed."""
        received, searched = b"", 0
        while True:
            chunk = await self.stream.receive_some(RECEIVE_BYTES)
            if not chunk:
                return received, True
            received += chunk
            if len(received) > HEAD_MAX or _BLANK_LINE.search(received, searched):
                return received, False
            searched = max(0, len(received) - 3)

    async def _answer(self, head: tuple[int, int, int], received: bytes) -> tuple[int, bytes]:
        """A plain answer's status and body; the head is at hand."""
        status, length, start = head
        if length > ANSWER_MAX:
            raise h11.RemoteProtocolError(f"answer larger than {ANSWER_MAX} bytes")
        chunks, size = [received], len(received)
        while size < start + length:
            chunk = await self.stream.receive_some(RECEIVE_BYTES)
            if not chunk:
                raise trio.BrokenResourceError("the node ended the exchange mid-answer")
            chunks.append(chunk)
            size += len(chunk)
        self.reusable = size == start + length      # nothing unasked-for came after
        data = received if len(chunks) == 1 else b"".join(chunks)
        return status, data[start:start + length]

    async def _answer_h11(self, exchange: _Exchange, received: bytes,
                          closed: bool) -> tuple[int, bytes]:
        """Any other answer, read by an h11 machine shown the request first."""
        machine = h11.Connection(h11.CLIENT)
        for event in exchange.events():
            machine.send(event)
        machine.receive_data(received)
        if closed:
            machine.receive_data(b"")
        status, size, chunks = 0, 0, []
        while not isinstance(event := await self._next_event(machine), h11.EndOfMessage):
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > ANSWER_MAX:
                    raise h11.RemoteProtocolError(f"answer larger than {ANSWER_MAX} bytes")
                chunks.append(bytes(event.data))
        self.reusable = (machine.our_state is h11.DONE and machine.their_state is h11.DONE
                         and not machine.trailing_data[0])
        return status, b"".join(chunks)

    async def _next_event(self, machine: h11.Connection) -> h11.Event:
        while (event := machine.next_event()) is h11.NEED_DATA:
            machine.receive_data(await self.stream.receive_some(RECEIVE_BYTES))
        if isinstance(event, h11.ConnectionClosed) or not isinstance(event, h11.Event):
            raise trio.BrokenResourceError(f"the node ended the exchange: {event!r}")
        return event

    def next_cycle(self) -> bool:
        """Ready the connection for another request; False if it must be closed."""
        if not self.reusable:
            return False
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


# ---- plain answers: pure parsing, no I/O
#
# RFC 9112's grammar, narrowed as in h11serve: a field value is visible
# ASCII with inner spaces or tabs; lines end in CRLF.  Anything else is h11's.

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_VALUE = rb"(?:[!-~]+(?:[ \t]+[!-~]+)*)?"
_FIELD = re.compile(rb"(%s):[ \t]*(%s)[ \t]*\r\n" % (_TOKEN, _VALUE))
_ANSWER_HEAD = re.compile(
    rb"HTTP/1\.1 ([2-5][0-9][0-9]) [\t !-~]*\r\n((?:%s:[ \t]*%s[ \t]*\r\n)*)\r\n"
    % (_TOKEN, _VALUE))
_BLANK_LINE = re.compile(rb"\n\r?\n")
# fields that change the framing or end the connection: h11 reads those answers
_NOT_PLAIN = frozenset({b"transfer-encoding", b"connection"})


def parse_answer_head(data: bytes) -> tuple[int, int, int] | None:
    """(status, content length, where the body starts) of the answer at the
    start of ``data``, if its head has all arrived and is plain; else None."""
    head = _ANSWER_HEAD.match(data)
    if head is None:
        return None
    status = int(head[1])
    length: bytes | None = None
    for name, value in _FIELD.findall(head[2]):
        name = name.lower()
        if name in _NOT_PLAIN or (name == b"content-length" and length is not None):
            return None
        if name == b"content-length":
            length = value
    if length is None or not length.isdigit() or len(length) > 12 or status in (204, 304):
        return None
    return status, int(length), head.end()
