"""Full garbage collections paced by connection churn, for a collector tuned to run rarely.

``python -m aether`` freezes what it loaded at start and raises the collector's thresholds
(``aether.main.tune_garbage_collector``): a full collection then waits for tens of millions of
allocations, so whatever sits in a reference cycle stays in memory that long. Aether keeps its
own objects out of cycles; two per-connection cycles belong to the libraries under it:

- Hypercorn's ``TCPServer`` and its protocol refer to each other: about 2 KiB per connection;
- wsproto's ``FrameProtocol`` holds a generator that holds it until a close frame ends the
  generator: a WebSocket whose peer vanished without one keeps its permessage-deflate state
  (zlib's buffers: about 45 KiB of RSS each, measured) until a collection.

A connection that lived through a young collection is in the oldest generation when it closes,
so only a full collection frees what it leaves. ``FullCollectionPacer`` runs one once as many
WebSockets closed since the last as are open now (at least ``MIN_CLOSES``): the garbage waiting
stays below what the open connections hold themselves, and the collections cost each closed
connection about one open connection's scan.

Measured on the 2-core VM (permessage-deflate WebSockets open, nothing else running): a full
collection takes about 0.2 ms per open connection (100 open: 5-10 ms; 500: 70 ms; 1,500:
240-280 ms; 3,000: 0.8 s), a pause every stream sees; paced so, 0.2-0.3 ms per closed connection.

@.architecture
role: garbage collection pacing
jobs: [cleanup]
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# Below this many closes, a full collection costs more per close than it frees (and the garbage
# of 100 vanished deflate connections is about 5 MiB).
MIN_CLOSES = 100


class FullCollectionPacer:
    """Counts closed connections; off until ``enable`` (the collector's own schedule is enough
    at CPython's default thresholds)."""

    def __init__(self, collect: Callable[[], int] = gc.collect) -> None:
        self._collect = collect
        self._min_closes: int | None = None
        self._closes = 0

    def enable(self, min_closes: int = MIN_CLOSES) -> None:
        self._min_closes = min_closes
        self._closes = 0

    def disable(self) -> None:
        self._min_closes = None

    def freeze_started(self) -> None:
        """The application has started: collect what starting it left, then freeze what is
        alive out of every later collection's scan. What ``python -m aether`` froze before
        starting was its modules; starting loads more (the agentic path's warm-up imports Open
        Interpreter and LiteLLM: about 300,000 objects, which a full collection took 0.2 s to
        scan, a pause every stream saw). Only when enabled: a test process is left as it is."""
        if self._min_closes is None:
            return
        started = time.perf_counter()
        self._collect()
        gc.freeze()
        log.debug(
            "%d objects frozen at start in %.1f ms",
            gc.get_freeze_count(),
            (time.perf_counter() - started) * 1000,
        )

    def connection_closed(self, still_open: int) -> None:
        """Called once per closed connection, with the number still open."""
        if self._min_closes is None:
            return
        self._closes += 1
        if self._closes < max(self._min_closes, still_open):
            return
        closes, self._closes = self._closes, 0
        started = time.perf_counter()
        collected = self._collect()
        log.debug(
            "full collection after %d closed connections (%d open): %d objects in %.1f ms",
            closes,
            still_open,
            collected,
            (time.perf_counter() - started) * 1000,
        )


FULL_COLLECTIONS = FullCollectionPacer()
