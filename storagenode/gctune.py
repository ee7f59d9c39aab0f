"""The cyclic garbage collector, tuned for long-running servers.

CPython runs a young-generation collection every 700 container
allocations.  A mount or node allocates several per request (trio's tasks
and cancel scopes, request dicts, attribute dicts), so the collector ran
every few requests and walked the young objects each time: sequential
mkdir went from 3,870-4,060 to 4,230-4,760 per second, and rmdir from
7,530-9,030 to 8,790-9,510, with the settings below (three runs each,
alternated, on one local cluster).  Everything made while starting (modules,
classes, the parsed configuration) is frozen: no collection looks at it
again.  Garbage in cycles is collected all the same, after more
allocations: the young generation holds at most ``YOUNG`` objects.
"""

from __future__ import annotations

import gc

YOUNG = 50_000           # allocations between young collections (CPython: 700)
OLDER = 20               # young collections per middle one, middle per full (10)


def tune() -> None:
    """Freeze what exists now and collect less often (see the module text)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG, OLDER, OLDER)
