"""What the admin programs share: synchronous calls to the metadata node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from storagenode.auth import load_secret
from storagenode.metaclient import MetaClient


def sync_call(meta: str, secret_file: Path, method: str, **args: Any) -> Any:
    """Call one metadata RPC from synchronous code."""
    secret = load_secret(secret_file)

    async def call() -> Any:
        client = MetaClient(meta, secret, timeout=10.0)
        try:
            return await client.call(method, **args)
        finally:
            await client.aclose()

    return trio.run(call)
