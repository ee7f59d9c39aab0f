"""The one place that decides what is a temporary failure and how to retry it.

Bounded exponential backoff with full jitter under an overall deadline.
The clock and the random source are injectable for tests.
"""

from __future__ import annotations

import random
from typing import Awaitable, Callable, TypeVar

import httpx
import trio

T = TypeVar("T")

TEMPORARY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def is_temporary(exc: BaseException) -> bool:
    """Would the same request plausibly succeed if tried again later?"""
    if isinstance(flag := getattr(exc, "temporary", None), bool):
        return flag     # errors that know, e.g. dataclient.NodeError
    if isinstance(exc, (httpx.TransportError, trio.BrokenResourceError, ConnectionError)):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in TEMPORARY_STATUS
    return False


def backoff(attempt: int, base: float = 0.05, cap: float = 2.0,
            rng: random.Random | None = None) -> float:
    """Seconds to wait before try number ``attempt`` (1-based), full jitter."""
    r = rng or random
    return r.uniform(0, min(cap, base * (2 ** (attempt - 1))))


async def retrying(call: Callable[[], Awaitable[T]], *, deadline: float,
                   temporary: Callable[[BaseException], bool] = is_temporary,
                   rng: random.Random | None = None) -> T:
    """Run ``call`` until it succeeds, fails permanently, or ``deadline`` passes.

    ``deadline`` is in ``trio.current_time()`` units.  The last error is
    re-raised when time runs out.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except Exception as exc:
            if not temporary(exc):
                raise
            delay = backoff(attempt, rng=rng)
            if trio.current_time() + delay >= deadline:
                raise
            await trio.sleep(delay)
