"""The client every part uses to talk to data nodes (docs/DESIGN.md, "Data node HTTP API").

How this works
--------------
One pooled ``httpx.AsyncClient`` (the transport is injectable, for tests
and the simulator) sends the cluster secret with every request.  Addresses
are ``"host:port"``.  Whatever goes wrong, callers see one family of
exceptions, translated once in ``_send`` and ``_check``:

- ``NodeUnavailable``: connection refused, timeout, 5xx other than corrupt
  (``temporary``: worth retrying, ``retry.is_temporary`` honours it);
- ``ObjectNotFound``: 404;
- ``ObjectCorrupted``: the node found its copy corrupt, or the bytes we got
  fail ``blockformat.verify`` here;
- ``NodeFull``: 507;
- ``NodeRejected``: any other 4xx, with the node's message.

Whole objects are verified on this side too (in a worker thread: BLAKE3
releases the GIL), so a corrupted transfer is never handed to a caller.

``get_buffer`` and ``put``, the block reads and writes of every mount,
skip httpx when they can (``_Plain``): the request's head and body are
written on a kept-alive trio socket and the answer's body is received
straight into one buffer of its announced length.  httpx handed a 4 MiB
body over in 64 KiB pieces through several layers of async iterators: 5 ms
of client CPU per block read, over a third of what a mount spends reading
one, and 3 ms per copy written.  An answer not framed by ``content-length``
(or asking to close) is asked for again through httpx, which judges it.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

import httpx
import trio

from . import blockformat
from .auth import auth_header
from .buffers import Buffer, scratch
from .ids import ObjectId

WHOLE_MAX = 1 << 30         # an object answer larger than this is read the plain way
HEAD_MAX = 16 * 1024        # an answer's head longer than this goes to httpx
RECEIVE_BYTES = 64 * 1024
Parts = bytes | Sequence[bytes | memoryview]     # a body, whole or in parts to send in turn
IDLE_KEPT = 8               # idle connections kept per node
_STATUS = re.compile(rb"HTTP/1\.1 ([2-5][0-9][0-9]) [^\r\n]*\r\n")
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]{1,12})[ \t]*\r\n", re.IGNORECASE)
_NOT_PLAIN = re.compile(rb"\r\n(transfer-encoding|connection):", re.IGNORECASE)


class NodeError(Exception):
    """Base of every error talking to a data node."""

    temporary = False

    def __init__(self, address: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{address}: {message}")
        self.address = address
        self.message = message
        self.status = status


class NodeUnavailable(NodeError):
    """The node did not answer, or failed on its side (5xx)."""

    temporary = True


class ObjectNotFound(NodeError):
    """The node holds no such object (404)."""


class ObjectCorrupted(NodeError):
    """The node's copy is corrupt, or the bytes received fail verification."""


class NodeFull(NodeError):
    """The node refuses new objects: disk full or below its reserve (507)."""


class NodeRejected(NodeError):
    """The node refused the request (a 4xx other than 404 and 507)."""


def _node_message(content: bytes, fallback: str) -> str:
    try:
        answer = json.loads(content)
    except ValueError:
        return content[:200].decode("utf-8", "replace") or fallback
    if isinstance(answer, dict) and "error" in answer:
        return str(answer["error"])
    return str(answer)[:200]


def _check(address: str, response: httpx.Response) -> httpx.Response:
    """The response if it is a success; the matching NodeError otherwise."""
    status = response.status_code
    if status < 400:
        return response
    message = "" if response.request.method == "HEAD" else \
        _node_message(response.content, response.reason_phrase)
    raise _error(address, status, message)


def _error(address: str, status: int, message: str) -> NodeError:
    """The NodeError for a failed answer's status and the node's message."""
    if status == 404:
        return ObjectNotFound(address, message or "no such object", status)
    if status == 507:
        return NodeFull(address, message or "node full", status)
    if status == 500 and message == "corrupt":
        return ObjectCorrupted(address, "stored object is corrupt", status)
    if status >= 500:
        return NodeUnavailable(address, message or f"HTTP {status}", status)
    return NodeRejected(address, message or f"HTTP {status}", status)


def _json(address: str, response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise NodeUnavailable(address, "malformed JSON answer", response.status_code) from None


async def _verify(address: str, obj: bytes) -> None:
    try:
        await trio.to_thread.run_sync(blockformat.verify, obj)
    except blockformat.CorruptedObject as exc:
        raise ObjectCorrupted(address, f"received object fails verification: {exc}") from None


READER_VERIFIES = "reader_verifies=1"     # a GET's query: see DataClient.get_buffer


class DataClient:
    """Async client for the data node API; close with ``aclose()``."""

    def __init__(self, secret: str, *, timeout: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None,
                 max_connections: int = 64) -> None:
        self._http = httpx.AsyncClient(
            headers=auth_header(secret), timeout=timeout, transport=transport,
            limits=httpx.Limits(max_connections=max_connections))
        self._plain = _Plain(secret, timeout) if transport is None else None

    async def aclose(self) -> None:
        if self._plain is not None:
            self._plain.close()
        await self._http.aclose()

    async def __aenter__(self) -> "DataClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, method: str, address: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; transport failures become NodeUnavailable, errors NodeError."""
        try:
            response = await self._http.request(method, f"http://{address}{path}", **kwargs)
        except httpx.TransportError as exc:
            raise NodeUnavailable(address, f"{type(exc).__name__}: {exc}") from None
        return _check(address, response)

    async def put(self, address: str, oid: ObjectId, obj: Parts) -> None:
        """Store ``obj`` durably (fine if the identical object is already
        there); ``obj`` may come in parts, sent one after the other."""
        if await self._fast(b"PUT", address, f"/v1/objects/{oid}", obj) is None:
            whole = obj if isinstance(obj, bytes) else b"".join(obj)
            await self._send("PUT", address, f"/v1/objects/{oid}", content=whole)

    async def _fast(self, method: bytes, address: str, path: str, body: Parts = b""
                    ) -> Buffer | None:
        """The body of a success answer through ``_Plain``; a failure's
        NodeError; None if only httpx can do it (then ask again there)."""
        if self._plain is None:
            return None
        try:
            answer = await self._plain.exchange(method, address, path, body)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                trio.TooSlowError) as exc:
            raise NodeUnavailable(address, f"{type(exc).__name__}: {exc}") from None
        if answer is None:
            return None
        status, content = answer
        if status >= 300:
            raise _error(address, status, _node_message(bytes(content), f"HTTP {status}"))
        return content

    async def get(self, address: str, oid: ObjectId,
                  byte_range: tuple[int, int] | None = None, *, verify: bool = True) -> bytes:
        """The whole object, verified here too (``verify=False``: by the
        caller, which decodes it: ``blockformat.decode`` verifies); or the
        half-open span [start, end) of the stored object when ``byte_range``
        is given."""
        if byte_range is None:
            obj = (await self._send("GET", address, f"/v1/objects/{oid}")).content
            if verify:
                await _verify(address, obj)
            return obj
        start, end = byte_range
        if not 0 <= start < end:
            raise ValueError(f"empty or negative byte range {byte_range}")
        response = await self._send("GET", address, f"/v1/objects/{oid}",
                                    headers={"range": f"bytes={start}-{end - 1}"})
        if response.status_code != 206:
            raise NodeRejected(address, f"expected 206 for a range, got {response.status_code}")
        return response.content

    async def get_buffer(self, address: str, oid: ObjectId, *,
                         node_verifies: bool = True) -> bytes | Buffer:
        """The whole stored object, not verified here (the caller decodes
        it, which verifies), received straight into one buffer of the
        announced length: no list of chunks and no join beside it (a 4 MiB
        block in flight cost three copies at once: the mount's memory peak).
        ``node_verifies=False``: the node sends its copy without checking it
        first (the caller checks every byte anyway; if they fail, it asks
        again with the node checking, which puts a bad copy aside)."""
        path = f"/v1/objects/{oid}" if node_verifies else f"/v1/objects/{oid}?{READER_VERIFIES}"
        answer = await self._fast(b"GET", address, path)
        if answer is not None:
            return answer
        try:
            async with self._http.stream("GET", f"http://{address}{path}") as response:
                length = response.headers.get("content-length", "")
                if response.status_code >= 400 or not length.isdigit() \
                        or int(length) > WHOLE_MAX:
                    await response.aread()
                    return _check(address, response).content
                buf = scratch(int(length))
                view, pos = memoryview(buf), 0
                async for chunk in response.aiter_raw():
                    if pos + len(chunk) > len(buf):
                        raise NodeUnavailable(address, "answer longer than its content-length")
                    view[pos:pos + len(chunk)] = chunk
                    pos += len(chunk)
                if pos != len(buf):
                    raise NodeUnavailable(address, f"answer cut at {pos} of {len(buf)} bytes")
                view.release()
                return buf
        except httpx.TransportError as exc:
            raise NodeUnavailable(address, f"{type(exc).__name__}: {exc}") from None

    async def get_pieces(self, address: str, oid: ObjectId, first: int, last: int
                         ) -> bytes | Buffer:
        """The object's header and piece table and the stored bytes of its
        pieces ``first`` .. ``last``, not checked (``blockformat.decode_range``
        checks and decodes them); the whole object from a node or an object
        without pieces."""
        path = f"/v1/objects/{oid}?pieces={first}-{last}"
        answer = await self._fast(b"GET", address, path)
        if answer is not None:
            return answer
        return (await self._send("GET", address, path)).content

    async def head(self, address: str, oid: ObjectId) -> int | None:
        """The stored size of the object, None if the node does not hold it."""
        try:
            response = await self._send("HEAD", address, f"/v1/objects/{oid}")
        except ObjectNotFound:
            return None
        return int(response.headers["content-length"])

    async def delete(self, address: str, oid: ObjectId) -> bool:
        """Remove the object; False if the node did not hold it.  (Through
        ``_Plain`` as reads and writes go: the collector's deletes through
        httpx cost the metadata node ~1 ms of CPU each.)"""
        path = f"/v1/objects/{oid}"
        try:
            if await self._fast(b"DELETE", address, path) is None:
                await self._send("DELETE", address, path)
        except ObjectNotFound:
            return False
        return True

    async def list(self, address: str, after: str = "",
                   limit: int = 1000) -> tuple[list[dict[str, Any]], bool]:
        """Up to ``limit`` ``{"oid", "size"}`` with oid > ``after``, and whether more follow."""
        params: dict[str, str | int] = {"limit": limit}
        if after:
            params["after"] = after
        answer = _json(address, await self._send("GET", address, "/v1/objects", params=params))
        return list(answer["objects"]), bool(answer["more"])

    async def stats(self, address: str) -> dict[str, Any]:
        """``{"node_id", "capacity", "free", "used", "objects"}``."""
        return dict(_json(address, await self._send("GET", address, "/v1/stats")))

    async def health(self, address: str) -> dict[str, Any]:
        """``{"status", "role", "node_id"}`` (needs no secret, sent anyway)."""
        return dict(_json(address, await self._send("GET", address, "/health")))


class _Plain:
    """Whole-object GETs and PUTs on kept-alive sockets (see the module
    docstring); the connections belong to the trio run that made them."""

    def __init__(self, secret: str, timeout: float) -> None:
        self.auth = f"authorization: Bearer {secret}\r\n".encode("ascii")
        self.timeout = timeout
        self.idle: dict[str, list[trio.SocketStream]] = {}
        self.token: object = None

    def close(self) -> None:
        for streams in self.idle.values():
            for stream in streams:
                stream.socket.close()
        self.idle.clear()

    async def exchange(self, method: bytes, address: str, path: str, body: Parts = b""
                       ) -> tuple[int, Buffer] | None:
        """Status and body of the answer to a GET, a DELETE, or a PUT of
        ``body``, if the answer is plain (``content-length`` framing, or a
        204); None for any other (ask httpx).  On a kept connection that
        turns out closed by the node meanwhile, the request is sent again on
        a new one (a GET changes nothing, a PUT of the same object again is
        fine, a DELETE again finds nothing: "not held")."""
        token = trio.lowlevel.current_trio_token()
        if token is not self.token:
            self.close()              # a new run: the old run's sockets are unusable
            self.token = token
        host, _, port = address.rpartition(":")
        request = b"%s %s HTTP/1.1\r\nhost: %s\r\n%scontent-length: %d\r\n\r\n" % (
            method, path.encode("ascii"), address.encode("ascii"), self.auth,
            len(body) if isinstance(body, bytes) else sum(len(part) for part in body))
        with trio.fail_after(self.timeout):
            while True:
                kept = self.idle.get(address)
                stream = kept.pop() if kept else None
                reused = stream is not None
                if stream is None:
                    stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
                try:
                    answer = await self._exchange(stream, request, body)
                except (OSError, trio.BrokenResourceError):
                    stream.socket.close()
                    if reused:
                        continue          # maybe closed by the node while idle
                    raise
                except BaseException:     # cancelled, timed out: its state is unknown
                    stream.socket.close()
                    raise
                if answer is None:
                    stream.socket.close()
                    return None
                streams = self.idle.setdefault(address, [])
                if len(streams) < IDLE_KEPT:
                    streams.append(stream)
                else:
                    stream.socket.close()
                return answer

    @staticmethod
    async def _exchange(stream: trio.SocketStream, request: bytes, body: Parts
                        ) -> tuple[int, Buffer] | None:
        """Send ``request`` and ``body``, read the answer: (status, body), or
        None if the answer is not plain (then the connection is spent)."""
        parts = [body] if isinstance(body, bytes) else list(body)
        if parts and len(parts[0]) <= HEAD_MAX:
            request += parts.pop(0)           # an object's own header: one send with ours
        await stream.send_all(request)
        for part in parts:
            if part:
                await stream.send_all(part)   # a block: not copied to join it to the head
        head = b""
        while (end := head.find(b"\r\n\r\n")) < 0:
            if len(head) > HEAD_MAX:
                return None
            piece = await stream.receive_some(RECEIVE_BYTES)
            if not piece:
                raise trio.BrokenResourceError("connection closed before the answer")
            head += piece
        fields = head[:end + 2]
        status, length = _STATUS.match(fields), _LENGTH.search(fields)
        if status is not None and status[1] == b"204" and length is None \
                and not _NOT_PLAIN.search(fields) and len(head) == end + 4:
            return 204, bytearray()           # no content, by definition (a DELETE's)
        if status is None or length is None or _NOT_PLAIN.search(fields) \
                or int(length[1]) > WHOLE_MAX:
            return None
        buf = scratch(int(length[1]))
        got = head[end + 4:]
        if len(got) > len(buf):
            return None               # more than announced: not an answer to trust
        buf[:len(got)] = got
        view, pos = memoryview(buf), len(got)
        sock = stream.socket
        while pos < len(buf):
            n = await sock.recv_into(view[pos:])
            if n == 0:
                raise trio.BrokenResourceError(f"answer cut at {pos} of {len(buf)} bytes")
            pos += n
        view.release()
        return int(status[1]), buf
