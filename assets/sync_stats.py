"""What a run did, per bucket: the figures every caller reports (Dagster metadata, the CLI, bench)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, fields


@dataclass
class SyncStats:
    rows_seen: int = 0
    rows_written: int = 0
    rows_unchanged: int = 0
    rows_deleted: int = 0
    rows_skipped: int = 0
    rows_failed: int = 0
    chunks_written: int = 0
    chunks_embedded: int = 0
    chunks_reused: int = 0
    tokens: int = 0
    provider_requests: int = 0
    provider_seconds: float = 0.0
    changes_cleared: int = 0
    # Batch mode (assets/batch_fill.py): batches sent, and the lines and tokens of the batches
    # collected (billed at the batch price; their vectors are stored by the sweep, as reused).
    batches_submitted: int = 0
    batch_lines: int = 0
    batch_tokens: int = 0
    seconds: float = 0.0
    # (seconds from logging to clearing, keys in the entry) of each change-log entry cleared:
    # the commit-to-embedding lag, weighted by the keys it held (a sweep request counts as one).
    change_lags: list[tuple[float, int]] = field(default_factory=list)

    def merge(self, other: SyncStats) -> None:
        for f in fields(self):
            mine = getattr(self, f.name)
            if isinstance(mine, list):
                mine.extend(getattr(other, f.name))
            else:
                setattr(self, f.name, mine + getattr(other, f.name))

    def as_dict(self) -> dict[str, float]:
        """The counters and timings (the lags are a distribution: see change_lags)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "change_lags"}


def count_by_bucket(buckets: Iterable[tuple[int]]) -> Counter[int]:
    """How many rows a `... RETURNING bucket` statement returned per bucket."""
    return Counter(b for (b,) in buckets)
