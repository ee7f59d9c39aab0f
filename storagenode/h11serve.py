"""HTTP/1.1 serving for the metadata role: h11 driven by hand over trio streams.

The metadata RPC is many tiny requests, each one on the critical path of a
FUSE operation, so the per-request cost of the HTTP layer matters more than
its features.  This module serves the same handlers as ``httpserve`` (they
take a ``Request`` and return a ``Response`` or raise ``HTTPError``) for
well under half of Hypercorn's CPU per request (numbers: docs/DESIGN.md).

How this works
--------------
``serve`` listens and runs one task per accepted connection.  At most
``MAX_CONNECTIONS`` connections are open at once; one past that is closed
at once without being read (the client sees a reset and tries again later).

A connection is an ``h11.Connection``, a pure state machine: bytes received
go in, events (``Request``, ``Data``, ``EndOfMessage``) come out; events
to send go in, bytes come out.  The task loops, one request at a time:

1. wait for the request head;
2. hand the handler a ``Request`` whose body is read only when the handler
   asks (``await request.body(limit)``, the one place that enforces the
   limit with 413), each read that has to wait bounded by ``READ_SECONDS``;
3. send the response head, body and end in one write;
4. start the next cycle, unless either side ends the connection.  Bytes of
   a pipelined next request stay buffered in the state machine until then.
   Steps 3 and 1 of the next cycle together get ``IDLE_SECONDS``: so an idle
   keep-alive connection, one trickling its head, or one not reading its
   answers is closed.

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
from typing import Any
from urllib.parse import parse_qs, unquote

import h11
import trio

from .httpserve import Handler, HTTPError, Request, Response, respond

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 1024
MAX_HEADER_BYTES = 64 * 1024
IDLE_SECONDS = 75.0          # to send an answer and receive the next request head
READ_SECONDS = 30.0          # for each read of a request body that has to wait
LINGER_SECONDS = 1.0         # draining an unread body before closing
LINGER_BYTES = 16 * 1024 * 1024
RECEIVE_BYTES = 64 * 1024

# what a client can cause on the wire; ends its connection quietly
_NETWORK_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def serve(handle: Handler, bind: str, *, max_connections: int = MAX_CONNECTIONS,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``handle`` on ``bind`` ("host:port", port 0 for any) until cancelled.

    ``task_status.started`` gets the bound addresses as "host:port" strings.
    """
    host, port = split_bind(bind)
    listeners = await trio.open_tcp_listeners(port, host=host)
    server = _Server(handle, max_connections)
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

    def __init__(self, handle: Handler, max_connections: int) -> None:
        self.handle = handle
        self.max_connections = max_connections
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
            await serve_stream(self.handle, stream)
        finally:
            self.open -= 1
            self.refused = 0


async def serve_stream(handle: Handler, stream: trio.abc.HalfCloseableStream) -> None:
    """Serve HTTP/1.1 requests arriving on ``stream`` until either side ends it,
    then close it.  Never raises but for cancellation."""
    try:
        async with stream:
            await _Connection(stream, handle).run()
    except _NETWORK_ERRORS as exc:
        log.debug("connection ended: %r", exc)
    except Exception:
        log.exception("bug serving a connection; closing it")


class _Connection:
    """One client connection: its h11 state machine and the request loop.

    One cancel scope, the watchdog, spans the connection; its deadline is
    moved as the connection waits for the client (for a request head, a
    piece of body, a write) and lifted while the handler works.  Moving a
    deadline costs far less than a cancel scope per read.
    """

    def __init__(self, stream: trio.abc.HalfCloseableStream, handle: Handler) -> None:
        self.stream = stream
        self.handle = handle
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.watchdog = trio.CancelScope(deadline=trio.current_time() + IDLE_SECONDS)
        self.peer_closed = False

    async def run(self) -> None:
        """Serve requests one at a time until either side ends the connection."""
        with self.watchdog:
            while await self._cycle():
                self.h11.start_next_cycle()

    async def _cycle(self) -> bool:
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

    def _expect(self, seconds: float) -> None:
        """Give the client at most ``seconds`` from now, or drop the connection."""
        self.watchdog.deadline = trio.current_time() + seconds

    async def _next_event(self) -> Any:
        while (event := self.h11.next_event()) is h11.NEED_DATA:
            data = bytes(await self.stream.receive_some(RECEIVE_BYTES))
            self.peer_closed = not data
            self.h11.receive_data(data)
        return event

    async def _answer(self, event: h11.Request) -> None:
        request = _request(event, self._receive)
        self.watchdog.deadline = math.inf      # the handler takes the time it needs
        response = await respond(self.handle, request)
        self._skip_unread_body()
        self._expect(IDLE_SECONDS)             # for the answer and the next request
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
            if self.peer_closed:
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
        self._expect(READ_SECONDS)
        try:
            if self.h11.client_is_waiting_for_100_continue:
                await self._send(h11.InformationalResponse(status_code=100, headers=[]))
            return await self._next_event()
        finally:
            self.watchdog.deadline = math.inf

    async def _send_response(self, method: str, response: Response) -> None:
        headers = list(response.headers.items())
        if "content-length" not in response.headers:
            headers.append(("content-length", str(len(response.body))))
        if self.h11.their_state is not h11.DONE:
            headers.append(("connection", "close"))   # unread body: the stream is lost
        await self._send(h11.Response(status_code=response.status, headers=headers),
                         h11.Data(data=b"" if method == "HEAD" else response.body),
                         h11.EndOfMessage())

    async def _send(self, *events: h11.Event) -> None:
        """Encode ``events`` and write them in one go."""
        await self.stream.send_all(b"".join(self.h11.send(event) or b"" for event in events))

    async def _refuse(self, status: int, reason: str) -> None:
        """Answer malformed HTTP with ``status`` if a response can still be sent."""
        log.debug("malformed HTTP from a client: %s", reason)
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        self._expect(READ_SECONDS)
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
        self._expect(LINGER_SECONDS)
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
