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
"""

from __future__ import annotations

from typing import Any

import httpx
import trio

from . import blockformat
from .auth import auth_header
from .ids import ObjectId

WHOLE_MAX = 1 << 30         # an object answer larger than this is read the plain way


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


def _node_message(response: httpx.Response) -> str:
    try:
        answer = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(answer, dict) and "error" in answer:
        return str(answer["error"])
    return str(answer)[:200]


def _check(address: str, response: httpx.Response) -> httpx.Response:
    """The response if it is a success; the matching NodeError otherwise."""
    status = response.status_code
    if status < 400:
        return response
    message = _node_message(response) if response.request.method != "HEAD" else ""
    if status == 404:
        raise ObjectNotFound(address, message or "no such object", status)
    if status == 507:
        raise NodeFull(address, message or "node full", status)
    if status == 500 and message == "corrupt":
        raise ObjectCorrupted(address, "stored object is corrupt", status)
    if status >= 500:
        raise NodeUnavailable(address, message or f"HTTP {status}", status)
    raise NodeRejected(address, message or f"HTTP {status}", status)


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


class DataClient:
    """Async client for the data node API; close with ``aclose()``."""

    def __init__(self, secret: str, *, timeout: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None,
                 max_connections: int = 64) -> None:
        self._http = httpx.AsyncClient(
            headers=auth_header(secret), timeout=timeout, transport=transport,
            limits=httpx.Limits(max_connections=max_connections))

    async def aclose(self) -> None:
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

    async def put(self, address: str, oid: ObjectId, obj: bytes) -> None:
        """Store ``obj`` durably (fine if the identical object is already there)."""
        await self._send("PUT", address, f"/v1/objects/{oid}", content=obj)

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

    async def get_buffer(self, address: str, oid: ObjectId) -> bytes | bytearray:
        """The whole stored object, not verified (the caller decodes it, which
        verifies), received straight into one buffer of the announced length:
        no list of chunks and no join beside it (a 4 MiB block in flight
        cost three copies at once: the mount's memory peak)."""
        try:
            async with self._http.stream("GET", f"http://{address}/v1/objects/{oid}"
                                         ) as response:
                length = response.headers.get("content-length", "")
                if response.status_code >= 400 or not length.isdigit() \
                        or int(length) > WHOLE_MAX:
                    await response.aread()
                    return _check(address, response).content
                buf = bytearray(int(length))
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

    async def head(self, address: str, oid: ObjectId) -> int | None:
        """The stored size of the object, None if the node does not hold it."""
        try:
            response = await self._send("HEAD", address, f"/v1/objects/{oid}")
        except ObjectNotFound:
            return None
        return int(response.headers["content-length"])

    async def delete(self, address: str, oid: ObjectId) -> bool:
        """Remove the object; False if the node did not hold it."""
        try:
            await self._send("DELETE", address, f"/v1/objects/{oid}")
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
