"""Provider requests of the pipeline, and the isolation of poison inputs. Free of Dagster.

A request is filled across pages (a page's last, partial batch is topped up by the next page
instead of going out half empty). When a request fails for a reason one input can cause, it is
halved until the bad inputs are alone, so the rest of the batch is still stored and only the bad
rows go to the ledger.
"""

from __future__ import annotations

import time
from concurrent.futures import Future

import numpy as np

from .providers.base import EmbeddingProvider, ProviderError
from .sync_stats import SyncStats

# What one request came back with, per part it was split into: its figures, vectors and errors.
Outcome = list[tuple[SyncStats, dict[bytes, np.ndarray], dict[bytes, ProviderError]]]


class Batch:
    """One provider request. Sent when full, or when a page that needs it is due."""

    def __init__(self, bucket: int) -> None:
        self.items: list[tuple[bytes, str]] = []
        self.tokens = 0
        self.bucket = bucket  # provider figures are booked to the bucket of its first text
        self.future: Future[Outcome] | None = None
        self.waiting = 0  # unwritten pages that need its vectors
        self.booked = False

    def done(self) -> bool:
        return self.future is not None and self.future.done()


def embed_isolating(provider: EmbeddingProvider, batch: list[tuple[bytes, str]]) -> Outcome:
    """One request; if it fails for a reason one input can cause, halve the batch until the bad
    inputs are alone. A failure of the whole run (auth, config) is raised."""
    stats = SyncStats(provider_requests=1)
    started = time.perf_counter()
    try:
        result = provider.embed([t for _, t in batch])
    except ProviderError as exc:
        stats.provider_seconds = time.perf_counter() - started
        if exc.fails_run:
            raise
        if exc.row_level and len(batch) > 1:
            middle = len(batch) // 2
            return ([(stats, {}, {})] + embed_isolating(provider, batch[:middle])
                    + embed_isolating(provider, batch[middle:]))
        return [(stats, {}, {h: exc for h, _ in batch})]
    stats.provider_seconds = time.perf_counter() - started
    stats.tokens = result.tokens
    stats.chunks_embedded = len(batch)
    return [(stats, {h: v for (h, _), v in zip(batch, result.vectors)}, {})]
