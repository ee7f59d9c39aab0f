"""The client of the metadata node RPC, used by every other part of objfs.

``await client.call("mkdir", vol=1, parent=1, name=b"x", mode=0o755, uid=0,
gid=0)`` returns the method's result.  Errors come in three kinds, mapped
here once: ``MetaError`` (a filesystem errno the node answered),
``MetaUnavailable`` (transport failure or a 5xx: temporary, try again or
elsewhere) and ``BadRequest`` (the node refused the request as malformed or
unauthorized: a bug or a misconfiguration, never retried).
"""

from __future__ import annotations

from typing import Any

import httpx
import msgpack

from .auth import auth_header
from .metastate import BadRequest, MetaError

__all__ = ["MetaClient", "MetaError", "MetaUnavailable", "BadRequest"]


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
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.address = address
        self._http = httpx.AsyncClient(
            base_url=f"http://{address}", headers=auth_header(secret),
            timeout=timeout, transport=transport)

    async def call(self, method: str, **args: Any) -> Any:
        """Call ``method`` with ``args``; its result, or MetaError / MetaUnavailable."""
        body = msgpack.packb({"method": method, "args": args}, use_bin_type=True)
        try:
            response = await self._http.post(
                "/v1/rpc", content=body, headers={"content-type": "application/msgpack"})
        except httpx.HTTPError as exc:
            sent = not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
            raise MetaUnavailable(f"{self.address}: {method}: {exc!r}", sent) from exc
        return self._answer(method, response)

    def _answer(self, method: str, response: httpx.Response) -> Any:
        if response.status_code >= 500:
            raise MetaUnavailable(f"{self.address}: {method}: HTTP {response.status_code}")
        if response.status_code != 200:
            raise BadRequest(f"{self.address}: {method}: HTTP {response.status_code} "
                             f"{response.text[:200]}")
        try:
            answer = msgpack.unpackb(response.content, raw=False)
        except ValueError as exc:
            raise MetaUnavailable(f"{self.address}: {method}: garbled answer") from exc
        if not isinstance(answer, dict):
            raise MetaUnavailable(f"{self.address}: {method}: garbled answer")
        if "errno" in answer:
            raise MetaError(answer["errno"], answer.get("error", ""))
        return answer["result"]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "MetaClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
