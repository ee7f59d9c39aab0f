"""HTTP serving for the node roles: a thin ASGI layer run by Hypercorn on trio.

Hypercorn (its trio worker) speaks HTTP; this module gives the roles a small
request object with a bounded body reader, and response helpers.  Handlers
raise ``HTTPError`` for client errors; anything else becomes a logged 500
(``respond``).  ``h11serve`` serves the same handlers without Hypercorn, for
the metadata role, where the cost per small request matters most.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

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
    body: bytes = b""
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
                return b"".join(chunks)


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


def asgi_app(handle: Handler) -> Callable[..., Awaitable[None]]:
    """Wrap a request handler as an ASGI application."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        request = Request(
            scope["method"], scope["path"],
            parse_qs(scope.get("query_string", b"").decode("latin-1")),
            {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]},
            receive)
        response = await respond(handle, request)
        headers = [(k.encode(), v.encode()) for k, v in response.headers.items()]
        if "content-length" not in response.headers:
            headers.append((b"content-length", str(len(response.body)).encode()))
        await send({"type": "http.response.start", "status": response.status,
                    "headers": headers})
        body = response.body if request.method != "HEAD" else b""
        await send({"type": "http.response.body", "body": body})

    return app


async def serve(handle: Handler, bind: str, *,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``handle`` on ``bind`` ("host:port") until cancelled."""
    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    config.h11_max_incomplete_size = 64 * 1024
    config.graceful_timeout = 2
    await hypercorn_serve(asgi_app(handle), config, task_status=task_status)  # type: ignore[arg-type]
