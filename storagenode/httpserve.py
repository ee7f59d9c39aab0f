"""What the node roles' HTTP handlers see: a small request object with a
bounded body reader, and response helpers.  Handlers raise ``HTTPError``
for client errors; anything else becomes a logged 500 (``respond``).
``h11serve`` speaks HTTP/1.1 and runs them (both roles).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

from .buffers import Bytes


log = logging.getLogger(__name__)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


@dataclass
class Response:
    status: int
    body: Bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, value: Any, status: int = 200) -> "Response":
        return cls(status, json.dumps(value).encode(),
                   {"content-type": "application/json"})

    @classmethod
    def text(cls, text: str, status: int = 200, ctype: str = "text/plain") -> "Response":
        return cls(status, text.encode(), {"content-type": ctype})


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    _receive: Callable[[], Awaitable[dict[str, Any]]]

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    async def body(self, limit: int) -> bytes:
        """The whole request body; HTTPError 413 past ``limit`` bytes."""
        whole = await self.body_buffer(limit)
        return whole if isinstance(whole, bytes) else bytes(whole)

    async def body_buffer(self, limit: int) -> Bytes:
        """The whole request body as ``body`` gives it, but a body that
        arrived in one buffer (one the server read whole before the handler
        ran: ``h11serve.Eager``) is that buffer, not a copy."""
        declared = self.header("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPError(413, f"body larger than the limit of {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise HTTPError(400, "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"body larger than the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


Handler = Callable[[Request], Awaitable[Response]]


async def respond(handle: Handler, request: Request) -> Response:
    """``handle``'s response; HTTPError becomes its status, any other error a logged 500."""
    try:
        return await handle(request)
    except HTTPError as exc:
        return Response.json({"error": exc.message, **exc.extra}, exc.status)
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return Response.json({"error": "internal error"}, 500)
