"""Provider requests of the pipeline, and the isolation of poison inputs. Free of Dagster.

A request is filled across pages (a page's last, partial batch is topped up by the next page
instead of going out half empty). When a request fails for a reason one input can cause, it is
halved until the bad inputs are alone, so the rest of the batch is still stored and only the bad
rows go to the ledger.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
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
        self.bucket = bucket  # the bucket of its first text: the request itself is counted there
        # Each text's bucket, and the tokens each bucket sends: the provider's figures are shared
        # out by them, so each partition shows what its own rows cost.
        self.bucket_of: dict[bytes, int] = {}
        self.bucket_tokens: Counter[int] = Counter()
        self.future: Future[Outcome] | None = None
        self.waiting = 0  # unwritten pages that need its vectors
        self.booked = False

    def done(self) -> bool:
        return self.future is not None and self.future.done()

    def book(self, stats_of: Callable[[int], SyncStats], part: SyncStats, vectors: dict[bytes, np.ndarray]) -> None:
        """A request's figures, by bucket: chunks embedded exactly, tokens and provider seconds in
        proportion to the tokens each bucket sent (the provider reports one total per request)."""
        stats_of(self.bucket).provider_requests += part.provider_requests
        total = sum(self.bucket_tokens.values())
        shares = sorted(self.bucket_tokens.items()) if total else [(self.bucket, 1)]
        total = total or 1
        chunks = Counter(self.bucket_of.get(h, self.bucket) for h in vectors)
        tokens_left = part.tokens
        for i, (bucket, sent) in enumerate(shares):
            stats = stats_of(bucket)
            tokens = tokens_left if i == len(shares) - 1 else round(part.tokens * sent / total)
            tokens_left -= tokens
            stats.tokens += tokens
            stats.provider_seconds += part.provider_seconds * sent / total
            stats.chunks_embedded += chunks.pop(bucket, 0)
        for bucket, n in chunks.items():
            stats_of(bucket).chunks_embedded += n


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
