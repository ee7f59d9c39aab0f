"""HTTP/1.1 serving for the node roles: h11 driven by hand over trio streams.

The metadata RPC is many tiny requests, each one on the critical path of a
FUSE operation, so the per-request cost of the HTTP layer matters more than
its features; a data node's requests are large, and h11 handing their
bodies over in 64 KiB events cost more CPU than the rest of a PUT.  This
module serves the handlers of ``httpserve`` (they take a ``Request`` and
return a ``Response`` or raise ``HTTPError``) for well under half of
Hypercorn's CPU per request (numbers: docs/DESIGN.md).

How this works
--------------
``serve`` listens and runs one task per accepted connection.  At most
``MAX_CONNECTIONS`` connections are open at once; one past that is closed
at once without being read (the client sees a reset and tries again later).

A connection loops, one request at a time.  Each request takes one of three
paths, chosen from the bytes already received when it starts:

- **simple** (nearly every RPC): the whole request is already here, its head
  is in the plain form a well-behaved HTTP/1.1 client sends (a ``host``, at
  most a ``content-length`` for framing, no ``transfer-encoding``,
  ``expect`` or ``upgrade``, no ``connection`` but ``keep-alive``, nothing
  repeated) and its body is at most ``SIMPLE_BODY_MAX``.  ``parse_simple`` (pure, no I/O) reads it
  with one regular expression, and ``encode_simple`` writes the answer's
  bytes, the same bytes h11 would write.  This skips h11's per-event state
  machine, which cost about as much CPU as everything else in a round trip.
- **simple, body arriving**: as simple, but only the head is all here and
  the body (at most the server's ``body_max``: the handler's own limit) is
  still arriving, and ``admit`` accepts the head's fields (the nodes admit
  only requests that carry the cluster secret): the body is read whole,
  straight from the stream, and the request is then served as a simple one.  A client that closes mid-body
  ends only its connection (no handler ran).
- **general** (anything else: a head still arriving, chunked
  framing, 100-continue, ``connection: close``, malformed HTTP): a fresh
  ``h11.Connection``, a pure state machine, gets the bytes and drives the
  request as below; when it is done, the bytes it holds past that request go
  back to the loop.  Every judgement about odd or broken HTTP is h11's.

A general request:

1. wait for the request head;
2. hand the handler a ``Request`` whose body is read only when the handler
   asks (``await request.body(limit)``, the one place that enforces the
   limit with 413), each read that has to wait bounded by ``READ_SECONDS``;
3. send the response head, body and end in one write;
4. start the next cycle, unless either side ends the connection.  Bytes of
   a pipelined next request stay buffered until then.

Sending an answer and receiving the next request head together get
``IDLE_SECONDS``, on either path: so an idle keep-alive connection, one
trickling its head, or one not reading its answers is closed.

Invariants: a request head is never larger than ``MAX_HEADER_BYTES`` plus
one read (431 otherwise); a request whose body the handler left unread, and
which has not all arrived yet, is answered with ``connection: close``, and
the connection is then closed after a short bounded drain (so the client
reads the answer instead of a reset); malformed HTTP gets a 400 and a
close; nothing a client does (garbage, disconnect mid-body, reset) ends the
server: network errors end only that connection, and anything else is
logged as a bug and ends only that connection.  Cancelling ``serve`` closes
the listeners and every connection.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Callable, NamedTuple
from urllib.parse import parse_qs, unquote

import h11
import trio

from .buffers import Buffer, Bytes
from .httpserve import Handler, HTTPError, Request, Response, respond

log = logging.getLogger(__name__)

Admit = Callable[[dict[str, str]], bool]     # may this request's body be read eagerly?
MakeBuffer = Callable[[int], Buffer]     # a writable buffer for a body of n bytes

MAX_CONNECTIONS = 1024
MAX_HEADER_BYTES = 64 * 1024
IDLE_SECONDS = 75.0          # to send an answer and receive the next request head
READ_SECONDS = 30.0          # for each read of a request body that has to wait
LINGER_SECONDS = 1.0         # draining an unread body before closing
LINGER_BYTES = 16 * 1024 * 1024
RECEIVE_BYTES = 64 * 1024
EAGER_RECEIVE_BYTES = 1024 * 1024
EAGER_SLOTS = 32              # bodies read before their handler, held at once per server
SIMPLE_BODY_MAX = 64 * 1024       # a simple request's body, if all here with its head

# what a client can cause on the wire; ends its connection quietly
_NETWORK_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Eager:
    """Which plain requests have their body read whole before the handler
    runs: bodies of at most ``body_max`` bytes (make it the handler's own
    limit) whose head's fields ``admit`` accepts (None: every request; give
    it the handler's authentication, so that nobody without it makes the
    server hold ``body_max`` bytes), at most ``slots`` of them at once (each
    held until its handler returns).  Each such body is received straight
    into one writable buffer of its length made by ``buffer`` (the handler
    gets that buffer: a data node asks for page-aligned ``mmap`` ones, which
    it writes to disk with O_DIRECT)."""

    def __init__(self, body_max: int = SIMPLE_BODY_MAX, admit: Admit | None = None,
                 slots: int = EAGER_SLOTS, buffer: MakeBuffer = bytearray) -> None:
        self.body_max = body_max
        self.admit = admit
        self.slots = trio.CapacityLimiter(slots)
        self.buffer = buffer


async def serve(handle: Handler, bind: str, *, max_connections: int = MAX_CONNECTIONS,
                body_max: int = SIMPLE_BODY_MAX, admit: Admit | None = None,
                slots: int = EAGER_SLOTS, buffer: MakeBuffer = bytearray,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``handle`` on ``bind`` ("host:port", port 0 for any) until cancelled.
    ``body_max``, ``admit``, ``slots`` and ``buffer``: which bodies are read
    before the handler runs, how many at once, and into what (``Eager``).

    ``task_status.started`` gets the bound addresses as "host:port" strings.
    """
    host, port = split_bind(bind)
    listeners = await trio.open_tcp_listeners(port, host=host)
    server = _Server(handle, max_connections, Eager(body_max, admit, slots, buffer))
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, server.connection, listeners)
        task_status.started([_address(listener) for listener in listeners])


def split_bind(bind: str) -> tuple[str | None, int]:
    """("host", port) from "host:port" or "[v6]:port"; an empty host means all."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bind address {bind!r} is not host:port")
    return (host.strip("[]") or None), int(port)


def _address(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Server:
    """Counts connections and runs each one; errors end only their connection."""

    def __init__(self, handle: Handler, max_connections: int, eager: Eager) -> None:
        self.handle = handle
        self.max_connections = max_connections
        self.eager = eager
        self.open = 0
        self.refused = 0            # since the last warning (one per burst, not each)

    async def connection(self, stream: trio.SocketStream) -> None:
        if self.open >= self.max_connections:
            if not self.refused:
                log.warning("refusing connections: %d already open", self.open)
            self.refused += 1
            await trio.aclose_forcefully(stream)
            return
        self.open += 1
        try:
            await serve_stream(self.handle, stream, self.eager)
        finally:
            self.open -= 1
            self.refused = 0


async def serve_stream(handle: Handler, stream: trio.abc.HalfCloseableStream,
                       eager: Eager | None = None) -> None:
    """Serve HTTP/1.1 requests arriving on ``stream`` until either side ends it,
    then close it.  Never raises but for cancellation."""
    try:
        async with stream:
            await _Connection(stream, handle, eager or Eager()).run()
    except _NETWORK_ERRORS as exc:
        log.debug("connection ended: %r", exc)
    except Exception:
        log.exception("bug serving a connection; closing it")


class _Connection:
    """One client connection: the request loop, and what it has received.

    One cancel scope, the watchdog, spans the connection; its deadline is
    moved as the connection waits for the client (for a request head, a
    piece of body, a write) and lifted while the handler works.  Moving a
    deadline costs far less than a cancel scope per read.
    """

    def __init__(self, stream: trio.abc.HalfCloseableStream, handle: Handler,
                 eager: Eager) -> None:
        self.stream = stream
        self.handle = handle
        self.eager = eager
        self.watchdog = trio.CancelScope(deadline=trio.current_time() + IDLE_SECONDS)
        self.received = b""         # bytes not yet part of a request served, from ...
        self.start = 0              # ... this offset on
        self.peer_closed = False

    async def run(self) -> None:
        """Serve requests one at a time until either side ends the connection."""
        with self.watchdog:
            while await self._cycle():
                pass

    async def _cycle(self) -> bool:
        """Read and answer one request; True if the connection stays open."""
        if self.start == len(self.received):
            if self.peer_closed:
                return False
            await self._receive()
        simple = parse_simple(self.received, self.start)
        if simple is None:
            eager = self.eager
            head = parse_simple_head(self.received, self.start, eager.body_max)
            if head is None or (eager.admit is not None and not eager.admit(head.headers)):
                return await self._general()
            self.watchdog.deadline = math.inf      # waiting for a slot is not the client's
            async with eager.slots:                # bodies held at once are bounded
                simple = await self._read_body(head)
                if simple is None:
                    return False            # the client went away mid-body
                self.start = simple.end
                return await self._answer_simple(simple)
        self.start = simple.end
        return await self._answer_simple(simple)

    async def _read_body(self, simple: SimpleHead) -> SimpleRequest | None:
        """The rest of a simple request whose head is here and whose body
        (at most ``body_max`` bytes) is not all here yet, read whole, straight
        from the stream: a data node's 4 MiB PUT went through h11 in 64 KiB
        events, for five times the CPU of everything else it does with it.
        None if the client closes before the body is all sent."""
        head_end = simple.head.end()
        end = head_end + simple.length
        first = self.received[head_end:end]
        head, rest = self.received[self.start:head_end], self.received[end:]
        body = self.eager.buffer(simple.length)
        sock = self.stream.socket if isinstance(self.stream, trio.SocketStream) else None
        with memoryview(body) as view:
            view[:len(first)] = first
            pos = len(first)
            while pos < simple.length:
                self.expect(READ_SECONDS)
                if sock is not None:           # no copy: the kernel writes into the body
                    n = await sock.recv_into(view[pos:pos + EAGER_RECEIVE_BYTES])
                else:
                    piece = await self.stream.receive_some(min(simple.length - pos,
                                                               EAGER_RECEIVE_BYTES))
                    n = len(piece)
                    view[pos:pos + n] = piece
                if not n:
                    self.peer_closed = True
                    return None
                pos += n
        self.received = rest
        return simple_request(simple, head, body, 0)

    def expect(self, seconds: float) -> None:
        """Give the client at most ``seconds`` from now, or drop the connection."""
        self.watchdog.deadline = trio.current_time() + seconds

    async def _receive(self) -> None:
        """Wait for more bytes (all earlier ones are used up)."""
        self.received = bytes(await self.stream.receive_some(RECEIVE_BYTES))
        self.start = 0
        self.peer_closed = not self.received

    async def _answer_simple(self, simple: SimpleRequest) -> bool:
        path, _, query = simple.target.partition("?")
        request = Request(simple.method, unquote(path), parse_qs(query) if query else {},
                          simple.headers, _WholeBody(simple.body))
        self.watchdog.deadline = math.inf      # the handler takes the time it needs
        response = await respond(self.handle, request)
        self.expect(IDLE_SECONDS)              # for the answer and the next request
        head = encode_simple_head(simple.method, response)
        if head is None:                       # an answer only h11 knows how to frame
            return await _General(self).send_for(simple, response)
        if simple.method == "HEAD":
            await self.stream.send_all(head)
        elif len(response.body) <= SIMPLE_BODY_MAX:
            await self.stream.send_all(head + response.body)      # one write
        else:
            await self.stream.send_all(head)   # a block: not copied to join them
            with memoryview(response.body) as body:
                await self.stream.send_all(body)
        return True

    async def _general(self) -> bool:
        """Serve one request through h11, from the bytes received so far on."""
        general = _General(self)
        general.h11.receive_data(self.received[self.start:])
        if self.peer_closed:
            general.h11.receive_data(b"")
        self.received, self.start = b"", 0
        if not await general.cycle():
            return False
        general.h11.start_next_cycle()
        self.received, self.peer_closed = general.h11.trailing_data
        return True


class _General:
    """One request of a connection served through an h11 state machine."""

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection
        self.stream = connection.stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)

    async def cycle(self) -> bool:
        """Read and answer one request; True if the connection stays open."""
        try:
            event = await self._next_event()
        except h11.RemoteProtocolError as exc:
            await self._refuse(exc.error_status_hint, str(exc))
            return False
        if not isinstance(event, h11.Request):
            return False                    # the client closed the connection
        await self._answer(event)
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            return True
        await self._linger()
        return False

    async def send_for(self, simple: SimpleRequest, response: Response) -> bool:
        """Send ``response`` to a simple request already answered (h11 is
        shown the request first); True if the connection stays open."""
        self.h11.receive_data(simple.raw)
        while self.h11.their_state is not h11.DONE:
            self.h11.next_event()
        await self._send_response(simple.method, response)
        return self.h11.our_state is h11.DONE

    async def _next_event(self) -> Any:
        while (event := self.h11.next_event()) is h11.NEED_DATA:
            data = bytes(await self.stream.receive_some(RECEIVE_BYTES))
            self.connection.peer_closed = not data
            self.h11.receive_data(data)
        return event

    async def _answer(self, event: h11.Request) -> None:
        request = _request(event, self._receive)
        self.connection.watchdog.deadline = math.inf    # the handler takes its time
        response = await respond(self.connection.handle, request)
        self._skip_unread_body()
        self.connection.expect(IDLE_SECONDS)   # for the answer and the next request
        await self._send_response(request.method, response)

    def _skip_unread_body(self) -> None:
        """Drop the rest of the request body if it has all arrived already
        (so the connection can stay open although the handler did not read it)."""
        try:
            while self.h11.their_state is h11.SEND_BODY:
                if self.h11.next_event() is h11.NEED_DATA:
                    return
        except h11.RemoteProtocolError:
            return

    async def _receive(self) -> dict[str, Any]:
        """The next piece of the request body, as an ASGI message (``Request.body``)."""
        if self.h11.their_state is not h11.SEND_BODY:
            return {"type": "http.request", "body": b"", "more_body": False}
        try:
            event = await self._body_event()
        except h11.RemoteProtocolError as exc:
            if self.connection.peer_closed:
                return {"type": "http.disconnect"}
            raise HTTPError(exc.error_status_hint, f"malformed request body: {exc}") from None
        except _NETWORK_ERRORS:
            return {"type": "http.disconnect"}
        if isinstance(event, h11.Data):
            return {"type": "http.request", "body": bytes(event.data), "more_body": True}
        if isinstance(event, h11.EndOfMessage):
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    async def _body_event(self) -> Any:
        """The next body event; a wait for the client is bounded by READ_SECONDS."""
        event = self.h11.next_event()
        if event is not h11.NEED_DATA:
            return event                        # already received: no deadline to move
        self.connection.expect(READ_SECONDS)
        try:
            if self.h11.client_is_waiting_for_100_continue:
                await self._send(h11.InformationalResponse(status_code=100, headers=[]))
            return await self._next_event()
        finally:
            self.connection.watchdog.deadline = math.inf

    async def _send_response(self, method: str, response: Response) -> None:
        headers = list(response.headers.items())
        if "content-length" not in response.headers:
            headers.append(("content-length", str(len(response.body))))
        if self.h11.their_state is not h11.DONE:
            headers.append(("connection", "close"))   # unread body: the stream is lost
        await self._send(h11.Response(status_code=response.status, headers=headers),
                         h11.Data(data=b"" if method == "HEAD" else bytes(response.body)),
                         h11.EndOfMessage())

    async def _send(self, *events: h11.Event) -> None:
        """Encode ``events`` and write them in one go."""
        await self.stream.send_all(b"".join(self.h11.send(event) or b"" for event in events))

    async def _refuse(self, status: int, reason: str) -> None:
        """Answer malformed HTTP with ``status`` if a response can still be sent."""
        log.debug("malformed HTTP from a client: %s", reason)
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        self.connection.expect(READ_SECONDS)
        try:
            await self._send_response("GET", Response.json({"error": reason}, status))
        except h11.LocalProtocolError:
            return
        await self._linger()

    async def _linger(self) -> None:
        """Before closing, read and drop what the client still sends, briefly.

        Closing a socket with unread input makes the kernel send a reset,
        which can destroy the answer before the client reads it.
        """
        if self.h11.their_state in (h11.DONE, h11.CLOSED, h11.MUST_CLOSE):
            return
        self.connection.expect(LINGER_SECONDS)
        await self.stream.send_eof()
        drained = 0
        while drained < LINGER_BYTES:
            chunk = await self.stream.receive_some(RECEIVE_BYTES)
            if not chunk:
                return
            drained += len(chunk)


def _request(event: h11.Request, receive: Any) -> Request:
    """The handler's view of one h11 request head."""
    path, _, query = event.target.decode("ascii").partition("?")
    headers = {name.decode("latin-1"): value.decode("latin-1")
               for name, value in event.headers}
    return Request(event.method.decode("ascii"), unquote(path),
                   parse_qs(query), headers, receive)


class _WholeBody:
    """``Request``'s receive callable when the whole body has arrived."""

    def __init__(self, body: Bytes) -> None:
        self.body: Bytes = body

    async def __call__(self) -> dict[str, Any]:
        body, self.body = self.body, b""
        return {"type": "http.request", "body": body, "more_body": False}


# ---- simple requests: pure parsing and encoding, no I/O
#
# The grammar is RFC 9112's, narrowed: field values of visible ASCII with
# inner spaces or tabs (no obs-text, no obs-fold), CRLF line ends only.
# Anything outside it is served by h11 instead, never refused here.

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_VALUE = rb"(?:[!-~]+(?:[ \t]+[!-~]+)*)?"
_FIELD = re.compile(rb"(%s):[ \t]*(%s)[ \t]*\r\n" % (_TOKEN, _VALUE))
_SIMPLE_HEAD = re.compile(rb"(%s) ([!-~]+) HTTP/1\.1\r\n((?:%s:[ \t]*%s[ \t]*\r\n)*)\r\n" % (
    _TOKEN, _TOKEN, _VALUE))
_NAME = re.compile(_TOKEN.decode())
_FIELD_VALUE = re.compile(_VALUE.decode())
# request fields that change framing or the connection: h11 handles them
_NOT_SIMPLE = frozenset({"transfer-encoding", "expect", "connection", "upgrade"})
# answer fields h11 would add or act on itself
_NOT_SIMPLE_ANSWER = frozenset({"content-length", "transfer-encoding", "connection", "host"})


class SimpleRequest(NamedTuple):
    method: str
    target: str
    headers: dict[str, str]     # names in lower case
    body: Bytes
    head: bytes                 # the request line and fields as received
    end: int                    # where it ends in the received bytes

    @property
    def raw(self) -> bytes:
        """The request as received."""
        return self.head + self.body


class SimpleHead(NamedTuple):
    """A simple request's head, whole, with its body maybe still arriving."""
    head: re.Match[bytes]
    headers: dict[str, str]
    length: int                 # of the body


def parse_simple_head(data: bytes, start: int = 0,
                      body_max: int = SIMPLE_BODY_MAX) -> SimpleHead | None:
    """The head of the simple request at ``data[start:]`` if all of it is
    there and its body is at most ``body_max`` bytes; None if that request
    must go to h11 (see the module docstring)."""
    head = _SIMPLE_HEAD.match(data, start)
    if head is None:
        return None
    headers: dict[str, str] = {}
    for name, value in _FIELD.findall(head[3]):
        key = name.decode("ascii").lower()
        if key in headers or (key in _NOT_SIMPLE and not (
                key == "connection" and value.lower() == b"keep-alive")):
            return None      # (keep-alive is what HTTP/1.1 does anyway; httpx says it)
        headers[key] = value.decode("ascii")
    length = headers.get("content-length", "0")
    if ("host" not in headers or head[1] == b"CONNECT" or not length.isdigit()
            or len(length) > 9 or int(length) > body_max):
        return None
    return SimpleHead(head, headers, int(length))


def parse_simple(data: bytes, start: int = 0) -> SimpleRequest | None:
    """The simple request at ``data[start:]``, if a whole one is there;
    None if that request must go to h11 (see the module docstring)."""
    simple = parse_simple_head(data, start)
    if simple is None:
        return None
    end = simple.head.end() + simple.length
    if end > len(data):
        return None                             # the body is still arriving
    return simple_request(simple, data[start:simple.head.end()], data[simple.head.end():end], end)


def simple_request(simple: SimpleHead, head: bytes, body: Bytes, end: int) -> SimpleRequest:
    return SimpleRequest(simple.head[1].decode("ascii"), simple.head[2].decode("ascii"),
                         simple.headers, body, head, end)


def encode_simple(method: str, response: Response) -> bytes | None:
    """The bytes h11 would send for ``response`` to a simple ``method``
    request; None if only h11 may frame it (a status without a body, a
    field it manages, or a field h11 would refuse)."""
    head = encode_simple_head(method, response)
    if head is None or method == "HEAD":
        return head
    return head + response.body


def encode_simple_head(method: str, response: Response) -> bytes | None:
    """What ``encode_simple`` sends before the body."""
    if not 200 <= response.status <= 599 or response.status in (204, 304):
        return None
    lines = [b"HTTP/1.1 %d \r\n" % response.status]
    for name, value in response.headers.items():
        if (name.lower() in _NOT_SIMPLE_ANSWER or not name.isascii() or not value.isascii()
                or not _NAME.fullmatch(name) or not _FIELD_VALUE.fullmatch(value)):
            return None
        lines.append(f"{name}: {value}\r\n".encode("ascii"))
    lines.append(b"content-length: %d\r\n\r\n" % len(response.body))
    return b"".join(lines)
