"""The interface every provider implements, and the errors it raises."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Error kinds. A row-level kind may be caused by one bad input, so a failing batch is split to
# find it; the others concern the whole provider and are recorded for every row of the batch.
ROW_LEVEL_KINDS = frozenset({"bad_request", "bad_response", "input_too_long"})
RUN_LEVEL_KINDS = frozenset({"auth", "config"})


class ProviderError(Exception):
    """A failed embedding request. `kind` is one of: rate_limited, server_error, timeout,
    connection, bad_response, bad_request, input_too_long, auth, config."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        # What the provider asked for (Retry-After): the ledger waits at least this long.
        self.retry_after = retry_after

    @property
    def row_level(self) -> bool:
        return self.kind in ROW_LEVEL_KINDS

    @property
    def fails_run(self) -> bool:
        """Errors no retry of single rows can fix (a missing key): the run fails, nothing is cleared."""
        return self.kind in RUN_LEVEL_KINDS


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # shape (len(texts), dimensions), float32
    tokens: int


class EmbeddingProvider(ABC):
    dimensions: int
    max_inputs_per_request: int
    max_tokens_per_request: int
    max_tokens_per_input: int
    max_concurrency: int

    @abstractmethod
    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text, never under the provider's own count (limits are checked with it)."""

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> Embeddings:
        """One request. Raises ProviderError; retries of transient faults happen inside."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class DelegatingProvider(EmbeddingProvider):
    """A provider that wraps another (to meter it, to record what it is sent): it takes the inner
    provider's limits and passes every call through; subclasses override what they observe. Closing
    it leaves the inner provider open, since the inner one is shared (providers.provider_for)."""

    def __init__(self, inner: EmbeddingProvider) -> None:
        self.inner = inner
        self.dimensions = inner.dimensions
        self.max_inputs_per_request = inner.max_inputs_per_request
        self.max_tokens_per_request = inner.max_tokens_per_request
        self.max_tokens_per_input = inner.max_tokens_per_input
        self.max_concurrency = inner.max_concurrency

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.inner.count_tokens(texts)

    def embed(self, texts: Sequence[str]) -> Embeddings:
        return self.inner.embed(texts)


def check_vectors(vectors: np.ndarray, expected_rows: int, dimensions: int) -> np.ndarray:
    """Refuse a response that does not fit the request instead of storing garbage."""
    if vectors.ndim != 2 or vectors.shape[0] != expected_rows:
        raise ProviderError(
            "bad_response", f"expected {expected_rows} vectors, got shape {tuple(vectors.shape)}"
        )
    if vectors.shape[1] != dimensions:
        raise ProviderError(
            "bad_response", f"expected vectors of {dimensions} dimensions, got {vectors.shape[1]}"
        )
    if not np.isfinite(vectors).all():
        raise ProviderError("bad_response", "response contains NaN or infinite values")
    if (np.abs(vectors).max(axis=1) == 0).any():
        raise ProviderError("bad_response", "response contains an all-zero vector")
    return vectors.astype(np.float32, copy=False)
